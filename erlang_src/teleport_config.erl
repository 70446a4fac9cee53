%% @doc teleport's settings, read from the `teleport' application environment.
%%
%% <table>
%% <tr><th>Key</th><th>Default</th><th>Meaning</th></tr>
%% <tr><td>`pool_size'</td><td>2</td><td>connections per peer node, each one way (ours to the peer; the peer's pool carries the other way). A sender's messages always take one connection; the connections share the node's I/O threads, so more of them than I/O threads add queues, not parallelism (the ring benchmark, one I/O thread, teleport's mean trip: 0.36-0.38 s at 1, 0.37-0.39 s at 2, 0.35 s at 4, interleaved in one run). Each costs a descriptor at each end, no thread (a 50-node cluster at 2: 196 descriptors per node)</td></tr>
%% <tr><td>`io_threads'</td><td>`auto': a quarter of the schedulers online, at least 1, at most 16</td><td>threads that read and write every teleport socket of this node, whatever the number of peers and connections</td></tr>
%% <tr><td>`listen_ip'</td><td>`{0,0,0,0}'</td><td>address the listener binds</td></tr>
%% <tr><td>`listen_port'</td><td>`0' (any)</td><td>port the listener binds</td></tr>
%% <tr><td>`max_frame_bytes'</td><td>512 MiB</td><td>largest encoded message sent or accepted</td></tr>
%% <tr><td>`send_queue_bytes'</td><td>64 MiB</td><td>per connection; past it senders wait</td></tr>
%% <tr><td>`sndbuf'</td><td>`auto'</td><td>the kernel send buffer (`SO_SNDBUF', as inet's `sndbuf') of each connection this node dials. `auto' (Linux; elsewhere as `kernel'): 512 KiB on a connection whose round trip, as TCP measured it during the handshake, is under 1 ms, else as `kernel'. A peer's kernel does not acknowledge bytes its reader has not read, so this bounds what waits unread at the peer: on loopback with many busy connections it then stays in the CPU caches (the ring's mean trip 0.31-0.36 s against 0.44-0.46 s under `kernel'); it also caps a connection at about 1 MiB per round trip (1 GB/s at 1 ms), hence only on short paths. `kernel': never set (Linux grows it up to `net.ipv4.tcp_wmem''s maximum). Bytes (at least 65536): always that much (the kernel doubles it and caps it at `net.core.wmem_max'). `teleport:stats/1' shows each outbound connection's `send_buffer' as the kernel reports it</td></tr>
%% <tr><td>`connect_timeout'</td><td>5000 ms</td><td>TCP connect to a peer</td></tr>
%% <tr><td>`handshake_timeout'</td><td>5000 ms</td><td>whole cookie handshake, both directions</td></tr>
%% <tr><td>`max_pending_handshakes'</td><td>64</td><td>inbound handshakes in progress at once; more connections are closed at accept</td></tr>
%% <tr><td>`max_pending_handshakes_per_ip'</td><td>8</td><td>of those, how many one source (IPv4 address, IPv6 /64) may hold</td></tr>
%% <tr><td>`max_handshake_failures_per_ip'</td><td>100</td><td>inbound handshakes one source (as above) may fail in a burst, counting those in progress (wrong cookie or certificate, garbage, a client that hangs up or times out); past it the source's connections are closed at accept, before any handshake work. It gets a tenth of the burst back each second (10/s at the default), and one back for each of its handshakes that succeeds, so a host whose handshakes mostly succeed is never refused, however many it makes; a misconfigured node's retries back off far below it. Refusals are counted in `listener_stats()''s `throttled_handshakes' and logged as `handshake_failed' with reason `throttled'. `infinity': no limit</td></tr>
%% <tr><td>`io_chunk_bytes'</td><td>`infinity'</td><td>most bytes per socket read or write (at least 4096); on a kernel that does not preempt inside system calls, chunks keep bulk transfers from holding a core for milliseconds (lower latency for everything else on the node; bulk throughput ~10-15% lower at 262144, ~25-30% at 65536; see README, "Bulk transfers beside latency-sensitive traffic")</td></tr>
%% <tr><td>`io_thread_priority'</td><td>`normal'</td><td>`idle' (Linux only): the I/O threads run only on CPU the rest of the machine leaves unused, so bulk transfers stop delaying the VM's own work; with `io_chunk_bytes' 65536 a disterl call's p99 beside 4 x 10 MiB streams on 2 cores stayed within 1.7-2.8x of idle. A node that keeps every core busy starves its teleport traffic</td></tr>
%% <tr><td>`reader_busy_wait_us'</td><td>100</td><td>how long an I/O thread that finds nothing to do polls its sockets (giving the core to any thread that wants it) before sleeping, 0 to never poll. Only after the previous wait was shorter than this and no bulk frame since: request/response traffic polls, sparse or bulk traffic does not. A message caught while polling reaches its process one thread wake-up sooner (ping-pong p50 ~20% lower on 2 cores), for up to this much CPU per message, like the VM's own scheduler busy wait (`+sbwt')</td></tr>
%% <tr><td>`decode_on_scheduler'</td><td>`auto'</td><td>which arriving messages are decoded on a dirty scheduler instead of the connection's I/O thread: `auto' only where this VM cannot build them off a scheduler (maps over 32 keys, and funs, on OTP 25 before 25.3.2.18, 26 before 26.2.5.9 and 27 before 27.3, whose VM crashes doing so: OTP GH-8208); `always' for every message holding such a map or a fun (slower: one more hand-off per message; for tests)</td></tr>
%% <tr><td>`tls'</td><td>`disabled'</td><td>TLS 1.3 on every teleport connection, both ways, with mutual certificates: `#{certfile => Path, keyfile => Path, cacertfile => Path}' (PEM; each side presents its certificate and checks the other's chain against `cacertfile'; the cookie handshake still runs, inside TLS). Optional keys: `verify' (`verify_peer', the default, or `verify_none': no certificate is checked, still encrypted; for tests only), `server_name_check' (`true', the default: a dialing node checks the server's certificate names the host part of the node name it dials, as `server_name_indication' does in `inet_tls_dist'; `false' for clusters whose certificates carry no host names), `client_name_check' (`true', the default: a listener checks the dialing node's certificate names the host part of the node name it claims, so a holder of one node's certificate cannot speak as a node of another host; `false' likewise), `ciphers' (TLS 1.3 suites as strings, of `"TLS_AES_256_GCM_SHA384"', `"TLS_AES_128_GCM_SHA256"', `"TLS_CHACHA20_POLY1305_SHA256"'; default all). Every node of the cluster needs the same setting. Unreadable files or a key that does not match: `application:start(teleport)' returns `{error, _}'. Linux and FreeBSD builds only</td></tr>
%% <tr><td>`peer_addresses'</td><td>`#{}'</td><td>`#{Node => {IP, Port}}': skip the lookup over distributed Erlang</td></tr>
%% </table>
-module(teleport_config).

-export([get/0, get/1, validate/2, defaults/0, io_threads/1]).

-type key() :: pool_size | io_threads | listen_ip | listen_port | max_frame_bytes | send_queue_bytes
             | sndbuf | connect_timeout | handshake_timeout | max_pending_handshakes
             | max_pending_handshakes_per_ip | max_handshake_failures_per_ip
             | io_chunk_bytes | io_thread_priority
             | reader_busy_wait_us | decode_on_scheduler | tls | peer_addresses.
-export_type([key/0]).

%% @doc Every setting, defaults filled in; raises `{invalid_config, Key, Value}'.
-spec get() -> #{key() => term()}.
get() ->
    maps:map(fun(Key, Default) ->
                     validate(Key, application:get_env(teleport, Key, Default))
             end, defaults()).

%% @doc One setting, validated.
-spec get(key()) -> term().
get(Key) ->
    validate(Key, application:get_env(teleport, Key, maps:get(Key, defaults()))).

%% @doc Every setting's default, as in the table above.
-spec defaults() -> #{key() => term()}.
defaults() ->
    #{pool_size => 2,
      io_threads => auto,
      listen_ip => {0, 0, 0, 0},
      listen_port => 0,
      max_frame_bytes => 512 * 1024 * 1024,
      send_queue_bytes => 64 * 1024 * 1024,
      sndbuf => auto,
      connect_timeout => 5000,
      handshake_timeout => 5000,
      max_pending_handshakes => 64,
      max_pending_handshakes_per_ip => 8,
      max_handshake_failures_per_ip => 100,
      io_chunk_bytes => infinity,
      io_thread_priority => normal,
      reader_busy_wait_us => 100,
      decode_on_scheduler => auto,
      tls => disabled,
      peer_addresses => #{}}.

%% @doc Returns `Value' if it is acceptable for `Key', else raises.
-spec validate(key(), term()) -> term().
validate(pool_size, N) when is_integer(N), N >= 1, N =< 256 -> N;
validate(io_threads, auto) -> auto;
validate(io_threads, N) when is_integer(N), N >= 1, N =< 256 -> N;
validate(listen_ip, Ip) when is_tuple(Ip) -> valid_ip(listen_ip, Ip);
validate(listen_port, P) when is_integer(P), P >= 0, P =< 65535 -> P;
validate(max_frame_bytes, N) when is_integer(N), N >= 1024, N =< 16#FFFFFFFF -> N;
validate(send_queue_bytes, N) when is_integer(N), N >= 1024 -> N;
validate(sndbuf, auto) -> auto;
validate(sndbuf, kernel) -> kernel;
%% Below 64 KiB a loopback sender stalls: one segment can be 64 KiB, and the peer's
%% delayed ACK (up to 40 ms) is then all that frees the buffer.
validate(sndbuf, N) when is_integer(N), N >= 65536, N =< 1 bsl 30 -> N;
validate(connect_timeout, T) when is_integer(T), T > 0 -> T;
validate(handshake_timeout, T) when is_integer(T), T > 0 -> T;
validate(max_pending_handshakes, N) when is_integer(N), N >= 1 -> N;
validate(max_pending_handshakes_per_ip, N) when is_integer(N), N >= 1 -> N;
validate(max_handshake_failures_per_ip, infinity) -> infinity;
validate(max_handshake_failures_per_ip, N) when is_integer(N), N >= 1, N =< 16#FFFFFFFF -> N;
validate(io_chunk_bytes, infinity) -> infinity;
validate(io_chunk_bytes, N) when is_integer(N), N >= 4096 -> N;
validate(io_thread_priority, normal) -> normal;
validate(io_thread_priority, idle) ->
    %% SCHED_IDLE is Linux's; refused here rather than when the listener starts.
    case os:type() of
        {unix, linux} -> idle;
        _ -> erlang:error({invalid_config, io_thread_priority, idle})
    end;
validate(reader_busy_wait_us, N) when is_integer(N), N >= 0, N =< 10000 -> N;
validate(decode_on_scheduler, auto) -> auto;
validate(decode_on_scheduler, always) -> always;
validate(peer_addresses, M) when is_map(M) ->
    maps:foreach(fun(Node, {Ip, Port}) when is_atom(Node), is_integer(Port),
                                            Port > 0, Port =< 65535 ->
                         valid_ip(peer_addresses, Ip);
                    (Node, Addr) ->
                         erlang:error({invalid_config, peer_addresses, {Node, Addr}})
                 end, M),
    M;
validate(tls, disabled) -> disabled;
validate(tls, M) when is_map(M) -> valid_tls(M);
validate(Key, Value) ->
    erlang:error({invalid_config, Key, Value}).

%% @doc The I/O thread count `io_threads' stands for on this node.
-spec io_threads(auto | pos_integer()) -> pos_integer().
io_threads(auto) ->
    min(16, max(1, erlang:system_info(schedulers_online) div 4));
io_threads(N) when is_integer(N) ->
    N.

-define(TLS_SUITES, ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                     "TLS_CHACHA20_POLY1305_SHA256"]).

%% The `tls' map with its defaults filled in.
valid_tls(M) ->
    Defaults = #{verify => verify_peer, server_name_check => true, client_name_check => true,
                 ciphers => ?TLS_SUITES},
    Known = [certfile, keyfile, cacertfile | maps:keys(Defaults)],
    Tls = maps:merge(Defaults, M),
    Ciphers = maps:get(ciphers, Tls),
    Suites = case is_list(Ciphers) of
                 true -> [suite_name(C) || C <- Ciphers];
                 false -> []
             end,
    Valid = maps:size(maps:without(Known, M)) =:= 0
        andalso lists:all(fun(Key) -> is_path(maps:get(Key, Tls, undefined)) end,
                          [certfile, keyfile, cacertfile])
        andalso lists:member(maps:get(verify, Tls), [verify_peer, verify_none])
        andalso is_boolean(maps:get(server_name_check, Tls))
        andalso is_boolean(maps:get(client_name_check, Tls))
        andalso Suites =/= []
        andalso lists:all(fun(S) -> lists:member(S, ?TLS_SUITES) end, Suites),
    case Valid of
        true -> Tls#{ciphers := Suites};
        false -> erlang:error({invalid_config, tls, M})
    end.

is_path(P) when is_binary(P), P =/= <<>> -> true;
is_path(P) when is_list(P), P =/= [] -> io_lib:char_list(P);
is_path(_) -> false.

suite_name(C) when is_binary(C) -> binary_to_list(C);
suite_name(C) when is_list(C) -> C;
suite_name(C) -> C.

valid_ip(Key, Ip) ->
    case inet:ntoa(Ip) of
        {error, einval} -> erlang:error({invalid_config, Key, Ip});
        _ -> Ip
    end.

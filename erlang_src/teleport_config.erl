%% @doc teleport's settings, read from the `teleport' application environment.
%%
%% This module is where the settings are defined: their names (`key()'), types
%% (`validate/2'), defaults (`defaults/0') and meaning (the table below). README.md's
%% settings tables are checked against it by `teleport_config_tests', and the Rust side
%% (`native/teleport_net/src/config.rs') receives the validated values.
%%
%% <table>
%% <tr><th>Key</th><th>Type</th><th>Default</th><th>Meaning</th></tr>
%% <tr><td>`pool_size'</td><td>1..256</td><td>`2'</td><td>connections per peer node, each one way: this node's pool carries its messages to the peer, the peer's pool the other way. A sender's messages always take one connection. The connections share the node's I/O threads, so more of them than I/O threads add queues, not parallelism. Each costs a descriptor at each end and no thread (a 50-node cluster at 2: 2 x 49 x 2 = 196 descriptors per node)</td></tr>
%% <tr><td>`io_threads'</td><td>`auto' | 1..256</td><td>`auto'</td><td>threads that read and write every teleport socket of this node, whatever the number of peers and connections. `auto': a quarter of the schedulers online, at least 1, at most 16 (`io_threads/1')</td></tr>
%% <tr><td>`listen_ip'</td><td>`inet:ip_address()'</td><td>`{0,0,0,0}'</td><td>address the listener binds</td></tr>
%% <tr><td>`listen_port'</td><td>0..65535</td><td>`0'</td><td>port the listener binds; 0: any free port (peers find it over distributed Erlang)</td></tr>
%% <tr><td>`max_frame_bytes'</td><td>1024..2^32-1</td><td>512 MiB</td><td>largest encoded message sent or accepted; a peer may make this node allocate this much for one message, so set it to what your messages need</td></tr>
%% <tr><td>`send_queue_bytes'</td><td>at least 1024</td><td>64 MiB</td><td>bytes queued per connection; past it senders wait in `send' (or get `{error, busy}' with `nosuspend')</td></tr>
%% <tr><td>`sndbuf'</td><td>`auto' | `kernel' | 65536..2^30</td><td>`auto'</td><td>the kernel send buffer (`SO_SNDBUF', as inet's `sndbuf') of each connection this node dials. `auto' (Linux; elsewhere as `kernel'): 512 KiB on a connection whose round trip, as TCP measured it during the handshake, is under 1 ms, else as `kernel'. A peer's kernel does not acknowledge bytes its reader has not read, so this bounds what waits unread at the peer, which then stays in the CPU caches; it also caps a connection at about its size per round trip, hence only on short paths. `kernel': never set. A number: always that (the kernel doubles it and caps it at `net.core.wmem_max'); below 64 KiB a sender would stall on the peer's delayed ACKs. `teleport:stats/1' shows each outbound connection's `send_buffer'</td></tr>
%% <tr><td>`connect_timeout'</td><td>milliseconds, at least 1</td><td>5000 ms</td><td>TCP connect to a peer</td></tr>
%% <tr><td>`handshake_timeout'</td><td>milliseconds, at least 1</td><td>5000 ms</td><td>the whole cookie handshake (and TLS's, with `tls'); also how long a large message may take to arrive whole, plus a second per MiB</td></tr>
%% <tr><td>`max_pending_handshakes'</td><td>at least 1</td><td>`64'</td><td>inbound handshakes in progress at once; more connections are closed at accept</td></tr>
%% <tr><td>`max_pending_handshakes_per_ip'</td><td>at least 1</td><td>`8'</td><td>of those, how many one source (an IPv4 address, an IPv6 /64) may hold; over it, closed at accept and counted in `teleport:listener_stats/0''s `handshake_failures'</td></tr>
%% <tr><td>`max_handshake_failures_per_ip'</td><td>at least 1 | `infinity'</td><td>`100'</td><td>inbound handshakes one source (as above) may fail in a burst, counting those in progress (wrong cookie or certificate, garbage, a client that hangs up or times out); past it the source's connections are closed at accept, before any handshake work. It gets a tenth of the burst back each second (10/s at the default), and one back for each of its handshakes that succeeds, so a host whose handshakes mostly succeed is never refused, however many it makes; a misconfigured node's retries back off far below it. Refusals are counted in `listener_stats()''s `throttled_handshakes' and logged as `handshake_failed' with reason `throttled'. `infinity': no limit</td></tr>
%% <tr><td>`reader_busy_wait_us'</td><td>0..10000</td><td>`100'</td><td>how long an I/O thread that finds nothing to do polls its sockets (yielding the core to any thread that wants it) before sleeping; 0 never polls. Only after a wait shorter than this and no bulk frame since: request/response traffic polls, sparse or bulk traffic does not. A message caught while polling reaches its process one thread wake-up sooner, for up to this much CPU per message, like the VM's scheduler busy wait (`+sbwt'). With many concurrent callers the polling takes cores from the schedulers: 0 gave 64 callers of small RPCs about a quarter more calls/s (BENCHMARKS.md)</td></tr>
%% <tr><td>`tls'</td><td>`disabled' | map</td><td>`disabled'</td><td>TLS 1.3 on every teleport connection, with mutual certificates: `#{certfile => Path, keyfile => Path, cacertfile => Path}' (PEM; each side presents its certificate and checks the other's chain against `cacertfile'; the cookie handshake still runs, inside TLS). Optional keys: `verify' (`verify_peer', the default, or `verify_none': no certificate is checked, still encrypted; for tests only), `server_name_check' (`true', the default: a dialing node checks that the server's certificate names the host part of the node name it dials, as `server_name_indication' does in `inet_tls_dist'; `false' for certificates without host names), `client_name_check' (`true', the default: a listener checks that the dialing node's certificate names the host part of the node name it claims, so one node's certificate cannot speak for a node of another host; `false' likewise), `ciphers' (TLS 1.3 suites as strings, of `"TLS_AES_256_GCM_SHA384"', `"TLS_AES_128_GCM_SHA256"', `"TLS_CHACHA20_POLY1305_SHA256"'; default all). Every node of the cluster needs the same setting. Unreadable files or a key that does not match: `application:start(teleport)' returns `{error, _}'. Linux and FreeBSD builds only</td></tr>
%% <tr><td>`rpc_modules'</td><td>`all' | `{only, [module()]}' | `{except, [module()]}'</td><td>`all'</td><td>which modules a peer may call through {@link teleport_rpc} (calls, casts, multicalls): `all', `{only, [Module]}' or `{except, [Module]}'. A refused call raises `{erpc, {module_not_allowed, Module}}' in its caller; refused calls and casts are counted (`refused_rpcs' in {@link teleport:stats/1}) and logged at most every 10 s. Allowing `erlang' allows everything (`erlang:apply/2'), as does a fun's call (`teleport_rpc:call(Node, Fun)' is `erlang:apply(Fun, [])')</td></tr>
%% <tr><td>`rpc_compression'</td><td>`off' | `{1..9, Bytes}' | `#{node() | default => ...}'</td><td>`off'</td><td>{@link teleport_rpc} arguments and results over a size threshold travel compressed: `off', `{Level, ThresholdBytes}' (zlib level 1-9, external size in bytes), or `#{Node => off | {Level, ThresholdBytes}, default => ...}' per peer. A call's own `compression' option overrides it. The receiving side refuses a compressed term that would inflate past `max_frame_bytes' before allocating it (`{erpc, too_large}'; counted as `refused_compressed')</td></tr>
%% <tr><td>`peer_addresses'</td><td>`#{node() => {IP, Port}}'</td><td>`#{}'</td><td>listener addresses of peers, so that no lookup over distributed Erlang is needed</td></tr>
%% <tr><td>`io_thread_priority'</td><td>`normal' | `idle'</td><td>`normal'</td><td>`idle' (Linux only): the I/O threads run only on CPU time nothing else on the machine wants (`SCHED_IDLE'), so bulk transfers never delay the VM's own work; a node that keeps every core busy then starves its teleport traffic, small messages included. Rarely needed</td></tr>
%% <tr><td>`decode_on_scheduler'</td><td>`auto'</td><td>`auto'</td><td>which arriving messages are decoded on a dirty scheduler instead of the connection's I/O thread: those this VM cannot build off a scheduler (maps over 32 keys, and funs, on OTP 25 before 25.3.2.18, 26 before 26.2.5.9 and 27 before 27.3, whose VM crashes doing so: erlang/otp GH-8208). `always', every message holding such a map or a fun, exists for teleport's own tests (they run that path on every release): only the NIF they build (cargo feature `test-hooks') takes it, elsewhere it is refused like any invalid value</td></tr>
%% </table>
-module(teleport_config).

-export([get/0, get/1, validate/2, defaults/0, io_threads/1]).

-type key() :: pool_size | io_threads | listen_ip | listen_port | max_frame_bytes | send_queue_bytes
             | sndbuf | connect_timeout | handshake_timeout | max_pending_handshakes
             | max_pending_handshakes_per_ip | max_handshake_failures_per_ip
             | io_thread_priority
             | reader_busy_wait_us | decode_on_scheduler | tls | peer_addresses
             | rpc_modules | rpc_compression.
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
      io_thread_priority => normal,
      reader_busy_wait_us => 100,
      decode_on_scheduler => auto,
      tls => disabled,
      peer_addresses => #{},
      rpc_modules => all,
      rpc_compression => off}.

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
validate(io_thread_priority, normal) -> normal;
validate(io_thread_priority, idle) ->
    %% SCHED_IDLE is Linux's; refused here rather than when the listener starts.
    case os:type() of
        {unix, linux} -> idle;
        _ -> erlang:error({invalid_config, io_thread_priority, idle})
    end;
validate(reader_busy_wait_us, N) when is_integer(N), N >= 0, N =< 10000 -> N;
validate(decode_on_scheduler, auto) -> auto;
validate(decode_on_scheduler, always) ->
    %% Test builds only: a value no user needs stays out of the release build.
    case teleport_nif:test_hooks() of
        true -> always;
        false -> erlang:error({invalid_config, decode_on_scheduler, always})
    end;
validate(peer_addresses, M) when is_map(M) ->
    maps:foreach(fun(Node, {Ip, Port}) when is_atom(Node), is_integer(Port),
                                            Port > 0, Port =< 65535 ->
                         valid_ip(peer_addresses, Ip);
                    (Node, Addr) ->
                         erlang:error({invalid_config, peer_addresses, {Node, Addr}})
                 end, M),
    M;
validate(rpc_modules, all) -> all;
validate(rpc_modules, {Kind, Modules} = Value) when Kind =:= only; Kind =:= except ->
    case is_list(Modules) andalso lists:all(fun erlang:is_atom/1, Modules) of
        true -> Value;
        false -> erlang:error({invalid_config, rpc_modules, Value})
    end;
validate(rpc_compression, Map) when is_map(Map) ->
    maps:foreach(fun(Key, Compression) when is_atom(Key) -> valid_compression(Compression);
                    (Key, _) -> erlang:error({invalid_config, rpc_compression, Key})
                 end, Map),
    Map;
validate(rpc_compression, Compression) ->
    valid_compression(Compression);
validate(tls, disabled) -> disabled;
validate(tls, M) when is_map(M) -> valid_tls(M);
validate(Key, Value) ->
    erlang:error({invalid_config, Key, Value}).

%% `off' or `{Level, Threshold}' (teleport_rpc_codec).
valid_compression(Compression) ->
    case teleport_rpc_codec:valid(Compression) of
        true -> Compression;
        false -> erlang:error({invalid_config, rpc_compression, Compression})
    end.

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

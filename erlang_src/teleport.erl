%% @doc teleport: Erlang messages between nodes over pools of TCP connections
%% owned by a Rust NIF, beside distributed Erlang instead of through it.
%%
%% `teleport:send({Name, Node}, Msg)' stands in for `{Name, Node} ! Msg' and
%% `teleport:gs_call(Server, Request)' for `gen_server:call(Server, Request)'.
%% Large messages to a node no longer hold up every other message to it, and
%% many senders use many connections.
%%
%% Guarantees:
%% <ul>
%% <li>Ordering: messages from one process to one node arrive in the order sent
%%     (the sender's pid picks its connection in the pool).</li>
%% <li>Delivery: like `!', best effort. A message accepted by `send' is written
%%     unless the connection dies first; such messages, and arrivals with no
%%     live destination, are counted in {@link stats/0} and logged.</li>
%% <li>Security: every connection proves knowledge of the cookie in both
%%     directions (HMAC-SHA256 challenge-response) before anything is decoded.</li>
%% <li>Memory: each connection queues at most `send_queue_bytes' (plus one
%%     message per waiting sender); past it, senders wait until it drains.</li>
%% </ul>
-module(teleport).

-export([send/2, send/3, gs_call/2, gs_call/3, gs_cast/2]).
-export([send_frame/3, send_frame/4]).
-export([connect/1, connect/2, disconnect/1, nodes/0, listen_address/0, stats/0, stats/1,
         listener_stats/0]).

-export_type([dest/0, send_option/0, peer_stats/0, connection_stats/0, address/0,
              connect_error/0, tls_reason/0]).

-ifdef(TEST).
-export([route/1]).
-endif.

-type dest() :: pid() | atom() | {atom(), node()}.
%% A pid, a locally registered name, or `{Name, Node}'.
-type send_option() :: unordered | {key, term()} | nosuspend.
%% See {@link send/3}.
-type peer_stats() :: #{messages_out := non_neg_integer(),
                        bytes_out := non_neg_integer(),
                        messages_in := non_neg_integer(),
                        bytes_in := non_neg_integer(),
                        connections := non_neg_integer(),
                        queued_bytes := non_neg_integer(),
                        partial_bytes := non_neg_integer(),
                        refused_calls := non_neg_integer(),
                        refused_rpcs := non_neg_integer(),
                        refused_casts := non_neg_integer(),
                        refused_compressed := non_neg_integer(),
                        dropped_out := non_neg_integer(),
                        undeliverable_in := non_neg_integer(),
                        connects := non_neg_integer(),
                        disconnects := non_neg_integer(),
                        handshake_failures := non_neg_integer(),
                        per_connection := [connection_stats()]}.
%% A peer's counters; see {@link stats/0} for every key.
-type connection_stats() ::
        #{direction := outbound,
          index := non_neg_integer(),
          local := address(),
          remote := address(),
          connected_ms := non_neg_integer(),
          messages_out := non_neg_integer(),
          bytes_out := non_neg_integer(),
          queued_bytes := non_neg_integer(),
          send_buffer => non_neg_integer()}
      | #{direction := inbound,
          local := address(),
          remote := address(),
          connected_ms := non_neg_integer(),
          messages_in := non_neg_integer(),
          bytes_in := non_neg_integer(),
          undeliverable_in := non_neg_integer(),
          partial_bytes := non_neg_integer()}.
%% One live connection's counters; see {@link stats/0} for every key.
-type address() :: {inet:ip_address(), inet:port_number()}.
%% `{Ip, Port}' of one end of a connection.

-type connect_error() ::
        {connect, inet:posix() | timeout | unknown}
      | {handshake, bad_cookie | timeout | closed | malformed | oversized | version
                    | wrong_node | own_node_name | bad_node_name | tls_reason()
                    | inet:posix() | unknown}
      | {io, inet:posix() | timeout | closed | unknown}
      | stopping
      | {closed, binary()}
      | {internal, term()}
      | {backoff, connect_error()}
      | timeout | not_started | noconnection
      | {bad_host, string(), inet:posix()}
      | {error | exit | throw, term()}.
%% Why {@link connect/2} failed; see there.
-type tls_reason() ::
        tls_unknown_ca | tls_expired | tls_bad_hostname | tls_bad_certificate
      | tls_no_certificate | tls_node_name | tls_incompatible | tls_alert | tls_protocol
      | tls_plaintext | tls_closed | tls_error.
%% Why a TLS handshake failed (see docs/security.md).

-define(DEFAULT_CALL_TIMEOUT, 5000).
%% What the relays refuse, counted per peer (teleport_relay_sup:count/2).
-define(REFUSALS, #{refused_calls => 0, refused_rpcs => 0, refused_casts => 0,
                    refused_compressed => 0}).
%% How often a sender suspended by back-pressure checks its connection itself.
-define(RESUME_RECHECK_MS, 500).

%% @doc Sends `Msg' to `Dest' like `erlang:send/2'; remote destinations go over
%% teleport. Returns `{error, noconnection}' when the node cannot be reached,
%% `{error, too_large}' past `max_frame_bytes', and `{error, unsupported_by_peer}'
%% when `Msg' holds a term the peer's Erlang/OTP release cannot decode (an OTP 29
%% native record sent to an older release); nothing is sent then. A bad `Dest' raises
%% `badarg', as does an unregistered local name. When the connection's queue is
%% full the caller waits until it drains (like a busy distribution port).
-spec send(dest(), term()) -> ok | {error, noconnection | too_large | unsupported_by_peer}.
send(Dest, Msg) ->
    send(Dest, Msg, []).

%% @doc {@link send/2} with options:
%% <ul>
%% <li>`{key, Term}': pick the connection by `Term' instead of by the sender,
%%     so order is kept per key.</li>
%% <li>`unordered': any connection; one process pushing many large messages
%%     uses the whole pool. No order between such messages.</li>
%% <li>`nosuspend': never wait; return `{error, busy}' (nothing sent) if the
%%     connection's queue is full.</li>
%% </ul>
-spec send(dest(), term(), [send_option()]) ->
    ok | {error, noconnection | too_large | unsupported_by_peer | busy}.
send(Dest, Msg, Opts) ->
    case route(Dest) of
        local ->
            _ = erlang:send(Dest, Msg),
            ok;
        {remote, Node, Target} ->
            remote_send(Node, send, {Target, Msg}, connection_key(Opts),
                        lists:member(nosuspend, Opts));
        badarg ->
            erlang:error(badarg, [Dest, Msg, Opts])
    end.

%% @equiv gs_call(Dest, Request, 5000)
-spec gs_call(dest(), term()) -> term().
gs_call(Dest, Request) ->
    gs_call(Dest, Request, ?DEFAULT_CALL_TIMEOUT).

%% @doc `gen_server:call/3' over teleport: works with gen_server and gen_statem.
%% The request goes over teleport, and so does a reply over 64 KiB (encoded);
%% smaller replies come back over distributed Erlang, like gen_server's own.
%% Exits like gen_server:call, as `{Reason, {teleport, gs_call, [Dest, Request, Timeout]}}'
%% with Reason:
%% <ul>
%% <li>`timeout', `noproc', the server's exit reason, `{nodedown, Node}' (only
%%     when distributed Erlang lost the node), as gen_server:call;</li>
%% <li>`{teleport_unreachable, Node, Why}': distributed Erlang reaches the node
%%     but teleport could not, for 10 s (`Why': `not_started' when teleport does
%%     not run there, or a {@link connect/2} reason). A call waits that long for
%%     teleport restarting on the server's node, within its own timeout;</li>
%% <li>`{request_lost, Node}': the request was lost on its way to the server
%%     (a connection closed under it, or a process of teleport's on the
%%     server's node was killed or stopped while it held it);</li>
%% <li>`{call_keeper_down, Why}': the process that made the call on the
%%     server's node was killed; the server may have served the request;</li>
%% <li>`{teleport, no_call_relay}': teleport was stopping on the server's node
%%     and no process there could take the request.</li>
%% </ul>
%% Every call ends: with the reply, its timeout, or one of these. The server
%% sees `From' as `{KeeperPid, Tag}' where KeeperPid is a process teleport
%% started for this call on the server's node, so `gen_server:reply/2' works as
%% usual. The reply is not lost when connections drop or teleport restarts on
%% either node: it is then sent again over distributed Erlang.
%% A small reply that arrives after the timeout is dropped, as with gen_server
%% since OTP 24; a large one, arriving over teleport, is left in the caller's
%% mailbox as `{'$teleport_reply', Ref, KeeperPid, Reply}' (as with gen_server
%% before OTP 24).
%%
%% Emits the telemetry span `[teleport, call, start | stop | exception]'
%% (docs/telemetry.md) where telemetry runs.
-spec gs_call(dest(), term(), timeout()) -> term().
gs_call(Dest, Request, Timeout) ->
    case route(Dest) of
        badarg ->
            erlang:error(badarg, [Dest, Request, Timeout]);
        Route ->
            case teleport_telemetry:enabled() of
                false ->
                    route_call(Route, Dest, Request, Timeout);
                true ->
                    Metadata = call_metadata(Route, Dest, Request, Timeout),
                    teleport_telemetry:span(
                      [teleport, call], Metadata,
                      fun() ->
                              Reply = route_call(Route, Dest, Request, Timeout),
                              {Reply, Metadata#{reply_size => erlang:external_size(Reply)}}
                      end)
            end
    end.

route_call(local, Dest, Request, Timeout) ->
    try gen:call(Dest, '$gen_call', Request, Timeout) of
        {ok, Reply} -> Reply
    catch
        exit:Reason -> exit({Reason, {?MODULE, gs_call, [Dest, Request, Timeout]}})
    end;
route_call({remote, Node, Target}, Dest, Request, Timeout) ->
    teleport_call:call(Node, Target, Dest, Request, Timeout).

%% Sizes are the terms' external format sizes (what teleport's encoder writes, less
%% compression); measured only where telemetry runs.
call_metadata(Route, Dest, Request, Timeout) ->
    Node = case Route of
               local -> node();
               {remote, N, _} -> N
           end,
    #{call => gs_call, node => Node, destination => Dest,
      destination_kind => case Dest of
                              _ when is_pid(Dest) -> pid;
                              _ -> registered_name
                          end,
      request_size => erlang:external_size(Request), timeout => Timeout}.

%% @doc `gen_server:cast/2' over teleport. Always returns `ok'.
-spec gs_cast(dest(), term()) -> ok.
gs_cast(Dest, Request) ->
    try send(Dest, {'$gen_cast', Request}) of
        _ -> ok
    catch
        error:badarg -> ok
    end.

%% @doc Opens the pool to `Node' now instead of at the first send. The peer's
%% listener is found over distributed Erlang (or in `peer_addresses'); besides
%% the reasons of {@link connect/2}, finding it can fail with `noconnection'
%% (no disterl connection to `Node'), `not_started' (teleport is not running
%% there), `{bad_host, Host, Posix}', or `{Class, Reason}' from the remote call.
-spec connect(node()) -> ok | {error, connect_error()}.
connect(Node) when is_atom(Node) ->
    teleport_connector:ensure(Node, discover).

%% @doc Opens the pool to `Node' at a known listener address. Errors are terms
%% to match on:
%% <ul>
%% <li>`{connect, Posix}': the TCP connect failed, e.g. `econnrefused',
%%     `ehostunreach', or `timeout' after `connect_timeout'.</li>
%% <li>`{handshake, Why}': the peer was reached but the handshake failed:
%%     `bad_cookie' (the peer closed after our proof: its cookie differs),
%%     `timeout' (after `handshake_timeout'), `closed' (the peer closed before
%%     its challenge: it is another node, or over its pending-handshake cap),
%%     `malformed', `oversized', `version', `bad_node_name'. With the `tls'
%%     setting also: `tls_unknown_ca' (a certificate not from our CA, or ours not
%%     from the peer's), `tls_expired', `tls_bad_certificate', `tls_no_certificate',
%%     `tls_bad_hostname' (the peer's certificate does not name the host dialed),
%%     `tls_closed' (the peer closed during the TLS handshake: it does not speak
%%     TLS), `tls_plaintext', `tls_incompatible', `tls_protocol', `tls_alert',
%%     `tls_error'.</li>
%% <li>`{io, Posix}': a socket call after the handshake failed.</li>
%% <li>`stopping': teleport is stopping on this node.</li>
%% <li>`{closed, Text}': the new pool closed as it opened (`Text' says why);
%%     `{internal, Why}': one of teleport's threads or processes failed
%%     (logged).</li>
%% <li>`{backoff, Reason}': an open failed with `Reason' moments ago; the next
%%     attempt waits (100 ms, doubling up to 5 s).</li>
%% <li>`timeout': no outcome within the open's deadline; `not_started':
%%     teleport is not running here.</li>
%% </ul>
-spec connect(node(), {inet:ip_address(), inet:port_number()}) -> ok | {error, connect_error()}.
connect(Node, {Ip, Port} = Address) when is_atom(Node), is_tuple(Ip), is_integer(Port) ->
    teleport_connector:ensure(Node, Address).

%% @doc Closes the pool to `Node'. Messages still queued are dropped and counted.
-spec disconnect(node()) -> ok.
disconnect(Node) when is_atom(Node) ->
    teleport_nif:close_pool(Node).

%% @doc Nodes this node has an open pool to.
-spec nodes() -> [node()].
nodes() ->
    teleport_nif:peers().

%% @doc Where this node's listener is bound.
-spec listen_address() -> {inet:ip_address(), inet:port_number()} | {error, not_started}.
listen_address() ->
    case teleport_nif:listen_address() of
        {ok, Address} -> Address;
        {error, _} = Error -> Error
    end.

%% @doc Counters for every peer node teleport exchanged with since it started,
%% read from Rust atomics in one NIF call (cheap enough to poll every second).
%% "Out" is this node's pool to the peer, "in" is the peer's pool into us.
%% Message counts are frames (a `gs_call' is one out and its reply one in);
%% bytes are frame bodies (the encoded message and its destination), without
%% the 5-byte frame header.
%%
%% Per peer (totals since start, surviving reconnects):
%% <ul>
%% <li>`messages_out', `bytes_out': written to the peer's sockets.</li>
%% <li>`messages_in', `bytes_in': read whole from the peer.</li>
%% <li>`connections': connections of our pool to the peer now (0 without one).</li>
%% <li>`queued_bytes': bytes accepted by `send' and not yet written, now.</li>
%% <li>`refused_calls': gs_calls and {@link teleport_rpc} calls from the peer
%%     refused because it had 10,000 under way here (its callers exited
%%     `{teleport, too_many_calls}', or raised `{erpc, system_limit}').</li>
%% <li>`refused_rpcs': {@link teleport_rpc} calls and casts from the peer to a
%%     module the `rpc_modules' setting does not allow.</li>
%% <li>`refused_casts': {@link teleport_rpc} casts to `{Node, Key}' from the
%%     peer refused because 100,000 of its keyed casts waited here for their
%%     keys' earlier requests.</li>
%% <li>`refused_compressed': compressed {@link teleport_rpc} arguments or
%%     results from the peer refused because they would decompress to more
%%     than `max_frame_bytes'.</li>
%% <li>`partial_bytes': bytes held now for large messages the peer has sent
%%     part of (a message over 64 KiB travels in chunks, with others' smaller
%%     messages between them; the receiver holds at most one such message per
%%     connection, in the buffer it is delivered in).</li>
%% <li>`dropped_out': messages accepted by `send' but never written because
%%     the pool closed first.</li>
%% <li>`undeliverable_in': arrivals from the peer with no live destination
%%     (no such process or registered name).</li>
%% <li>`connects', `disconnects': how often our pool to the peer opened and
%%     closed.</li>
%% <li>`handshake_failures': our pool's handshakes with the peer that failed
%%     (wrong cookie, wrong node name, timeout). Failures of connections
%%     coming in are in {@link listener_stats/0}: nothing is attributed to a
%%     node before it authenticates.</li>
%% <li>`per_connection': one map per live connection with the peer: first our
%%     pool's, by slot, then the peer's pool into us. Empty when none is up.</li>
%% </ul>
%% Per connection (counted since that connection came up):
%% <ul>
%% <li>`direction': `outbound' (our pool) or `inbound' (the peer's).</li>
%% <li>`index' (outbound only): the connection's slot in our pool, from 0;
%%     a sender's pid (or its `{key, Term}') picks the slot.</li>
%% <li>`local', `remote': `{Ip, Port}' of this end and of the other.</li>
%% <li>`connected_ms': milliseconds since it was authenticated.</li>
%% <li>`messages_out', `bytes_out', `queued_bytes' (outbound only): as the
%%     peer's, for this connection.</li>
%% <li>`messages_in', `bytes_in', `undeliverable_in', `partial_bytes' (inbound
%%     only): as the peer's, for this connection.</li>
%% <li>`send_buffer' (outbound only, where the OS reports it): the socket's
%%     kernel send buffer in bytes, as sized by the `sndbuf' setting.</li>
%% </ul>
%% The per-connection counts of live connections add up to the peer's totals
%% while no pool has closed since start; afterwards the totals also hold what
%% earlier connections carried.
-spec stats() -> #{node() => peer_stats()}.
stats() ->
    Refused = teleport_relay_sup:counters(),
    maps:map(fun(Node, Stats) ->
                     maps:merge(maps:merge(Stats, ?REFUSALS), maps:get(Node, Refused, #{}))
             end, teleport_nif:stats()).

%% @doc The counters for one peer, as in {@link stats/0}; all zero (and no
%% connections) if teleport never exchanged with it.
-spec stats(node()) -> peer_stats().
stats(Node) when is_atom(Node) ->
    case stats() of
        #{Node := Stats} -> Stats;
        #{} -> #{messages_out => 0, bytes_out => 0, messages_in => 0, bytes_in => 0,
                 connections => 0, queued_bytes => 0, partial_bytes => 0,
                 refused_calls => 0, refused_rpcs => 0, refused_casts => 0,
                 refused_compressed => 0, dropped_out => 0,
                 undeliverable_in => 0, connects => 0, disconnects => 0,
                 handshake_failures => 0, per_connection => []}
    end.

%% @doc The listener's counters: inbound `handshake_failures' (wrong cookie,
%% garbage, timeouts, connections closed at accept over the pending-handshake
%% caps or throttled: nothing is attributed to a node before it authenticates),
%% `throttled_handshakes' (of those, connections closed at accept because their
%% source failed more handshakes than `max_handshake_failures_per_ip' allows),
%% `pending_handshakes' now, `inbound_connections' open now, and
%% `accept_errors': accepts that failed (out of file descriptors, `emfile' or
%% `enfile', or memory), each followed by a pause (100 ms doubling to 1 s while
%% they keep failing) and logged as `accept_failed' at most once a second.
%% Empty if teleport is not running.
-spec listener_stats() -> #{handshake_failures => non_neg_integer(),
                            throttled_handshakes => non_neg_integer(),
                            pending_handshakes => non_neg_integer(),
                            inbound_connections => non_neg_integer(),
                            accept_errors => non_neg_integer()}.
listener_stats() ->
    teleport_nif:listener_stats().

%%% Internal

%% Where a destination lives, and what the peer needs to find it.
-spec route(term()) -> local | {remote, node(), pid() | atom()} | badarg.
route(Pid) when is_pid(Pid) ->
    case node(Pid) =:= node() of
        true -> local;
        false -> {remote, node(Pid), Pid}
    end;
route(Name) when is_atom(Name) ->
    local;
route({Name, Node}) when is_atom(Name), is_atom(Node) ->
    case Node =:= node() of
        true -> local;
        false -> {remote, Node, Name}
    end;
route(_) ->
    badarg.

connection_key([]) -> erlang:phash2(self());
connection_key([{key, Key} | _]) -> erlang:phash2(Key);
%% unique_integer counts in steps that share factors with pool sizes: hash it.
connection_key([unordered | _]) -> erlang:phash2(erlang:unique_integer());
connection_key([nosuspend | Opts]) -> connection_key(Opts);
connection_key([Other | _]) -> erlang:error({badarg, Other}).

%% @private
%% @doc Queues `Envelope' as a frame of `Kind' to `Node', keyed by the caller
%% (teleport_call sends its call frames with it).
-spec send_frame(node(), send | call, term()) ->
    ok | {error, noconnection | too_large | unsupported_by_peer | busy}.
send_frame(Node, Kind, Envelope) ->
    send_frame(Node, Kind, Envelope, erlang:phash2(self())).

%% @private
%% @doc {@link send_frame/3} on the connection `ConnKey' picks (a hash: the
%% caller's pid, or a `{key, Term}''s term).
-spec send_frame(node(), send | call, term(), non_neg_integer()) ->
    ok | {error, noconnection | too_large | unsupported_by_peer | busy}.
send_frame(Node, Kind, Envelope, ConnKey) ->
    remote_send(Node, Kind, Envelope, ConnKey, false).

remote_send(Node, Kind, Envelope, Key, NoSuspend) ->
    %% The NIF encodes the envelope (large binaries by reference, big terms on a
    %% dirty scheduler), after checking that the node is connected.
    case enqueue(Node, Kind, Key, NoSuspend, Envelope) of
        not_connected ->
            case teleport_connector:ensure(Node, discover) of
                ok ->
                    case enqueue(Node, Kind, Key, NoSuspend, Envelope) of
                        not_connected -> {error, noconnection};
                        Result -> Result
                    end;
                {error, _} ->
                    {error, noconnection}
            end;
        Result ->
            Result
    end.

enqueue(Node, Kind, Key, NoSuspend, Envelope) ->
    case teleport_nif:send(Node, Kind, Key, NoSuspend, Envelope) of
        ok -> ok;
        suspend -> suspended(Node, Kind, Key);
        not_connected -> not_connected;
        Refused -> refused(Node, Kind, Refused)
    end.

refused(Node, Kind, Reason) ->
    teleport_telemetry:execute([teleport, frame, refused], #{count => 1},
                               #{node => Node, kind => Kind, reason => Reason}),
    {error, Reason}.

suspended(Node, Kind, Key) ->
    Metadata = #{node => Node, kind => Kind},
    Start = erlang:monotonic_time(),
    teleport_telemetry:execute([teleport, send, suspended],
                               #{monotonic_time => Start}, Metadata),
    ok = await_resume(Node, Key),
    teleport_telemetry:execute([teleport, send, resumed],
                               #{duration => erlang:monotonic_time() - Start}, Metadata).

%% Queued, but the connection is over its byte limit: wait until it drains (or
%% closes) before this process may send more. The NIF's wake-up can be lost (the
%% runtime restarted, its event pump failed), so the wait also rechecks the
%% connection itself now and then: it ends once the connection is no longer
%% over its limit, whoever noticed.
await_resume(Node, Key) ->
    receive
        {teleport_resume, Node} -> ok
    after ?RESUME_RECHECK_MS ->
            case teleport_nif:over_limit(Node, Key) of
                true -> await_resume(Node, Key);
                false -> ok
            end
    end.

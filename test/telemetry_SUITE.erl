%%% @doc teleport's telemetry events (docs/telemetry.md), against telemetry v1.4.1 built
%%% from the peer projects ($TELEPORT_PEERS, default ../shared/peers beside the
%%% checkout; skipped without it). Everything runs on peer nodes: this node never
%%% loads telemetry, as the suites after this one expect.
%%%
%%% <ul>
%%% <li>`absent': a node without telemetry starts teleport, calls, sends;
%%%     `teleport_telemetry:enabled()' is false there.</li>
%%% <li>`started_after_teleport': telemetry loaded and started on a node where
%%%     teleport already runs: its handlers get the events from then on.</li>
%%% <li>`call_span': `[teleport, call, start | stop]' around a gs_call to another
%%%     node and to a local server, with node, destination kind and sizes, in
%%%     native time units; `[teleport, call, exception]' for a server that is not
%%%     there; the same span around `teleport_rpc:call' (`call => rpc').</li>
%%% <li>`pool_events': `[teleport, pool, opened]' and `[teleport, pool, closed]'.</li>
%%% <li>`handshake_refused_and_backoff': a peer with another cookie: our
%%%     handshake refused (outbound) and the peer's (inbound, at our listener);
%%%     `[teleport, peer, backoff]' after each failed open, with its delay.</li>
%%% <li>`handshake_throttled': garbage connections from 127.0.0.2 to a node with
%%%     `max_handshake_failures_per_ip' 3: once refused at accept, an inbound
%%%     `[teleport, handshake, refused]' with reason `throttled' from that
%%%     source.</li>
%%% <li>`back_pressure': a stopped receiver: a sender suspended, then resumed
%%%     (with how long it waited); `nosuspend' and `max_frame_bytes' refusals; the
%%%     pool closed with messages queued: `[teleport, frame, dropped]' out.</li>
%%% <li>`too_many_calls': 10,200 calls at once to a server that answers after
%%%     4 s: on the server's node, `[teleport, frame, refused]' with reason
%%%     `too_many_calls' once per refused call.</li>
%%% <li>`undeliverable': messages for a dead pid: `[teleport, frame, dropped]'
%%%     in, on the receiving node.</li>
%%% <li>`cost': a benchmark (prints, asserts only that the work was done): the
%%%     gs_call and send paths from a node without telemetry, from one with
%%%     telemetry and no handler, and from it with a handler attached to every
%%%     event, in TELEMETRY_COST_BLOCKS blocks (default 2; the order of the three
%%%     turns each block) of TELEMETRY_COST_CALLS calls and as many 100-byte
%%%     sends (default 2000), back-to-back from one process; and the bare cost of
%%%     `teleport_telemetry:span/3' and `execute/3' in each state. Per state: the
%%%     mean gs_call round trip and its p50/p99, the mean `send', the span and
%%%     event: min-max (median) over the blocks.</li>
%%% </ul>
-module(telemetry_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([absent/1, started_after_teleport/1, call_span/1, pool_events/1,
         handshake_refused_and_backoff/1, handshake_throttled/1, back_pressure/1,
         too_many_calls/1, undeliverable/1, cost/1]).
%% Run on the peers.
-export([forward/4, noop/4, counter/0, timed_calls/3, timed_sends/3, timed_spans/1]).

-define(RPC_TIMEOUT, 30000).
-define(EVENT_TIMEOUT, 10000).
-define(SERVER, telemetry_suite_server).
-define(EVENTS, [[teleport, call, start], [teleport, call, stop], [teleport, call, exception],
                 [teleport, pool, opened], [teleport, pool, closed],
                 [teleport, handshake, refused], [teleport, peer, backoff],
                 [teleport, send, suspended], [teleport, send, resumed],
                 [teleport, frame, refused], [teleport, frame, dropped]]).

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [absent, started_after_teleport, call_span, pool_events, handshake_refused_and_backoff,
     handshake_throttled, back_pressure, too_many_calls, undeliverable, cost].

init_per_suite(Config) ->
    case teleport_test_peer:ensure_distributed() of
        ok ->
            case build_telemetry(?config(priv_dir, Config)) of
                {ok, Ebin} -> [{telemetry_ebin, Ebin} | Config];
                {skip, _} = Skip -> Skip
            end;
        {fail, _} = Fail ->
            Fail
    end.

end_per_suite(_Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(_Case, _Config) ->
    _ = [signal("CONT", OsPid) || OsPid <- take(stopped)],
    _ = [teleport_test_peer:stop(Peer) || Peer <- take(peers)],
    ok.

%%====================================================================
%% Cases
%%====================================================================

absent(Config) ->
    A = start_peer(Config, "tel_absent", no_telemetry, #{}),
    B = start_peer(Config, "tel_absent_b", no_telemetry, #{}),
    start_server(B),
    ?assertEqual(non_existing, erpc:call(A, code, which, [telemetry])),
    ?assertNot(erpc:call(A, teleport_telemetry, enabled, [])),
    ?assertEqual(hello, erpc:call(A, teleport, gs_call, [{?SERVER, B}, {echo, hello}])),
    ?assertEqual(ok, erpc:call(A, teleport, send, [{?SERVER, B}, ignored])),
    ?assertEqual(ok, erpc:call(A, teleport_telemetry, execute, [[teleport, test], #{}, #{}])),
    ?assertEqual(done, erpc:call(A, teleport_telemetry, span,
                                 [[teleport, test], #{}, fun() -> {done, #{}} end])),
    ?assert(lists:member(B, erpc:call(A, teleport, nodes, []))).

started_after_teleport(Config) ->
    A = start_peer(Config, "tel_after", no_telemetry, #{}),
    B = start_peer(Config, "tel_after_b", no_telemetry, #{}),
    start_server(B),
    ?assertEqual(hello, erpc:call(A, teleport, gs_call, [{?SERVER, B}, {echo, hello}])),
    ?assertNot(erpc:call(A, teleport_telemetry, enabled, [])),
    true = erpc:call(A, code, add_patha, [?config(telemetry_ebin, Config)]),
    {ok, [telemetry]} = erpc:call(A, application, ensure_all_started, [telemetry]),
    attach(A),
    ?assertEqual(again, erpc:call(A, teleport, gs_call, [{?SERVER, B}, {echo, again}])),
    {_, #{node := B}} = event([teleport, call, start]),
    {_, #{node := B}} = event([teleport, call, stop]),
    ?assert(erpc:call(A, teleport_telemetry, enabled, [])).

call_span(Config) ->
    A = start_peer(Config, "tel_call", telemetry, #{}),
    B = start_peer(Config, "tel_call_b", telemetry, #{}),
    start_server(A),
    start_server(B),
    attach(A),
    Request = {echo, binary:copy(<<1>>, 1000)},
    {_, Reply} = Request,
    ?assertEqual(Reply, erpc:call(A, teleport, gs_call, [{?SERVER, B}, Request])),
    {StartM, Start} = event([teleport, call, start]),
    {StopM, Stop} = event([teleport, call, stop]),
    ?assertMatch(#{monotonic_time := T, system_time := S} when is_integer(T) andalso is_integer(S),
                 StartM),
    #{duration := Duration, monotonic_time := StopTime} = StopM,
    ?assert(Duration > 0),
    ?assertEqual(StopTime - maps:get(monotonic_time, StartM), Duration),
    ?assertMatch(#{call := gs_call, node := B, destination := {?SERVER, B},
                   destination_kind := registered_name, timeout := 5000,
                   request_size := RS} when RS > 1000, Start),
    ?assertEqual(erlang:external_size(Request), maps:get(request_size, Start)),
    ?assertEqual(erlang:external_size(Reply), maps:get(reply_size, Stop)),
    ?assertEqual(maps:get(telemetry_span_context, Start), maps:get(telemetry_span_context, Stop)),
    %% A pid, and a server on the caller's own node.
    Pid = erpc:call(B, erlang, whereis, [?SERVER]),
    ?assertEqual(x, erpc:call(A, teleport, gs_call, [Pid, {echo, x}])),
    {_, #{destination_kind := pid, node := B}} = event([teleport, call, start]),
    {_, #{destination_kind := pid}} = event([teleport, call, stop]),
    ?assertEqual(y, erpc:call(A, teleport, gs_call, [?SERVER, {echo, y}])),
    {_, #{node := A, destination_kind := registered_name}} = event([teleport, call, start]),
    _ = event([teleport, call, stop]),
    %% No such server: the exception event, and the exit as gen_server's.
    ?assertMatch({exit, {noproc, {teleport, gs_call, _}}},
                 erpc:call(A, fun() ->
                                      try teleport:gs_call({nobody_here, B}, ping)
                                      catch exit:Why -> {exit, Why}
                                      end
                              end)),
    _ = event([teleport, call, start]),
    {#{duration := D}, #{kind := exit, reason := {noproc, _}, node := B}} =
        event([teleport, call, exception]),
    ?assert(D > 0),
    %% An RPC call: the same span, call => rpc; an exception as erpc raises it.
    ?assertEqual(Reply, erpc:call(A, teleport_rpc, call, [B, erlang, element, [2, Request]])),
    {_, #{call := rpc, node := B, destination := B, destination_kind := node,
          mfa := {erlang, element, 2}}} = event([teleport, call, start]),
    {_, #{call := rpc, reply_size := ReplySize}} = event([teleport, call, stop]),
    ?assertEqual(erlang:external_size(Reply), ReplySize),
    ?assertMatch({error, {erpc, _}},
                 erpc:call(A, fun() ->
                                      try teleport_rpc:call({B, k}, erlang, error, [boom])
                                      catch error:Why -> {error, {erpc, Why}}
                                      end
                              end)),
    {_, #{call := rpc, destination_kind := key}} = event([teleport, call, start]),
    {_, #{kind := error, reason := {exception, boom, _}}} = event([teleport, call, exception]),
    nothing_more().

pool_events(Config) ->
    A = start_peer(Config, "tel_pool", telemetry, #{pool_size => 3}),
    B = start_peer(Config, "tel_pool_b", telemetry, #{}),
    attach(A),
    ok = erpc:call(A, teleport, connect, [B]),
    {#{connections := 3}, #{node := B}} = event([teleport, pool, opened]),
    ok = erpc:call(A, teleport, disconnect, [B]),
    {#{dropped_messages := 0}, #{node := B, reason := Reason}} = event([teleport, pool, closed]),
    ct:pal("pool closed by disconnect: ~p", [Reason]).

handshake_refused_and_backoff(Config) ->
    A = start_peer(Config, "tel_hs", telemetry, #{}),
    {W, WNode} = start_isolated("tel_hs_w", telemetry_suite_wrong_cookie),
    attach(A),
    WAddr = teleport_test_peer:connectable(peer:call(W, teleport, listen_address, [],
                                                     ?RPC_TIMEOUT)),
    ?assertEqual({error, {handshake, bad_cookie}}, erpc:call(A, teleport, connect, [WNode, WAddr])),
    {#{count := 1}, #{direction := outbound, node := WNode, reason := bad_cookie}} =
        event([teleport, handshake, refused]),
    Delay = erlang:convert_time_unit(100, millisecond, native),
    {#{delay := Delay}, #{node := WNode, reason := {handshake, bad_cookie}}} =
        event([teleport, peer, backoff]),
    %% W dialing A: refused at A's listener.
    AAddr = teleport_test_peer:connectable(erpc:call(A, teleport, listen_address, [])),
    ?assertEqual({error, {handshake, bad_cookie}}, peer:call(W, teleport, connect, [A, AAddr],
                                                             ?RPC_TIMEOUT)),
    {#{count := Count}, #{direction := inbound, remote := Remote, reason := InReason}} =
        event([teleport, handshake, refused]),
    ?assert(Count >= 1),
    ?assert(is_binary(Remote)),
    ct:pal("inbound refusal: ~p from ~s", [InReason, Remote]),
    %% Nothing listens: a connect failure, then a doubled backoff for the same node.
    {ok, Closed} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, ClosedPort} = inet:port(Closed),
    ok = gen_tcp:close(Closed),
    Nobody = 'telemetry_suite_nobody@127.0.0.1',
    ?assertMatch({error, {connect, econnrefused}},
                 erpc:call(A, teleport, connect, [Nobody, {{127, 0, 0, 1}, ClosedPort}])),
    {#{delay := Delay}, #{node := Nobody, reason := {connect, econnrefused}}} =
        event([teleport, peer, backoff]),
    timer:sleep(150),
    ?assertMatch({error, {connect, econnrefused}},
                 erpc:call(A, teleport, connect, [Nobody, {{127, 0, 0, 1}, ClosedPort}])),
    Doubled = 2 * Delay,
    {#{delay := Doubled}, #{node := Nobody}} = event([teleport, peer, backoff]).

handshake_throttled(Config) ->
    A = start_peer(Config, "tel_throttle", telemetry, #{max_handshake_failures_per_ip => 3}),
    attach(A),
    {Ip, Port} = teleport_test_peer:connectable(erpc:call(A, teleport, listen_address, [])),
    Garbage = fun() ->
                      {ok, S} = gen_tcp:connect(Ip, Port, [binary, {active, false},
                                                           {ip, {127, 0, 0, 2}}], 5000),
                      ok = gen_tcp:send(S, <<0, 0>>),
                      _ = gen_tcp:recv(S, 0, 5000),
                      gen_tcp:close(S)
              end,
    %% Three failures spend the allowance; the fourth connection is refused at accept
    %% (the failures before it make events of their own reasons).
    [Garbage() || _ <- lists:seq(1, 4)],
    {_, #{direction := inbound, remote := Remote}} = throttled_event(),
    ?assertMatch(<<"127.0.0.2:", _/binary>>, Remote).

throttled_event() ->
    receive
        {telemetry_event, [teleport, handshake, refused], M, #{reason := throttled} = Meta} ->
            {M, Meta}
    after ?EVENT_TIMEOUT ->
            ct:fail({no_throttled_event, flush()})
    end.

back_pressure(Config) ->
    A = start_peer(Config, "tel_bp", telemetry, #{pool_size => 1, send_queue_bytes => 1024,
                                          max_frame_bytes => 4 * 1024 * 1024}),
    B = start_peer(Config, "tel_bp_b", no_telemetry, #{}),
    start_server(B),
    ok = erpc:call(A, teleport, connect, [B]),
    attach(A),
    BOs = erpc:call(B, os, getpid, []),
    signal("STOP", BOs),
    put(stopped, [BOs]),
    %% A sender on A pushes 1 MiB messages until the queue holds it back.
    Test = self(),
    Sender = erpc:call(A, erlang, spawn,
                       [fun() ->
                                Big = binary:copy(<<2>>, 1024 * 1024),
                                R = [teleport:send({?SERVER, B}, Big, [{key, bp}])
                                     || _ <- lists:seq(1, 64)],
                                Test ! {sender_done, R}
                        end]),
    {#{monotonic_time := _}, #{node := B, kind := send}} = event([teleport, send, suspended]),
    %% While it waits: a nosuspend send in its order (its key) is refused, as is one
    %% over max_frame_bytes. The queue may drain into the kernel's buffers once more
    %% after the first suspension (B is stopped, not its kernel), so a nosuspend send
    %% can still be taken until those are full: try until one is refused.
    ?assertEqual({error, busy}, nosuspend_until_busy(A, B, 100)),
    {#{count := 1}, #{node := B, reason := busy, kind := send}} = event([teleport, frame, refused]),
    ?assertEqual({error, too_large},
                 erpc:call(A, teleport, send, [{?SERVER, B}, binary:copy(<<3>>, 5 * 1024 * 1024)])),
    {#{count := 1}, #{reason := too_large}} = event([teleport, frame, refused]),
    %% Closing the pool drops what was queued, and lets the sender go.
    ok = erpc:call(A, teleport, disconnect, [B]),
    {#{dropped_messages := Dropped}, #{node := B}} = event([teleport, pool, closed]),
    ?assert(Dropped > 0),
    {#{count := Dropped}, #{node := B, direction := out}} = event([teleport, frame, dropped]),
    {#{duration := Waited}, #{node := B}} = event([teleport, send, resumed]),
    ?assert(Waited > 0),
    signal("CONT", BOs),
    put(stopped, []),
    receive
        {sender_done, Results} -> ?assert(lists:member(ok, Results))
    after ?RPC_TIMEOUT ->
            ct:fail({sender_still_waiting, erpc:call(A, erlang, process_info, [Sender])})
    end.

too_many_calls(Config) ->
    A = start_peer(Config, "tel_calls", no_telemetry, #{}),
    B = start_peer(Config, "tel_calls_b", telemetry, #{}),
    start_server(B),
    attach(B),
    Test = self(),
    N = 10200,
    _ = erpc:call(A, erlang, spawn,
                  [fun() ->
                           Self = self(),
                           _ = [spawn(fun() ->
                                              Self ! try teleport:gs_call({?SERVER, B},
                                                                          {delayed_reply, 4000, ok},
                                                                          60000)
                                                     catch exit:{Reason, _} -> Reason
                                                     end
                                      end) || _ <- lists:seq(1, N)],
                           Test ! {outcomes, [receive O -> O end || _ <- lists:seq(1, N)]}
                   end]),
    Outcomes = receive {outcomes, Os} -> Os after 120000 -> ct:fail(calls_hung) end,
    Refused = length([O || {teleport, too_many_calls} = O <- Outcomes]),
    ct:pal("~b calls: ~b refused", [N, Refused]),
    ?assert(Refused >= 200),
    Events = [M || {telemetry_event, [teleport, frame, refused], M, #{node := Node, kind := call,
                                                                       reason := too_many_calls}}
                       <- flush(), Node =:= A],
    ?assertEqual(Refused, length(Events)),
    ?assert(lists:all(fun(#{count := C}) -> C =:= 1 end, Events)).

nosuspend_until_busy(_A, _B, 0) ->
    never_busy;
nosuspend_until_busy(A, B, Tries) ->
    case erpc:call(A, teleport, send, [{?SERVER, B}, x, [nosuspend, {key, bp}]]) of
        ok ->
            timer:sleep(50),
            nosuspend_until_busy(A, B, Tries - 1);
        Other ->
            Other
    end.

undeliverable(Config) ->
    A = start_peer(Config, "tel_undeliv", no_telemetry, #{}),
    B = start_peer(Config, "tel_undeliv_b", telemetry, #{}),
    attach(B),
    Dead = erpc:call(B, erlang, spawn, [fun() -> ok end]),
    ?assert(teleport_test_peer:wait_until(
              fun() -> not erpc:call(B, erlang, is_process_alive, [Dead]) end, 5000)),
    _ = [ok = erpc:call(A, teleport, send, [Dead, lost]) || _ <- lists:seq(1, 3)],
    {#{count := Count}, #{node := A, direction := in, reason := Reason}} =
        event([teleport, frame, dropped]),
    ?assert(Count >= 1),
    ct:pal("undeliverable: ~p (~p)", [Count, Reason]).

cost(Config) ->
    N = env_int("TELEMETRY_COST_CALLS", 2000),
    Blocks = env_int("TELEMETRY_COST_BLOCKS", 2),
    Absent = start_peer(Config, "tel_cost_absent", no_telemetry, #{}),
    Present = start_peer(Config, "tel_cost", telemetry, #{}),
    B = start_peer(Config, "tel_cost_b", no_telemetry, #{}),
    start_server(B),
    Sink = erpc:call(B, erlang, spawn, [?MODULE, counter, []]),
    _ = [ok = erpc:call(A, teleport, connect, [B]) || A <- [Absent, Present]],
    States = [{absent, Absent}, {no_handler, Present}, {handler, Present}],
    Runs = [run_state(State, A, B, Sink, N)
            || Block <- lists:seq(0, Blocks - 1),
               {State, A} <- rotate(States, Block)],
    ct:pal("uptime: ~s", [os:cmd("uptime")]),
    _ = [begin
             Mine = [R || {S, R} <- Runs, S =:= State],
             Line = io_lib:format(
                      "telemetry cost ~p (~p blocks x ~p): gs_call mean ~s us, p50 ~s us, "
                      "p99 ~s us; send mean ~s us; span ~s ns, event ~s ns",
                      [State, Blocks, N | [range(Key, Mine) || Key <- [call_mean, call_p50, call_p99,
                                                                      send_mean, span_ns,
                                                                      event_ns]]]),
             ct:pal("~s", [Line]),
             io:format(user, "~s~n", [Line])
         end || {State, _} <- States],
    ok.

run_state(State, A, B, Sink, N) ->
    State =:= handler andalso
        (ok = erpc:call(A, telemetry, attach_many,
                        [cost_handler, ?EVENTS, fun ?MODULE:noop/4, []])),
    try
        Calls = erpc:call(A, ?MODULE, timed_calls, [{?SERVER, B}, N, {echo, <<"ping">>}], 120000),
        SendUs = erpc:call(A, ?MODULE, timed_sends, [Sink, N, binary:copy(<<5>>, 100)], 120000),
        {SpanNs, EventNs} = erpc:call(A, ?MODULE, timed_spans, [N * 10]),
        Sorted = lists:sort(Calls),
        {State, #{call_mean => lists:sum(Calls) / N, call_p50 => lists:nth(N div 2, Sorted),
                  call_p99 => lists:nth(max(1, N * 99 div 100), Sorted), send_mean => SendUs,
                  span_ns => SpanNs, event_ns => EventNs}}
    after
        State =:= handler andalso (ok = erpc:call(A, telemetry, detach, [cost_handler]))
    end.

rotate(List, N) ->
    {Front, Back} = lists:split(N rem length(List), List),
    Back ++ Front.

%% "min-max (median)" over the blocks.
range(Key, Runs) ->
    Values = lists:sort([float(maps:get(Key, R)) || R <- Runs]),
    io_lib:format("~.2f-~.2f (~.2f)", [hd(Values), lists:last(Values),
                                       lists:nth((length(Values) + 1) div 2, Values)]).

env_int(Var, Default) ->
    case os:getenv(Var) of
        false -> Default;
        Text -> list_to_integer(Text)
    end.

%% @private On the caller's node: each gs_call's round trip, in microseconds.
timed_calls(Dest, N, Request) ->
    [begin
         T0 = erlang:monotonic_time(),
         _ = teleport:gs_call(Dest, Request),
         erlang:convert_time_unit(erlang:monotonic_time() - T0, native, nanosecond) / 1000
     end || _ <- lists:seq(1, N)].

%% @private On the sender's node: mean microseconds per send of N, once the
%% counting sink (see counter/0) has them all.
timed_sends(Sink, N, Msg) ->
    Ref = make_ref(),
    ok = teleport:send(Sink, {expect, N, self(), Ref}),
    T0 = erlang:monotonic_time(),
    _ = [ok = teleport:send(Sink, Msg) || _ <- lists:seq(1, N)],
    Sent = erlang:monotonic_time(),
    receive
        {Ref, done} -> ok
    after 60000 -> erlang:error(sink_incomplete)
    end,
    erlang:convert_time_unit(Sent - T0, native, nanosecond) / 1000 / N.

%% @private Counts messages; tells who asked once it has the number expected.
counter() ->
    receive
        {expect, N, Pid, Ref} -> count(N, Pid, Ref)
    end.

count(0, Pid, Ref) ->
    Pid ! {Ref, done},
    counter();
count(N, Pid, Ref) ->
    receive
        _ -> count(N - 1, Pid, Ref)
    end.

%% @private Nanoseconds per teleport_telemetry:span/3 of nothing, and per execute/3.
timed_spans(N) ->
    Fun = fun() -> {ok, #{}} end,
    T0 = erlang:monotonic_time(),
    _ = [ok = teleport_telemetry:span([teleport, call], #{}, Fun) || _ <- lists:seq(1, N)],
    T1 = erlang:monotonic_time(),
    _ = [ok = teleport_telemetry:execute([teleport, frame, refused], #{count => 1}, #{})
         || _ <- lists:seq(1, N)],
    T2 = erlang:monotonic_time(),
    {erlang:convert_time_unit(T1 - T0, native, nanosecond) / N,
     erlang:convert_time_unit(T2 - T1, native, nanosecond) / N}.

%% @private A handler that does nothing: what telemetry itself costs.
noop(_Event, _Measurements, _Metadata, _Config) ->
    ok.

%%====================================================================
%% Helpers
%%====================================================================

%% @private The handler: telemetry calls it in the process that emits the event.
forward(Event, Measurements, Metadata, Pid) ->
    Pid ! {telemetry_event, Event, Measurements, Metadata},
    ok.

attach(Node) ->
    ok = erpc:call(Node, telemetry, attach_many,
                   [{?MODULE, self()}, ?EVENTS, fun ?MODULE:forward/4, self()]).

event(Name) ->
    receive
        {telemetry_event, Name, Measurements, Metadata} -> {Measurements, Metadata}
    after ?EVENT_TIMEOUT ->
            ct:fail({no_event, Name, flush()})
    end.

%% No other call events (pool events come as the pool opens, whenever that is).
nothing_more() ->
    ?assertEqual([], [E || {telemetry_event, [teleport, call | _], _, _} = E <- flush()]).

flush() ->
    receive
        {telemetry_event, _, _, _} = E -> [E | flush()]
    after 200 -> []
    end.

%% A peer with teleport started, and telemetry started after it, or not in its code
%% path at all.
start_peer(Config, Prefix, Telemetry, AppEnv) ->
    Args = case Telemetry of
               telemetry -> ["-pa", ?config(telemetry_ebin, Config)];
               no_telemetry -> []
           end,
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name(Prefix), Args,
                                                AppEnv),
    put(peers, [Peer | get_list(peers)]),
    Telemetry =:= telemetry andalso
        ({ok, [telemetry]} = erpc:call(Node, application, ensure_all_started, [telemetry])),
    Node.

start_isolated(Prefix, Cookie) ->
    {ok, Peer, Node} = teleport_test_peer:start_isolated(teleport_test_peer:unique_name(Prefix),
                                                         Cookie),
    put(peers, [Peer | get_list(peers)]),
    {Peer, Node}.

start_server(Node) ->
    {ok, _} = erpc:call(Node, teleport_test_server, start, [?SERVER]).

take(Key) ->
    List = get_list(Key),
    put(Key, []),
    List.

get_list(Key) ->
    case get(Key) of
        undefined -> [];
        L -> L
    end.

signal(Sig, OsPid) ->
    true = lists:all(fun(C) -> C >= $0 andalso C =< $9 end, OsPid),
    _ = os:cmd("kill -" ++ Sig ++ " " ++ OsPid),
    ok.

%% telemetry, compiled from the peer projects' copy into the suite's private folder
%% (no network, no rebar3 needed): `{ok, Ebin}', or a skip saying why not.
build_telemetry(PrivDir) ->
    Src = filename:join([peers_dir(), "telemetry", "src"]),
    case filelib:wildcard(filename:join(Src, "*.erl")) of
        [] ->
            {skip, {no_telemetry_source, Src,
                    "set TELEPORT_PEERS to the folder holding the peer projects"}};
        Files ->
            Ebin = filename:join([PrivDir, "telemetry", "ebin"]),
            ok = filelib:ensure_path(Ebin),
            _ = [{ok, _} = compile:file(F, [{outdir, Ebin}, {i, Src}, report_errors])
                 || F <- Files],
            {ok, [{application, telemetry, Props}]} =
                file:consult(filename:join(Src, "telemetry.app.src")),
            Modules = [list_to_atom(filename:basename(F, ".erl")) || F <- Files],
            App = {application, telemetry, lists:keystore(modules, 1, Props, {modules, Modules})},
            ok = file:write_file(filename:join(Ebin, "telemetry.app"),
                                 io_lib:format("~p.~n", [App])),
            {ok, Ebin}
    end.

peers_dir() ->
    case os:getenv("TELEPORT_PEERS") of
        Dir when is_list(Dir), Dir =/= "" ->
            Dir;
        _ ->
            %% The checkout holds _build (code:lib_dir: <checkout>/_build/test/lib/teleport).
            [Checkout | _] = string:split(code:lib_dir(teleport), "/_build/"),
            filename:join([Checkout, "..", "shared", "peers"])
    end.

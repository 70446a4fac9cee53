%%% @doc What teleport does when things go wrong, between real BEAM nodes.
%%%
%%% The test runner's node (the "origin") runs teleport; each case starts the
%%% peer nodes it needs and stops them (by their peer pid, and by OS pid if
%%% they outlive that) when it ends, however it ends.
%%% <ul>
%%% <li>`peer_killed_mid_transfer': a peer is `kill -9'ed while several
%%%     processes stream 10 MiB messages to it and a gs_call to it is in
%%%     flight. Nothing hangs, the pool and its threads go away, teleport keeps
%%%     working to another peer.</li>
%%% <li>`same_name_comes_back': a node stops and a new one with the same name
%%%     starts; the next send reaches the new one.</li>
%%% <li>`stalled_receiver_bounds_memory': the receiving node is SIGSTOPped;
%%%     senders block and the origin's binary memory stays bounded by
%%%     `send_queue_bytes', not by what the senders want to send. After
%%%     SIGCONT every message arrives.</li>
%%% <li>`nosuspend_returns_busy': the same stall; `nosuspend' sends get
%%%     `{error, busy}' instead of blocking, and a busy message is not sent.</li>
%%% <li>`hostile_listener': garbage, oversized and truncated handshakes, a
%%%     silent client, a wrong cookie and a burst of 500 connections (from a
%%%     source of its own, throttled after 100) against a node's listener: no
%%%     atom created, no thread or memory kept, the node still serves teleport.</li>
%%% <li>`app_restart': stopping teleport on a node closes its listener and its
%%%     connections and ends its threads; starting it again works.</li>
%%% <li>`stopped_mid_operation': teleport is stopped on the sending node while
%%%     its senders wait on back-pressure with 10 MiB messages queued for a
%%%     SIGSTOPped peer, and on the receiving node while a message waits for a
%%%     (suspended) decoder. Both stops return, every waiting send ends, what
%%%     arrives from each sender is a prefix of what it was told was sent, in
%%%     order, the receiver logs the message it could not deliver, and teleport
%%%     starts again on both nodes and carries traffic.</li>
%%% <li>`listen_ip_loopback': a node with `listen_ip' 127.0.0.2 is reached
%%%     there, and its port on 127.0.0.3 refuses connections.</li>
%%% <li>group `netns' (root only, needs `ip netns'): two nodes in two network
%%%     namespaces joined by a veth pair. teleport works across it, and a silent
%%%     partition (the link goes down: no FIN, no RST) unblocks senders once
%%%     distributed Erlang declares the node down; after the link comes back,
%%%     one sender's messages still arrive in order and no stale inbound
%%%     connection is left behind. `listen_ip_in_namespace': a node whose
%%%     `listen_ip' is its veth address is reached there (from its own and the
%%%     other namespace, by teleport too) and refuses on 127.0.0.1 of its
%%%     namespace.</li>
%%% </ul>
%%% Sinks on the peers forward a summary of what they receive (never the
%%% 10 MiB payloads) back over distributed Erlang; see teleport_rel_remote.
-module(reliability_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0,
         init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2,
         init_per_testcase/2, end_per_testcase/2]).

-export([peer_killed_mid_transfer/1, same_name_comes_back/1,
         stalled_receiver_bounds_memory/1, nosuspend_returns_busy/1,
         hostile_listener/1, app_restart/1, stopped_mid_operation/1, listen_ip_loopback/1,
         veth_transfer/1, partition_heal/1, listen_ip_in_namespace/1]).
%% Run on namespace peers too.
-export([restart_teleport/1, send_batch/4]).

-define(MiB, (1024 * 1024)).
-define(BIG, (10 * ?MiB)).
-define(POOL_SIZE, 4).
-define(STALL_QUEUE_BYTES, (8 * ?MiB)).
-define(SINK, teleport_rel_sink).
-define(COLLECTOR, teleport_rel_collector).
-define(RPC_TIMEOUT, 30000).
-define(MSG_TIMEOUT, 60000).
%% Cleanup that must run even when a case's process is killed by its timetrap
%% (end_per_testcase then runs in a new process): kept in a public table owned
%% by a process that lives as long as the suite.
-define(TRACK, teleport_rel_track).

%% handshake.rs, HandshakeError::reason/0: why a handshake failed. events.rs
%% makes an atom of it for the log event; whatever a client sends, these are
%% the only names it can be.
-define(HANDSHAKE_REASONS, [<<"io">>, <<"timeout">>, <<"malformed">>, <<"oversized">>,
                            <<"version">>, <<"wrong_node">>, <<"own_node_name">>, <<"bad_node_name">>,
                            <<"bad_cookie">>, <<"throttled">>, <<"too_many_handshakes">>]).
%% Where the burst of connections comes from: a source of its own, which H
%% throttles past max_handshake_failures_per_ip (100) while this node, dialing
%% from 127.0.0.1, keeps its allowance.
-define(BURST_SOURCE, {127, 0, 0, 5}).

%% The namespaces' addresses exist only inside the namespaces this suite makes.
-define(NS_A_IP, "10.200.0.1").
-define(NS_B_IP, "10.200.0.2").
%% Nodes in the namespaces have no epmd: each listens for disterl on this port
%% and assumes the other does too (-erl_epmd_port).
-define(NS_DIST_PORT, "4370").
-define(NS_POOL_SIZE, 2).

%%====================================================================
%% Common Test callbacks
%%====================================================================

suite() ->
    [{timetrap, {minutes, 10}}].

all() ->
    [peer_killed_mid_transfer,
     same_name_comes_back,
     stalled_receiver_bounds_memory,
     nosuspend_returns_busy,
     hostile_listener,
     app_restart,
     stopped_mid_operation,
     listen_ip_loopback,
     {group, netns}].

groups() ->
    [{netns, [], [veth_transfer, partition_heal, listen_ip_in_namespace]}].

init_per_suite(Config) ->
    %% Our own node name: another suite run on this host may hold teleport_ct.
    WasDistributed = node() =/= nonode@nohost,
    case teleport_test_peer:start_local_teleport("teleport_rel", #{pool_size => ?POOL_SIZE}) of
        ok ->
            Started = not WasDistributed andalso node() =/= nonode@nohost,
            [{tracker, start_tracker()}, {started_distribution, Started} | Config];
        {fail, _} = Fail ->
            Fail
    end.

end_per_suite(Config) ->
    cleanup(suite),
    ?config(tracker, Config) ! stop,
    teleport_test_peer:stop_local_teleport(#{pool_size => ?POOL_SIZE}),
    _ = ?config(started_distribution, Config) andalso net_kernel:stop(),
    ok.

init_per_group(netns, Config) ->
    case netns_prerequisites() of
        {ok, IpExe, Erl} ->
            try
                [{netns, setup_netns(IpExe, Erl)} | Config]
            catch
                Class:Reason:Stack ->
                    cleanup(netns),
                    erlang:raise(Class, Reason, Stack)
            end;
        {skip, _} = Skip ->
            Skip
    end.

end_per_group(netns, _Config) ->
    cleanup(netns),
    ok.

init_per_testcase(Case, Config) when Case =:= stalled_receiver_bounds_memory;
                                     Case =:= nosuspend_returns_busy ->
    %% Settings apply when teleport starts.
    restart_teleport([{send_queue_bytes, ?STALL_QUEUE_BYTES}]),
    track(testcase, {teleport_env, [send_queue_bytes]}),
    init_case(Config);
init_per_testcase(_Case, Config) ->
    init_case(Config).

init_case(Config) ->
    flush(),
    Config.

end_per_testcase(_Case, _Config) ->
    cleanup(testcase),
    flush(),
    ok.

%%====================================================================
%% peer_killed_mid_transfer
%%====================================================================

peer_killed_mid_transfer(_Config) ->
    {P, POs} = start_peer("rel_p", #{}),
    {Q, _} = start_peer("rel_q", #{}),
    {ok, _} = teleport_rel_remote:start_sink(P, ?SINK, self()),
    {ok, _} = teleport_rel_remote:start_sink(Q, ?SINK, self()),
    {ok, Srv} = erpc:call(P, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    ?assertNot(lists:member(P, teleport:nodes())),
    ThreadsBefore = os_threads(),
    SocketsBefore = os_sockets(),
    %% The call opens the pool; it must still be in flight at the kill.
    Req = {sleep, 30000},
    Caller = spawn_caller(Srv, Req, 60000),
    ?assert(teleport_test_peer:wait_until(fun() -> sleeping(P, Srv) end, ?RPC_TIMEOUT)),
    ThreadsOpen = os_threads(),
    SocketsOpen = os_sockets(),
    Tag = make_ref(),
    Big = crypto:strong_rand_bytes(?BIG),
    Streamers = [spawn_streamer({?SINK, P}, Tag, I, Big) || I <- lists:seq(1, 4)],
    %% Mid-transfer: some messages have arrived, the senders are still going.
    ?assertEqual(8, length(collect(Tag, 8, ?MSG_TIMEOUT))),
    Killed = now_ms(),
    signal("KILL", POs),
    Deadline = Killed + 10000,
    Streamed = [await_streamer(S, Deadline) || S <- Streamers],
    CallResult = receive
                     {call_result, Caller, R, _} -> R
                 after remaining(Deadline) ->
                         {still_waiting, erlang:process_info(Caller, [current_function, status])}
                 end,
    PoolGone = teleport_test_peer:wait_until(fun() -> not lists:member(P, teleport:nodes()) end, remaining(Deadline)),
    SocketsBack = teleport_test_peer:wait_until(fun() -> os_sockets() =< SocketsBefore end, 10000),
    ThreadsAfter = os_threads(),
    %% Every message send accepted (the streamers' oks and the call) was
    %% either written or counted as dropped: none vanished uncounted.
    Accepted = 1 + lists:sum([Oks || {streamed, Oks, _, _} <- Streamed]),
    Accounted = fun() ->
                        #{messages_out := Out, dropped_out := Dropped} = teleport:stats(P),
                        Out + Dropped
                end,
    _ = teleport_test_peer:wait_until(fun() -> Accounted() =:= Accepted end, 10000),
    ct:pal("streamers {streamed, messages ok, then, ms after the kill}: ~p~ncall: ~p~n"
           "pool gone: ~p, ~p ms after the kill~n"
           "OS threads: ~p before the pool, ~p with it, ~p after~n"
           "sockets: ~p before the pool, ~p with it, ~p after~n"
           "accepted ~p, written + dropped ~p; stats: ~p",
           [[setelement(4, S, At - Killed) || {streamed, _, _, At} = S <- Streamed] ++
                [S || S <- Streamed, element(1, S) =/= streamed],
            CallResult, PoolGone, now_ms() - Killed,
            ThreadsBefore, ThreadsOpen, ThreadsAfter, SocketsBefore, SocketsOpen, os_sockets(),
            Accepted, Accounted(), teleport:stats(P)]),
    %% Every sender came back, within 10 s, with ok or noconnection only.
    _ = [?assertMatch({streamed, Oks, {error, noconnection}, At}
                        when is_integer(Oks) andalso At =< Deadline, S)
         || S <- Streamed],
    ?assertMatch({exit, {Reason, {teleport, gs_call, [Srv, Req, 60000]}}}
                   when Reason =:= {nodedown, P} orelse Reason =:= noconnection,
                 CallResult),
    ?assert(PoolGone),
    ?assertMatch(#{connections := 0}, teleport:stats(P)),
    ?assertEqual(Accepted, Accounted()),
    %% Connections cost no thread: the I/O threads serve them all. Each costs one
    %% descriptor, and every one is closed once the pool is gone (a leaked connection
    %% is exactly what this must catch).
    ?assert(ThreadsOpen < ThreadsBefore + ?POOL_SIZE),
    ?assert(ThreadsAfter =< ThreadsOpen),
    ?assert(SocketsOpen >= SocketsBefore + ?POOL_SIZE),
    ?assert(SocketsBack),
    %% teleport still works to another node.
    Tag2 = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, Q}, {Tag2, q, 1, <<"after the kill">>})),
    ?assertEqual([{Q, q, 1, 14}], collect(Tag2, 1, ?MSG_TIMEOUT)),
    {ok, SrvQ} = erpc:call(Q, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    ?assertEqual({Tag2, echo}, teleport:gs_call(SrvQ, {echo, {Tag2, echo}}, 10000)).

%% Sends {Tag, Id, Seq, Big} until a send is not ok.
spawn_streamer(Dest, Tag, Id, Big) ->
    Parent = self(),
    spawn_link(fun() -> Parent ! {streamer_done, self(), stream(Dest, Tag, Id, Big, 1)} end).

stream(_Dest, _Tag, _Id, _Big, Seq) when Seq > 100000 ->
    {streamed, Seq - 1, never_refused, now_ms()};
stream(Dest, Tag, Id, Big, Seq) ->
    case teleport:send(Dest, {Tag, Id, Seq, Big}) of
        ok -> stream(Dest, Tag, Id, Big, Seq + 1);
        Other -> {streamed, Seq - 1, Other, now_ms()}
    end.

await_streamer(Pid, Deadline) ->
    receive
        {streamer_done, Pid, Result} -> Result
    after remaining(Deadline) ->
            {hung, Pid, erlang:process_info(Pid, [current_function, status])}
    end.

spawn_caller(Dest, Req, Timeout) ->
    Parent = self(),
    spawn_link(fun() ->
                       R = catch_exit(fun() -> teleport:gs_call(Dest, Req, Timeout) end),
                       Parent ! {call_result, self(), R, now_ms()}
               end).

%%====================================================================
%% same_name_comes_back
%%====================================================================

same_name_comes_back(_Config) ->
    Name = teleport_test_peer:unique_name("rel_same"),
    {ok, Peer1, Node} = teleport_test_peer:start(Name, [], #{}),
    Os1 = track_peer(testcase, Peer1, Node),
    {ok, Sink1} = teleport_rel_remote:start_sink(Node, ?SINK, self()),
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, Node}, {Tag, first, 1, <<"one">>})),
    ?assertEqual([{Node, first, 1, 3}], collect(Tag, 1, ?MSG_TIMEOUT)),
    ok = teleport_test_peer:stop(Peer1),
    %% peer:stop returns when distributed Erlang drops, which can be before the
    %% OS process (and the listener in it) is gone.
    ?assert(teleport_test_peer:wait_until(fun() -> not os_process_is(Os1, atom_to_list(Node)) end,
                                          10000)),
    ?assert(teleport_test_peer:wait_until(fun() -> not lists:member(Node, teleport:nodes()) end, 10000)),
    %% While it is gone: refused, and a failure the connector remembers.
    ?assertEqual({error, noconnection}, teleport:send({?SINK, Node}, {Tag, down, 1, <<"lost">>})),
    {ok, Peer2, Node2} = teleport_test_peer:start(Name, [], #{}),
    Os2 = track_peer(testcase, Peer2, Node2),
    ?assertEqual(Node, Node2),
    ?assertNotEqual(Os1, Os2),
    {ok, Sink2} = teleport_rel_remote:start_sink(Node, ?SINK, self()),
    ?assertNotEqual(Sink1, Sink2),
    %% The very next send reaches the new node.
    ?assertEqual(ok, teleport:send({?SINK, Node}, {Tag, second, 1, <<"two">>})),
    ?assertEqual([{Node, second, 1, 3}], collect(Tag, 1, ?MSG_TIMEOUT)),
    ?assert(lists:member(Node, teleport:nodes())),
    %% And the new node's teleport reaches us (its own pool to us, our inbound).
    {ok, Echo} = teleport_test_peer:start_echo(Node, self()),
    ?assertEqual(ok, teleport:send(Echo, {Tag, echo})),
    receive
        {teleport_ct_echo, Echo, {Tag, echo}} -> ok;
        {teleport_ct_echo_error, Echo, Error} -> ct:fail({echo_failed, Error})
    after ?MSG_TIMEOUT ->
            ct:fail(no_echo_from_new_node)
    end,
    {ok, Srv} = erpc:call(Node, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    ?assertEqual(Node, teleport:gs_call(Srv, whoami, 10000)).

%%====================================================================
%% stalled_receiver_bounds_memory
%%====================================================================

stalled_receiver_bounds_memory(_Config) ->
    Senders = 4,
    PerSender = 20,
    {S, SOs} = start_peer("rel_s", #{}),
    {ok, _} = teleport_rel_remote:start_sink(S, ?SINK, self()),
    %% Open the pool while S can still answer the address lookup.
    ?assertEqual(ok, teleport:connect(S)),
    ?assertMatch(#{connections := ?POOL_SIZE}, teleport:stats(S)),
    garbage_collect(),
    BinBefore = erlang:memory(binary),
    signal("STOP", SOs),
    Tag = make_ref(),
    Pids = [spawn_batch_sender({?SINK, S}, Tag, I, PerSender) || I <- lists:seq(1, Senders)],
    ?assert(teleport_test_peer:wait_until(fun() -> blocked_in_teleport(Pids) =/= [] end, ?RPC_TIMEOUT)),
    Peak = peak_binary_memory(3000),
    Blocked = blocked_in_teleport(Pids),
    %% What the origin may hold while S is stopped, per sender: bytes under its
    %% connection's limit (send_queue_bytes, 8 MiB, as if it had a connection
    %% of its own), the one message past the limit that it was allowed to queue
    %% before waiting (10 MiB), and the next message it is making (10 MiB):
    %% 28 MiB, so 112 MiB for 4 senders, plus 32 MiB for whatever else the VM
    %% allocates meanwhile. Bytes in the kernel's socket buffers are not VM
    %% memory. Unbounded, the senders would hold 4 x 20 x 10 MiB = 800 MiB.
    Bound = Senders * (?STALL_QUEUE_BYTES + 2 * ?BIG) + 32 * ?MiB,
    ct:pal("binary memory: ~p MiB before, peak ~p MiB over 3 s (bound ~p MiB over the start)~n"
           "blocked in teleport: ~p of ~p~nstats while stalled: ~p",
           [BinBefore div ?MiB, Peak div ?MiB, Bound div ?MiB, length(Blocked), Senders,
            teleport:stats(S)]),
    ?assert(Peak - BinBefore < Bound),
    ?assertNotEqual([], Blocked),
    signal("CONT", SOs),
    Got = collect(Tag, Senders * PerSender, 120000),
    Results = [receive
                   {batch_done, Pid, R} -> R
               after ?MSG_TIMEOUT ->
                       {not_done, erlang:process_info(Pid, [current_function, status])}
               end || Pid <- Pids],
    ?assertEqual([lists:duplicate(PerSender, ok) || _ <- Pids], Results),
    ?assertEqual(Senders * PerSender, length(Got)),
    ?assertEqual([{I, Seq} || I <- lists:seq(1, Senders), Seq <- lists:seq(1, PerSender)],
                 lists:sort([{I, Seq} || {_, I, Seq, _} <- Got])),
    ?assertEqual([?BIG], lists:usort([Size || {_, _, _, Size} <- Got])),
    %% Each sender's messages arrived in the order it sent them.
    _ = [?assertEqual({I, lists:seq(1, PerSender)}, {I, [Seq || {_, J, Seq, _} <- Got, J =:= I]})
         || I <- lists:seq(1, Senders)],
    ok.

%% Sends Count fresh 10 MiB binaries; reports the results.
spawn_batch_sender(Dest, Tag, Id, Count) ->
    Parent = self(),
    spawn_link(fun() ->
                       Results = [teleport:send(Dest, {Tag, Id, Seq, crypto:strong_rand_bytes(?BIG)})
                                  || Seq <- lists:seq(1, Count)],
                       Parent ! {batch_done, self(), Results}
               end).

%% Processes waiting in teleport:send for their connection's queue to drain.
blocked_in_teleport(Pids) ->
    [Pid || Pid <- Pids,
            erlang:process_info(Pid, [current_function, status])
                =:= [{current_function, {teleport, await_resume, 2}}, {status, waiting}]].

peak_binary_memory(Ms) ->
    peak_binary_memory(deadline(Ms), erlang:memory(binary)).

peak_binary_memory(Deadline, Peak) ->
    case remaining(Deadline) of
        0 ->
            Peak;
        _ ->
            timer:sleep(50),
            peak_binary_memory(Deadline, max(Peak, erlang:memory(binary)))
    end.

%%====================================================================
%% nosuspend_returns_busy
%%====================================================================

nosuspend_returns_busy(_Config) ->
    {S, SOs} = start_peer("rel_s", #{}),
    {ok, _} = teleport_rel_remote:start_sink(S, ?SINK, self()),
    ?assertEqual(ok, teleport:connect(S)),
    signal("STOP", SOs),
    Tag = make_ref(),
    %% One binary, sent again and again: the attempts cost no memory.
    Big = crypto:strong_rand_bytes(?BIG),
    Max = 20,
    Parent = self(),
    Trier = spawn_link(fun() ->
                               Parent ! {tried, self(), send_until_busy({?SINK, S}, Tag, Big, 1, Max)}
                       end),
    Results = receive
                  {tried, Trier, R} -> R
              after 10000 ->
                      ct:fail({nosuspend_send_blocked,
                               erlang:process_info(Trier, [current_function, status])})
              end,
    ct:pal("nosuspend results: ~p~nstats while stalled: ~p", [Results, teleport:stats(S)]),
    ?assertEqual({error, busy}, lists:last(Results)),
    Accepted = length(Results) - 1,
    ?assert(Accepted >= 1),
    ?assertEqual(lists:duplicate(Accepted, ok), lists:droplast(Results)),
    signal("CONT", SOs),
    %% Exactly the accepted messages arrive; the busy one was never queued.
    Got = collect(Tag, Accepted, 120000),
    ?assertEqual([{S, nosuspend, Seq, ?BIG} || Seq <- lists:seq(1, Accepted)], Got),
    ?assertEqual([], collect(Tag, 1, 2000)),
    %% With the queue drained, nosuspend sends go through again.
    ?assertEqual(ok, teleport:send({?SINK, S}, {Tag, nosuspend, 0, <<"again">>}, [nosuspend])),
    ?assertEqual([{S, nosuspend, 0, 5}], collect(Tag, 1, ?MSG_TIMEOUT)).

send_until_busy(_Dest, _Tag, _Big, Seq, Max) when Seq > Max ->
    [{never_busy_after, Max}];
send_until_busy(Dest, Tag, Big, Seq, Max) ->
    case teleport:send(Dest, {Tag, nosuspend, Seq, Big}, [nosuspend]) of
        ok -> [ok | send_until_busy(Dest, Tag, Big, Seq + 1, Max)];
        Other -> [Other]
    end.

%%====================================================================
%% hostile_listener
%%====================================================================

hostile_listener(_Config) ->
    {H, HOs} = start_peer("rel_h", #{handshake_timeout => 500}),
    HBin = atom_to_binary(H),
    Addr = teleport_test_peer:connectable(erpc:call(H, teleport, listen_address, [], ?RPC_TIMEOUT)),
    {ok, _} = teleport_rel_remote:start_sink(H, ?SINK, self()),
    {ok, Srv} = erpc:call(H, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    %% A pool opened before the attacks, to check it outlives them.
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, H}, {Tag, before, 1, <<"x">>})),
    ?assertEqual([{H, before, 1, 1}], collect(Tag, 1, ?MSG_TIMEOUT)),
    warm_up(H),
    NewReasons = [R || R <- ?HANDSHAKE_REASONS, not atom_exists(H, R)],
    %% teleport's notices reach H's default handler: the first one printed loads
    %% the modules that format it (and their atoms). Loaded before counting.
    ok = rpc(H, code, ensure_modules_loaded, [[io, io_lib, io_lib_format, io_lib_pretty,
                                               logger_formatter]]),
    AtomsBefore = rpc(H, erlang, system_info, [atom_count]),
    MemBefore = rpc(H, erlang, memory, [total]),
    ThreadsBefore = peer_os_threads(H, HOs),
    %% Names no node has: if the handshake made atoms of what clients send,
    %% these would show up on H.
    Fresh = [fresh_name(I) || I <- lists:seq(1, 4)],
    [Fresh1, Fresh2, Fresh3, Fresh4] = Fresh,
    %% (a) Random bytes: closed, nothing sent back.
    Garbage = [garbage(Seed) || Seed <- lists:seq(1, 20)],
    _ = [?assertMatch({_, Closed} when Closed =:= closed orelse Closed =:= reset,
                      {Seed, raw_exchange(Addr, Bytes, close_wait)})
         || {Seed, Bytes} <- lists:zip(lists:seq(1, 20), Garbage)],
    %% (b) A HELLO claiming 65535 bytes.
    Huge = <<16#FFFF:16, 1, (crypto:strong_rand_bytes(200))/binary>>,
    ?assertMatch(C when C =:= closed orelse C =:= reset, raw_exchange(Addr, Huge, close_wait)),
    %% (c) A HELLO cut short, then our end closed for writing: H must not wait
    %% for the rest.
    <<Truncated:20/binary, _/binary>> = hello(Fresh1, HBin),
    ?assertEqual(closed, raw_exchange(Addr, Truncated, half_close)),
    %% A well-formed HELLO for some other node.
    ?assertMatch(C when C =:= closed orelse C =:= reset,
                 raw_exchange(Addr, hello(Fresh2, <<"nobody@127.0.0.1">>), close_wait)),
    %% A HELLO for H gets a CHALLENGE; a made-up proof gets the door.
    ?assertEqual({challenged, closed}, raw_exchange(Addr, hello(Fresh3, HBin), bad_proof)),
    %% (d) Silence: H gives up after its handshake_timeout (500 ms).
    ?assertEqual({error, closed}, raw_exchange(Addr, <<>>, silent)),
    %% A HELLO for H, one byte every 100 ms: the 500 ms are for the whole
    %% handshake, so H closes long before the last byte (after ~9 s).
    ?assertEqual(closed, raw_exchange(Addr, hello(Fresh4, HBin), trickle)),
    %% (e) A node with another cookie, through teleport itself.
    {W, WNode} = start_isolated("rel_w", teleport_rel_wrong_cookie),
    ?assertEqual({error, {handshake, bad_cookie}},
                 peer:call(W, teleport, connect, [H, Addr], ?RPC_TIMEOUT)),
    %% (f) 500 connect/close, 10 at a time, from another source.
    Burst = connect_burst(Addr, ?BURST_SOURCE, 10, 50),
    ct:pal("burst of 500 connect/close: ~p", [Burst]),
    %% Every handshake thread is gone, and nothing else was kept.
    ThreadsBack = teleport_test_peer:wait_until(fun() -> peer_os_threads(H, HOs) =< ThreadsBefore end, 15000),
    AtomsAfter = rpc(H, erlang, system_info, [atom_count]),
    Created = [R || R <- NewReasons, atom_exists(H, R)],
    MemAfter = rpc(H, erlang, memory, [total]),
    ct:pal("on ~p: atoms ~p -> ~p (handshake reason atoms created: ~p)~n"
           "memory ~p -> ~p KiB~nOS threads ~p -> ~p~nstats: ~p",
           [H, AtomsBefore, AtomsAfter, [binary_to_list(C) || C <- Created], MemBefore div 1024, MemAfter div 1024,
            ThreadsBefore, peer_os_threads(H, HOs), rpc(H, teleport, stats, [])]),
    %% The only atoms allowed are the fixed reason names of the log event,
    %% and none of the names clients sent.
    ?assertEqual(length(Created), AtomsAfter - AtomsBefore),
    ?assertEqual([], [N || N <- [atom_to_binary(WNode) | Fresh], atom_exists(H, N)]),
    ?assert(ThreadsBack),
    ?assert(MemAfter - MemBefore < 20 * ?MiB),
    %% Only the origin ever authenticated to H.
    ?assertEqual([node()], maps:keys(rpc(H, teleport, stats, []))),
    ?assertEqual([], rpc(H, teleport, nodes, [])),
    %% H still serves teleport: on the pool from before, and on a new one.
    ?assertEqual(ok, teleport:send({?SINK, H}, {Tag, old_pool, 1, <<"y">>})),
    ?assertEqual([{H, old_pool, 1, 1}], collect(Tag, 1, ?MSG_TIMEOUT)),
    ?assertEqual(ok, teleport:disconnect(H)),
    ?assert(teleport_test_peer:wait_until(fun() -> not lists:member(H, teleport:nodes()) end, 10000)),
    %% Opened explicitly, so a failure says why.
    ?assertEqual(ok, teleport:connect(H)),
    ?assertEqual(ok, teleport:send({?SINK, H}, {Tag, new_pool, 1, <<"z">>})),
    ?assertEqual([{H, new_pool, 1, 1}], collect(Tag, 1, ?MSG_TIMEOUT)),
    ?assertEqual({Tag, call}, teleport:gs_call(Srv, {echo, {Tag, call}}, 10000)).

%% Loads what the measurements themselves use on H (and the logger's
%% formatting, by logging once at notice level, as a failed handshake does),
%% so that lazy code loading is not counted as atoms the attacks made.
warm_up(H) ->
    _ = [rpc(H, erlang, system_info, [atom_count]) || _ <- [1, 2]],
    _ = rpc(H, erlang, memory, [total]),
    _ = rpc(H, teleport, stats, []),
    _ = rpc(H, teleport, nodes, []),
    _ = atom_exists(H, <<"teleport_rel_warm_up_never_an_atom">>),
    ok = rpc(H, logger, notice, ["reliability_SUITE: warming up the logger",
                                 [], #{domain => [teleport]}]),
    ok.

%% Opens a connection to Addr, sends Bytes, then:
%%   close_wait: returns how H ended it (closed or reset; H must send nothing);
%%   half_close: closes our sending side first, then the same;
%%   bad_proof: expects a CHALLENGE, answers with a wrong proof, then the same;
%%   silent: returns what a 5 s recv gets;
%%   trickle: sends Bytes one at a time (see trickle/2).
raw_exchange({Ip, Port}, Bytes, Then) ->
    {ok, Sock} = gen_tcp:connect(Ip, Port, [binary, {active, false}, {packet, raw}], 5000),
    try
        Then =:= trickle orelse (ok = gen_tcp:send(Sock, Bytes)),
        case Then of
            trickle ->
                trickle(Sock, Bytes);
            close_wait ->
                await_close(Sock);
            half_close ->
                ok = gen_tcp:shutdown(Sock, write),
                await_close(Sock);
            bad_proof ->
                case gen_tcp:recv(Sock, 42, 5000) of
                    {ok, <<40:16, 2, 2, _NonceS:32/binary, _Capabilities:6/binary>>} ->
                        ok = gen_tcp:send(Sock, handshake_message(3, <<0:256, 0:48>>)),
                        {challenged, await_close(Sock)};
                    Other ->
                        {no_challenge, Other}
                end;
            silent ->
                gen_tcp:recv(Sock, 0, 5000)
        end
    after
        gen_tcp:close(Sock)
    end.

%% Sends one byte at a time, 100 ms apart, until H closes (or the bytes run out).
trickle(_Sock, <<>>) ->
    all_sent;
trickle(Sock, <<Byte, Rest/binary>>) ->
    case gen_tcp:send(Sock, <<Byte>>) of
        ok ->
            case gen_tcp:recv(Sock, 0, 100) of
                {error, timeout} -> trickle(Sock, Rest);
                {error, closed} -> closed;
                {error, econnreset} -> closed;
                Other -> Other
            end;
        {error, _} ->
            closed
    end.

%% closed (FIN) or reset (RST: H closed with our bytes unread); anything H
%% sends instead is returned.
await_close(Sock) ->
    case gen_tcp:recv(Sock, 0, 5000) of
        {error, closed} -> closed;
        {error, econnreset} -> reset;
        Other -> Other
    end.

%% handshake.rs: every message is [u16 length][u8 tag][body], the length
%% counting tag and body. HELLO (tag 1) is
%% [1][32-byte nonce][u8 len][client node][u8 len][server node], the nonce
%% starting with "teleprt" and the client's protocol version (2).
hello(Client, Server) ->
    handshake_message(1, <<1, "teleprt", 2, (crypto:strong_rand_bytes(24))/binary,
                           (byte_size(Client)), Client/binary,
                           (byte_size(Server)), Server/binary>>).

handshake_message(Tag, Body) ->
    <<(1 + byte_size(Body)):16, Tag, Body/binary>>.

fresh_name(I) ->
    iolist_to_binary(["rel_fresh_", integer_to_list(I), "_",
                      integer_to_list(erlang:unique_integer([positive])), "@127.0.0.1"]).

%% Reproducible garbage, 1 to 1024 bytes.
garbage(Seed) ->
    State = rand:seed_s(exsss, {Seed, 7, 1999}),
    {Len, State1} = rand:uniform_s(1024, State),
    {Bytes, _} = rand:bytes_s(Len, State1),
    Bytes.

%% Workers x PerWorker connections from `Source' opened and closed at once, as
%% fast as they go.
connect_burst({Ip, Port}, Source, Workers, PerWorker) ->
    Parent = self(),
    Pids = [spawn_link(fun() ->
                               Rs = [case gen_tcp:connect(Ip, Port, [binary, {active, false},
                                                                     {ip, Source}], 5000) of
                                         {ok, S} -> gen_tcp:close(S), ok;
                                         {error, E} -> E
                                     end || _ <- lists:seq(1, PerWorker)],
                               Parent ! {burst, self(), Rs}
                       end) || _ <- lists:seq(1, Workers)],
    count(lists:append([receive {burst, Pid, Rs} -> Rs after ?MSG_TIMEOUT -> [timeout] end
                        || Pid <- Pids])).

atom_exists(Node, Bin) ->
    try erpc:call(Node, erlang, binary_to_existing_atom, [Bin, utf8], ?RPC_TIMEOUT) of
        _ -> true
    catch
        error:{exception, badarg, _} -> false
    end.

%%====================================================================
%% app_restart
%%====================================================================

app_restart(_Config) ->
    {R, ROs} = start_bare_peer("rel_r"),
    ThreadsBare = peer_os_threads(R, ROs),
    ?assertMatch({ok, _}, rpc(R, application, ensure_all_started, [teleport])),
    ThreadsStarted = peer_os_threads(R, ROs),
    {ok, _} = teleport_rel_remote:start_sink(R, ?SINK, self()),
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, R}, {Tag, before, 1, <<"b">>})),
    ?assertEqual([{R, before, 1, 1}], collect(Tag, 1, ?MSG_TIMEOUT)),
    %% R's own pool to us too, so that stop has both directions to close.
    {ok, Echo} = teleport_test_peer:start_echo(R, self()),
    ?assertEqual(ok, teleport:send(Echo, {Tag, echo})),
    receive {teleport_ct_echo, Echo, {Tag, echo}} -> ok after ?MSG_TIMEOUT -> ct:fail(no_echo) end,
    ThreadsRunning = peer_os_threads(R, ROs),
    {OldIp, OldPort} = teleport_test_peer:connectable(rpc(R, teleport, listen_address, [])),
    ok = rpc(R, application, stop, [teleport]),
    Refused = gen_tcp:connect(OldIp, OldPort, [binary, {active, false}], 5000),
    PoolGone = teleport_test_peer:wait_until(fun() -> not lists:member(R, teleport:nodes()) end, 10000),
    ThreadsBack = teleport_test_peer:wait_until(fun() -> peer_os_threads(R, ROs) =< ThreadsBare end, 10000),
    ct:pal("~p's OS threads: ~p before teleport, ~p started, ~p with pools both ways, ~p stopped~n"
           "connect to the old port ~p: ~p",
           [R, ThreadsBare, ThreadsStarted, ThreadsRunning, peer_os_threads(R, ROs),
            OldPort, Refused]),
    ?assertEqual({error, econnrefused}, Refused),
    ?assert(PoolGone),
    ?assertMatch(#{connections := 0}, teleport:stats(R)),
    ?assert(ThreadsBack),
    ?assertEqual({error, not_started}, rpc(R, teleport, listen_address, [])),
    %% Started again: found at its new address, with no help.
    ok = rpc(R, application, start, [teleport]),
    ?assertMatch({_, Port} when is_integer(Port), rpc(R, teleport, listen_address, [])),
    ?assertEqual(ok, teleport:send({?SINK, R}, {Tag, again, 1, <<"a">>})),
    ?assertEqual([{R, again, 1, 1}], collect(Tag, 1, ?MSG_TIMEOUT)),
    {ok, Srv} = rpc(R, teleport_test_server, start_anon, []),
    ?assertEqual(R, teleport:gs_call(Srv, whoami, 10000)),
    ?assertEqual(ok, teleport:send(Echo, {Tag, echo_again})),
    receive
        {teleport_ct_echo, Echo, {Tag, echo_again}} -> ok
    after ?MSG_TIMEOUT ->
            ct:fail(no_echo_after_restart)
    end.

%%====================================================================
%% stopped_mid_operation
%%====================================================================

stopped_mid_operation(_Config) ->
    %% A small queue limit: every 10 MiB send waits until most of it is written.
    {S, _} = start_peer("rel_ms", #{send_queue_bytes => ?MiB}),
    {R, _} = start_peer("rel_mr", #{}),
    {ok, _} = teleport_rel_remote:start_sink(R, ?SINK, self()),
    %% The sending side, while its senders stream to R and wait on back-pressure.
    Tag = make_ref(),
    {Senders, PerSender} = {3, 30},
    Parent = self(),
    Pids = [rpc(S, erlang, spawn, [fun() -> Parent ! {batch_done, self(), send_batch({?SINK, R}, Tag, I, PerSender)} end])
            || I <- lists:seq(1, Senders)],
    First = collect(Tag, 5, ?MSG_TIMEOUT),
    ?assertEqual(5, length(First)),
    ?assert(teleport_test_peer:wait_until(
              fun() -> rpc(S, teleport_rel_remote, blocked_senders, []) =/= [] end, ?RPC_TIMEOUT)),
    {StopS, ok} = timer:tc(fun() -> rpc(S, application, stop, [teleport]) end),
    Results = [receive {batch_done, Pid, Rs} -> Rs
               after 10000 -> ct:fail({send_still_waiting_after_stop, Pid})
               end || Pid <- Pids],
    Arrived = First ++ collect(Tag, Senders * PerSender, 3000),
    ct:pal("S stopped in ~b ms; send results ~p;~narrived at R: ~p",
           [StopS div 1000, Results, [{Id, Seq} || {_, Id, Seq, _} <- Arrived]]),
    %% Sends after the stop are refused...
    ?assert(lists:all(fun(Rs) -> lists:last(Rs) =:= {error, noconnection} end, Results)),
    %% ...and what arrived from each sender is a prefix of what it was told was sent.
    lists:foreach(
      fun({Id, Rs}) ->
              Accepted = [Seq || {Seq, ok} <- lists:zip(lists:seq(1, PerSender), Rs)],
              Got = [Seq || {_, J, Seq, _} <- Arrived, J =:= Id],
              ?assertEqual({Id, Got}, {Id, lists:sublist(Accepted, length(Got))})
      end, lists:zip(lists:seq(1, Senders), Results)),
    ok = rpc(S, application, start, [teleport]),
    ?assertEqual(ok, rpc(S, teleport, send, [{?SINK, R}, {Tag, again, 1, <<"s">>}])),
    ?assertEqual([{R, again, 1, 1}], collect(Tag, 1, ?MSG_TIMEOUT)),
    %% The receiving side: a message too big to decode on the I/O thread waits for a
    %% decoder, which is suspended, and the one after it waits behind it.
    Decoders = rpc(R, teleport_decoder, names, []),
    _ = [ok = rpc(R, sys, suspend, [D]) || D <- Decoders],
    Deferred = lists:seq(1, 200000),
    ?assertEqual(ok, teleport:send({?SINK, R}, {Tag, deferred, 1, Deferred})),
    ?assertEqual(ok, teleport:send({?SINK, R}, {Tag, deferred, 2, <<"after">>})),
    ?assertEqual([], collect(Tag, 1, 1000)),
    ok = rpc(R, teleport_rel_remote, forward_reports, [self(), undelivered_at_stop]),
    {StopR, ok} = timer:tc(fun() -> rpc(R, application, stop, [teleport]) end),
    %% Not delivered, and not silently: the decoder that held it says so.
    receive
        {rel_report, R, #{messages := Undelivered}} -> ?assertEqual(1, Undelivered)
    after ?MSG_TIMEOUT -> ct:fail(no_undelivered_at_stop_report)
    end,
    ?assert(teleport_test_peer:wait_until(fun() -> not lists:member(R, teleport:nodes()) end, 10000)),
    Late = collect(Tag, 2, 2000),
    ct:pal("R stopped in ~b ms with a frame deferred; then arrived: ~p",
           [StopR div 1000, [{Id, Seq} || {_, Id, Seq, _} <- Late]]),
    %% Whatever made it through came in order.
    ?assertEqual(lists:sublist([1, 2], length(Late)), [Seq || {_, deferred, Seq, _} <- Late]),
    ok = rpc(R, application, start, [teleport]),
    ?assertEqual(ok, teleport:send({?SINK, R}, {Tag, again, 2, <<"r">>})),
    ?assertEqual([{R, again, 2, 1}], collect(Tag, 1, ?MSG_TIMEOUT)).

%% On the sending peer: each send's result, or what it raised.
send_batch(Dest, Tag, Id, Count) ->
    [try teleport:send(Dest, {Tag, Id, Seq, crypto:strong_rand_bytes(?BIG)})
     catch Class:Reason -> {Class, Reason}
     end || Seq <- lists:seq(1, Count)].

%% A peer without teleport started (its code is in the path).
start_bare_peer(Prefix) ->
    Args = ["-setcookie", atom_to_list(erlang:get_cookie()), "-start_epmd", "false"
            | teleport_test_peer:code_path_args()],
    {ok, Peer, Node} = peer:start_link(#{name => teleport_test_peer:unique_name(Prefix),
                                         host => "127.0.0.1", longnames => true,
                                         args => Args, wait_boot => 60000}),
    {Node, track_peer(testcase, Peer, Node)}.

%%====================================================================
%% listen_ip_loopback
%%====================================================================

%% Without root: loopback has many addresses, and the listener takes only its own.
listen_ip_loopback(_Config) ->
    Bound = {127, 0, 0, 2},
    {P, _} = start_peer("rel_bind", #{listen_ip => Bound}),
    {Ip, Port} = rpc(P, teleport, listen_address, []),
    Refused = teleport_rel_remote:tcp_probe({127, 0, 0, 3}, Port),
    Accepted = teleport_rel_remote:tcp_probe(Bound, Port),
    ct:pal("listening on ~p:~p; 127.0.0.3: ~p; ~p: ~p", [Ip, Port, Refused, Bound, Accepted]),
    ?assertEqual(Bound, Ip),
    ?assertEqual({error, econnrefused}, Refused),
    ?assertEqual(ok, Accepted),
    %% teleport finds it there (the lookup returns the bound address).
    {ok, _} = teleport_rel_remote:start_sink(P, ?SINK, self()),
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, P}, {Tag, bound, 1, <<"here">>})),
    ?assertEqual([{P, bound, 1, 4}], collect(Tag, 1, ?MSG_TIMEOUT)).

%%====================================================================
%% netns
%%====================================================================

netns_prerequisites() ->
    Ip = hd([Path || Path <- ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"],
                     filelib:is_regular(Path)] ++ [os:find_executable("ip")]),
    Erl = os:find_executable("erl"),
    Probe = "tprel_probe" ++ os:getpid(),
    if
        Ip =:= false ->
            {skip, "netns group: no `ip' command (iproute2)"};
        Erl =:= false ->
            {skip, "netns group: no `erl' in PATH to start nodes inside namespaces"};
        true ->
            case os:cmd("id -u") of
                "0\n" ->
                    case run(Ip, ["netns", "add", Probe]) of
                        {0, _} ->
                            _ = run(Ip, ["netns", "delete", Probe]),
                            {ok, Ip, Erl};
                        Failed ->
                            {skip, lists:flatten(io_lib:format(
                                                   "netns group: `ip netns add' fails here: ~p",
                                                   [Failed]))}
                    end;
                _ ->
                    {skip, "netns group: needs root (network namespaces, veth)"}
            end
    end.

%% Two namespaces joined by a veth pair, one node in each; the origin drives
%% them over their standard I/O, as it cannot reach the namespaces' addresses.
setup_netns(IpExe, Erl) ->
    Id = os:getpid() ++ integer_to_list(erlang:unique_integer([positive]) rem 1000),
    {NsA, NsB} = {"tprel_a" ++ Id, "tprel_b" ++ Id},
    {VethA, VethB} = {"trva" ++ Id, "trvb" ++ Id},
    _ = [begin ip(IpExe, ["netns", "add", Ns]), track(netns, {netns, IpExe, Ns}) end
         || Ns <- [NsA, NsB]],
    ip(IpExe, ["link", "add", VethA, "type", "veth", "peer", "name", VethB]),
    _ = [ip(IpExe, Args)
         || {Ns, Veth, Cidr} <- [{NsA, VethA, ?NS_A_IP "/24"}, {NsB, VethB, ?NS_B_IP "/24"}],
            Args <- [["link", "set", Veth, "netns", Ns],
                     ["-n", Ns, "addr", "add", Cidr, "dev", Veth],
                     ["-n", Ns, "link", "set", "lo", "up"],
                     ["-n", Ns, "link", "set", Veth, "up"]]],
    {PeerA, A} = start_netns_peer("tprel_a", NsA, ?NS_A_IP, IpExe, Erl),
    {PeerB, B} = start_netns_peer("tprel_b", NsB, ?NS_B_IP, IpExe, Erl),
    #{ip => IpExe, ns_a => NsA, veth_a => VethA, a => {PeerA, A}, b => {PeerB, B}}.

start_netns_peer(Prefix, Ns, Host, IpExe, Erl) ->
    Args = ["-setcookie", atom_to_list(erlang:get_cookie()),
            "-start_epmd", "false", "-erl_epmd_port", ?NS_DIST_PORT,
            %% A silent partition is noticed in seconds, not in a minute.
            "-kernel", "net_ticktime", "4"
            | teleport_test_peer:code_path_args()],
    {ok, Peer, Node} = peer:start_link(#{name => teleport_test_peer:unique_name(Prefix),
                                         host => Host, longnames => true,
                                         connection => standard_io,
                                         exec => {IpExe, ["netns", "exec", Ns, Erl]},
                                         args => Args, wait_boot => 60000}),
    %% init_per_group's process exits when it returns; end_per_group stops it.
    true = unlink(Peer),
    OsPid = peer:call(Peer, os, getpid, [], ?RPC_TIMEOUT),
    track(netns, {peer, Peer}),
    track(netns, {os_pid, OsPid, atom_to_list(Node)}),
    ok = peer:call(Peer, application, load, [teleport], ?RPC_TIMEOUT),
    _ = [ok = peer:call(Peer, application, set_env, [teleport, K, V], ?RPC_TIMEOUT)
         || {K, V} <- [{pool_size, ?NS_POOL_SIZE}, {send_queue_bytes, 4 * ?MiB}]],
    {ok, _} = peer:call(Peer, application, ensure_all_started, [teleport], ?RPC_TIMEOUT),
    {Peer, Node}.

%% Node A streams to a sink on node B, in the other namespace.
veth_transfer(Config) ->
    #{ip := IpExe, ns_a := NsA, veth_a := VethA, a := {PA, _A}, b := {PB, B}} =
        ?config(netns, Config),
    {ok, Coll} = pcall(PA, teleport_rel_remote, start_collector, [?COLLECTOR]),
    %% Started from A: A and B connect over disterl, across the veth.
    {ok, _} = pcall(PA, teleport_rel_remote, start_sink, [B, ?SINK, Coll]),
    TxBefore = tx_bytes(IpExe, NsA, VethA),
    Tag = make_ref(),
    Count = 20,
    ?assertMatch({Count, max_reached, _},
                 pcall(PA, teleport_rel_remote, flood, [{?SINK, B}, Tag, ?MiB, [], Count])),
    Collected = fun() -> pcall(PA, teleport_rel_remote, collected, [?COLLECTOR, Tag]) end,
    ?assert(teleport_test_peer:wait_until(fun() -> length(Collected()) >= Count end, ?MSG_TIMEOUT)),
    ?assertEqual([{Tag, flood, Seq, ?MiB} || Seq <- lists:seq(1, Count)], Collected()),
    TxAfter = tx_bytes(IpExe, NsA, VethA),
    {ok, Srv} = pcall(PB, teleport_test_server, start_anon, []),
    ?assertEqual({Tag, call}, pcall(PA, teleport, gs_call, [Srv, {echo, {Tag, call}}, 10000])),
    StatsA = pcall(PA, teleport, stats, [B]),
    ct:pal("~s sent ~p bytes during the transfer~nA's stats for B: ~p", [VethA, TxAfter - TxBefore, StatsA]),
    %% The messages went through the veth: A had no other way to B.
    ?assert(TxAfter - TxBefore >= Count * ?MiB),
    ?assertMatch(#{connections := ?NS_POOL_SIZE}, StatsA),
    ?assert(maps:get(messages_out, StatsA) >= Count).

%% The link between the namespaces goes down without a word to either side.
partition_heal(Config) ->
    #{ip := IpExe, ns_a := NsA, veth_a := VethA, a := {PA, A}, b := {PB, B}} =
        ?config(netns, Config),
    Sink = teleport_rel_partition_sink,
    {ok, Coll} = pcall(PA, teleport_rel_remote, start_collector, [?COLLECTOR]),
    {ok, _} = pcall(PA, teleport_rel_remote, start_sink, [B, Sink, Coll]),
    {ok, Sender} = pcall(PA, teleport_rel_remote, start_sender, []),
    Tag = make_ref(),
    %% The ordered messages and the flood take different connections (see
    %% teleport:connection_key/1): the flood must not hold up the ordered ones.
    {KeyOrdered, KeyFlood} = keys_on_different_connections(?NS_POOL_SIZE),
    Ordered = fun(Seq) ->
                      pcall(PA, teleport_rel_remote, sender_send,
                            [Sender, {Sink, B}, {Tag, ordered, Seq, <<"m">>}, [{key, KeyOrdered}],
                             ?RPC_TIMEOUT])
              end,
    Collected = fun() -> pcall(PA, teleport_rel_remote, collected, [?COLLECTOR, Tag]) end,
    ?assertEqual(ok, Ordered(0)),
    ?assert(teleport_test_peer:wait_until(fun() -> length(Collected()) >= 1 end, ?MSG_TIMEOUT)),
    ?assertEqual(?NS_POOL_SIZE, pcall(PB, teleport_rel_remote, inbound_connections, [])),
    ip(IpExe, ["-n", NsA, "link", "set", VethA, "down"]),
    Cut = now_ms(),
    %% Accepted: it sits in A's socket buffer, or in teleport's queue.
    ?assertEqual(ok, Ordered(1)),
    Flood = spawn_flood(PA, {Sink, B}, Tag, [{key, KeyFlood}]),
    FloodBlocked = teleport_test_peer:wait_until(fun() -> pcall(PA, teleport_rel_remote, blocked_senders, []) =/= [] end,
                              ?RPC_TIMEOUT),
    FloodResult = receive {flood, Flood, R} -> R after 60000 -> flood_still_blocked end,
    PoolGone = teleport_test_peer:wait_until(fun() -> not lists:member(B, pcall(PA, teleport, nodes, [])) end, 30000),
    DownAfter = now_ms() - Cut,
    ip(IpExe, ["-n", NsA, "link", "set", VethA, "up"]),
    Reconnected = teleport_test_peer:wait_until(fun() -> pcall(PA, net_kernel, connect_node, [B]) =:= true end, 30000),
    Healed = now_ms(),
    ?assertEqual(ok, Ordered(2)),
    GotM2 = teleport_test_peer:wait_until(fun() -> lists:keymember(2, 3, Collected()) end, ?MSG_TIMEOUT),
    %% Give the old connections time to deliver what they still hold (TCP
    %% retransmits, now the link is back) and to close.
    InboundSettled = teleport_test_peer:wait_until(fun() ->
                                        pcall(PB, teleport_rel_remote, inbound_connections, [])
                                            =< ?NS_POOL_SIZE
                                end, 60000),
    Arrived = [Seq || {_, ordered, Seq, _} <- Collected()],
    ct:pal("flood: blocked ~p, then ~p~npool to B gone: ~p, ~p ms after the cut; disterl back: ~p~n"
           "ordered messages arrived: ~p~n"
           "B's inbound teleport connections ~p ms after the heal: ~p (settled: ~p)~n"
           "A's stats for B: ~p~nB's stats for A: ~p",
           [FloodBlocked, FloodResult, PoolGone, DownAfter, Reconnected, Arrived, now_ms() - Healed,
            pcall(PB, teleport_rel_remote, inbound_connections, []), InboundSettled,
            pcall(PA, teleport, stats, [B]), pcall(PB, teleport, stats, [A])]),
    %% The flood was blocked by the stall and released by the nodedown.
    ?assert(FloodBlocked),
    ?assertMatch({Oks, {error, noconnection}, _} when is_integer(Oks), FloodResult),
    ?assert(PoolGone),
    ?assert(Reconnected),
    ?assert(GotM2),
    %% One sender, one destination: 1 may be lost with its connection, but it
    %% must never arrive after 2.
    ?assertMatch(InOrder when InOrder =:= [0, 2] orelse InOrder =:= [0, 1, 2], Arrived),
    %% Nothing is left reading connections from before the partition.
    ?assert(InboundSettled).

%% Node A listens on its veth address only: reachable there, from inside its
%% namespace and from B's, and refused on its namespace's 127.0.0.1.
listen_ip_in_namespace(Config) ->
    #{a := {PA, A}, b := {PB, _B}} = ?config(netns, Config),
    {ok, VethA} = inet:parse_address(?NS_A_IP),
    restart_remote_teleport(PA, [{listen_ip, VethA}]),
    try
        {Ip, Port} = pcall(PA, teleport, listen_address, []),
        Loopback = pcall(PA, teleport_rel_remote, tcp_probe, [{127, 0, 0, 1}, Port]),
        FromA = pcall(PA, teleport_rel_remote, tcp_probe, [VethA, Port]),
        FromB = pcall(PB, teleport_rel_remote, tcp_probe, [VethA, Port]),
        ct:pal("A listens on ~p:~p; inside A's namespace 127.0.0.1: ~p, ~s: ~p; from B: ~p",
               [Ip, Port, Loopback, ?NS_A_IP, FromA, FromB]),
        ?assertEqual(VethA, Ip),
        ?assertEqual({error, econnrefused}, Loopback),
        ?assertEqual(ok, FromA),
        ?assertEqual(ok, FromB),
        %% B's teleport reaches A at that address.
        {ok, Coll} = pcall(PB, teleport_rel_remote, start_collector, [?COLLECTOR]),
        {ok, _} = pcall(PB, teleport_rel_remote, start_sink, [A, ?SINK, Coll]),
        Tag = make_ref(),
        ?assertEqual(ok, pcall(PB, teleport, send, [{?SINK, A}, {Tag, bound, 1, <<"veth">>}])),
        Collected = fun() -> pcall(PB, teleport_rel_remote, collected, [?COLLECTOR, Tag]) end,
        ?assert(teleport_test_peer:wait_until(fun() -> Collected() =/= [] end, ?MSG_TIMEOUT)),
        ?assertEqual([{Tag, bound, 1, 4}], Collected()),
        ?assert(lists:member(A, pcall(PB, teleport, nodes, [])))
    after
        %% Later cases in the group expect A as setup_netns left it.
        restart_remote_teleport(PA, [{listen_ip, undefined}])
    end.

%% Restarts teleport on a namespace node with `Env' (`undefined' unsets a key).
restart_remote_teleport(Peer, Env) ->
    ok = pcall(Peer, ?MODULE, restart_teleport, [Env]).

spawn_flood(Peer, Dest, Tag, Opts) ->
    Parent = self(),
    spawn_link(fun() ->
                       R = pcall(Peer, teleport_rel_remote, flood, [Dest, Tag, ?MiB, Opts, 10000],
                                 120000),
                       Parent ! {flood, self(), R}
               end).

%% Two keys that pick different connections of a pool of N.
keys_on_different_connections(N) ->
    First = {ordered, 0},
    Other = hd([{flood, I} || I <- lists:seq(1, 100),
                              erlang:phash2({flood, I}) rem N =/= erlang:phash2(First) rem N]),
    {First, Other}.

tx_bytes(IpExe, Ns, Veth) ->
    Out = ip(IpExe, ["netns", "exec", Ns, "cat", "/sys/class/net/" ++ Veth ++ "/statistics/tx_bytes"]),
    binary_to_integer(string:trim(Out)).

pcall(Peer, M, F, A) ->
    pcall(Peer, M, F, A, ?RPC_TIMEOUT).

pcall(Peer, M, F, A, Timeout) ->
    peer:call(Peer, M, F, A, Timeout).

ip(IpExe, Args) ->
    case run(IpExe, Args) of
        {0, Out} -> Out;
        Failed -> error({ip_failed, Args, Failed})
    end.

%% Runs a program to its end; {ExitStatus, Output}.
run(Exe, Args) ->
    Port = open_port({spawn_executable, Exe},
                     [{args, Args}, exit_status, stderr_to_stdout, binary, hide]),
    run_loop(Port, <<>>).

run_loop(Port, Acc) ->
    receive
        {Port, {data, Data}} -> run_loop(Port, <<Acc/binary, Data/binary>>);
        {Port, {exit_status, Status}} -> {Status, Acc}
    after 30000 ->
            _ = try port_close(Port) catch error:badarg -> true end,
            {timeout, Acc}
    end.

%%====================================================================
%% Peers, OS processes, cleanup
%%====================================================================

%% A peer running teleport, linked to the case's process; stopped when the case ends.
start_peer(Prefix, AppEnv) ->
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name(Prefix), [], AppEnv),
    {Node, track_peer(testcase, Peer, Node)}.

start_isolated(Prefix, Cookie) ->
    {ok, Peer, Node} = teleport_test_peer:start_isolated(teleport_test_peer:unique_name(Prefix),
                                                         Cookie),
    track(testcase, {peer, Peer}),
    OsPid = peer:call(Peer, os, getpid, [], ?RPC_TIMEOUT),
    track(testcase, {os_pid, OsPid, atom_to_list(Node)}),
    {Peer, Node}.

%% Remembers the peer and its OS pid for cleanup; returns the OS pid.
track_peer(Scope, Peer, Node) ->
    track(Scope, {peer, Peer}),
    OsPid = erpc:call(Node, os, getpid, [], ?RPC_TIMEOUT),
    track(Scope, {os_pid, OsPid, atom_to_list(Node)}),
    OsPid.

start_tracker() ->
    Parent = self(),
    Pid = spawn(fun() ->
                        ?TRACK = ets:new(?TRACK, [named_table, public, bag]),
                        Parent ! {tracker_ready, self()},
                        receive stop -> ok end
                end),
    receive {tracker_ready, Pid} -> Pid end.

track(Scope, Item) ->
    true = ets:insert(?TRACK, {Scope, Item}).

%% Stopped processes are resumed first (a stopped node cannot halt), then
%% peers are stopped; OS processes that outlived that are killed; namespaces go last.
cleanup(Scope) ->
    Items = [Item || {_, Item} <- ets:take(?TRACK, Scope)],
    _ = [signal("CONT", OsPid) || {os_pid, OsPid, Node} <- Items, os_process_is(OsPid, Node)],
    _ = [teleport_test_peer:stop(Peer) || {peer, Peer} <- Items],
    _ = [kill_leftover(OsPid, Node) || {os_pid, OsPid, Node} <- Items],
    _ = [restore_teleport(Keys) || {teleport_env, Keys} <- Items],
    _ = [run(IpExe, ["netns", "delete", Ns]) || {netns, IpExe, Ns} <- Items],
    ok.

kill_leftover(OsPid, Node) ->
    case teleport_test_peer:wait_until(fun() -> not os_process_is(OsPid, Node) end, 5000) of
        true ->
            ok;
        false ->
            ct:pal("~s (OS pid ~s) outlived its peer: killing it", [Node, OsPid]),
            signal("KILL", OsPid)
    end.

%% True while OsPid is a live process started for Node (not a zombie, not a
%% reused pid).
os_process_is(OsPid, Node) ->
    Dir = "/proc/" ++ OsPid,
    case {file:read_file(Dir ++ "/cmdline"), file:read_file(Dir ++ "/stat")} of
        {{ok, Cmdline}, {ok, Stat}} ->
            [_, AfterComm] = string:split(Stat, ")", trailing),
            not lists:prefix(" Z", binary_to_list(AfterComm))
                andalso binary:match(Cmdline, list_to_binary(Node)) =/= nomatch;
        _ ->
            false
    end.

signal(Sig, OsPid) ->
    true = lists:all(fun(C) -> C >= $0 andalso C =< $9 end, OsPid),
    _ = os:cmd("kill -" ++ Sig ++ " " ++ OsPid),
    ok.

%% Restarts teleport here with `Env' (`undefined' unsets a key).
restart_teleport(Env) ->
    ok = application:stop(teleport),
    start_teleport_with(Env).

%% Undoes restart_teleport/1 for `Keys' (teleport may have stopped meanwhile).
restore_teleport(Keys) ->
    _ = application:stop(teleport),
    start_teleport_with([{K, undefined} || K <- Keys]).

start_teleport_with(Env) ->
    _ = [ok = case V of
                  undefined -> application:unset_env(teleport, K);
                  _ -> application:set_env(teleport, K, V)
              end || {K, V} <- Env],
    {ok, _} = application:ensure_all_started(teleport),
    ok.

os_threads() ->
    {ok, Tasks} = file:list_dir("/proc/self/task"),
    length(Tasks).

%% This VM's open sockets.
os_sockets() ->
    {ok, Fds} = file:list_dir("/proc/self/fd"),
    length([Fd || Fd <- Fds,
                  {ok, "socket:" ++ _} <- [file:read_link("/proc/self/fd/" ++ Fd)]]).

peer_os_threads(Node, OsPid) ->
    {ok, Tasks} = rpc(Node, file, list_dir, ["/proc/" ++ OsPid ++ "/task"]),
    length(Tasks).

rpc(Node, M, F, A) ->
    erpc:call(Node, M, F, A, ?RPC_TIMEOUT).

sleeping(Node, Pid) ->
    rpc(Node, erlang, process_info, [Pid, current_function]) =:= {current_function, {timer, sleep, 1}}.

%%====================================================================
%% Helpers
%%====================================================================

%% The next N summaries {Tag, Id, Seq, Size} forwarded by any sink, as
%% {Node, Id, Seq, Size} in arrival order; fewer if Timeout ms pass first.
collect(Tag, N, Timeout) ->
    collect_loop(Tag, N, deadline(Timeout), []).

collect_loop(_Tag, 0, _Deadline, Acc) ->
    lists:reverse(Acc);
collect_loop(Tag, N, Deadline, Acc) ->
    receive
        {rel_sink, Node, {Tag, Id, Seq, Size}} ->
            collect_loop(Tag, N - 1, Deadline, [{Node, Id, Seq, Size} | Acc])
    after remaining(Deadline) ->
            lists:reverse(Acc)
    end.

catch_exit(Fun) ->
    try Fun() of
        Value -> {returned, Value}
    catch
        exit:Reason -> {exit, Reason}
    end.

%% #{Element => Occurrences}
count(List) ->
    lists:foldl(fun(X, Acc) -> maps:update_with(X, fun(C) -> C + 1 end, 1, Acc) end, #{}, List).


flush() ->
    receive
        _ -> flush()
    after 0 ->
            ok
    end.

now_ms() ->
    erlang:monotonic_time(millisecond).

deadline(Timeout) ->
    now_ms() + Timeout.

remaining(Deadline) ->
    max(0, Deadline - now_ms()).

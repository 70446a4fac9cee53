%% @doc Scale benchmark (issue 16): one hub node exchanging traffic both ways with N
%% small peer nodes, over disterl and over teleport in the same run, reporting the
%% OS threads, open file descriptors and resident memory of the hub and of one peer,
%% and the aggregate throughput each way.
%%
%% Every node is a small VM (default `+S 1 +sbwt none +sbwtdcpu none +sbwtdio none
%% -connect_all false': one scheduler, no scheduler busy-waiting, so that 25 VMs share
%% 2 cores sensibly, and no transitive disterl mesh between the peers: the hub is
%% connected to every peer, the peers only to the hub and to the test node). With
%% `+S 1', teleport's default `io_threads' (auto) is 1; its default `pool_size' is 2.
%%
%% The case `scale', step by step:
%% <ol>
%% <li>Start the hub and N peers (teleport running in each, listening on 127.0.0.1),
%%     connected only to the test node. Sample `idle'.</li>
%% <li>disterl: connect the hub to every peer (`net_kernel:connect_node/1'), then run
%%     the traffic (below) with `{Name, Node} ! Msg'. Sample `disterl' in the middle
%%     of the measuring window.</li>
%% <li>teleport: sample `connected' (disterl connected, no teleport pool anywhere:
%%     the "before"), open the hub's pool to every peer and every peer's pool to the
%%     hub with `teleport:connect/1' (one peer at a time: all peers dial from
%%     127.0.0.1, and the listener admits `max_pending_handshakes_per_ip' handshakes
%%     from one address at once), check every pool has `pool_size' connections, run
%%     the same traffic with `teleport:send/3'. Sample `teleport' in the middle of the
%%     window (every pool open both ways and carrying traffic: the "after").</li>
%% <li>Disconnect every pool (both sides), wait up to 10 s for the hub's threads to
%%     fall back to the `connected' count, sample `disconnected'.</li>
%% </ol>
%% A sample reads `/proc/<os pid>/task' (threads), `/proc/<os pid>/fd' (open file
%% descriptors) and VmRSS in `/proc/<os pid>/status' of every VM from the test node,
%% outside the VMs measured.
%%
%% Traffic: receiver processes count the messages and payload bytes they get, and
%% separately those they take from their mailbox within the measuring window (by the
%% OS clock, which every VM on the host shares): on the hub one receiver per peer, on
%% every peer one. On each peer SENDERS processes send to its receiver on the hub; on
%% the hub SENDERS processes per peer send to that peer's receiver; each message is
%% `{scale, Src, Payload}' with one BYTES-byte binary shared by every sender of a
%% node. Over teleport sender i uses `{key, K}' with `erlang:phash2(K) rem pool_size
%% =:= i rem pool_size' (how teleport picks a slot today), so SENDERS = pool_size (the
%% default) puts one sender on every connection of every pool; the per-connection
%% counters of `teleport:stats()' on the hub show how many connections carried
%% traffic. All senders start together, send for WARMUP_MS plus the window, then
%% stop; the receivers are then waited for until each has every message that was sent
%% to it. Throughput is what the receivers took within the window: messages/s and
%% MB/s (10^6 bytes of payload per second), hub->peers (all peers' receivers
%% together) and peers->hub (all the hub's receivers together). With `+S 1' the hub's
%% one scheduler runs its senders and its receivers (and, for disterl, the reading of
%% every socket): the figures are what one small VM can move, not what loopback can.
%% Printed beside them, in the middle of the window: the hub VM's memory, its
%% receivers' message queues and the binaries they hold.
%%
%% These are benchmarks, not tests: figures are printed (ct:pal and the console),
%% never asserted. The case checks behaviour only: no send failed, every pool had
%% `pool_size' connections, every peer delivered something both ways over each
%% transport, and after the senders stopped every receiver got exactly what was sent
%% to it.
%%
%% Groups: `short' (in all/0, so the default `rebar3 ct' and scripts/test.sh run it:
%% 4 peers, `pool_size' 2, 1 s window) and `full' (the benchmark: 24 peers, teleport's
%% default `pool_size', 5 s window):
%%
%%     scripts/with_epmd.sh rebar3 ct --suite test/scale_SUITE --group full
%%
%% Environment variables override the group's defaults:
%% <ul>
%% <li>SCALE_PEERS: peer nodes (full 24, short 4).</li>
%% <li>SCALE_SECONDS: measuring window in seconds, an integer (full 5, short 1).</li>
%% <li>SCALE_WARMUP_MS: sending before the window opens (full 1000, short 500).</li>
%% <li>SCALE_BYTES: payload of each message (default 65536).</li>
%% <li>SCALE_SENDERS: senders per peer per direction (default: the pool size).</li>
%% <li>SCALE_POOL_SIZE: teleport `pool_size' on every node (full: teleport's default,
%%     2; short 2).</li>
%% <li>SCALE_TRANSPORTS: which to run, comma-separated (default "disterl,teleport";
%%     disterl always runs first).</li>
%% <li>SCALE_VM_ARGS: the extra `erl' arguments of every VM, space-separated,
%%     replacing the default above.</li>
%% <li>SCALE_IO_THREADS, SCALE_IO_THREAD_PRIORITY, SCALE_READER_BUSY_WAIT_US,
%%     SCALE_SEND_QUEUE_BYTES, SCALE_MAX_PENDING_HANDSHAKES,
%%     SCALE_MAX_PENDING_HANDSHAKES_PER_IP: those teleport settings on every node.</li>
%% </ul>
%%
%% Every VM is started by a holder process made in init_per_testcase (the peers are
%% linked to it); end_per_testcase stops each of them by its `peer' pid, pass or
%% fail (timetrap included), waits until their OS processes have exited (killing by
%% OS pid any still running after 10 s), and ends the holder.
-module(scale_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2, init_per_testcase/2, end_per_testcase/2]).
-export([scale/1]).
%% Run on the VMs.
-export([rx_start/2, rx_loop/2, send_run/7, sender/5, connect_disterl/1, disconnect_all/1,
         vm_memory/1]).

-define(DEFAULT_VM_ARGS, "+S 1 +sbwt none +sbwtdcpu none +sbwtdio none -connect_all false").
-define(RPC_TIMEOUT, 120000).
%% A peer's boot (teleport_test_peer waits up to 60 s) plus teleport's start.
-define(START_TIMEOUT, 180000).
%% After the senders stop: until every receiver has what was sent to it.
-define(DRAIN_TIMEOUT, 600000).
%% From fixing the senders' start time to that time (plus 20 ms per peer): receivers
%% and senders are spawned meanwhile.
-define(START_DELAY_MS, 1000).
-define(SETTLE_TIMEOUT, 10000).

suite() ->
    [{timetrap, {minutes, 30}}].

all() -> [{group, short}].

groups() ->
    [{short, [], [scale]},
     {full, [], [scale]}].

init_per_suite(Config) ->
    teleport_test_peer:init_per_suite(Config).

end_per_suite(_Config) ->
    ok.

init_per_group(short, Config) ->
    [{params, params(#{peers => 4, seconds => 1, warmup_ms => 500, pool_size => 2})}
     | Config];
init_per_group(full, Config) ->
    [{params, params(#{peers => 24, seconds => 5, warmup_ms => 1000, pool_size => default})}
     | Config].

end_per_group(_Group, _Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    [{holder, holder_start()} | Config].

end_per_testcase(_Case, Config) ->
    holder_stop(?config(holder, Config)),
    ok.

params(Defaults) ->
    Int = fun(Var, Default) ->
                  case os:getenv(Var) of
                      false -> Default;
                      Value -> list_to_integer(string:trim(Value))
                  end
          end,
    PoolSize = Int("SCALE_POOL_SIZE", maps:get(pool_size, Defaults)),
    AppEnv0 = teleport_test_peer:app_env_from_os(
                "SCALE", [io_threads, sndbuf, io_thread_priority, reader_busy_wait_us,
                          send_queue_bytes, max_pending_handshakes,
                          max_pending_handshakes_per_ip]),
    AppEnv = case PoolSize of
                 default -> AppEnv0;
                 _ -> AppEnv0#{pool_size => PoolSize}
             end,
    Transports = [list_to_existing_atom(T)
                  || T <- string:lexemes(env("SCALE_TRANSPORTS", "disterl,teleport"), ", "),
                     lists:member(T, ["disterl", "teleport"])],
    #{peers => Int("SCALE_PEERS", maps:get(peers, Defaults)),
      seconds => Int("SCALE_SECONDS", maps:get(seconds, Defaults)),
      warmup_ms => Int("SCALE_WARMUP_MS", maps:get(warmup_ms, Defaults)),
      bytes => Int("SCALE_BYTES", 65536),
      senders => Int("SCALE_SENDERS", default),
      transports => [T || T <- [disterl, teleport], lists:member(T, Transports)],
      vm_args => string:lexemes(env("SCALE_VM_ARGS", ?DEFAULT_VM_ARGS), " "),
      app_env => AppEnv#{listen_ip => {127, 0, 0, 1}}}.

env(Var, Default) ->
    case os:getenv(Var) of
        false -> Default;
        Value -> Value
    end.

%%--------------------------------------------------------------------
%% The case

scale(Config) ->
    #{peers := N, seconds := Seconds, warmup_ms := WarmupMs, bytes := Bytes,
      senders := Senders0, transports := Transports, vm_args := VmArgs,
      app_env := AppEnv} = ?config(params, Config),
    Holder = ?config(holder, Config),
    T0 = erlang:monotonic_time(millisecond),
    Hub = start_vm(Holder, "scale_hub", VmArgs, AppEnv),
    Peers = [{I, start_vm(Holder, "scale_p" ++ integer_to_list(I) ++ "_", VmArgs, AppEnv)}
             || I <- lists:seq(1, N)],
    {_, Peer1} = hd(Peers),
    PeerNodes = [Node || {_, Node} <- Peers],
    OsPids = maps:from_list([{Node, erpc:call(Node, os, getpid, [], ?RPC_TIMEOUT)}
                             || Node <- [Hub | PeerNodes]]),
    PoolSize = erpc:call(Hub, teleport_config, get, [pool_size], ?RPC_TIMEOUT),
    Senders = case Senders0 of
                  default -> PoolSize;
                  _ -> Senders0
              end,
    Ctx = #{hub => Hub, peers => Peers, pool_size => PoolSize, senders => Senders,
            bytes => Bytes, warmup_ms => WarmupMs, window_ms => Seconds * 1000,
            os_pids => OsPids},
    ct:pal("scale: hub ~p and ~b peers started in ~b ms; pool_size ~b, ~b senders per peer "
           "per direction, ~b-byte messages, ~b ms warm-up + ~b s window, vm args ~s, "
           "teleport env ~p",
           [Hub, N, erlang:monotonic_time(millisecond) - T0, PoolSize, Senders, Bytes,
            WarmupMs, Seconds, lists:join(" ", VmArgs), AppEnv]),
    Idle = sample(OsPids),
    Disterl = case lists:member(disterl, Transports) of
                  true ->
                      ok = erpc:call(Hub, ?MODULE, connect_disterl, [PeerNodes], ?RPC_TIMEOUT),
                      run_traffic(disterl, Ctx);
                  false ->
                      undefined
              end,
    Teleport = case lists:member(teleport, Transports) of
                   true -> teleport_phase(Ctx);
                   false -> undefined
               end,
    report(Ctx, Idle, Disterl, Teleport, Peer1, VmArgs),
    ok.

%% The teleport part: the "before" sample, every pool opened both ways, the traffic,
%% every pool closed again.
teleport_phase(#{hub := Hub, peers := Peers, pool_size := PoolSize, os_pids := OsPids} = Ctx) ->
    PeerNodes = [Node || {_, Node} <- Peers],
    ok = erpc:call(Hub, ?MODULE, connect_disterl, [PeerNodes], ?RPC_TIMEOUT),
    Connected = sample(OsPids),
    T0 = erlang:monotonic_time(millisecond),
    lists:foreach(
      fun(Node) ->
              ?assertEqual(ok, erpc:call(Hub, teleport, connect, [Node], ?RPC_TIMEOUT),
                           {hub_connect, Node}),
              ?assertEqual(ok, erpc:call(Node, teleport, connect, [Hub], ?RPC_TIMEOUT),
                           {peer_connect, Node})
      end, PeerNodes),
    PoolsOpen = fun() ->
                        HubStats = erpc:call(Hub, teleport, stats, [], ?RPC_TIMEOUT),
                        lists:all(fun(Node) ->
                                          connections(HubStats, Node) =:= PoolSize andalso
                                              connections(erpc:call(Node, teleport, stats, [],
                                                                    ?RPC_TIMEOUT), Hub)
                                              =:= PoolSize
                                  end, PeerNodes)
                end,
    ?assert(teleport_test_peer:wait_until(PoolsOpen, ?SETTLE_TIMEOUT),
            {pools_not_open, PoolSize}),
    ct:pal("scale: every pool open both ways (~b connections each) in ~b ms",
           [PoolSize, erlang:monotonic_time(millisecond) - T0]),
    Result = run_traffic(teleport, Ctx),
    HubStats = erpc:call(Hub, teleport, stats, [], ?RPC_TIMEOUT),
    ct:pal("scale: teleport:stats() on the hub after the traffic, per peer {messages_out, "
           "messages_in, connections, inbound connections}: ~w",
           [[{Node, {Out, In, C, length([x || #{direction := inbound} <- Cs])}}
             || {Node, #{messages_out := Out, messages_in := In, connections := C,
                         per_connection := Cs}} <- lists:sort(maps:to_list(HubStats))]]),
    Totals = maps:values(HubStats),
    ?assertEqual(0, lists:sum([maps:get(dropped_out, S) || S <- Totals]), dropped_out),
    ?assertEqual(0, lists:sum([maps:get(undeliverable_in, S) || S <- Totals]),
                 undeliverable_in),
    Conns = lists:append([Cs || #{per_connection := Cs} <- Totals]),
    Used = #{out => length([C || #{direction := outbound, messages_out := M} = C <- Conns,
                                 M > 0]),
             in => length([C || #{direction := inbound, messages_in := M} = C <- Conns, M > 0]),
             total_each_way => length(Peers) * PoolSize},
    %% Close every pool, both sides; the hub's threads fall back.
    ok = erpc:call(Hub, ?MODULE, disconnect_all, [PeerNodes], ?RPC_TIMEOUT),
    _ = [ok = erpc:call(Node, ?MODULE, disconnect_all, [[Hub]], ?RPC_TIMEOUT)
         || Node <- PeerNodes],
    #{Hub := #{threads := Before}} = Connected,
    HubPid = maps:get(Hub, OsPids),
    Settled = teleport_test_peer:wait_until(
                fun() -> maps:get(threads, proc_counts(HubPid)) =< Before end,
                ?SETTLE_TIMEOUT),
    Disconnected = sample(OsPids),
    Result#{connected => Connected, disconnected => Disconnected,
            disconnected_settled => Settled, connections_used => Used}.

connections(Stats, Node) ->
    case Stats of
        #{Node := #{connections := C}} -> C;
        #{} -> 0
    end.

%% One transport's traffic, both ways at once. Returns the throughput, the sample taken
%% in the middle of the window and the per-peer message counts.
run_traffic(Transport, #{hub := Hub, peers := Peers, pool_size := PoolSize,
                         senders := Senders, bytes := Bytes, warmup_ms := WarmupMs,
                         window_ms := WindowMs, os_pids := OsPids}) ->
    N = length(Peers),
    Start = erlang:system_time(microsecond) + (?START_DELAY_MS + 20 * N) * 1000,
    WStart = Start + WarmupMs * 1000,
    WEnd = WStart + WindowMs * 1000,
    %% Peer I's receiver on the hub and the hub's receiver on peer I: both rx(T, I).
    Rx = fun(I) -> rx_name(Transport, I) end,
    HubRx = [Rx(I) || {I, _} <- Peers],
    {ok, _} = erpc:call(Hub, ?MODULE, rx_start, [HubRx, {WStart, WEnd}], ?RPC_TIMEOUT),
    _ = [{ok, _} = erpc:call(Node, ?MODULE, rx_start, [[Rx(I)], {WStart, WEnd}], ?RPC_TIMEOUT)
         || {I, Node} <- Peers],
    Times = {Start, WEnd},
    Requests = [{0, Hub, erpc:send_request(Hub, ?MODULE, send_run,
                                           [Transport, 0, [{Rx(I), Node} || {I, Node} <- Peers],
                                            Senders, PoolSize, Bytes, Times])}
                | [{I, Node, erpc:send_request(Node, ?MODULE, send_run,
                                               [Transport, I, [{Rx(I), Hub}], Senders, PoolSize,
                                                Bytes, Times])}
                   || {I, Node} <- Peers]],
    sleep_until(WStart + WindowMs * 500),
    During = sample(OsPids),
    HubMemory = erpc:call(Hub, ?MODULE, vm_memory, [HubRx], ?RPC_TIMEOUT),
    Sent = [{I, Node, erpc:receive_response(ReqId, ?RPC_TIMEOUT + WarmupMs + WindowMs)}
            || {I, Node, ReqId} <- Requests],
    Late = lists:max([L || {_, _, #{late_ms := L}} <- Sent]),
    Errors = [{Node, E} || {_, Node, #{errors := E}} <- Sent, E =/= #{}],
    ?assertEqual([], Errors, {send_errors, Transport}),
    %% What each receiver must get.
    [#{sent := FromHub}] = [R || {0, _, R} <- Sent],
    Expected = maps:from_list(
                 lists:append([[{{Rx(I), Hub}, maps:get(Hub, S, 0)},
                                {{Rx(I), Node}, maps:get(Node, FromHub, 0)}]
                               || {I, Node, #{sent := S}} <- Sent, I =/= 0])),
    T0 = erlang:monotonic_time(millisecond),
    Counts = drain(Expected, ?DRAIN_TIMEOUT),
    DrainMs = erlang:monotonic_time(millisecond) - T0,
    _ = [erlang:send(Dest, stop) || Dest <- maps:keys(Expected)],
    %% Every peer delivered something both ways.
    lists:foreach(fun({I, Node}) ->
                          ?assert(maps:get({Rx(I), Hub}, Expected) > 0,
                                  {nothing_from_peer, Transport, Node}),
                          ?assert(maps:get({Rx(I), Node}, Expected) > 0,
                                  {nothing_to_peer, Transport, Node})
                  end, Peers),
    %% Within the window, {Messages, Bytes} per peer: hub->peer and peer->hub.
    Window = fun(Dest) ->
                     {_, _, WM, WB} = maps:get(Dest, Counts),
                     {WM, WB}
             end,
    In = [Window({Rx(I), Hub}) || {I, _} <- Peers],
    Out = [Window({Rx(I), Node}) || {I, Node} <- Peers],
    Secs = WindowMs / 1000,
    Rate = fun(Pairs) ->
                   {lists:sum([M || {M, _} <- Pairs]) / Secs,
                    lists:sum([B || {_, B} <- Pairs]) / Secs / 1.0e6}
           end,
    PerPeer = fun(Pairs) ->
                      Ms = [M || {M, _} <- Pairs],
                      {lists:min(Ms), lists:max(Ms)}
              end,
    ct:pal("scale ~p: ~b messages sent and received in all; latest sender start ~b ms after "
           "the set time; receivers had everything ~b ms after the senders stopped; window "
           "messages per peer hub->peer min-max ~w, peer->hub ~w; hub in mid-window: ~w",
           [Transport, lists:sum(maps:values(Expected)), Late, DrainMs, PerPeer(Out),
            PerPeer(In), HubMemory]),
    #{out => Rate(Out), in => Rate(In), out_per_peer => PerPeer(Out),
      in_per_peer => PerPeer(In), during => During, drain_ms => DrainMs,
      hub_memory => HubMemory}.

rx_name(Transport, I) ->
    list_to_atom("scale_rx_" ++ atom_to_list(Transport) ++ "_" ++ integer_to_list(I)).

%% Polls every receiver until each has exactly what was sent to it (or the time is
%% up: then the assertion shows the difference). Returns every receiver's counts.
drain(Expected, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    drain_loop(Expected, Deadline).

drain_loop(Expected, Deadline) ->
    Counts = maps:map(fun(Dest, _) -> rx_counts(Dest) end, Expected),
    Received = maps:map(fun(_, {M, _, _, _}) -> M end, Counts),
    case Received =:= Expected orelse erlang:monotonic_time(millisecond) > Deadline of
        true ->
            ?assertEqual(Expected, Received, received),
            Counts;
        false ->
            timer:sleep(200),
            drain_loop(Expected, Deadline)
    end.

rx_counts(Dest) ->
    Ref = make_ref(),
    erlang:send(Dest, {counts, self(), Ref}),
    receive
        {Ref, Counts} -> Counts
    after ?RPC_TIMEOUT ->
            error({receiver_not_answering, Dest})
    end.

%%--------------------------------------------------------------------
%% On the VMs

%% Registered receivers (not linked to the erpc process that starts them).
rx_start(Names, Window) ->
    {ok, [begin
              Pid = spawn(?MODULE, rx_loop, [Window, {0, 0, 0, 0}]),
              true = register(Name, Pid),
              Pid
          end || Name <- Names]}.

%% Counts {Messages, Bytes, WindowMessages, WindowBytes}.
rx_loop({WStart, WEnd} = Window, {M, B, WM, WB} = Counts) ->
    receive
        {scale, _Src, Bin} ->
            Now = erlang:system_time(microsecond),
            Size = byte_size(Bin),
            case Now >= WStart andalso Now < WEnd of
                true -> rx_loop(Window, {M + 1, B + Size, WM + 1, WB + Size});
                false -> rx_loop(Window, {M + 1, B + Size, WM, WB})
            end;
        {counts, From, Ref} ->
            From ! {Ref, Counts},
            rx_loop(Window, Counts);
        stop ->
            ok
    end.

%% Senders per destination, released at Start (OS clock, microseconds) and stopped at
%% Stop. Returns #{sent => #{DestNode => Messages}, errors => #{{DestNode, Error} =>
%% Count}, late_ms => how long after Start they were released}.
send_run(Transport, Src, Dests, Senders, PoolSize, Bytes, {Start, Stop}) ->
    Msg = {scale, Src, binary:copy(<<16#5a>>, Bytes)},
    Keys = slot_keys(Senders, PoolSize),
    Pids = [spawn_link(?MODULE, sender, [self(), Transport, Dest, Msg, [{key, Key}]])
            || Dest <- Dests, Key <- Keys],
    sleep_until(Start),
    Late = (erlang:system_time(microsecond) - Start) div 1000,
    _ = [Pid ! go || Pid <- Pids],
    sleep_until(Stop),
    _ = [Pid ! stop || Pid <- Pids],
    Results = [receive {sent, Pid, Dest, N, Errs} -> {Dest, N, Errs} end || Pid <- Pids],
    Sent = lists:foldl(fun({{_, Node}, N, _}, Acc) ->
                               maps:update_with(Node, fun(X) -> X + N end, N, Acc)
                       end, #{}, Results),
    Errors = maps:from_list([{{Node, E}, C} || {{_, Node}, _, Errs} <- Results,
                                                {E, C} <- maps:to_list(Errs)]),
    #{sent => Sent, errors => Errors, late_ms => Late}.

%% One key per sender, all distinct: sender i's key K has
%% erlang:phash2(K) rem PoolSize =:= i rem PoolSize (the slot teleport picks for it).
slot_keys(Senders, PoolSize) ->
    [nth_key(I rem PoolSize, I div PoolSize, PoolSize, 0) || I <- lists:seq(0, Senders - 1)].

%% The (Skip+1)-th integer from K up whose slot is Slot.
nth_key(Slot, Skip, PoolSize, K) ->
    case erlang:phash2(K) rem PoolSize =:= Slot of
        true when Skip =:= 0 -> K;
        true -> nth_key(Slot, Skip - 1, PoolSize, K + 1);
        false -> nth_key(Slot, Skip, PoolSize, K + 1)
    end.

sender(Driver, Transport, Dest, Msg, Opts) ->
    receive go -> ok end,
    send_loop(Driver, Transport, Dest, Msg, Opts, 0, #{}).

send_loop(Driver, Transport, Dest, Msg, Opts, N, Errors) ->
    receive
        stop ->
            Driver ! {sent, self(), Dest, N, Errors}
    after 0 ->
            case transmit(Transport, Dest, Msg, Opts) of
                ok ->
                    send_loop(Driver, Transport, Dest, Msg, Opts, N + 1, Errors);
                Error ->
                    send_loop(Driver, Transport, Dest, Msg, Opts, N,
                              maps:update_with(Error, fun(C) -> C + 1 end, 1, Errors))
            end
    end.

transmit(disterl, Dest, Msg, _Opts) ->
    erlang:send(Dest, Msg),
    ok;
transmit(teleport, Dest, Msg, Opts) ->
    teleport:send(Dest, Msg, Opts).

%% The VM's own view of its memory (MiB), its receivers' backlog (messages) and the
%% binaries its receivers hold (MiB: in their queues, or dropped but not yet
%% collected).
vm_memory(Receivers) ->
    MiB = fun(Type) -> erlang:memory(Type) div 1048576 end,
    Pids = [Pid || Name <- Receivers, Pid <- [whereis(Name)], is_pid(Pid)],
    Info = [I || Pid <- Pids, I <- [process_info(Pid, [message_queue_len, binary])],
                 I =/= undefined],
    #{vm_total_mib => MiB(total), vm_binary_mib => MiB(binary),
      rx_queue => lists:sum([Len || [{message_queue_len, Len}, _] <- Info]),
      rx_binary_mib => lists:sum([Size || [_, {binary, Bins}] <- Info,
                                          {_, Size, _} <- Bins]) div 1048576}.

%% On the hub.
connect_disterl(Nodes) ->
    case [Node || Node <- Nodes, net_kernel:connect_node(Node) =/= true] of
        [] -> ok;
        Failed -> {error, {not_connected, Failed}}
    end.

disconnect_all(Nodes) ->
    lists:foreach(fun(Node) -> ok = teleport:disconnect(Node) end, Nodes).

sleep_until(SystemMicros) ->
    timer:sleep(max(0, (SystemMicros - erlang:system_time(microsecond)) div 1000)).

%%--------------------------------------------------------------------
%% Threads, file descriptors and memory, read from /proc by the test node

sample(OsPids) ->
    maps:map(fun(_Node, OsPid) -> proc_counts(OsPid) end, OsPids).

proc_counts(OsPid) ->
    Dir = "/proc/" ++ OsPid,
    {ok, Tasks} = file:list_dir(Dir ++ "/task"),
    {ok, Fds} = file:list_dir(Dir ++ "/fd"),
    {ok, Status} = file:read_file(Dir ++ "/status"),
    [Rss] = [list_to_integer(string:trim(string:trim(Rest), trailing, " kB"))
             || Line <- string:lexemes(binary_to_list(Status), "\n"),
                ["VmRSS", Rest] <- [string:split(Line, ":")]],
    #{threads => length(Tasks), fds => length(Fds), rss_kib => Rss}.

%%--------------------------------------------------------------------
%% Report

report(#{hub := Hub, peers := Peers, pool_size := PoolSize, senders := Senders,
         bytes := Bytes, warmup_ms := WarmupMs, window_ms := WindowMs}, Idle, Disterl,
       Teleport, Peer1, VmArgs) ->
    summary("scale peers=~b pool_size=~b senders=~b (per peer per direction) bytes=~b "
            "warmup_ms=~b window_s=~.1f vm_args=\"~s\"",
            [length(Peers), PoolSize, Senders, Bytes, WarmupMs, WindowMs / 1000,
             lists:join(" ", VmArgs)]),
    Samples = [{"idle", Idle}]
        ++ [{"disterl traffic", maps:get(during, Disterl)} || Disterl =/= undefined]
        ++ case Teleport of
               undefined -> [];
               #{connected := C, during := D, disconnected := X} ->
                   [{"teleport before (disterl connected)", C}, {"teleport traffic", D},
                    {"teleport disconnected", X}]
           end,
    summary("  threads / fds / RSS MiB     hub            peer 1         all ~b VMs (sum)",
            [length(Peers) + 1]),
    lists:foreach(
      fun({Label, S}) ->
              Sum = fun(K) -> lists:sum([maps:get(K, V) || V <- maps:values(S)]) end,
              summary("  ~-35s ~s   ~s   ~b / ~b / ~b",
                      [Label, tfr(maps:get(Hub, S)), tfr(maps:get(Peer1, S)), Sum(threads),
                       Sum(fds), Sum(rss_kib) div 1024])
      end, Samples),
    Line = fun(Name, #{out := {OM, OB}, in := {IM, IB}, out_per_peer := OP,
                       in_per_peer := IP}) ->
                   summary("  ~-8s hub->peers ~b msg/s ~.1f MB/s, peers->hub ~b msg/s ~.1f MB/s "
                           "(window messages per peer: hub->peer ~b-~b, peer->hub ~b-~b)",
                           [Name, round(OM), OB, round(IM), IB, element(1, OP), element(2, OP),
                            element(1, IP), element(2, IP)])
           end,
    _ = [Line("disterl", Disterl) || Disterl =/= undefined],
    _ = [Line("teleport", Teleport) || Teleport =/= undefined],
    _ = [summary("  hub mid-window, ~s: VM memory ~b MiB (binaries ~b MiB); receivers: "
                 "~b messages queued, ~b MiB of binaries held", [Name, T, B, Q, RB])
         || {Name, #{hub_memory := #{vm_total_mib := T, vm_binary_mib := B, rx_queue := Q,
                                     rx_binary_mib := RB}}}
                <- [{"disterl", Disterl}, {"teleport", Teleport}]],
    case {Disterl, Teleport} of
        {#{out := {_, DO}, in := {_, DI}}, #{out := {_, TO}, in := {_, TI}}} ->
            summary("  teleport/disterl: hub->peers ~.2fx, peers->hub ~.2fx, both ~.2fx",
                    [ratio(TO, DO), ratio(TI, DI), ratio(TO + TI, DO + DI)]);
        _ ->
            ok
    end,
    case Teleport of
        #{connections_used := #{out := UO, in := UI, total_each_way := T},
          disconnected_settled := Settled} ->
            summary("  teleport connections that carried traffic (hub): out ~b of ~b, in ~b of ~b;"
                    " hub threads back to the 'before' count after disconnecting: ~p",
                    [UO, T, UI, T, Settled]);
        undefined ->
            ok
    end.

tfr(#{threads := T, fds := F, rss_kib := R}) ->
    string:pad(io_lib:format("~b / ~b / ~b", [T, F, R div 1024]), 12).

ratio(_, B) when B == 0 -> 0.0;
ratio(A, B) -> A / B.

summary(Format, Args) ->
    Line = lists:flatten(io_lib:format(Format, Args)),
    ct:pal("~s", [Line]),
    io:format(user, "~s~n", [Line]).

%%--------------------------------------------------------------------
%% The holder: starts every VM (linked to it) and stops them all by their peer pids.

holder_start() ->
    spawn(fun() -> holder_loop([]) end).

holder_loop(Vms) ->
    receive
        {start, From, Ref, Name, Args, AppEnv} ->
            case teleport_test_peer:start(Name, Args, AppEnv) of
                {ok, Peer, Node} ->
                    OsPid = try erpc:call(Node, os, getpid, [], ?RPC_TIMEOUT)
                            catch _:_ -> undefined
                            end,
                    From ! {Ref, {ok, Node}},
                    holder_loop([{Peer, Node, OsPid} | Vms]);
                {error, _} = Error ->
                    From ! {Ref, Error},
                    holder_loop(Vms)
            end;
        {stop, From, Ref} ->
            T0 = erlang:monotonic_time(millisecond),
            lists:foreach(fun({Peer, _, _}) -> teleport_test_peer:stop(Peer) end, Vms),
            lists:foreach(fun await_exit/1, Vms),
            ct:pal("scale: ~b VMs stopped and their OS processes gone in ~b ms",
                   [length(Vms), erlang:monotonic_time(millisecond) - T0]),
            From ! {Ref, stopped}
    end.

%% peer:stop/1 returns before the OS process is gone (its halt is under way): wait
%% until it has exited, and if it is still running after ?SETTLE_TIMEOUT (and is still
%% that node's VM), kill it by its pid.
await_exit({_, _, undefined}) ->
    ok;
await_exit({_, Node, OsPid}) ->
    Running = fun() ->
                      case file:read_file("/proc/" ++ OsPid ++ "/stat") of
                          {ok, Stat} ->
                              %% "pid (comm) State ...": Z and X have exited.
                              [_, After] = string:split(Stat, <<")">>, trailing),
                              not lists:member(binary:at(string:trim(After, leading), 0),
                                               [$Z, $X]);
                          {error, _} ->
                              false
                      end
              end,
    case teleport_test_peer:wait_until(fun() -> not Running() end, ?SETTLE_TIMEOUT) of
        true ->
            ok;
        false ->
            case file:read_file("/proc/" ++ OsPid ++ "/cmdline") of
                {ok, Cmd} ->
                    case binary:match(Cmd, atom_to_binary(Node)) of
                        nomatch ->
                            ok;
                        _ ->
                            ct:pal("scale: ~p (OS pid ~s) still running after peer:stop; "
                                   "killing it", [Node, OsPid]),
                            _ = os:cmd("kill -KILL " ++ OsPid),
                            ok
                    end;
                {error, _} ->
                    ok
            end
    end.

holder_stop(Holder) ->
    Mon = monitor(process, Holder),
    Ref = make_ref(),
    Holder ! {stop, self(), Ref},
    receive
        {Ref, stopped} -> ok;
        {'DOWN', Mon, process, Holder, _} -> ok
    after ?START_TIMEOUT ->
            ct:pal("scale: the holder did not stop its VMs in time; killing it (its VMs halt)"),
            exit(Holder, kill)
    end,
    demonitor(Mon, [flush]),
    ok.

start_vm(Holder, Prefix, Args, AppEnv) ->
    Ref = make_ref(),
    Holder ! {start, self(), Ref, teleport_test_peer:unique_name(Prefix), Args, AppEnv},
    receive
        {Ref, {ok, Node}} -> Node;
        {Ref, {error, Reason}} -> ct:fail({vm_start_failed, Prefix, Reason})
    after ?START_TIMEOUT ->
            ct:fail({vm_start_timeout, Prefix})
    end.

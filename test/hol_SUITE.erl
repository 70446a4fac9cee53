%%% @doc Head-of-line benchmark: small calls beside bulk transfers, at a fixed
%%% rate. It prints figures and never asserts a timing; it asserts what the
%%% traffic must do whatever the timing: every call gets its own reply, and every
%%% byte the streams sent reaches the sink.
%%%
%%% Two peer nodes, A and B, on this host. On B: an echo gen_server and a sink that
%%% counts what it gets. On A: STREAMS processes send PAYLOAD-byte binaries to the
%%% sink, and two series of calls go to the echo at a fixed rate, open loop (each
%%% call is its own process, started at its time whatever the others do, and timed
%%% from that time, so a stall shows in every call it delays): `teleport:gs_call/3'
%%% and `gen_server:call/3' over disterl, CALLS of each per round, one every
%%% INTERVAL_MS, the two series offset by half an interval. Conditions:
%%% <ul>
%%% <li>`idle': no bulk;</li>
%%% <li>`full': the streams over teleport, as fast as they go;</li>
%%% <li>`paced': the streams over teleport, paced to PACED_MBPS MB/s together;</li>
%%% <li>`disterl_paced': the same paced streams over disterl (for reference).</li>
%%% </ul>
%%% Each condition runs ROUNDS times, interleaved with the others (idle, full,
%%% paced, disterl_paced, idle, ...), so a noisy stretch of the machine falls on
%%% all of them. Printed per round: p50, p99 and max of each series, and the
%%% streams' throughput; then per condition the median and the worst round. Each
%%% call asks the echo for the OS clock when the call reached it, which both nodes
%%% share on one host, so each series is also split into its legs: p50 and p99 of
%%% the way there (caller to server, the request's transport) and back.
%%%
%%% `slow_link': the same calls and streams between two nodes whose teleport and
%%% disterl connections both go through a relay started here, which passes at
%%% most LINK_MBPS and delays each piece by LINK_DELAY_MS (a 1 Gbit/s link with a
%%% 1 ms delay by default; netem is not in this kernel).
%%%
%%% Environment (defaults in brackets; the `short' group, in all/0, runs a
%%% few calls to keep the suite from rotting; `full' is the benchmark):
%%% HOL_ROUNDS [full 5], HOL_CALLS [300], HOL_INTERVAL_MS [5], HOL_STREAMS [4],
%%% HOL_PAYLOAD [10485760], HOL_PACED_MBPS [1000], HOL_LINK_MBPS [125],
%%% HOL_LINK_DELAY_MS [1], and teleport settings HOL_TLS (on: certificates made
%%% with openssl), HOL_POOL_SIZE, HOL_IO_THREADS,
%%% HOL_IO_THREAD_PRIORITY, HOL_SNDBUF. TELEPORT_PEER_EBIN: run the
%%% peers on another build of teleport (its ebin), e.g. scripts/build_old_main.sh's.
-module(hol_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([calls_under_bulk/1, slow_link/1]).
%% Run on the peers.
-export([round/2, stream/5, byte_sink/0, relay_epmd_port/1]).
%% The relay's epmd module, on the node whose disterl goes through it.
-export([start_link/0, register_node/2, register_node/3, port_please/2, port_please/3,
         names/1, address_please/3, listen_port_please/2]).

-define(SERVER, hol_echo).
-define(SINK, hol_sink).
-define(RPC_TIMEOUT, 600000).

suite() ->
    [{timetrap, {minutes, 60}}].

all() ->
    [{group, short}].

groups() ->
    [{short, [], [calls_under_bulk, slow_link]},
     {full, [], [calls_under_bulk, slow_link]}].

init_per_suite(Config) ->
    teleport_test_peer:init_per_suite(Config).

end_per_suite(_Config) ->
    ok.

init_per_group(short, Config) ->
    [{params, params(#{rounds => 1, calls => 40, payload => 1 bsl 20})} | Config];
init_per_group(full, Config) ->
    [{params, params(#{rounds => 5, calls => 300, payload => 10 bsl 20})} | Config].

end_per_group(_, _Config) ->
    ok.

params(Group) ->
    Defaults = maps:merge(#{interval_ms => 5, streams => 4, paced_mbps => 1000,
                            link_mbps => 125, link_delay_ms => 1}, Group),
    maps:map(fun(Key, Default) ->
                     Var = "HOL_" ++ string:uppercase(atom_to_list(Key)),
                     case os:getenv(Var) of
                         false -> Default;
                         "" -> Default;
                         Value -> list_to_integer(Value)
                     end
             end, Defaults).

%% HOL_CONDITIONS (e.g. "idle,full") runs only those.
conditions(All) ->
    case os:getenv("HOL_CONDITIONS") of
        Set when Set =:= false; Set =:= "" -> All;
        Set -> [C || C <- All, lists:member(atom_to_list(C), string:lexemes(Set, ","))]
    end.

app_env() ->
    teleport_test_peer:app_env_from_os("HOL", [tls, pool_size, io_threads, io_thread_priority, sndbuf]).

%%====================================================================
%% calls_under_bulk
%%====================================================================

calls_under_bulk(Config) ->
    P = ?config(params, Config),
    {Peers, A, B} = start_pair(app_env(), []),
    try
        Conditions = conditions([idle, full, paced, disterl_paced]),
        Results = [{Cond, R, run_round(A, B, Cond, P)}
                   || R <- lists:seq(1, maps:get(rounds, P)), Cond <- Conditions],
        report("calls_under_bulk", P, Conditions, Results)
    after
        [teleport_test_peer:stop(Peer) || Peer <- Peers]
    end.

%%====================================================================
%% slow_link
%%====================================================================

%% A and B as above, but B's teleport listener and disterl listener are reached
%% through relays on A's host with the link's bandwidth and delay; A learns the
%% relayed addresses from peer_addresses (teleport) and this module as its epmd
%% module (disterl).
slow_link(Config) ->
    P = ?config(params, Config),
    {[PeerB], B} = start_one("hol_slow_b", app_env(), []),
    {ok, {_, TeleportPort}} = erpc:call(B, teleport_nif, listen_address, []),
    {ok, DistPort} = erpc:call(B, ?MODULE, relay_epmd_port, [B]),
    Link = #{mbps => maps:get(link_mbps, P), delay_ms => maps:get(link_delay_ms, P)},
    TeleportRelay = hol_relay:start(TeleportPort, Link),
    DistRelay = hol_relay:start(DistPort, Link),
    try
        Env = (app_env())#{peer_addresses => #{B => {{127, 0, 0, 1}, hol_relay:port(TeleportRelay)}}},
        Args = ["-epmd_module", atom_to_list(?MODULE),
                "-hol_relay", atom_to_list(B), integer_to_list(hol_relay:port(DistRelay))],
        {[PeerA], A} = start_one("hol_slow_a", Env, Args),
        try
            true = erpc:call(A, net_kernel, connect_node, [B]),
            ok = erpc:call(A, teleport, connect, [B]),
            ok = erpc:call(B, teleport, connect, [A]),
            ok = setup_b(B),
            ct:pal("slow link: ~p MB/s, ~p ms each way (relays ~p, ~p)",
                   [maps:get(mbps, Link), maps:get(delay_ms, Link),
                    hol_relay:port(TeleportRelay), hol_relay:port(DistRelay)]),
            Conditions = conditions([idle, paced_link, disterl_paced_link]),
            Results = [{Cond, R, run_round(A, B, Cond, P)}
                       || R <- lists:seq(1, maps:get(rounds, P)), Cond <- Conditions],
            report("slow_link", P, Conditions, Results)
        after
            teleport_test_peer:stop(PeerA)
        end
    after
        hol_relay:stop(TeleportRelay),
        hol_relay:stop(DistRelay),
        teleport_test_peer:stop(PeerB)
    end.

%%====================================================================
%% One round
%%====================================================================

run_round(A, B, Cond, P) ->
    #{streams := Streams, payload := Payload, calls := Calls, interval_ms := Interval} = P,
    {Transport, Rate} = case Cond of
                            idle -> {none, 0};
                            full -> {teleport, infinity};
                            paced -> {teleport, maps:get(paced_mbps, P) * 1000000};
                            disterl_paced -> {disterl, maps:get(paced_mbps, P) * 1000000};
                            %% Over the slow link, paced to two thirds of it.
                            paced_link -> {teleport, maps:get(link_mbps, P) * 666666};
                            disterl_paced_link -> {disterl, maps:get(link_mbps, P) * 666666}
                        end,
    erpc:call(A, ?MODULE, round, [B, #{transport => Transport, rate => Rate, streams => Streams,
                                        payload => Payload, calls => Calls,
                                        interval_ms => Interval}], ?RPC_TIMEOUT).

%% On A: starts the streams, lets them ramp up, runs both call series, stops the
%% streams; returns the latencies (us) and the streams' throughput (MB/s).
-spec round(node(), map()) -> map().
round(B, #{transport := Transport, rate := Rate, streams := N, payload := Payload,
           calls := Calls, interval_ms := Interval}) ->
    Bin = binary:copy(<<7>>, Payload),
    process_flag(trap_exit, true),
    Start = sink_count(B),
    T0 = erlang:monotonic_time(microsecond),
    Stop = atomics:new(1, []),
    PerStream = case Rate of
                    infinity -> infinity;
                    _ -> Rate / max(N, 1)
                end,
    Streamers = [spawn_link(?MODULE, stream, [Transport, B, Bin, PerStream, Stop])
                 || Transport =/= none, _ <- lists:seq(1, N)],
    timer:sleep(case Transport of none -> 0; _ -> 300 end),
    Self = self(),
    Collector = spawn_link(fun() -> collect(Self, 2 * Calls, #{teleport => [], disterl => []}) end),
    Origin = erlang:monotonic_time(microsecond) + 1000,
    Ticks = [{Series, Origin + I * Interval * 1000 + Offset}
             || I <- lists:seq(0, Calls - 1),
                {Series, Offset} <- [{teleport, 0}, {disterl, Interval * 500}]],
    ok = fire(lists:keysort(2, Ticks), B, Collector),
    Lat = receive {latencies, Collector, L} -> L after ?RPC_TIMEOUT -> error(calls_timeout) end,
    atomics:put(Stop, 1, 1),
    Sent = lists:sum([receive {'EXIT', S, {sent, Bytes}} -> Bytes end || S <- Streamers]),
    T1 = erlang:monotonic_time(microsecond),
    End = sink_count(B),
    %% Whatever the calls did, every byte the streams sent arrives.
    ok = await_sink(B, Start + Sent, erlang:monotonic_time(millisecond) + 60000),
    #{teleport => lists:sort(maps:get(teleport, Lat)), disterl => lists:sort(maps:get(disterl, Lat)),
      late => lists:sort(maps:get(late, Lat)), mbps => (End - Start) / max(1, T1 - T0),
      legs => maps:from_list([{{Leg, S}, lists:sort(maps:get({Leg, S}, Lat))}
                              || Leg <- [there, back], S <- [teleport, disterl]])}.

sink_count(B) ->
    erpc:call(B, erlang, whereis, [?SINK]) ! {count, self()},
    receive {sink_count, Count} -> Count end.

await_sink(B, Expected, Deadline) ->
    case sink_count(B) of
        Expected ->
            ok;
        Count when Count < Expected ->
            case erlang:monotonic_time(millisecond) < Deadline of
                true -> timer:sleep(50), await_sink(B, Expected, Deadline);
                false -> error({streamed_bytes_missing, Expected - Count})
            end;
        Count ->
            error({more_bytes_than_streamed, Count - Expected})
    end.

%% Starts each call at its time (microseconds, monotonic), in its own process, and
%% times it from its start. Sleeps between calls (a busy wait would take a core
%% from what is measured): a call starts up to a timer's grain (~1 ms) late, and
%% how late is recorded beside it, so a node too busy to start calls on time shows.
fire([], _B, _Collector) ->
    ok;
fire([{Series, At} | Rest], B, Collector) ->
    Wait = At - erlang:monotonic_time(microsecond),
    _ = Wait > 0 andalso timer:sleep((Wait + 999) div 1000),
    Started = erlang:monotonic_time(microsecond),
    spawn(fun() ->
                  Sent = os:system_time(microsecond),
                  Arrived = case Series of
                                teleport -> teleport:gs_call({?SERVER, B}, clock, 30000);
                                disterl -> gen_server:call({?SERVER, B}, clock, 30000)
                            end,
                  Back = os:system_time(microsecond),
                  true = is_integer(Arrived),
                  Collector ! {latency, Series, erlang:monotonic_time(microsecond) - Started,
                               Started - At, Arrived - Sent, Back - Arrived}
          end),
    fire(Rest, B, Collector).

collect(Parent, 0, Acc) ->
    Parent ! {latencies, self(), Acc};
collect(Parent, Left, Acc) ->
    receive
        {latency, Series, Us, Late, There, Back} ->
            Add = fun(Key, Value, M) -> maps:update_with(Key, fun(L) -> [Value | L] end, [Value], M) end,
            Acc1 = Add(late, Late, Add({there, Series}, There, Add({back, Series}, Back, Acc))),
            collect(Parent, Left - 1, Add(Series, Us, Acc1))
    end.

%% One stream: sends `Bin' to the sink on B over `Transport', at most `Rate' bytes
%% a second (infinity: as fast as it goes), until told to stop; exits with how many
%% bytes it sent.
-spec stream(teleport | disterl, node(), binary(), number(), atomics:atomics_ref()) -> no_return().
stream(Transport, B, Bin, Rate, Stop) ->
    stream(Transport, B, Bin, Rate, Stop, erlang:monotonic_time(microsecond), 0).

stream(Transport, B, Bin, Rate, Stop, T0, Sent) ->
    case atomics:get(Stop, 1) of
        1 ->
            exit({sent, Sent});
        0 ->
            case Transport of
                teleport -> ok = teleport:send({?SINK, B}, Bin);
                disterl -> erlang:send({?SINK, B}, Bin)
            end,
            Sent1 = Sent + byte_size(Bin),
            case Rate of
                infinity -> ok;
                _ ->
                    Due = T0 + round(Sent1 / Rate * 1000000),
                    Ahead = Due - erlang:monotonic_time(microsecond),
                    _ = Ahead > 1000 andalso timer:sleep(Ahead div 1000)
            end,
            stream(Transport, B, Bin, Rate, Stop, T0, Sent1)
    end.

%%====================================================================
%% Nodes
%%====================================================================

start_pair(Env, Args) ->
    {[PeerB], B} = start_one("hol_b", Env, Args),
    {[PeerA], A} = try start_one("hol_a", Env, Args)
                   catch C:R:S -> teleport_test_peer:stop(PeerB), erlang:raise(C, R, S)
                   end,
    true = erpc:call(A, net_kernel, connect_node, [B]),
    ok = erpc:call(A, teleport, connect, [B]),
    ok = erpc:call(B, teleport, connect, [A]),
    ok = setup_b(B),
    ct:pal("hol peers ~p and ~p, teleport env ~p, peer ebin ~p",
           [A, B, Env, os:getenv("TELEPORT_PEER_EBIN")]),
    {[PeerA, PeerB], A, B}.

start_one(Prefix, Env, Args) ->
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name(Prefix), Args, Env),
    unlink(Peer),
    {[Peer], Node}.

setup_b(B) ->
    {ok, _} = erpc:call(B, teleport_test_server, start, [?SERVER]),
    Sink = erpc:call(B, erlang, spawn, [?MODULE, byte_sink, []]),
    %% Registered before anything asks for it by name.
    true = erpc:call(B, erlang, register, [?SINK, Sink]),
    ok.

%% On B: counts the bytes it gets; tells how many when asked.
-spec byte_sink() -> no_return().
byte_sink() ->
    byte_sink(0).

byte_sink(N) ->
    receive
        {count, From} -> From ! {sink_count, N}, byte_sink(N);
        Bin when is_binary(Bin) -> byte_sink(N + byte_size(Bin));
        _ -> byte_sink(N)
    end.

%%====================================================================
%% Report
%%====================================================================

report(Name, P, Conditions, Results) ->
    [ct:pal("~s round ~b ~-19s teleport gs_call p50 ~9.1f p99 ~9.1f max ~9.1f | "
            "disterl call p50 ~9.1f p99 ~9.1f max ~9.1f us | streams ~9.1f MB/s | "
            "calls started late p99 ~9.1f us",
            [Name, R, Cond | stats(maps:get(teleport, M)) ++ stats(maps:get(disterl, M))
             ++ [maps:get(mbps, M), lists:nth(2, stats(maps:get(late, M)))]])
     || {Cond, R, M} <- Results],
    %% Where a call's time went: from the caller to the server (request), and back
    %% (reply), by the OS clock both nodes share.
    [ct:pal("~s round ~b ~-19s legs p50 / p99: gs_call there ~7.1f / ~8.1f back ~7.1f / ~8.1f | "
            "disterl call there ~7.1f / ~8.1f back ~7.1f / ~8.1f us",
            [Name, R, Cond | legs(M)])
     || {Cond, R, M} <- Results],
    Summary = [begin
                   Rounds = [M || {C, _, M} <- Results, C =:= Cond],
                   Med = fun(Series, I) -> median([lists:nth(I, stats(maps:get(Series, M))) || M <- Rounds]) end,
                   Worst = fun(Series, I) -> lists:max([lists:nth(I, stats(maps:get(Series, M))) || M <- Rounds]) end,
                   MedLegs = [median([lists:nth(I, legs(M)) || M <- Rounds]) || I <- lists:seq(1, 8)],
                   io_lib:format("~n  ~-19s teleport p50 ~9.1f (worst ~9.1f) p99 ~9.1f (worst ~9.1f) | "
                                 "disterl p50 ~9.1f (worst ~9.1f) p99 ~9.1f (worst ~9.1f) us | "
                                 "streams ~9.1f MB/s (least ~9.1f)"
                                 "~n  ~-19s   legs p50 / p99: gs_call there ~7.1f / ~8.1f back ~7.1f / ~8.1f | "
                                 "disterl call there ~7.1f / ~8.1f back ~7.1f / ~8.1f us",
                                 [Cond, Med(teleport, 1), Worst(teleport, 1), Med(teleport, 2), Worst(teleport, 2),
                                  Med(disterl, 1), Worst(disterl, 1), Med(disterl, 2), Worst(disterl, 2),
                                  median([maps:get(mbps, M) || M <- Rounds]),
                                  lists:min([maps:get(mbps, M) || M <- Rounds]), "" | MedLegs])
               end || Cond <- Conditions],
    Text = io_lib:format("hol ~s ~p: medians over ~b rounds~s",
                         [Name, P, maps:get(rounds, P), Summary]),
    ct:pal("~s", [Text]),
    io:format(user, "~s~n", [Text]),
    %% The work completed: every call of every round answered.
    [?assertEqual(maps:get(calls, P), length(maps:get(S, M))) || {_, _, M} <- Results,
                                                                   S <- [teleport, disterl]],
    ok.

%% p50 and p99 of each leg: gs_call's there and back, then the disterl call's.
legs(#{legs := Legs}) ->
    lists:append([lists:sublist(stats(maps:get({Leg, S}, Legs)), 2)
                  || S <- [teleport, disterl], Leg <- [there, back]]).

stats([]) -> [0.0, 0.0, 0.0];
stats(Sorted) -> [float(percentile(Sorted, 50)), float(percentile(Sorted, 99)), float(lists:last(Sorted))].

percentile(Sorted, Pct) ->
    lists:nth(max(1, min(length(Sorted), round(Pct / 100 * length(Sorted)))), Sorted).

median(Values) ->
    percentile(lists:sort(Values), 50).

%%====================================================================
%% epmd module for the node whose disterl to B goes through the relay
%%====================================================================

%% On B: the port its disterl listener is on.
-spec relay_epmd_port(node()) -> {ok, inet:port_number()}.
relay_epmd_port(Node) ->
    [Name, Host] = string:split(atom_to_list(Node), "@"),
    {port, Port, _} = erl_epmd:port_please(Name, Host),
    {ok, Port}.

relayed(Name, Host) ->
    case init:get_argument(hol_relay) of
        {ok, [[Node, Port]]} ->
            case Node =:= Name ++ "@" ++ Host of
                true -> {port, list_to_integer(Port), 6};
                false -> undefined
            end;
        _ ->
            undefined
    end.

start_link() -> erl_epmd:start_link().
register_node(Name, Port) -> erl_epmd:register_node(Name, Port).
register_node(Name, Port, Family) -> erl_epmd:register_node(Name, Port, Family).
port_please(Name, Host) -> port_please(Name, Host, infinity).
port_please(Name, Host, Timeout) ->
    HostName = case Host of
                   H when is_list(H) -> H;
                   H when is_atom(H) -> atom_to_list(H);
                   H -> inet:ntoa(H)
               end,
    case relayed(Name, HostName) of
        undefined -> erl_epmd:port_please(Name, Host, Timeout);
        Relayed -> Relayed
    end.
names(Host) -> erl_epmd:names(Host).
address_please(Name, Host, Family) ->
    HostName = case Host of
                   H when is_list(H) -> H;
                   H when is_atom(H) -> atom_to_list(H);
                   H -> inet:ntoa(H)
               end,
    case relayed(Name, HostName) of
        {port, Port, Version} -> {ok, {127, 0, 0, 1}, Port, Version};
        undefined -> erl_epmd:address_please(Name, Host, Family)
    end.
listen_port_please(Name, Host) -> erl_epmd:listen_port_please(Name, Host).

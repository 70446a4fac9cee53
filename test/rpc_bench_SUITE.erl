%% @doc teleport_rpc beside erpc (over disterl) and gen_rpc, side by side in one
%% run. Benchmarks, not tests: figures are printed (ct:pal and the console),
%% never asserted; the cases only check that the work completed.
%%
%% Peers run teleport and gen_rpc (built by scripts/build_gen_rpc.sh from
%% unmodified sources; without it gen_rpc's columns are left out and the run
%% says so). Every transport is primed (its connections open) before timing, and
%% runs alternate which transport goes first.
%% <ul>
%% <li>`ring': ring_SUITE's ring over RPC casts: N nodes, W registered workers
%%     per node each holding a random payload; a hop is a cast of
%%     `erlang:send(Worker, Msg)' to the next node (`Mod:cast(Node, erlang,
%%     send, [Name, Msg])'), N-1 hops, the last node acks the origin the same
%%     way. Transports: teleport_rpc, teleport_rpc keyed per worker
%%     (`{Node, K}'), erpc, gen_rpc, gen_rpc keyed per worker; and, as baselines
%%     without RPC, the same hops as `teleport:send/2' and disterl's `!'. Mean
%%     trip.</li>
%% <li>`latency': one process on A calls `erlang:node/0' on B at a fixed rate
%%     (RPC_BENCH_RATE per second), each transport in interleaved blocks; p50
%%     and p99 in microseconds.</li>
%% <li>`throughput': RPC_BENCH_CALLERS (64) processes on A call
%%     `erlang:node/0' on B back to back for RPC_BENCH_SECONDS each block;
%%     calls per second.</li>
%% <li>`multicall': a 1 MiB binary argument to 5 nodes (RPC_BENCH_MULTICALL_NODES;
%%     `erlang:byte_size/1'),
%%     teleport_rpc:multicall against erpc:multicall and gen_rpc:multicall;
%%     median time per multicall.</li>
%% <li>`compression': a call with a JSON-like list of maps (RPC_BENCH_JSON_BYTES,
%%     1 MiB in external format) as argument and as result, compressed at level
%%     6 over 1 KiB by teleport_rpc (the call's option) and by gen_rpc (its
%%     `compress' setting), and uncompressed; median time per call, and the
%%     bytes teleport put on the wire per call.</li>
%% </ul>
%% Groups: `short' (in the test command: tiny sizes, so that the suite cannot
%% rot) and `full' (`rebar3 ct --suite test/rpc_bench_SUITE --group full').
%% Environment: RPC_RING_NODES, RPC_RING_WORKERS, RPC_RING_PAYLOAD_BYTES,
%% RPC_RING_ROUNDS, RPC_BENCH_CALLS, RPC_BENCH_RATE, RPC_BENCH_BLOCKS,
%% RPC_BENCH_CALLERS, RPC_BENCH_SECONDS, RPC_BENCH_MULTICALL_ROUNDS,
%% RPC_BENCH_JSON_BYTES, RPC_BENCH_CASES (comma-separated case names),
%% RPC_BENCH_TRANSPORTS (comma-separated transports, for profiling one alone).
-module(rpc_bench_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([ring/1, latency/1, throughput/1, multicall/1, compression/1]).
%% Run on the peers.
-export([worker_init/4, latency_run/3, throughput_run/3, caller_loop/4, multicall_run/3,
         compression_run/3, json_like/1]).

-define(TRIP_TIMEOUT, 300000).
-define(RUN_TIMEOUT, 600000).
-define(CALL_TIMEOUT, 60000).

suite() ->
    [{timetrap, {minutes, 60}}].

all() -> [{group, short}].

groups() ->
    Cases = [ring, latency, throughput, multicall, compression],
    [{short, [], Cases}, {full, [], Cases}].

init_per_suite(Config) ->
    teleport_test_peer:init_per_suite(Config).

end_per_suite(_Config) ->
    ok.

init_per_group(Group, Config) ->
    Params = params(Group),
    GenRpc = teleport_test_gen_rpc:available(),
    Extra = case GenRpc of
                {ok, Ebins} -> ["-pa" | Ebins];
                {skip, Why} -> ct:pal("gen_rpc left out: ~s", [Why]), []
            end,
    N = max(maps:get(ring_nodes, Params), maps:get(multicall_nodes, Params) + 1),
    Peers = [begin
                 {ok, Peer, Node} = teleport_test_peer:start(peer_name(I), Extra),
                 unlink(Peer),
                 {Peer, Node}
             end || I <- lists:seq(1, N)],
    Nodes = [Node || {_, Node} <- Peers],
    %% Every node connected to every other, both transports' pools open.
    [true = erpc:call(X, net_kernel, connect_node, [Y]) || X <- Nodes, Y <- Nodes, X < Y],
    Available = case GenRpc of
                    {ok, _} -> ok = teleport_test_gen_rpc:start(Nodes),
                               [teleport_rpc, erpc, gen_rpc];
                    {skip, _} -> [teleport_rpc, erpc]
                end,
    Transports = selected_transports(Available),
    ct:pal("rpc_bench ~p: ~b peers, transports ~p, params ~p, load ~s",
           [Group, N, Transports, Params, os:cmd("uptime")]),
    [{params, Params}, {peers, Peers}, {nodes, Nodes}, {transports, Transports} | Config].

end_per_group(_Group, Config) ->
    [teleport_test_peer:stop(Peer) || {Peer, _} <- ?config(peers, Config)],
    ok.

peer_name(I) ->
    list_to_atom("rpcb" ++ integer_to_list(I) ++ "_"
                 ++ integer_to_list(erlang:unique_integer([positive]))).

params(Group) ->
    Defaults = case Group of
                   short -> #{ring_nodes => 3, ring_workers => 2, ring_payload_bytes => 1 bsl 20,
                              ring_rounds => 1, calls => 300, rate => 500, blocks => 2,
                              callers => 8, seconds => 1, multicall_rounds => 5,
                              multicall_nodes => 2, json_bytes => 64 * 1024};
                   full -> #{ring_nodes => 6, ring_workers => 6, ring_payload_bytes => 10 bsl 20,
                             ring_rounds => 3, calls => 20000, rate => 1000, blocks => 4,
                             callers => 64, seconds => 5, multicall_rounds => 40,
                             multicall_nodes => 5, json_bytes => 1 bsl 20}
               end,
    Vars = #{ring_nodes => "RPC_RING_NODES", ring_workers => "RPC_RING_WORKERS",
             ring_payload_bytes => "RPC_RING_PAYLOAD_BYTES", ring_rounds => "RPC_RING_ROUNDS",
             calls => "RPC_BENCH_CALLS", rate => "RPC_BENCH_RATE", blocks => "RPC_BENCH_BLOCKS",
             callers => "RPC_BENCH_CALLERS", seconds => "RPC_BENCH_SECONDS",
             multicall_rounds => "RPC_BENCH_MULTICALL_ROUNDS",
             multicall_nodes => "RPC_BENCH_MULTICALL_NODES", json_bytes => "RPC_BENCH_JSON_BYTES"},
    maps:map(fun(Key, Default) ->
                     case os:getenv(maps:get(Key, Vars)) of
                         false -> Default;
                         Value -> list_to_integer(Value)
                     end
             end, Defaults).

%% RPC_BENCH_CASES: run only these cases (the others skip).
selected(Case) ->
    case os:getenv("RPC_BENCH_CASES") of
        false -> true;
        Cases -> lists:member(atom_to_list(Case), string:tokens(Cases, ","))
    end.

%%====================================================================
%% ring
%%====================================================================

ring(Config) ->
    run_selected(ring, fun() -> ring_run(Config) end).

ring_run(Config) ->
    #{ring_nodes := N, ring_workers := W, ring_payload_bytes := Bytes, ring_rounds := Rounds} =
        ?config(params, Config),
    Nodes = lists:sublist(?config(nodes, Config), N),
    Transports = lists:append([case T of
                                   teleport_rpc -> [teleport_rpc, teleport_rpc_keyed];
                                   gen_rpc -> [gen_rpc, gen_rpc_keyed];
                                   erpc -> [erpc]
                               end || T <- ?config(transports, Config)])
        ++ [teleport_send, disterl_send],
    Self = self(),
    Workers = [erpc:call(Node, erlang, spawn, [?MODULE, worker_init, [Self, {I, K}, Nodes, Bytes]])
               || {I, Node} <- lists:zip(lists:seq(1, N), Nodes), K <- lists:seq(1, W)],
    [receive {worker_ready, Node, K} -> ok after 60000 -> ct:fail({worker_not_ready, Node, K}) end
     || Node <- Nodes, K <- lists:seq(1, W)],
    try
        %% A tiny message around the ring on every transport opens every connection.
        [trips(T, Nodes, W, prime) || T <- Transports],
        Results = [maps:from_list([{T, trips(T, Nodes, W, full)} || T <- rotate(Transports, R)])
                   || R <- lists:seq(1, Rounds)],
        Means = [{T, mean(lists:append([maps:get(T, Res) || Res <- Results])) / 1.0e6}
                 || T <- Transports],
        TeleportMean = proplists:get_value(teleport_rpc, Means),
        summary("rpc ring nodes=~b workers=~b payload=~b rounds=~b, mean trip: ~s",
                [N, W, Bytes, Rounds,
                 string:join([io_lib:format("~p ~.3f s (~.2fx teleport_rpc's)",
                                            [T, M, M / TeleportMean]) || {T, M} <- Means], ", ")])
    after
        [exit(Pid, kill) || Pid <- Workers]
    end.

rotate(List, R) ->
    Shift = R rem length(List),
    lists:nthtail(Shift, List) ++ lists:sublist(List, Shift).

worker_name(K) ->
    list_to_atom("rpc_ring_worker_" ++ integer_to_list(K)).

%% On each node: worker K, its payload, its next node.
worker_init(Parent, {Index, K}, Nodes, Bytes) ->
    register(worker_name(K), self()),
    Payload = crypto:strong_rand_bytes(Bytes),
    Next = lists:nth(Index rem length(Nodes) + 1, Nodes),
    Parent ! {worker_ready, node(), K},
    worker_loop(#{k => K, next => Next, hops => length(Nodes) - 1, payload => Payload,
                  trips => #{}}).

worker_loop(#{k := K, next := Next, hops := Hops, payload := Payload, trips := Trips} = S) ->
    receive
        {go, Transport, Caller, Ref, Kind} ->
            Carried = case Kind of
                          prime -> <<>>;
                          full -> Payload
                      end,
            T0 = erlang:monotonic_time(microsecond),
            hop(Transport, Next, K, {ring, Transport, self(), Hops - 1, Ref, Carried}),
            worker_loop(S#{trips := Trips#{Ref => {Caller, T0, byte_size(Carried)}}});
        {ring, Transport, Origin, 0, Ref, Carried} ->
            hop(Transport, node(Origin), K, {ack, Ref, byte_size(Carried)}),
            worker_loop(S);
        {ring, Transport, Origin, Left, Ref, Carried} ->
            hop(Transport, Next, K, {ring, Transport, Origin, Left - 1, Ref, Carried}),
            worker_loop(S);
        {ack, Ref, Size} ->
            T1 = erlang:monotonic_time(microsecond),
            {{Caller, T0, Size0}, Trips1} = maps:take(Ref, Trips),
            Caller ! {trip, Ref, T1 - T0, Size =:= Size0},
            worker_loop(S#{trips := Trips1})
    end.

%% One hop: a cast of erlang:send/2 to worker K on Node.
hop(teleport_rpc, Node, K, Msg) ->
    ok = teleport_rpc:cast(Node, erlang, send, [worker_name(K), Msg]);
hop(teleport_rpc_keyed, Node, K, Msg) ->
    ok = teleport_rpc:cast({Node, K}, erlang, send, [worker_name(K), Msg]);
hop(erpc, Node, K, Msg) ->
    ok = erpc:cast(Node, erlang, send, [worker_name(K), Msg]);
hop(gen_rpc, Node, K, Msg) ->
    true = gen_rpc:cast(Node, erlang, send, [worker_name(K), Msg]);
hop(gen_rpc_keyed, Node, K, Msg) ->
    true = gen_rpc:cast({Node, K}, erlang, send, [worker_name(K), Msg]);
%% Baselines: the same hop as a plain send, no RPC.
hop(teleport_send, Node, K, Msg) ->
    ok = teleport:send({worker_name(K), Node}, Msg);
hop(disterl_send, Node, K, Msg) ->
    {worker_name(K), Node} ! Msg,
    ok.

%% Every worker at once on one transport.
trips(Transport, Nodes, W, Kind) ->
    timer:sleep(500),
    Refs = [begin
                Ref = make_ref(),
                {worker_name(K), Node} ! {go, Transport, self(), Ref, Kind},
                Ref
            end || Node <- Nodes, K <- lists:seq(1, W)],
    [receive
         {trip, Ref, Micros, Intact} ->
             ?assert(Intact, {payload_lost, Transport}),
             Micros
     after ?TRIP_TIMEOUT ->
             ct:fail({trip_timeout, Transport})
     end || Ref <- Refs].

%%====================================================================
%% latency
%%====================================================================

latency(Config) ->
    run_selected(latency, fun() -> latency_run(Config) end).

latency_run(Config) ->
    #{calls := Calls, rate := Rate, blocks := Blocks} = ?config(params, Config),
    [A, B | _] = ?config(nodes, Config),
    Transports = ?config(transports, Config),
    PerBlock = max(1, Calls div Blocks),
    Runs = interleaved(Blocks, Transports, fun(T) -> on(A, latency_run, [T, B, {PerBlock, Rate}]) end),
    Stats = [begin
                 Sorted = lists:sort(lists:append([L || {T1, L} <- Runs, T1 =:= T])),
                 {T, percentile(Sorted, 50), percentile(Sorted, 99)}
             end || T <- Transports],
    {_, P50T, P99T} = lists:keyfind(teleport_rpc, 1, Stats),
    summary("rpc latency calls=~b rate=~b/s blocks=~b, erlang:node/0 on B: ~s",
            [PerBlock * Blocks, Rate, Blocks,
             string:join([io_lib:format("~p p50 ~.1f us p99 ~.1f us", [T, P50, P99])
                          || {T, P50, P99} <- Stats], ", ")
             ++ io_lib:format(" (teleport_rpc/erpc p50 ~.2f p99 ~.2f)",
                              [P50T / element(2, lists:keyfind(erpc, 1, Stats)),
                               P99T / element(3, lists:keyfind(erpc, 1, Stats))])]).

%% On A: `Calls' calls, one every 1000/Rate ms (a call that overruns its slot
%% is not made up for), after a warm-up of a tenth as many; microseconds each.
latency_run(Transport, B, {Calls, Rate}) ->
    Call = call_fun(Transport, B),
    _ = [Call() || _ <- lists:seq(1, max(10, Calls div 10))],
    IntervalUs = 1000000 div Rate,
    Start = erlang:monotonic_time(microsecond),
    paced(Call, Start, IntervalUs, 0, Calls, []).

paced(_Call, _Start, _IntervalUs, Calls, Calls, Acc) ->
    Acc;
paced(Call, Start, IntervalUs, I, Calls, Acc) ->
    Slot = Start + I * IntervalUs,
    case (Slot - erlang:monotonic_time(microsecond)) div 1000 of
        Wait when Wait > 0 -> receive after Wait -> ok end;
        _ -> ok
    end,
    T0 = erlang:monotonic_time(nanosecond),
    _ = Call(),
    Us = (erlang:monotonic_time(nanosecond) - T0) / 1000,
    paced(Call, Start, IntervalUs, I + 1, Calls, [Us | Acc]).

call_fun(teleport_rpc, B) -> fun() -> B = teleport_rpc:call(B, erlang, node, [], ?CALL_TIMEOUT) end;
call_fun(erpc, B) -> fun() -> B = erpc:call(B, erlang, node, [], ?CALL_TIMEOUT) end;
call_fun(gen_rpc, B) -> fun() -> B = gen_rpc:call(B, erlang, node, [], ?CALL_TIMEOUT) end.

%%====================================================================
%% throughput
%%====================================================================

throughput(Config) ->
    run_selected(throughput, fun() -> throughput_run(Config) end).

throughput_run(Config) ->
    #{callers := Callers, seconds := Seconds, blocks := Blocks} = ?config(params, Config),
    [A, B | _] = ?config(nodes, Config),
    Transports = ?config(transports, Config),
    Runs = interleaved(Blocks, Transports, fun(T) -> on(A, throughput_run, [T, B, {Callers, Seconds}]) end),
    Rates = [{T, [R || {T1, R} <- Runs, T1 =:= T]} || T <- Transports],
    summary("rpc throughput callers=~b seconds=~b blocks=~b, erlang:node/0 on B: ~s",
            [Callers, Seconds, Blocks,
             string:join([io_lib:format("~p ~b calls/s (blocks ~s)",
                                        [T, round(mean(Rs)), format_list([round(R) || R <- Rs], "~b")])
                          || {T, Rs} <- Rates], ", ")]).

%% On A: calls per second from `Callers' processes calling back to back.
throughput_run(Transport, B, {Callers, Seconds}) ->
    Self = self(),
    Call = call_fun(Transport, B),
    _ = [Call() || _ <- lists:seq(1, 100)],
    Until = erlang:monotonic_time(millisecond) + Seconds * 1000,
    Pids = [spawn_link(?MODULE, caller_loop, [Self, Call, Until, 0]) || _ <- lists:seq(1, Callers)],
    Total = lists:sum([receive {calls, Pid, N} -> N after ?RUN_TIMEOUT -> error(no_count) end
                       || Pid <- Pids]),
    Total / Seconds.

caller_loop(Parent, Call, Until, N) ->
    case erlang:monotonic_time(millisecond) >= Until of
        true -> Parent ! {calls, self(), N};
        false -> _ = Call(), caller_loop(Parent, Call, Until, N + 1)
    end.

%%====================================================================
%% multicall
%%====================================================================

multicall(Config) ->
    run_selected(multicall, fun() -> multicall_run(Config) end).

multicall_run(Config) ->
    #{multicall_rounds := Rounds, multicall_nodes := Count} = ?config(params, Config),
    [A | Others] = ?config(nodes, Config),
    Targets = lists:sublist(Others, Count),
    Transports = ?config(transports, Config),
    Runs = interleaved(4, Transports, fun(T) -> on(A, multicall_run, [T, Targets, Rounds div 4 + 1]) end),
    Medians = [{T, median(lists:append([L || {T1, L} <- Runs, T1 =:= T]))} || T <- Transports],
    {_, Erpc} = lists:keyfind(erpc, 1, Medians),
    summary("rpc multicall 1 MiB to ~b nodes, ~b rounds: median ~s",
            [length(Targets), 4 * (Rounds div 4 + 1),
             string:join([io_lib:format("~p ~.2f ms (erpc/~p ~.2fx)", [T, M / 1000, T, Erpc / M])
                          || {T, M} <- Medians], ", ")]).

%% On A: microseconds per multicall of a fresh 1 MiB binary.
multicall_run(Transport, Targets, Rounds) ->
    Bytes = 1 bsl 20,
    Multicall = fun(Bin) ->
                        case Transport of
                            teleport_rpc ->
                                [{ok, Bytes}] = lists:usort(teleport_rpc:multicall(
                                                              Targets, erlang, byte_size, [Bin],
                                                              ?CALL_TIMEOUT));
                            erpc ->
                                [{ok, Bytes}] = lists:usort(erpc:multicall(Targets, erlang, byte_size,
                                                                           [Bin], ?CALL_TIMEOUT));
                            gen_rpc ->
                                {Values, []} = gen_rpc:multicall(Targets, erlang, byte_size, [Bin],
                                                                 ?CALL_TIMEOUT),
                                [Bytes] = lists:usort(Values)
                        end
                end,
    Multicall(crypto:strong_rand_bytes(Bytes)),
    [begin
         Bin = crypto:strong_rand_bytes(Bytes),
         T0 = erlang:monotonic_time(microsecond),
         Multicall(Bin),
         erlang:monotonic_time(microsecond) - T0
     end || _ <- lists:seq(1, Rounds)].

%%====================================================================
%% compression
%%====================================================================

compression(Config) ->
    run_selected(compression, fun() -> compression_run(Config) end).

compression_run(Config) ->
    #{json_bytes := Bytes, multicall_rounds := Rounds} = ?config(params, Config),
    [A, B | _] = ?config(nodes, Config),
    Modes = [teleport_rpc_zlib, teleport_rpc_plain]
        ++ [M || lists:member(gen_rpc, ?config(transports, Config)),
                 M <- [gen_rpc_zlib, gen_rpc_plain]],
    Json = json_like(Bytes),
    Runs = interleaved(4, Modes, fun(M) -> on(A, compression_run, [M, B, {Bytes, Rounds div 4 + 1}]) end),
    Stats = [begin
                 Times = lists:append([Ts || {M1, {Ts, _}} <- Runs, M1 =:= M]),
                 Wire = [W || {M1, {_, W}} <- Runs, M1 =:= M],
                 {M, median(Times), mean(Wire)}
             end || M <- Modes],
    summary("rpc compression, a JSON-like list of maps (~b bytes external, ~b compressed at "
            "level 6) as argument and result, median per call: ~s",
            [erlang:external_size(Json), byte_size(term_to_binary(Json, [{compressed, 6}])),
             string:join([io_lib:format("~p ~.2f ms~s", [M, T / 1000,
                                                         case round(W) of
                                                             0 -> "";
                                                             OnWire -> io_lib:format(" (~b bytes on "
                                                                                    "teleport)", [OnWire])
                                                         end])
                          || {M, T, W} <- Stats], ", ")]).

%% On A: microseconds per call sending the JSON-like data and getting it back,
%% and the bytes teleport carried per call (0 for gen_rpc).
compression_run(Mode, B, {Bytes, Rounds}) ->
    Json = json_like(Bytes),
    Call = case Mode of
               teleport_rpc_zlib ->
                   fun() -> teleport_rpc:call(B, erlang, hd, [[Json]], #{timeout => ?CALL_TIMEOUT,
                                                                       compression => {6, 1024}})
                   end;
               teleport_rpc_plain ->
                   fun() -> teleport_rpc:call(B, erlang, hd, [[Json]], #{timeout => ?CALL_TIMEOUT,
                                                                       compression => off})
                   end;
               gen_rpc_zlib ->
                   set_gen_rpc_compression([node(), B], 6),
                   fun() -> gen_rpc:call(B, erlang, hd, [[Json]], ?CALL_TIMEOUT) end;
               gen_rpc_plain ->
                   set_gen_rpc_compression([node(), B], 0),
                   fun() -> gen_rpc:call(B, erlang, hd, [[Json]], ?CALL_TIMEOUT) end
           end,
    Json = Call(),
    Before = wire_bytes(B),
    Times = [begin
                 T0 = erlang:monotonic_time(microsecond),
                 Json = Call(),
                 erlang:monotonic_time(microsecond) - T0
             end || _ <- lists:seq(1, Rounds)],
    {Times, (wire_bytes(B) - Before) / Rounds}.

set_gen_rpc_compression(Nodes, Level) ->
    [ok = erpc:call(N, application, set_env, [gen_rpc, compress, Level]) || N <- Nodes],
    [ok = erpc:call(N, application, set_env, [gen_rpc, compression_threshold, 1024]) || N <- Nodes],
    ok.

wire_bytes(B) ->
    #{bytes_out := Out, bytes_in := In} = teleport:stats(B),
    Out + In.

%% A JSON-like list of maps, about `Bytes' in external format.
json_like(Bytes) ->
    Item = fun(I) -> #{<<"id">> => I, <<"name">> => <<"user-", (integer_to_binary(I))/binary>>,
                       <<"email">> => <<"user", (integer_to_binary(I))/binary, "@example.com">>,
                       <<"active">> => I rem 3 =/= 0, <<"score">> => I * 7 rem 1000,
                       <<"tags">> => [<<"alpha">>, <<"beta">>, <<"gamma">>]}
           end,
    N = Bytes div erlang:external_size(Item(1)) + 1,
    [Item(I) || I <- lists:seq(1, N)].

%%====================================================================
%% Helpers
%%====================================================================

%% `[{T, Run(T)}]' for `Blocks' blocks of every one of `Ts', each block
%% starting with the next one.
interleaved(Blocks, Ts, Run) ->
    [{T, Run(T)} || I <- lists:seq(0, Blocks - 1), T <- rotate(Ts, I)].

%% Runs ?MODULE:F(Args...) on `Node'.
on(Node, F, Args) ->
    erpc:call(Node, ?MODULE, F, Args, ?RUN_TIMEOUT).

%% RPC_BENCH_TRANSPORTS (comma-separated) keeps only those of `Available', for
%% profiling one transport alone.
selected_transports(Available) ->
    case os:getenv("RPC_BENCH_TRANSPORTS") of
        false -> Available;
        Names -> [T || T <- Available, lists:member(atom_to_list(T), string:lexemes(Names, ","))]
    end.

run_selected(Case, Run) ->
    case selected(Case) of
        true -> Run();
        false -> {skip, "not in RPC_BENCH_CASES"}
    end.

mean([]) -> 0.0;
mean(Values) -> lists:sum(Values) / length(Values).

median(Values) ->
    percentile(lists:sort(Values), 50).

%% Nearest rank.
percentile(Sorted, Pct) ->
    N = length(Sorted),
    lists:nth(max(1, (Pct * N + 99) div 100), Sorted).

format_list(Values, Format) ->
    string:join([io_lib:format(Format, [V]) || V <- Values], " ").

summary(Format, Args) ->
    Line = lists:flatten(io_lib:format(Format, Args)),
    ct:pal("~s", [Line]),
    io:format(user, "~s~n", [Line]).

%% @doc Micro-benchmarks: disterl and teleport side by side, in the same run.
%%
%% Two peer nodes, A and B (started in init_per_suite, teleport running in
%% both, disterl and teleport connections opened before the first case). All
%% traffic goes from A to B (and back); it is driven by processes spawned on A
%% through erpc, and every time is taken on the nodes themselves with
%% `erlang:monotonic_time/0'. These are benchmarks, not tests: timings are
%% printed, never asserted; the cases only check that the work completed
%% (every message arrived, every call was answered).
%%
%% Cases (each prints `bench <case> <params>: disterl X, teleport Y, ratio Z'
%% through ct:pal and to the `user' console; ratio is always teleport/disterl):
%% <ul>
%% <li>`small_messages': S senders on A each send TOTAL div (S * BLOCKS)
%%     binaries of BYTES bytes to one sink on B, which counts them and tells
%%     the driver (over disterl) when it has them all. Messages per second,
%%     from the senders' start to the driver hearing from the sink, averaged
%%     over the blocks. One line per S.</li>
%% <li>`latency': a process on A pings an echo on B with a small binary, one
%%     round trip at a time; the echo answers over the transport the ping came
%%     by. WARMUP round trips are not recorded. p50 and p99 round trip in
%%     microseconds; ratio of the p50s.</li>
%% <li>`stats_cost': not a comparison. Starts a hub node and STATS_PEERS
%%     peers, all with `pool_size' 4, opens pools both ways between the hub
%%     and each peer and sends a few messages each way, then times
%%     STATS_CALLS calls of `teleport:stats()' on the hub with `timer:tc'.
%%     Prints the mean time per call and how many connection entries each
%%     call returned (8 per peer: 4 out, 4 in).</li>
%% </ul>
%% The pool size sweep is ring_SUITE's (RING_POOL_SIZES).
%%
%% Groups: `short' (in all/0, tiny sizes: keeps the suite from rotting) and
%% `full' (the benchmark: `rebar3 ct --suite test/bench_SUITE --group full').
%% Environment variables override the group's sizes:
%% <ul>
%% <li>BENCH_SMALL_TOTAL: messages per transport and sender count in
%%     small_messages (full 1200000, short 2000), shared evenly by the blocks
%%     and, within a block, by the senders.</li>
%% <li>BENCH_SMALL_SENDERS: comma-separated sender counts (default "1,8").</li>
%% <li>BENCH_SMALL_BYTES: size of each small binary (default 100).</li>
%% <li>BENCH_LATENCY_ROUNDS: recorded round trips per transport (full 20000,
%%     short 500), shared by the blocks.</li>
%% <li>BENCH_LATENCY_WARMUP: unrecorded round trips per transport (full 1000,
%%     short 50), shared by the blocks: each block starts with its share.</li>
%% <li>BENCH_BLOCKS: small_messages and latency run each transport in this many
%%     blocks (full 6, short 2), alternating which goes first, so a noisy
%%     machine's slow and fast stretches fall on both; the figures are over all
%%     blocks, the per-block ratios are printed too.</li>
%% <li>BENCH_LATENCY_BYTES: ping payload (default 32).</li>
%% <li>BENCH_LATENCY_PAUSE_MS: a pause before each round trip, untimed (default 0:
%%     back to back; 1 gives about one round trip per ms, where no thread is still
%%     polling from the last one).</li>
%% <li>BENCH_HOL_DURATION_MS: calls per condition, in ms (full 10000,
%%     short 1000).</li>
%% <li>BENCH_HOL_STREAMERS: streaming processes (default 4).</li>
%% <li>BENCH_HOL_PAYLOAD_BYTES: size of each streamed binary (full 10 MiB,
%%     short 1 MiB).</li>
%% <li>BENCH_POOL_SIZE: teleport `pool_size' on both peers (default:
%%     teleport's own, 2).</li>
%% <li>BENCH_IO_THREAD_PRIORITY: teleport `io_thread_priority' on both peers
%%     (default: teleport's own, normal).</li>
%% <li>BENCH_READER_BUSY_WAIT_US: teleport `reader_busy_wait_us' on both peers
%%     (default: teleport's own, 100).</li>
%% <li>BENCH_STATS_PEERS: peers of the hub in stats_cost (full 5, short 1).</li>
%% <li>BENCH_STATS_CALLS: timed calls in stats_cost (full 1000, short 100).</li>
%% </ul>
-module(bench_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([small_messages/1, latency/1, stats_cost/1, big_map/1, call_latency/1]).
%% Run on the peers.
-export([small_run/5, small_sender/5, counting_sink/2,
         latency_run/5, latency_echo/1,
         stats_run/1, call_run/3, big_map_run/2, big_map_receiver/1, b2t_micros/1]).

-define(ECHO_SERVER, bench_echo_server).
%% erpc timeout for one run on A, and how long to wait for any single step.
-define(RUN_TIMEOUT, 600000).
-define(STEP_TIMEOUT, 120000).
-define(CALL_TIMEOUT, 60000).
-define(STREAM_RAMP_MS, 200).

suite() ->
    [{timetrap, {minutes, 30}}].

all() -> [{group, short}].

groups() ->
    Cases = [small_messages, latency, call_latency, stats_cost, big_map],
    [{short, [], Cases},
     {full, [], Cases}].

%%--------------------------------------------------------------------
%% Setup

init_per_suite(Config) ->
    case teleport_test_peer:ensure_distributed() of
        ok ->
            AppEnv = teleport_test_peer:app_env_from_os(
                       "BENCH", [tls, pool_size, io_threads, sndbuf, io_thread_priority,
                                reader_busy_wait_us, decode_on_scheduler]),
            {PeerA, A} = start_peer("bench_a", AppEnv),
            {PeerB, B} = try start_peer("bench_b", AppEnv)
                         catch Class:Reason:Stack ->
                                 teleport_test_peer:stop(PeerA),
                                 erlang:raise(Class, Reason, Stack)
                         end,
            Config1 = [{peers, [PeerA, PeerB]}, {a, A}, {b, B} | Config],
            try
                %% Both transports open in both directions before any timing.
                true = erpc:call(A, net_kernel, connect_node, [B]),
                ok = erpc:call(A, teleport, connect, [B]),
                ok = erpc:call(B, teleport, connect, [A]),
                ct:pal("bench peers: A ~p, B ~p, teleport env ~p, schedulers ~p",
                       [A, B, AppEnv, erpc:call(A, erlang, system_info, [schedulers_online])]),
                Config1
            catch
                Class2:Reason2:Stack2 ->
                    end_per_suite(Config1),
                    erlang:raise(Class2, Reason2, Stack2)
            end;
        {fail, _} = Fail ->
            Fail
    end.

end_per_suite(Config) ->
    _ = [log_stats(Node) || Key <- [a, b], Node <- [proplists:get_value(Key, Config)],
                            Node =/= undefined],
    _ = [teleport_test_peer:stop(Peer) || Peer <- proplists:get_value(peers, Config, [])],
    ok.

%% teleport's counters at the end (dropped or undeliverable messages would show here).
log_stats(Node) ->
    try erpc:call(Node, teleport, stats, [], 5000) of
        Stats -> ct:pal("teleport:stats() on ~p: ~p", [Node, Stats])
    catch
        Class:Reason -> ct:pal("teleport:stats() on ~p: ~p:~p", [Node, Class, Reason])
    end.

%% The peers must outlive init_per_suite's process: unlink, end_per_suite stops them.
start_peer(Prefix, AppEnv) ->
    {Peer, Node} = start_linked_peer(Prefix, AppEnv),
    unlink(Peer),
    {Peer, Node}.

init_per_group(short, Config) ->
    [{params, params(#{small_total => 2000, latency_rounds => 500, latency_warmup => 50,
                       blocks => 2,
                       stats_peers => 1, stats_calls => 100})} | Config];
init_per_group(full, Config) ->
    [{params, params(#{small_total => 1200000, latency_rounds => 20000, latency_warmup => 1000,
                       blocks => 6,
                       stats_peers => 5, stats_calls => 1000})} | Config].

end_per_group(_Group, _Config) ->
    ok.

params(GroupDefaults) ->
    Defaults = maps:merge(#{small_senders => [1, 8], small_bytes => 100, latency_bytes => 32,
                            latency_pause_ms => 0},
                          GroupDefaults),
    Int = fun(Var, Key) ->
                  case os:getenv(Var) of
                      false -> maps:get(Key, Defaults);
                      Value -> list_to_integer(Value)
                  end
          end,
    Senders = case os:getenv("BENCH_SMALL_SENDERS") of
                  false -> maps:get(small_senders, Defaults);
                  List -> [list_to_integer(S) || S <- string:tokens(List, ", ")]
              end,
    #{small_total => Int("BENCH_SMALL_TOTAL", small_total),
      small_senders => Senders,
      small_bytes => Int("BENCH_SMALL_BYTES", small_bytes),
      latency_rounds => Int("BENCH_LATENCY_ROUNDS", latency_rounds),
      latency_warmup => Int("BENCH_LATENCY_WARMUP", latency_warmup),
      blocks => Int("BENCH_BLOCKS", blocks),
      latency_bytes => Int("BENCH_LATENCY_BYTES", latency_bytes),
      latency_pause_ms => Int("BENCH_LATENCY_PAUSE_MS", latency_pause_ms),
      stats_peers => Int("BENCH_STATS_PEERS", stats_peers),
      stats_calls => Int("BENCH_STATS_CALLS", stats_calls)}.

%%--------------------------------------------------------------------
%% small_messages

small_messages(Config) ->
    #{small_total := Total, small_senders := SenderCounts, small_bytes := Bytes,
      blocks := Blocks} = ?config(params, Config),
    A = ?config(a, Config),
    B = ?config(b, Config),
    lists:foreach(
      fun(Senders) ->
              PerSender = max(1, Total div (Senders * Blocks)),
              Runs = interleaved(
                       Blocks,
                       fun(Transport) ->
                               Run = on(A, small_run, [Transport, B, Senders, PerSender, Bytes]),
                               #{sent := Sent, received := Received, micros := Micros} = Run,
                               ?assertEqual(Senders * PerSender, Sent, {sent, Transport}),
                               ?assertEqual(Sent, Received, {received, Transport}),
                               ct:pal("small_messages ~p senders=~b: ~b messages in ~b us",
                                      [Transport, Senders, Received, Micros]),
                               Received * 1.0e6 / max(1, Micros)
                       end),
              %% Each block's rate weighs the same: blocks have equal message counts.
              Rate = fun(Transport) -> mean(maps:get(Transport, Runs)) end,
              RateD = Rate(disterl),
              RateT = Rate(teleport),
              BlockRatios = [T / D || {D, T} <- lists:zip(maps:get(disterl, Runs),
                                                          maps:get(teleport, Runs))],
              summary("bench small_messages senders=~b msgs=~b bytes=~b blocks=~b: "
                      "disterl ~b msg/s, teleport ~b msg/s, ratio ~.2f (per block ~s)",
                      [Senders, Senders * PerSender * Blocks, Bytes, Blocks, round(RateD),
                       round(RateT), RateT / RateD, format_ratios(BlockRatios)])
      end, SenderCounts).

%% On A. A counting sink on B, Senders senders here; the clock runs from
%% releasing the senders to the sink's report that it has them all.
small_run(Transport, B, Senders, PerSender, Bytes) ->
    Self = self(),
    Total = Senders * PerSender,
    Sink = spawn_link(B, ?MODULE, counting_sink, [Self, Total]),
    Pids = [spawn_link(?MODULE, small_sender, [Self, Transport, Sink, PerSender, Bytes])
            || _ <- lists:seq(1, Senders)],
    try
        await({sink_ready, Sink}),
        _ = [await({sender_ready, Pid}) || Pid <- Pids],
        T0 = erlang:monotonic_time(),
        _ = [Pid ! go || Pid <- Pids],
        {Sent, T1, Received} = small_wait(Sink, length(Pids), 0, [], undefined),
        #{sent => Sent, received => Received, micros => micros(T1 - T0)}
    after
        kill([Sink | Pids])
    end.

%% Takes the sink's report as it arrives (its time is the end of the run) and
%% every sender's count; fails at once if a send was refused.
small_wait(_Sink, 0, Sent, [], {T1, Received}) ->
    {Sent, T1, Received};
small_wait(_Sink, 0, Sent, Errors, Done) when Errors =/= [] ->
    error({send_errors, Errors, {sent, Sent}, {sink, Done}});
small_wait(Sink, Pending, Sent, Errors, Done) ->
    receive
        {sink_done, Sink, Received} ->
            small_wait(Sink, Pending, Sent, Errors, {erlang:monotonic_time(), Received});
        {sender_done, _Pid, N, Errs} ->
            small_wait(Sink, Pending - 1, Sent + N, Errs ++ Errors, Done)
    after ?STEP_TIMEOUT ->
            error({small_messages_timeout, {senders_pending, Pending}, {sent, Sent},
                   {errors, Errors}})
    end.

small_sender(Driver, Transport, Sink, N, Bytes) ->
    Payload = payload(Bytes),
    Driver ! {sender_ready, self()},
    receive go -> ok end,
    {Sent, Errors} = small_send(Transport, Sink, Payload, N, 0, []),
    Driver ! {sender_done, self(), Sent, lists:usort(Errors)}.

small_send(_Transport, _Sink, _Payload, 0, Sent, Errors) ->
    {Sent, Errors};
small_send(Transport, Sink, Payload, N, Sent, Errors) ->
    case transmit(Transport, Sink, Payload) of
        ok -> small_send(Transport, Sink, Payload, N - 1, Sent + 1, Errors);
        Error -> small_send(Transport, Sink, Payload, N - 1, Sent, [Error | Errors])
    end.

%% On B. Counts binaries; reports over disterl when it has Total of them.
counting_sink(Driver, Total) ->
    Driver ! {sink_ready, self()},
    counting_loop(Driver, Total, 0).

counting_loop(Driver, Total, Total) ->
    erlang:send(Driver, {sink_done, self(), Total}),
    counting_loop(Driver, Total, Total + 1);
counting_loop(Driver, Total, N) ->
    receive
        Bin when is_binary(Bin) -> counting_loop(Driver, Total, N + 1)
    end.

%%--------------------------------------------------------------------
%% latency

latency(Config) ->
    #{latency_rounds := Rounds, latency_warmup := Warmup, latency_bytes := Bytes,
      latency_pause_ms := PauseMs, blocks := Blocks} = ?config(params, Config),
    A = ?config(a, Config),
    B = ?config(b, Config),
    PerBlock = max(1, Rounds div Blocks),
    BlockWarmup = max(1, Warmup div Blocks),
    Runs = interleaved(Blocks,
                       fun(Transport) ->
                               Rtts = on(A, latency_run,
                                         [Transport, B, PerBlock, BlockWarmup,
                                          {Bytes, PauseMs}]),
                               ?assertEqual(PerBlock, length(Rtts), Transport),
                               Rtts
                       end),
    BlockRatios = [percentile(lists:sort(T), 50) / percentile(lists:sort(D), 50)
                   || {D, T} <- lists:zip(maps:get(disterl, Runs), maps:get(teleport, Runs))],
    Stats = [begin
                 Sorted = lists:sort(lists:append(maps:get(Transport, Runs))),
                 S = {percentile(Sorted, 50), percentile(Sorted, 99)},
                 ct:pal("latency ~p: ~b round trips, min ~.1f us, p50 ~.1f us, p99 ~.1f us, "
                        "max ~.1f us",
                        [Transport, length(Sorted), hd(Sorted), element(1, S), element(2, S),
                         lists:last(Sorted)]),
                 S
             end || Transport <- [disterl, teleport]],
    [{P50D, P99D}, {P50T, P99T}] = Stats,
    summary("bench latency round_trips=~b bytes=~b pause_ms=~b blocks=~b: disterl p50 ~.1f us "
            "p99 ~.1f us, teleport p50 ~.1f us p99 ~.1f us, ratio ~.2f (per block ~s)",
            [PerBlock * Blocks, Bytes, PauseMs, Blocks, P50D, P99D, P50T, P99T, P50T / P50D,
             format_ratios(BlockRatios)]).

%% On A: round trips in microseconds (floats), warm-up excluded.
latency_run(Transport, B, Rounds, Warmup, {Bytes, PauseMs}) ->
    Echo = spawn_link(B, ?MODULE, latency_echo, [self()]),
    try
        await({echo_ready, Echo}),
        Payload = payload(Bytes),
        _ = ping(Transport, Echo, {Payload, PauseMs}, Warmup, []),
        ping(Transport, Echo, {Payload, PauseMs}, Rounds, [])
    after
        kill([Echo])
    end.

ping(_Transport, _Echo, _Ping, 0, Acc) ->
    lists:reverse(Acc);
ping(Transport, Echo, {Payload, PauseMs} = Ping, N, Acc) ->
    _ = PauseMs > 0 andalso timer:sleep(PauseMs),
    T0 = erlang:monotonic_time(),
    ok = transmit(Transport, Echo, {ping, Transport, self(), Payload}),
    receive
        {pong, Payload} -> ok
    after ?STEP_TIMEOUT ->
            error({pong_timeout, Transport, N})
    end,
    T1 = erlang:monotonic_time(),
    ping(Transport, Echo, Ping, N - 1, [micros_float(T1 - T0) | Acc]).

%% On B. Answers each ping over the transport it came by.
latency_echo(Driver) ->
    Driver ! {echo_ready, self()},
    latency_echo_loop().

latency_echo_loop() ->
    receive
        {ping, Transport, From, Payload} ->
            ok = transmit(Transport, From, {pong, Payload}),
            latency_echo_loop()
    end.

%%--------------------------------------------------------------------
%% Helpers

on(Node, Function, Args) ->
    erpc:call(Node, ?MODULE, Function, Args, ?RUN_TIMEOUT).

transmit(disterl, Dest, Msg) ->
    erlang:send(Dest, Msg),
    ok;
transmit(teleport, Dest, Msg) ->
    teleport:send(Dest, Msg).

await(Msg) ->
    receive
        Msg -> ok
    after ?STEP_TIMEOUT ->
            error({timeout_waiting_for, Msg})
    end.

%%--------------------------------------------------------------------
%% stats_cost

-define(STATS_POOL_SIZE, 4).

stats_cost(Config) ->
    #{stats_peers := PeerCount, stats_calls := Calls} = ?config(params, Config),
    Env = #{pool_size => ?STATS_POOL_SIZE},
    %% Linked to this case's process: they go when it ends, pass or fail.
    Started = [start_linked_peer(Prefix, Env)
               || Prefix <- ["bench_hub" | ["bench_s" ++ integer_to_list(I)
                                            || I <- lists:seq(1, PeerCount)]]],
    try
        [{_, Hub} | Peers] = Started,
        lists:foreach(fun({_, Node}) ->
                              ok = erpc:call(Hub, teleport, connect, [Node], ?CALL_TIMEOUT),
                              ok = erpc:call(Node, teleport, connect, [Hub], ?CALL_TIMEOUT),
                              ok = erpc:call(Hub, teleport, send, [{nobody, Node}, x], ?CALL_TIMEOUT),
                              ok = erpc:call(Node, teleport, send, [{nobody, Hub}, x], ?CALL_TIMEOUT)
                      end, Peers),
        Expected = PeerCount * 2 * ?STATS_POOL_SIZE,
        Entries = fun() -> connection_entries(erpc:call(Hub, teleport, stats, [], ?CALL_TIMEOUT)) end,
        %% Inbound connections register once their first frame is read.
        ?assert(teleport_test_peer:wait_until(fun() -> Entries() =:= Expected end, 10000)),
        #{micros := Micros, entries := Got} = on(Hub, stats_run, [Calls]),
        ?assertEqual(Expected, Got),
        summary("bench stats_cost peers=~b pool_size=~b calls=~b: ~.1f us per teleport:stats() "
                "(~b connection entries)", [PeerCount, ?STATS_POOL_SIZE, Calls, Micros / Calls, Got])
    after
        lists:foreach(fun({Peer, _}) -> teleport_test_peer:stop(Peer) end, Started)
    end.

start_linked_peer(Prefix, Env) ->
    case teleport_test_peer:start(teleport_test_peer:unique_name(Prefix), [], Env) of
        {ok, Peer, Node} -> {Peer, Node};
        {error, Reason} -> ct:fail({peer_start_failed, Prefix, Reason})
    end.

%% On the hub: a few untimed calls, then Calls timed back to back.
stats_run(Calls) ->
    _ = [teleport:stats() || _ <- lists:seq(1, 10)],
    {Micros, Last} = timer:tc(fun() -> stats_loop(Calls, undefined) end),
    #{micros => Micros, entries => connection_entries(Last)}.

%% How many per-connection entries a teleport:stats() result holds.
connection_entries(Stats) ->
    lists:sum([length(Conns) || #{per_connection := Conns} <- maps:values(Stats)]).

stats_loop(0, Last) -> Last;
stats_loop(N, _) -> stats_loop(N - 1, teleport:stats()).

%% The driver is linked to what it spawned (so they die with it if it is
%% killed); on the way out it unlinks and kills them.
kill(Pids) ->
    lists:foreach(fun(Pid) ->
                          unlink(Pid),
                          exit(Pid, kill)
                  end, Pids).

payload(Bytes) ->
    binary:copy(<<16#5a>>, Bytes).

micros(Native) ->
    erlang:convert_time_unit(Native, native, microsecond).

micros_float(Native) ->
    erlang:convert_time_unit(Native, native, nanosecond) / 1000.

%% The nearest-rank percentile of a sorted, non-empty list: the element at
%% ceil(Pct/100 * N), 1-based.
percentile(Sorted, Pct) ->
    N = length(Sorted),
    Rank = max(1, (Pct * N + 99) div 100),
    lists:nth(Rank, Sorted).

%% Runs Run(disterl) and Run(teleport) Blocks times each, alternating which goes
%% first (disterl, teleport, teleport, disterl, ...), so that both see the same
%% stretches of a noisy machine. Returns each transport's results in block order.
interleaved(Blocks, Run) ->
    Order = fun(I) when I rem 2 =:= 0 -> [disterl, teleport];
               (_) -> [teleport, disterl]
            end,
    Results = [{Transport, Run(Transport)}
               || I <- lists:seq(0, Blocks - 1), Transport <- Order(I)],
    maps:from_list([{Transport, [R || {T, R} <- Results, T =:= Transport]}
                    || Transport <- [disterl, teleport]]).

mean(Values) ->
    lists:sum(Values) / length(Values).

format_ratios(Ratios) ->
    string:join([io_lib:format("~.2f", [R]) || R <- Ratios], " ").

summary(Format, Args) ->
    Line = lists:flatten(io_lib:format(Format, Args)),
    ct:pal("~s", [Line]),
    io:format(user, "~s~n", [Line]).

%%--------------------------------------------------------------------
%% big_map: receiving a map of BENCH_MAP_KEYS (default 100,000) integer keys.
%% One send at a time from A to B, over each transport, in alternating rounds;
%% each time is from just before the send on A to the message in the receiving
%% process on B (both nodes read the same OS clock), so it holds A's encoding,
%% the transfer and B's decoding. Beside them, on B: binary_to_term of the
%% same map's bytes, and term_to_binary + binary_to_term (the codec work of a
%% disterl send, without the transfer).

big_map(Config) ->
    A = ?config(a, Config),
    B = ?config(b, Config),
    Keys = env_int("BENCH_MAP_KEYS", 100000),
    Rounds = env_int("BENCH_MAP_ROUNDS", 7),
    Receiver = erpc:call(B, erlang, spawn, [?MODULE, big_map_receiver, [self()]]),
    try
        Times = [{T, erpc:call(A, ?MODULE, big_map_run, [T, {Receiver, Keys}], ?RUN_TIMEOUT)}
                 || _ <- lists:seq(1, Rounds), T <- [teleport, disterl]],
        Median = fun(T) -> median([Us || {T1, Us} <- Times, T1 =:= T]) end,
        {B2T, Codec} = erpc:call(B, ?MODULE, b2t_micros, [Keys], ?RUN_TIMEOUT),
        Tp = Median(teleport),
        De = Median(disterl),
        Deferred = erpc:call(B, fun() -> teleport_config:get(decode_on_scheduler) end),
        summary("big_map: ~b keys, median of ~b, decode_on_scheduler ~p on B (OTP ~s):~n"
               "  teleport send->receive ~.1f ms, disterl ~.1f ms (disterl/teleport ~.2fx)~n"
               "  on B: binary_to_term ~.1f ms, term_to_binary+binary_to_term ~.1f ms~n"
               "  teleport send->receive / binary_to_term: ~.2fx",
               [Keys, Rounds, Deferred, erlang:system_info(otp_release), Tp / 1000, De / 1000,
                De / Tp, B2T / 1000, Codec / 1000, Tp / B2T])
    after
        Receiver ! stop
    end.

%% On A: one timed send of a fresh map (built before the clock starts).
big_map_run(Transport, {Receiver, Keys}) ->
    Map = maps:from_list([{I, I} || I <- lists:seq(1, Keys)]),
    Ref = make_ref(),
    T0 = os:system_time(microsecond),
    ok = transmit(Transport, Receiver, {big_map, self(), Ref, T0, Map}),
    receive {Ref, Micros} -> Micros after ?STEP_TIMEOUT -> error(big_map_timeout) end.

%% On B: answers each map with how long it took to arrive.
big_map_receiver(Driver) ->
    receive
        {big_map, From, Ref, T0, Map} when is_map(Map) ->
            Micros = os:system_time(microsecond) - T0,
            From ! {Ref, Micros},
            big_map_receiver(Driver);
        stop ->
            ok
    end.

%% On B: medians of binary_to_term, and of term_to_binary + binary_to_term.
b2t_micros(Keys) ->
    Map = maps:from_list([{I, I} || I <- lists:seq(1, Keys)]),
    Bin = term_to_binary(Map),
    B2T = median([element(1, timer:tc(erlang, binary_to_term, [Bin])) || _ <- lists:seq(1, 7)]),
    Codec = median([element(1, timer:tc(fun() -> binary_to_term(term_to_binary(Map)) end))
                    || _ <- lists:seq(1, 7)]),
    {B2T, Codec}.

median(Values) ->
    percentile(lists:sort(Values), 50).

env_int(Var, Default) ->
    case os:getenv(Var) of
        false -> Default;
        Value -> list_to_integer(Value)
    end.

%%--------------------------------------------------------------------
%% call_latency: one caller on A makes gen_server calls to a server on B, one
%% at a time, with `teleport:gs_call' and with `gen_server:call' (disterl), in
%% interleaved blocks. What a call costs beside the ping-pong above: the keeper
%% process on B, its `started' and the caller's ack over disterl.

call_latency(Config) ->
    #{latency_rounds := Rounds, latency_warmup := Warmup, blocks := Blocks} =
        ?config(params, Config),
    A = ?config(a, Config),
    B = ?config(b, Config),
    {ok, Server} = erpc:call(B, teleport_test_server, start, [?ECHO_SERVER]),
    try
        PerBlock = max(1, Rounds div Blocks),
        Runs = interleaved(Blocks,
                           fun(Transport) ->
                                   on(A, call_run, [Transport, {?ECHO_SERVER, B},
                                                    {max(1, Warmup div Blocks), PerBlock}])
                           end),
        [{P50D, P99D}, {P50T, P99T}] =
            [begin
                 Sorted = lists:sort(lists:append(maps:get(T, Runs))),
                 {percentile(Sorted, 50), percentile(Sorted, 99)}
             end || T <- [disterl, teleport]],
        summary("bench call_latency calls=~b blocks=~b: gen_server:call (disterl) p50 ~.1f us "
                "p99 ~.1f us, teleport:gs_call p50 ~.1f us p99 ~.1f us, ratio p50 ~.2f p99 ~.2f",
                [PerBlock * Blocks, Blocks, P50D, P99D, P50T, P99T, P50T / P50D, P99T / P99D])
    after
        exit(Server, kill)
    end.

%% On A: call latencies in microseconds, warm-up excluded.
call_run(Transport, Server, {Warmup, Rounds}) ->
    Call = case Transport of
               disterl -> fun() -> gen_server:call(Server, {echo, x}, ?CALL_TIMEOUT) end;
               teleport -> fun() -> teleport:gs_call(Server, {echo, x}, ?CALL_TIMEOUT) end
           end,
    _ = [Call() || _ <- lists:seq(1, Warmup)],
    [begin
         T0 = erlang:monotonic_time(nanosecond),
         x = Call(),
         (erlang:monotonic_time(nanosecond) - T0) / 1000
     end || _ <- lists:seq(1, Rounds)].

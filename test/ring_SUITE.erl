%% @doc The article's ring benchmark, over disterl and over teleport in one run.
%%
%% N peer nodes, W registered workers per node, each holding its own random
%% payload. Every worker sends its payload around the ring at once: worker k on
%% node i sends to worker k on node i+1, and so on for N-1 hops; the last node
%% acks the originating worker over the same transport, which times the trip.
%% A prime phase first sends a tiny message around the ring on both transports
%% so every connection is open. Rounds alternate which transport goes first.
%%
%% Groups: `short' (run by the test command, so the suite cannot rot: it
%% checks every trip completes with its payload intact) and `full' (the
%% benchmark: 6 nodes x 6 workers x 10 MiB). Override with the environment
%% variables RING_NODES, RING_WORKERS, RING_PAYLOAD_BYTES, RING_ROUNDS,
%% RING_POOL_SIZE, RING_POOL_SIZES (comma-separated; a sweep),
%% RING_TLS (on: TLS with certificates made for the run), RING_IO_THREADS, RING_IO_THREAD_PRIORITY and RING_READER_BUSY_WAIT_US (teleport's `io_threads',
%% `io_thread_priority', `reader_busy_wait_us' on every node).
-module(ring_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([ring/1]).
-export([worker_init/4]).

-define(TRIP_TIMEOUT, 300000).

all() -> [{group, short}].

groups() ->
    [{short, [], [ring]},
     {full, [], [ring]}].

init_per_suite(Config) ->
    teleport_test_peer:init_per_suite(Config).

end_per_suite(_Config) ->
    ok.

%% `verify': the last node hashes the payload it received so the origin can
%% check it (the short variant, a test); otherwise only its size is checked, so
%% the benchmark times the transports and not phash2 over megabytes.
init_per_group(short, Config) ->
    [{params, params(#{nodes => 3, workers => 2, payload_bytes => 1 bsl 20, rounds => 1,
                       pool_sizes => [2], verify => true})} | Config];
init_per_group(full, Config) ->
    [{params, params(#{nodes => 6, workers => 6, payload_bytes => 10 bsl 20, rounds => 3,
                       pool_sizes => [default], verify => false})} | Config].

end_per_group(_Group, _Config) ->
    ok.

params(Defaults) ->
    Int = fun(Var, Key) ->
                  case os:getenv(Var) of
                      false -> maps:get(Key, Defaults);
                      Value -> list_to_integer(Value)
                  end
          end,
    PoolSizes = case {os:getenv("RING_POOL_SIZES"), os:getenv("RING_POOL_SIZE")} of
                    {false, false} -> maps:get(pool_sizes, Defaults);
                    {false, One} -> [list_to_integer(One)];
                    {Many, _} -> [list_to_integer(S) || S <- string:tokens(Many, ",")]
                end,
    #{nodes => Int("RING_NODES", nodes), workers => Int("RING_WORKERS", workers),
      payload_bytes => Int("RING_PAYLOAD_BYTES", payload_bytes),
      rounds => Int("RING_ROUNDS", rounds), pool_sizes => PoolSizes,
      app_env => teleport_test_peer:app_env_from_os("RING", [tls, io_threads, sndbuf, io_thread_priority,
                                                              reader_busy_wait_us]),
      verify => maps:get(verify, Defaults)}.

ring(Config) ->
    Params = ?config(params, Config),
    [run_pool_size(Params, PoolSize) || PoolSize <- maps:get(pool_sizes, Params)],
    ok.

run_pool_size(#{nodes := N, workers := W, payload_bytes := Bytes, rounds := Rounds,
                verify := Verify, app_env := Settings}, PoolSize) ->
    AppEnv = case PoolSize of
                 default -> Settings;
                 Size -> Settings#{pool_size => Size}
             end,
    Peers = [begin
                 {ok, Peer, Node} = teleport_test_peer:start(ring_name(I), [], AppEnv),
                 {Peer, Node}
             end || I <- lists:seq(1, N)],
    Nodes = [Node || {_, Node} <- Peers],
    try
        start_workers(Nodes, W, Bytes, Verify),
        ct:pal("ring: ~b nodes x ~b workers x ~b bytes, pool_size ~p, ~b rounds, settings ~p",
               [N, W, Bytes, PoolSize, Rounds, Settings]),
        prime(Nodes, W),
        Results = [round(R, Nodes, W) || R <- lists:seq(1, Rounds)],
        report(N, W, Bytes, PoolSize, Results)
    after
        [teleport_test_peer:stop(Peer) || {Peer, _} <- Peers]
    end.

ring_name(I) ->
    list_to_atom("ring" ++ integer_to_list(I) ++ "_" ++ integer_to_list(erlang:unique_integer([positive]))).

%% Workers: registered ring_worker_K on each node, payload made on that node.
start_workers(Nodes, W, Bytes, Verify) ->
    Self = self(),
    lists:foreach(
      fun({Index, Node}) ->
              [erpc:call(Node, erlang, spawn, [?MODULE, worker_init, [Self, {Index, K}, Nodes, {Bytes, Verify}]])
               || K <- lists:seq(1, W)]
      end, lists:zip(lists:seq(1, length(Nodes)), Nodes)),
    [receive {worker_ready, Node, K} -> ok after 30000 -> ct:fail({worker_not_ready, Node, K}) end
     || Node <- Nodes, K <- lists:seq(1, W)].

worker_name(K) ->
    list_to_atom("ring_worker_" ++ integer_to_list(K)).

worker_init(Parent, {Index, K}, Nodes, {Bytes, Verify}) ->
    register(worker_name(K), self()),
    Payload = crypto:strong_rand_bytes(Bytes),
    Next = lists:nth(Index rem length(Nodes) + 1, Nodes),
    Parent ! {worker_ready, node(), K},
    worker_loop(#{k => K, next => Next, hops => length(Nodes) - 1, payload => Payload,
                  trips => #{}, check => check_fun(Verify)}).

%% What the last node sends back for the origin to compare with its payload.
check_fun(true) -> fun erlang:phash2/1;
check_fun(false) -> fun erlang:byte_size/1.

worker_loop(#{k := K, next := Next, hops := Hops, payload := Payload, trips := Trips,
              check := Check} = S) ->
    receive
        {go, Transport, Caller, Ref} ->
            T0 = erlang:monotonic_time(microsecond),
            ok = transmit(Transport, {worker_name(K), Next},
                          {ring, Transport, self(), Hops - 1, Ref, Payload}),
            worker_loop(S#{trips := Trips#{Ref => {Caller, T0}}});
        {ring, Transport, Origin, 0, Ref, Carried} ->
            ok = transmit(Transport, Origin, {ack, Ref, Check(Carried)}),
            worker_loop(S);
        {ring, Transport, Origin, Left, Ref, Carried} ->
            ok = transmit(Transport, {worker_name(K), Next},
                          {ring, Transport, Origin, Left - 1, Ref, Carried}),
            worker_loop(S);
        {ack, Ref, Hash} ->
            T1 = erlang:monotonic_time(microsecond),
            {{Caller, T0}, Trips1} = maps:take(Ref, Trips),
            Intact = Hash =:= Check(Payload),
            Caller ! {trip, Ref, node(), K, T1 - T0, Intact},
            worker_loop(S#{trips := Trips1});
        stop ->
            ok
    end.

transmit(disterl, Dest, Msg) ->
    erlang:send(Dest, Msg),
    ok;
transmit(teleport, Dest, Msg) ->
    teleport:send(Dest, Msg).

%% A tiny message around the ring on both transports opens every connection.
prime(Nodes, W) ->
    [begin
         Refs = [go(Transport, Node, K, self()) || Node <- Nodes, K <- lists:seq(1, W)],
         [collect(Ref) || Ref <- Refs]
     end || Transport <- [disterl, teleport]],
    ok.

go(Transport, Node, K, Caller) ->
    Ref = make_ref(),
    {worker_name(K), Node} ! {go, Transport, Caller, Ref},
    Ref.

collect(Ref) ->
    receive
        {trip, Ref, _Node, _K, Micros, Intact} ->
            ?assert(Intact, payload_corrupted),
            Micros
    after ?TRIP_TIMEOUT ->
            ct:fail({trip_timeout, Ref})
    end.

%% One round: all workers at once on one transport, then on the other.
round(R, Nodes, W) ->
    Order = case R rem 2 of
                1 -> [disterl, teleport];
                0 -> [teleport, disterl]
            end,
    maps:from_list([{Transport, trips(Transport, Nodes, W)} || Transport <- Order]).

trips(Transport, Nodes, W) ->
    %% Wait for the previous phase's garbage to be collected out of the way.
    timer:sleep(500),
    Refs = [go(Transport, Node, K, self()) || Node <- Nodes, K <- lists:seq(1, W)],
    [collect(Ref) || Ref <- Refs].

report(N, W, Bytes, PoolSize, Results) ->
    Dist = lists:append([maps:get(disterl, R) || R <- Results]),
    Tele = lists:append([maps:get(teleport, R) || R <- Results]),
    ?assertEqual(length(Dist), length(Tele)),
    ?assertEqual(N * W * length(Results), length(Tele)),
    MeanD = mean(Dist) / 1.0e6,
    MeanT = mean(Tele) / 1.0e6,
    ct:pal("ring trips (us) disterl:  ~w~nring trips (us) teleport: ~w", [Dist, Tele]),
    Line = io_lib:format("ring nodes=~b workers=~b payload=~b pool_size=~p rounds=~b: "
                         "disterl mean ~.3f s, teleport mean ~.3f s, disterl/teleport ~.2fx",
                         [N, W, Bytes, PoolSize, length(Results), MeanD, MeanT, MeanD / MeanT]),
    ct:pal("~s", [Line]),
    io:format(user, "~s~n", [Line]),
    ok.

mean(List) ->
    lists:sum(List) / length(List).

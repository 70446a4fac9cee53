%%% @doc The migration table of docs/rpc.md, row by row: each `erpc', `rpc' or
%%% gen_rpc call beside its teleport_rpc equivalent, run on the same inputs
%%% (a value, a throw, an error, an exit, a node that cannot be reached), and
%%% their results compared as the table says: the same for erpc; for rpc and
%%% gen_rpc, through the correspondence the table states (rpc's `{badrpc, R}'
%%% is rpc's own reading of erpc's exception, see `rpcify/1').
%%%
%%% gen_rpc is built from unmodified sources (scripts/build_gen_rpc.sh); where
%%% it cannot be, its rows are skipped and say so. A is this node; B and C
%%% peers; every node runs teleport and gen_rpc.
-module(rpc_migration_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([erpc_call/1, erpc_cast/1, erpc_requests/1, erpc_multicall/1, erpc_multicast/1,
         rpc_call/1, rpc_cast/1, rpc_multicall/1, rpc_async_call/1, rpc_broadcasts/1,
         gen_rpc_call/1, gen_rpc_cast/1, gen_rpc_ordered_cast/1, gen_rpc_multicall/1,
         gen_rpc_async_call/1, gen_rpc_broadcasts/1, gen_rpc_eval_everywhere/1]).
%% Run on the peers.
-export([raise/2, tell/2, append/2, appended/0, start_log/0]).

-define(UNKNOWN, 'rpc_migration_nowhere@127.0.0.1').
-define(LOG, rpc_migration_log).

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [{group, erpc}, {group, rpc}, {group, gen_rpc}].

groups() ->
    [{erpc, [], [erpc_call, erpc_cast, erpc_requests, erpc_multicall, erpc_multicast]},
     {rpc, [], [rpc_call, rpc_cast, rpc_multicall, rpc_async_call, rpc_broadcasts]},
     {gen_rpc, [], [gen_rpc_call, gen_rpc_cast, gen_rpc_ordered_cast, gen_rpc_multicall,
                    gen_rpc_async_call, gen_rpc_broadcasts, gen_rpc_eval_everywhere]}].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("rpc_migration") of
        ok ->
            GenRpc = teleport_test_gen_rpc:available(),
            Extra = case GenRpc of
                        {ok, Ebins} -> ["-pa" | Ebins];
                        {skip, _} -> []
                    end,
            {ok, PeerB, B} = teleport_test_peer:start(teleport_test_peer:unique_name("mig_b"), Extra),
            {ok, PeerC, C} = teleport_test_peer:start(teleport_test_peer:unique_name("mig_c"), Extra),
            [unlink(P) || P <- [PeerB, PeerC]],
            [ok = erpc:call(N, ?MODULE, start_log, []) || N <- [B, C]],
            [{gen_rpc, GenRpc}, {peers, [PeerB, PeerC]}, {b, B}, {c, C} | Config];
        {skip, _} = Skip ->
            Skip
    end.

end_per_suite(Config) ->
    [teleport_test_peer:stop(P) || P <- ?config(peers, Config)],
    _ = application:stop(gen_rpc),
    teleport_test_peer:stop_local_teleport().

init_per_group(gen_rpc, Config) ->
    case ?config(gen_rpc, Config) of
        {ok, _} ->
            ok = teleport_test_gen_rpc:start([node(), ?config(b, Config), ?config(c, Config)]),
            Config;
        {skip, Why} ->
            {skip, Why}
    end;
init_per_group(_, Config) ->
    Config.

end_per_group(_, _Config) ->
    ok.

%%====================================================================
%% erpc: the same calls, the same results
%%====================================================================

%% erpc:call(N, M, F, A[, T])  ->  teleport_rpc:call(N, M, F, A[, T])
erpc_call(Config) ->
    [?assertEqual(outcome(fun() -> erpc:call(N, M, F, A) end),
                  outcome(fun() -> teleport_rpc:call(N, M, F, A) end))
     || {N, M, F, A} <- cases(Config)],
    [?assertEqual(outcome(fun() -> erpc:call(N, M, F, A, 5000) end),
                  outcome(fun() -> teleport_rpc:call(N, M, F, A, 5000) end))
     || {N, M, F, A} <- cases(Config)].

%% erpc:cast(N, M, F, A)  ->  teleport_rpc:cast(N, M, F, A)
erpc_cast(Config) ->
    B = ?config(b, Config),
    ?assertEqual(erpc:cast(B, ?MODULE, tell, [self(), erpc]),
                 teleport_rpc:cast(B, ?MODULE, tell, [self(), teleport_rpc])),
    ?assertEqual(lists:sort([erpc, teleport_rpc]), lists:sort(told(2))).

%% erpc:send_request/4, receive_response/2 (and wait_, check_response,
%% collections)  ->  the same names in teleport_rpc
erpc_requests(Config) ->
    [?assertEqual(outcome(fun() -> erpc:receive_response(erpc:send_request(N, M, F, A), 5000) end),
                  outcome(fun() -> teleport_rpc:receive_response(
                                     teleport_rpc:send_request(N, M, F, A), 5000) end))
     || {N, M, F, A} <- cases(Config)].

%% erpc:multicall(Ns, M, F, A[, T])  ->  teleport_rpc:multicall(Ns, M, F, A[, T])
erpc_multicall(Config) ->
    Nodes = [?config(b, Config), ?config(c, Config), ?UNKNOWN],
    [?assertEqual(erpc:multicall(Nodes, M, F, A, 5000), teleport_rpc:multicall(Nodes, M, F, A, 5000))
     || {_, M, F, A} <- cases(Config)].

%% erpc:multicast(Ns, M, F, A)  ->  teleport_rpc:multicast(Ns, M, F, A)
erpc_multicast(Config) ->
    Nodes = [?config(b, Config), ?config(c, Config)],
    ?assertEqual(erpc:multicast(Nodes, ?MODULE, tell, [self(), erpc]),
                 teleport_rpc:multicast(Nodes, ?MODULE, tell, [self(), teleport_rpc])),
    ?assertEqual(lists:sort([erpc, erpc, teleport_rpc, teleport_rpc]), lists:sort(told(4))).

%%====================================================================
%% rpc: the value, or erpc's exception where rpc returns {badrpc, R}
%%====================================================================

%% rpc:call(N, M, F, A[, T])  ->  teleport_rpc:call(N, M, F, A[, T]): the same
%% value; rpc's {badrpc, R} is an exception (rpcify/1 reads it as rpc does).
rpc_call(Config) ->
    [?assertEqual(rpc:call(N, M, F, A), rpcify(outcome(fun() -> teleport_rpc:call(N, M, F, A) end)))
     || {N, M, F, A} <- cases(Config)],
    [?assertEqual(rpc:call(N, M, F, A, 5000),
                  rpcify(outcome(fun() -> teleport_rpc:call(N, M, F, A, 5000) end)))
     || {N, M, F, A} <- cases(Config)].

%% rpc:cast(N, M, F, A) (true)  ->  teleport_rpc:cast(N, M, F, A) (ok)
rpc_cast(Config) ->
    B = ?config(b, Config),
    ?assertEqual(true, rpc:cast(B, ?MODULE, tell, [self(), rpc])),
    ?assertEqual(ok, teleport_rpc:cast(B, ?MODULE, tell, [self(), teleport_rpc])),
    ?assertEqual(lists:sort([rpc, teleport_rpc]), lists:sort(told(2))).

%% rpc:multicall(Ns, M, F, A[, T]) -> {Values, BadNodes}  ->
%% teleport_rpc:multicall(Ns, M, F, A[, T]): one result per node, the bad
%% nodes' {error, {erpc, noconnection | timeout}}.
rpc_multicall(Config) ->
    Nodes = [?config(b, Config), ?config(c, Config), ?UNKNOWN],
    [begin
         {Values, BadNodes} = rpc:multicall(Nodes, M, F, A, 5000),
         Results = teleport_rpc:multicall(Nodes, M, F, A, 5000),
         ?assertEqual(BadNodes, [N || {N, {error, {erpc, E}}} <- lists:zip(Nodes, Results),
                                      E =:= noconnection orelse E =:= timeout]),
         ?assertEqual(Values, [rpcify(R) || {N, R} <- lists:zip(Nodes, Results),
                                            not lists:member(N, BadNodes)])
     end || {_, M, F, A} <- cases(Config)].

%% rpc:async_call(N, M, F, A), rpc:yield(Key)  ->
%% teleport_rpc:send_request(N, M, F, A), teleport_rpc:receive_response(R)
rpc_async_call(Config) ->
    [?assertEqual(rpc:yield(rpc:async_call(N, M, F, A)),
                  rpcify(outcome(fun() -> teleport_rpc:receive_response(
                                            teleport_rpc:send_request(N, M, F, A)) end)))
     || {N, M, F, A} <- cases(Config)].

%% rpc:abcast(Ns, Name, Msg), rpc:sbcast(Ns, Name, Msg)  ->  the same in teleport_rpc
rpc_broadcasts(Config) ->
    broadcasts(rpc, Config).

%%====================================================================
%% gen_rpc: {Node, Key} as in gen_rpc; errors raised as erpc's
%%====================================================================

%% gen_rpc:call(N | {N, K}, M, F, A[, T])  ->  teleport_rpc:call(N | {N, K}, M, F, A[, T]):
%% the same value; a throw gen_rpc returns, teleport_rpc raises; gen_rpc's
%% {badrpc, R} and {badtcp, R} are exceptions.
gen_rpc_call(Config) ->
    B = ?config(b, Config),
    [begin
         Gen = gen_rpc:call(Dest, M, F, A, 5000),
         Tele = outcome(fun() -> teleport_rpc:call(Dest, M, F, A, 5000) end),
         ct:pal("~p:~p~p: gen_rpc ~p, teleport_rpc ~p", [M, F, A, Gen, Tele]),
         ?assertEqual(gen_rpcify(Gen), multicall_outcome(Tele))
     end || Dest <- [B, {B, key}], {N, M, F, A} <- cases(Config), N =:= B].

%% gen_rpc:cast(N | {N, K}, M, F, A) (true)  ->  teleport_rpc:cast(...) (ok)
gen_rpc_cast(Config) ->
    B = ?config(b, Config),
    ?assertEqual(true, gen_rpc:cast({B, k}, ?MODULE, tell, [self(), gen_rpc])),
    ?assertEqual(ok, teleport_rpc:cast({B, k}, ?MODULE, tell, [self(), teleport_rpc])),
    ?assertEqual(lists:sort([gen_rpc, teleport_rpc]), lists:sort(told(2))).

%% gen_rpc:ordered_cast({N, K}, M, F, A)  ->  teleport_rpc:cast({N, K}, M, F, A):
%% keyed casts always run in order.
gen_rpc_ordered_cast(Config) ->
    B = ?config(b, Config),
    [true = gen_rpc:ordered_cast({B, gen}, ?MODULE, append, [gen, I]) || I <- lists:seq(1, 200)],
    [ok = teleport_rpc:cast({B, tele}, ?MODULE, append, [tele, I]) || I <- lists:seq(1, 200)],
    true = teleport_test_peer:wait_until(
             fun() -> length(erpc:call(B, ?MODULE, appended, [])) =:= 400 end, 30000),
    Log = erpc:call(B, ?MODULE, appended, []),
    ?assertEqual(lists:seq(1, 200), [I || {gen, I} <- Log]),
    ?assertEqual(lists:seq(1, 200), [I || {tele, I} <- Log]).

%% gen_rpc:multicall(Ns, M, F, A[, T]) -> {Values, BadNodes}  ->
%% teleport_rpc:multicall(Ns, M, F, A[, T]): gen_rpc puts a node whose function
%% raised an error or exit among the bad nodes, without the reason (and its
%% values in no particular order); teleport_rpc gives each node's result, the
%% error with its reason, in the nodes' order.
gen_rpc_multicall(Config) ->
    Nodes = [?config(b, Config), ?config(c, Config)],
    [begin
         {Values, BadNodes} = gen_rpc:multicall(Nodes, M, F, A, 5000),
         Results = teleport_rpc:multicall(Nodes, M, F, A, 5000),
         ct:pal("~p:~p~p: gen_rpc ~p, teleport_rpc ~p", [M, F, A, {Values, BadNodes}, Results]),
         ?assertEqual(lists:sort(Values), lists:sort([V || {Tag, V} <- Results,
                                                          Tag =:= ok orelse Tag =:= throw])),
         ?assertEqual(lists:sort(BadNodes), lists:sort([N || {N, {Tag, _}} <- lists:zip(Nodes, Results),
                                                              Tag =:= error orelse Tag =:= exit]))
     end || {_, M, F, A} <- cases(Config)].

%% gen_rpc:async_call(N | {N, K}, M, F, A), gen_rpc:yield(Key), nb_yield(Key, T)  ->
%% teleport_rpc:send_request(...), receive_response(R), wait_response(R, T)
gen_rpc_async_call(Config) ->
    B = ?config(b, Config),
    [begin
         Gen = gen_rpc:yield(gen_rpc:async_call(Dest, M, F, A)),
         Tele = outcome(fun() -> teleport_rpc:receive_response(teleport_rpc:send_request(Dest, M, F, A)) end),
         ?assertEqual(gen_rpcify(Gen), multicall_outcome(Tele))
     end || Dest <- [B, {B, key}], {N, M, F, A} <- cases(Config), N =:= B],
    {value, B} = gen_rpc:nb_yield(gen_rpc:async_call(B, erlang, node, []), 5000),
    {response, B} = teleport_rpc:wait_response(teleport_rpc:send_request(B, erlang, node, []), 5000).

%% gen_rpc:abcast(Ns, Name, Msg), gen_rpc:sbcast(Ns, Name, Msg)  ->  the same in teleport_rpc
gen_rpc_broadcasts(Config) ->
    broadcasts(gen_rpc, Config).

%% gen_rpc:eval_everywhere(Ns, M, F, A) (abcast)  ->  teleport_rpc:multicast(Ns, M, F, A) (ok)
gen_rpc_eval_everywhere(Config) ->
    Nodes = [?config(b, Config), ?config(c, Config)],
    ?assertEqual(abcast, gen_rpc:eval_everywhere(Nodes, ?MODULE, tell, [self(), gen_rpc])),
    ?assertEqual(ok, teleport_rpc:multicast(Nodes, ?MODULE, tell, [self(), teleport_rpc])),
    ?assertEqual(lists:sort([gen_rpc, gen_rpc, teleport_rpc, teleport_rpc]), lists:sort(told(4))).

%%====================================================================
%% Helpers
%%====================================================================

%% The inputs each row runs: a value, a throw, an error (with its stack), an
%% exit, an undefined function, and a node that cannot be reached.
cases(Config) ->
    B = ?config(b, Config),
    [{B, erlang, node, []}, {B, ?MODULE, raise, [throw, thrown]},
     {B, ?MODULE, raise, [error, failed]}, {B, ?MODULE, raise, [exit, exited]},
     {B, no_such_module, f, []}, {?UNKNOWN, erlang, node, []}].

%% abcast and sbcast through `Module' and teleport_rpc to sinks on B and C (the
%% nodes of sbcast's good list in whichever order each gives them).
broadcasts(Module, Config) ->
    Nodes = [?config(b, Config), ?config(c, Config)],
    Sink = list_to_atom("rpc_migration_sink_" ++ atom_to_list(Module)),
    [{ok, _} = erpc:call(N, teleport_test_peer, start_sink, [N, Sink, self()]) || N <- Nodes],
    ?assertEqual(Module:abcast(Nodes, Sink, {abcast, Module}),
                 teleport_rpc:abcast(Nodes, Sink, {abcast, teleport_rpc})),
    Sorted = fun({Good, Bad}) -> {lists:sort(Good), lists:sort(Bad)} end,
    ?assertEqual(Sorted(Module:sbcast(Nodes ++ [?UNKNOWN], Sink, {sbcast, Module})),
                 Sorted(teleport_rpc:sbcast(Nodes ++ [?UNKNOWN], Sink, {sbcast, teleport_rpc}))),
    Got = [receive {from_sink, _, Msg} -> Msg after 5000 -> ct:fail(no_broadcast) end
           || _ <- lists:seq(1, 8)],
    ?assertEqual(lists:sort([{Kind, M} || Kind <- [abcast, sbcast], M <- [Module, teleport_rpc],
                                          _ <- Nodes]),
                 lists:sort(Got)).

outcome(Fun) ->
    try {ok, Fun()}
    catch Class:Reason -> {Class, Reason}
    end.

%% rpc's reading of an erpc outcome (as rpc:call/5 reads erpc's exceptions).
rpcify({ok, Value}) -> Value;
rpcify({throw, Value}) -> Value;
rpcify({exit, {exception, Reason}}) -> {badrpc, {'EXIT', Reason}};
rpcify({exit, {signal, Reason}}) -> {badrpc, {'EXIT', Reason}};
rpcify({error, {exception, Reason, Stack}}) -> {badrpc, {'EXIT', {Reason, Stack}}};
rpcify({error, {erpc, noconnection}}) -> {badrpc, nodedown};
rpcify({error, {erpc, timeout}}) -> {badrpc, timeout};
rpcify({error, {erpc, notsup}}) -> {badrpc, notsup};
rpcify({error, {erpc, Reason}}) -> {badrpc, {'EXIT', Reason}}.

%% A gen_rpc result as teleport_rpc's outcome: gen_rpc returns a throw's value
%% and {badrpc, {'EXIT', ...}} for exceptions (without erpc's trimming of the
%% stack: compared without it), and {badrpc | badtcp, _} for transport failures.
gen_rpcify({badrpc, {'EXIT', {Reason, Stack}}}) when is_list(Stack) -> {error, {exception, Reason}};
gen_rpcify({badrpc, {'EXIT', Reason}}) -> {exit, {exception, Reason}};
gen_rpcify({badrpc, _}) -> {error, {erpc, noconnection}};
gen_rpcify({badtcp, _}) -> {error, {erpc, noconnection}};
gen_rpcify(thrown) -> {throw, thrown};
gen_rpcify(Value) -> {ok, Value}.

%% A teleport_rpc outcome (or multicall result) without the error's stack.
multicall_outcome({error, {exception, Reason, _Stack}}) -> {error, {exception, Reason}};
multicall_outcome(Other) -> Other.

told(N) ->
    [receive {told, X} -> X after 5000 -> ct:fail({told, N}) end || _ <- lists:seq(1, N)].

%%% On the peers

raise(throw, R) -> throw(R);
raise(error, R) -> error(R);
raise(exit, R) -> exit(R).

tell(Pid, X) ->
    Pid ! {told, X},
    ok.

start_log() ->
    Self = self(),
    Pid = spawn(fun() ->
                        ?LOG = ets:new(?LOG, [named_table, public, ordered_set]),
                        Self ! {self(), ready},
                        receive stop -> ok end
                end),
    receive {Pid, ready} -> ok after 5000 -> error(no_log) end.

%% Appends `{Tag, I}' to the log (a pause first, so that casts run side by side
%% would finish out of order).
append(Tag, I) ->
    timer:sleep(rand:uniform(3) - 1),
    Seq = ets:update_counter(?LOG, seq, 1, {seq, 0}),
    true = ets:insert(?LOG, {{entry, Seq}, {Tag, I}}),
    ok.

appended() ->
    [E || [E] <- ets:match(?LOG, {{entry, '_'}, '$1'})].

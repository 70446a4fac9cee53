%%% @doc teleport_rpc against erpc: the same call through both must return or
%%% raise the same thing (`{Class, Reason}', remote stacks included), for
%%% calls, casts, the send_request family with request id collections,
%%% multicall and multicast, and the bad arguments erpc checks; and what erpc
%%% leaves to the transport: late results never reach the caller, the
%%% caller's group leader takes the remote function's output, large results
%%% come back whole over teleport.
%%%
%%% The test runner's node (A) calls peers B and C, teleport running on all.
-module(rpc_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([call_returns/1, call_exceptions/1, call_signal/1, call_funs/1, call_badarg/1,
         call_timeout_no_late_reply/1, call_large_results/1, call_local_node/1,
         call_group_leader/1, call_options/1,
         cast_runs/1, cast_badarg/1,
         request_receive/1, request_wait_check/1, request_abandoned/1,
         request_collections/1, request_badarg/1,
         multicall_mixed/1, multicall_timeout/1, multicall_badarg/1, multicast_runs/1,
         broadcasts/1]).
%% Run on the peers.
-export([raise/2, kill_self/0, sleep_then/2, big/1, tell/2, tell_node/2, io_hello/0, deep/1]).

-define(RPC_TIMEOUT, 30000).
-define(UNKNOWN, 'teleport_rpc_nowhere@127.0.0.1').

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [{group, calls}, {group, casts}, {group, requests}, {group, multi}].

groups() ->
    [{calls, [], [call_returns, call_exceptions, call_signal, call_funs, call_badarg,
                  call_timeout_no_late_reply, call_large_results, call_local_node,
                  call_group_leader, call_options]},
     {casts, [], [cast_runs, cast_badarg]},
     {requests, [], [request_receive, request_wait_check, request_abandoned,
                     request_collections, request_badarg]},
     {multi, [], [multicall_mixed, multicall_timeout, multicall_badarg, multicast_runs,
                  broadcasts]}].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("rpc") of
        ok ->
            {ok, PeerB, B} = teleport_test_peer:start(teleport_test_peer:unique_name("rpc_b")),
            {ok, PeerC, C} = teleport_test_peer:start(teleport_test_peer:unique_name("rpc_c")),
            [unlink(P) || P <- [PeerB, PeerC]],
            [{peers, [PeerB, PeerC]}, {b, B}, {c, C} | Config];
        {skip, _} = Skip ->
            Skip
    end.

end_per_suite(Config) ->
    [teleport_test_peer:stop(P) || P <- ?config(peers, Config)],
    teleport_test_peer:stop_local_teleport().

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(_Case, _Config) ->
    ok.

%%====================================================================
%% Calls
%%====================================================================

call_returns(Config) ->
    B = ?config(b, Config),
    same(call, [B, erlang, node, []]),
    ?assertEqual(B, teleport_rpc:call(B, erlang, node, [])),
    same(call, [B, lists, seq, [1, 10]]),
    same(call, [B, lists, seq, [1, 10], 5000]),
    same(call, [B, lists, seq, [1, 10], {abs, erlang:monotonic_time(millisecond) + 5000}]),
    same(call, [B, erlang, list_to_tuple, [lists:seq(1, 1000)]]),
    same(call, [{B, some_key}, erlang, node, []], [B, erlang, node, []]).

call_exceptions(Config) ->
    B = ?config(b, Config),
    [same(call, [B, ?MODULE, raise, [Class, Reason]])
     || Class <- [throw, error, exit], Reason <- [boom, {a, [tuple]}, normal]],
    %% A stack several frames deep, trimmed at erpc's own frame the same way.
    same(call, [B, ?MODULE, deep, [5]]),
    %% Unknown module and function, a BIF's badarg (its error_info), a bad match.
    same(call, [B, no_such_module, f, [1]]),
    same(call, [B, lists, no_such_function, []]),
    same(call, [B, erlang, atom_to_list, [1]]),
    same(call, [B, erlang, binary_to_term, [<<"not a term">>]]),
    %% erpc's own argument check on the remote side: too many arguments.
    same(call, [B, erlang, apply, [fun() -> ok end, lists:seq(1, 300)]]),
    ?assertMatch({error, {exception, boom, [{?MODULE, raise, 2, _} | _]}},
                 outcome(fun() -> teleport_rpc:call(B, ?MODULE, raise, [error, boom]) end)).

call_signal(Config) ->
    B = ?config(b, Config),
    same(call, [B, ?MODULE, kill_self, []]),
    ?assertEqual({exit, {signal, killed}},
                 outcome(fun() -> teleport_rpc:call(B, ?MODULE, kill_self, []) end)).

call_funs(Config) ->
    B = ?config(b, Config),
    Fun = fun() -> {node(), 42} end,
    same(call, [B, Fun]),
    same(call, [B, Fun, 5000]),
    same(call, [B, fun() -> throw(up) end]),
    same(call, [B, fun(_) -> never end]),
    same(call, [B, not_a_fun, 5000]).

call_badarg(Config) ->
    B = ?config(b, Config),
    Cases = [[<<"node">>, erlang, node, []], [B, "erlang", node, []], [B, erlang, 1, []],
             [B, erlang, node, not_a_list], [{B}, erlang, node, []], [{1, key}, erlang, node, []]],
    [same(call, Args) || Args <- Cases],
    [same(call, [B, erlang, node, [], T])
     || T <- [-1, 4294967296, 1.5, "5000", {abs, x}, {abs, erlang:monotonic_time(millisecond)
                                                       + 4294967296 + 1000}, #{timeout => -1},
              #{always_spawn => 'maybe'}]],
    [?assertEqual({error, {erpc, badarg}}, outcome(fun() -> apply(teleport_rpc, call, Args) end))
     || Args <- Cases].

%% A call that times out raises {erpc, timeout}; its result, small (over
%% disterl) or large (over teleport), never reaches the caller afterwards.
call_timeout_no_late_reply(Config) ->
    B = ?config(b, Config),
    same(call, [B, timer, sleep, [2000], 100]),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:call(B, ?MODULE, sleep_then, [300, small], 50) end)),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:call(B, ?MODULE, sleep_then, [300, {big, 1 bsl 20}], 50) end)),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:call({B, k}, ?MODULE, sleep_then, [300, {big, 1 bsl 20}], 50) end)),
    timer:sleep(1000),
    ?assertEqual({messages, []}, process_info(self(), messages)).

%% Results of every size come back whole: over disterl up to 64 KiB, over
%% teleport (through a relay here, to the caller's alias) above.
call_large_results(Config) ->
    B = ?config(b, Config),
    [begin
         Big = teleport_rpc:call(B, ?MODULE, big, [Bytes]),
         ?assertEqual(Bytes, byte_size(Big)),
         ?assertEqual(erpc:call(B, erlang, phash2, [Big]), erlang:phash2(Big))
     end || Bytes <- [10, 65000, 70000, 1 bsl 20, 10 bsl 20]],
    %% A large structured result too (decoded by a decoder on the way).
    List = teleport_rpc:call(B, lists, seq, [1, 200000]),
    ?assertEqual(lists:seq(1, 200000), List),
    %% And large arguments.
    Arg = binary:copy(<<"x">>, 5 bsl 20),
    ?assertEqual(5 bsl 20, teleport_rpc:call(B, erlang, byte_size, [Arg])).

call_local_node(_Config) ->
    same(call, [node(), erlang, node, []]),
    same(call, [node(), ?MODULE, raise, [error, here]]),
    same(call, [node(), ?MODULE, raise, [exit, here], 5000]),
    ?assertEqual(node(), teleport_rpc:call({node(), key}, erlang, node, [])).

%% The remote function's output goes to the caller's group leader.
call_group_leader(Config) ->
    B = ?config(b, Config),
    Outputs = [with_group_leader(fun() -> Module:call(B, ?MODULE, io_hello, []) end)
               || Module <- [erpc, teleport_rpc]],
    ?assertEqual([{ok, ["hello from " ++ atom_to_list(B) ++ "\n"]}], lists:usort(Outputs)).

%% OTP 28's options map, on every release; compression as an option.
call_options(Config) ->
    B = ?config(b, Config),
    ?assertEqual(B, teleport_rpc:call(B, erlang, node, [], #{timeout => 5000})),
    ?assertEqual(B, teleport_rpc:call(B, erlang, node, [], #{timeout => infinity,
                                                             always_spawn => true})),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:call(B, timer, sleep, [1000], #{timeout => 50}) end)),
    Data = lists:duplicate(10000, <<"compressible">>),
    ?assertEqual(erlang:phash2(Data),
                 teleport_rpc:call(B, erlang, phash2, [Data], #{compression => {6, 1024}})),
    [?assertEqual({error, {erpc, badarg}},
                  outcome(fun() -> teleport_rpc:call(B, erlang, node, [], #{compression => C}) end))
     || C <- [{0, 1}, {6, -1}, #{B => {6, 0}}, on]],
    Self = self(),
    ?assert(is_pid(teleport_rpc:call(node(), erlang, self, [], #{always_spawn => true}))),
    ?assertNotEqual(Self, teleport_rpc:call(node(), erlang, self, [], #{always_spawn => true})).

%%====================================================================
%% Casts
%%====================================================================

cast_runs(Config) ->
    B = ?config(b, Config),
    Self = self(),
    [ok = teleport_rpc:cast(Dest, ?MODULE, tell, [Self, {cast, Dest}])
     || Dest <- [B, {B, k}, node()]],
    ok = teleport_rpc:cast(B, fun() -> Self ! {cast, fun_on, node()} end),
    [receive {cast, Dest} -> ok after 5000 -> ct:fail({no_cast, Dest}) end
     || Dest <- [B, {B, k}, node()]],
    receive {cast, fun_on, B} -> ok after 5000 -> ct:fail(no_fun_cast) end,
    %% A cast that fails only logs there, as erpc's; one to a node that cannot be
    %% reached is dropped.
    same(cast, [B, ?MODULE, raise, [error, in_cast]]),
    same(cast, [?UNKNOWN, erlang, node, []]).

cast_badarg(Config) ->
    B = ?config(b, Config),
    [same(cast, Args)
     || Args <- [[1, erlang, node, []], [B, 1, node, []], [B, erlang, "node", []],
                 [B, erlang, node, x], [B, fun(_) -> x end], [B, x]]].

%%====================================================================
%% send_request and its collections
%%====================================================================

request_receive(Config) ->
    B = ?config(b, Config),
    [?assertEqual(outcome(fun() -> erpc:receive_response(erpc:send_request(B, M, F, A), 5000) end),
                  outcome(fun() ->
                                  teleport_rpc:receive_response(
                                    teleport_rpc:send_request(B, M, F, A), 5000)
                          end))
     || {M, F, A} <- [{erlang, node, []}, {?MODULE, raise, [throw, t]},
                      {?MODULE, raise, [error, e]}, {?MODULE, raise, [exit, x]},
                      {?MODULE, kill_self, []}, {timer, sleep, [1000]}]],
    ?assertEqual(B, teleport_rpc:receive_response(teleport_rpc:send_request(B, erlang, node, []))),
    ?assertEqual(B, teleport_rpc:receive_response(teleport_rpc:send_request({B, k}, fun erlang:node/0))),
    ?assertEqual(node(), teleport_rpc:receive_response(teleport_rpc:send_request(node(), erlang, node, []))),
    no_messages().

request_wait_check(Config) ->
    B = ?config(b, Config),
    R1 = teleport_rpc:send_request(B, ?MODULE, sleep_then, [300, small]),
    ?assertEqual(no_response, teleport_rpc:wait_response(R1)),
    ?assertEqual(no_response, teleport_rpc:wait_response(R1, 10)),
    ?assertEqual({response, small}, teleport_rpc:wait_response(R1, 5000)),
    %% check_response on whatever arrives, as a gen_server's handle_info would.
    R2 = teleport_rpc:send_request(B, ?MODULE, raise, [throw, thrown]),
    Msg = receive M -> M after 5000 -> ct:fail(no_response) end,
    ?assertEqual(no_response, teleport_rpc:check_response(other_message, R2)),
    ?assertEqual({throw, thrown}, outcome(fun() -> teleport_rpc:check_response(Msg, R2) end)),
    E = erpc:send_request(B, ?MODULE, raise, [throw, thrown]),
    EMsg = receive M2 -> M2 after 5000 -> ct:fail(no_response) end,
    ?assertEqual({throw, thrown}, outcome(fun() -> erpc:check_response(EMsg, E) end)),
    no_messages().

%% A request given up (receive_response's timeout) leaves nothing: no late
%% result, no waiter.
request_abandoned(Config) ->
    B = ?config(b, Config),
    Before = length(processes()),
    R = teleport_rpc:send_request(B, ?MODULE, sleep_then, [500, {big, 1 bsl 20}]),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:receive_response(R, 50) end)),
    R2 = teleport_rpc:send_request(B, ?MODULE, sleep_then, [500, small]),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:receive_response(R2, 50) end)),
    timer:sleep(1500),
    no_messages(),
    ?assertEqual(Before, length(processes())).

request_collections(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    Run = fun(Mod) ->
                  C0 = Mod:reqids_new(),
                  C1 = Mod:send_request(B, erlang, node, [], b, C0),
                  C2 = Mod:send_request(C, ?MODULE, raise, [throw, t], c, C1),
                  C3 = Mod:reqids_add(Mod:send_request(B, ?MODULE, sleep_then, [200, late]), slow, C2),
                  3 = Mod:reqids_size(C3),
                  Labels = lists:sort([L || {_, L} <- Mod:reqids_to_list(C3)]),
                  Got = collect_all(Mod, C3, []),
                  {Labels, lists:sort(Got), Mod:receive_response(Mod:reqids_new(), 10, true),
                   Mod:wait_response(Mod:reqids_new(), 10, true),
                   Mod:check_response(msg, Mod:reqids_new(), true),
                   outcome(fun() -> Mod:reqids_add(hd([R || {R, b} <- Mod:reqids_to_list(C1)]), again, C1) end)}
          end,
    ?assertEqual(Run(erpc), Run(teleport_rpc)),
    %% Without delete, and wait/check on collections.
    T0 = teleport_rpc:send_request(B, erlang, node, [], one, teleport_rpc:reqids_new()),
    ?assertMatch({{response, B}, one, #{}},
                 teleport_rpc:wait_response(T0, 5000, false)),
    Tc = teleport_rpc:send_request(B, erlang, node, [], two, teleport_rpc:reqids_new()),
    Msg = receive M -> M after 5000 -> ct:fail(no_response) end,
    ?assertEqual(no_response, teleport_rpc:check_response(unrelated, Tc, true)),
    {{response, B}, two, Empty} = teleport_rpc:check_response(Msg, Tc, true),
    ?assertEqual(0, teleport_rpc:reqids_size(Empty)),
    %% A collection's timeout abandons all of its requests.
    Tt = teleport_rpc:send_request(B, timer, sleep, [300], slow,
                                   teleport_rpc:send_request(C, timer, sleep, [300], slow2,
                                                             teleport_rpc:reqids_new())),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:receive_response(Tt, 20, true) end)),
    timer:sleep(600),
    no_messages().

collect_all(Mod, Collection, Acc) ->
    case outcome(fun() -> Mod:receive_response(Collection, 5000, true) end) of
        {ok, no_request} -> Acc;
        {ok, {Result, Label, Rest}} -> collect_all(Mod, Rest, [{Label, {ok, Result}} | Acc]);
        {Class, {Reason, Label, Rest}} -> collect_all(Mod, Rest, [{Label, {Class, Reason}} | Acc])
    end.

request_badarg(Config) ->
    B = ?config(b, Config),
    [?assertEqual(outcome(fun() -> apply(erpc, F, Args) end),
                  outcome(fun() -> apply(teleport_rpc, F, Args) end))
     || {F, Args} <- [{send_request, [1, erlang, node, []]}, {send_request, [B, 1, node, []]},
                      {send_request, [B, x]}, {send_request, [B, fun() -> x end, l, not_a_map]},
                      {send_request, [B, erlang, node, [], l, not_a_map]},
                      {receive_response, [not_a_request]}, {receive_response, [x, 10]},
                      {wait_response, [x]}, {wait_response, [x, 10]},
                      {check_response, [msg, x]}, {reqids_size, [x]},
                      {reqids_to_list, [x]}, {reqids_add, [x, l, #{}]},
                      {receive_response, [#{}, -1, true]}, {receive_response, [#{}, 10, x]},
                      {wait_response, [#{}, 10, x]}, {check_response, [m, #{}, x]}]],
    R = teleport_rpc:send_request(B, erlang, node, []),
    ?assertEqual({error, {erpc, badarg}},
                 outcome(fun() -> teleport_rpc:receive_response(R, -5) end)),
    ?assertEqual(B, teleport_rpc:receive_response(R, 5000)).

%%====================================================================
%% Several nodes
%%====================================================================

multicall_mixed(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    Nodes = [B, node(), C, ?UNKNOWN, B],
    [same(multicall, [Nodes, M, F, A])
     || {M, F, A} <- [{erlang, node, []}, {?MODULE, raise, [throw, t]},
                      {?MODULE, raise, [error, e]}, {?MODULE, raise, [exit, x]}]],
    %% (erpc applies a multicall's local function in the caller when it has no
    %% timeout: here it would kill the test.)
    same(multicall, [[B, C, node()], ?MODULE, kill_self, [], 5000]),
    same(multicall, [Nodes, fun() -> node() end]),
    same(multicall, [[], erlang, node, []]),
    ?assertEqual([{ok, B}, {ok, C}], teleport_rpc:multicall([{B, k1}, {C, k2}], erlang, node, [])),
    no_messages().

multicall_timeout(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    ?assertEqual(erpc:multicall([B, C], ?MODULE, sleep_then, [[{B, 1000}], fast], 300),
                 teleport_rpc:multicall([B, C], ?MODULE, sleep_then, [[{B, 1000}], fast], 300)),
    ?assertEqual([{error, {erpc, timeout}}, {ok, fast}],
                 teleport_rpc:multicall([B, C], ?MODULE, sleep_then, [[{B, 1000}], fast], 300)),
    timer:sleep(1200),
    no_messages().

multicall_badarg(Config) ->
    B = ?config(b, Config),
    [same(multicall, Args)
     || Args <- [[[B], 1, node, []], [[B], erlang, node, x], [[B, 1], erlang, node, []],
                 [not_a_list, erlang, node, []], [[B], erlang, node, [], -1], [[B], x]]].

multicast_runs(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    Self = self(),
    ok = teleport_rpc:multicast([B, {C, k}, node()], ?MODULE, tell_node, [Self, multicast]),
    ok = teleport_rpc:multicast([B], fun() -> Self ! {fun_multicast, node()} end),
    Got = lists:sort([receive {multicast, N} -> N after 5000 -> ct:fail(no_multicast) end
                      || _ <- [1, 2, 3]]),
    ?assertEqual(lists:sort([B, C, node()]), Got),
    receive {fun_multicast, B} -> ok after 5000 -> ct:fail(no_fun_multicast) end,
    [same(multicast, Args) || Args <- [[[B], 1, node, []], [[1], erlang, node, []], [x, erlang, node, []]]].

broadcasts(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    Self = self(),
    Name = rpc_suite_bcast,
    [{ok, _} = erpc:call(N, teleport_test_peer, start_sink, [N, Name, Self]) || N <- [B]],
    ?assertEqual(abcast, teleport_rpc:abcast([B, C, {B, k}, ?UNKNOWN], Name, hello)),
    [receive {from_sink, B, hello} -> ok after 5000 -> ct:fail(no_abcast) end || _ <- [1, 2]],
    ?assertEqual(rpc:sbcast([B, C, ?UNKNOWN], Name, again),
                 teleport_rpc:sbcast([B, C, ?UNKNOWN], Name, again)),
    ?assertEqual({[B, {B, k}], [C]}, teleport_rpc:sbcast([B, {B, k}, C], Name, keyed)),
    [receive {from_sink, B, M} -> ok after 5000 -> ct:fail({no_sbcast, M}) end
     || M <- [again, again, keyed, keyed]],
    no_messages().

%%====================================================================
%% Helpers
%%====================================================================

%% The same erpc call and teleport_rpc call return or raise the same.
same(Function, Args) ->
    same(Function, Args, Args).

same(Function, TeleportArgs, ErpcArgs) ->
    Erpc = outcome(fun() -> apply(erpc, Function, ErpcArgs) end),
    Teleport = outcome(fun() -> apply(teleport_rpc, Function, TeleportArgs) end),
    ?assertEqual(Erpc, Teleport, {Function, TeleportArgs}).

outcome(Fun) ->
    try {ok, Fun()}
    catch Class:Reason -> {Class, Reason}
    end.

no_messages() ->
    timer:sleep(100),
    ?assertEqual({messages, []}, process_info(self(), messages)).

%% Runs Fun with a group leader that collects what is written: {ok, Chars}.
with_group_leader(Fun) ->
    Old = group_leader(),
    Collector = spawn(fun() -> collect_io([]) end),
    group_leader(Collector, self()),
    try
        _ = Fun(),
        timer:sleep(200)
    after
        group_leader(Old, self())
    end,
    Collector ! {done, self()},
    receive {collected, Chars} -> {ok, Chars} after 5000 -> timeout end.

collect_io(Acc) ->
    receive
        {io_request, From, ReplyAs, {put_chars, Enc, Chars}} ->
            From ! {io_reply, ReplyAs, ok},
            collect_io([unicode:characters_to_list(Chars, Enc) | Acc]);
        {io_request, From, ReplyAs, {put_chars, Enc, M, F, A}} ->
            From ! {io_reply, ReplyAs, ok},
            collect_io([unicode:characters_to_list(apply(M, F, A), Enc) | Acc]);
        {io_request, From, ReplyAs, _} ->
            From ! {io_reply, ReplyAs, {error, enotsup}},
            collect_io(Acc);
        {done, Pid} ->
            Pid ! {collected, lists:reverse(Acc)}
    end.

%%% Run on the peers

raise(throw, Reason) -> throw(Reason);
raise(error, Reason) -> error(Reason);
raise(exit, Reason) -> exit(Reason).

deep(0) -> error(deep_down);
deep(N) -> [deep(N - 1)].

kill_self() ->
    exit(self(), kill).

%% Sleeps, then returns Result (`{big, Bytes}': a binary that large). `Ms' may
%% be `[{Node, Ms}]': the sleep on that node (none elsewhere).
sleep_then(Sleeps, Result) when is_list(Sleeps) ->
    sleep_then(proplists:get_value(node(), Sleeps, 0), Result);
sleep_then(Ms, {big, Bytes}) ->
    timer:sleep(Ms),
    big(Bytes);
sleep_then(Ms, Result) ->
    timer:sleep(Ms),
    Result.

big(Bytes) ->
    binary:copy(<<"b">>, Bytes).

tell(Pid, Msg) ->
    Pid ! Msg,
    ok.

tell_node(Pid, Tag) ->
    Pid ! {Tag, node()},
    ok.

io_hello() ->
    io:format("hello from ~s~n", [node()]).

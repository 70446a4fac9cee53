%%% @doc Every wait ends: a call's answer, a suspended sender, the runtime
%%% itself, each disturbed halfway.
%%%
%%% The test runner's node (the "origin") runs teleport and calls a gen_server
%%% on a peer node B over teleport. Each case starts B fresh and stops it by its
%%% peer pid when it ends.
%%% <ul>
%%% <li>group `calls', once with `infinity' and once with a finite timeout: a
%%%     call whose server answers after a while gets its reply (a small one,
%%%     sent back over disterl, and a 1 MiB one over teleport) although, in the
%%%     meantime, B's call relays were killed, teleport stopped and started on
%%%     B (the reply made while it was down), teleport stopped and started on
%%%     the origin (likewise), or the teleport connections were dropped both
%%%     ways while disterl stayed up. When the answer truly cannot come, the
%%%     caller exits with a clear reason: the server died (its reason), the
%%%     keeper holding the call was killed, no relay could take the call, or
%%%     the request was lost with its connection.</li>
%%% <li>group `suspended': a sender waiting for its queue to drain (B stopped
%%%     with SIGSTOP) returns although the wake-up is lost (the event pump
%%%     drops it), the pool is closed, or teleport restarts on the origin.</li>
%%% <li>`runtime_killed': B's teleport_runtime killed: the application comes
%%%     back with a fresh runtime on the same fixed port (the old listener
%%%     gone first) and teleport works again.</li>
%%% <li>`refuses_without_distribution', `refuses_nocookie': teleport does not
%%%     start, and listens nowhere, on a node that is not distributed or whose
%%%     cookie is `nocookie'; once distribution is up it starts.</li>
%%% </ul>
-module(faults_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0,
         init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2,
         init_per_testcase/2, end_per_testcase/2]).
-export([relay_killed/1, server_teleport_restarted/1, caller_teleport_restarted/1,
         connections_dropped/1, server_dies/1, keeper_killed/1, no_relay/1,
         request_lost/1,
         resume_lost/1, pool_closed_while_suspended/1, teleport_restarted_while_suspended/1,
         runtime_killed/1, refuses_without_distribution/1, refuses_nocookie/1]).

-define(SERVER, faults_server).
-define(SINK, faults_sink).
-define(RPC_TIMEOUT, 30000).
-define(MiB, (1024 * 1024)).
%% How long the server takes to answer a delayed call.
-define(REPLY_AFTER, 1500).
%% Longer than any outcome may take; reached only when a case fails.
-define(OUTCOME_TIMEOUT, 30000).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [{group, calls_infinity}, {group, calls_finite}, {group, suspended},
     runtime_killed, refuses_without_distribution, refuses_nocookie].

groups() ->
    Calls = [relay_killed, server_teleport_restarted, caller_teleport_restarted,
             connections_dropped, server_dies, keeper_killed, no_relay, request_lost],
    [{calls_infinity, [], Calls},
     {calls_finite, [], Calls},
     {suspended, [], [resume_lost, pool_closed_while_suspended,
                      teleport_restarted_while_suspended]}].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("faults") of
        ok -> Config;
        {fail, _} = Fail -> Fail
    end.

end_per_suite(_Config) ->
    teleport_test_peer:stop_local_teleport().

init_per_group(calls_infinity, Config) -> [{timeout, infinity} | Config];
init_per_group(calls_finite, Config) -> [{timeout, 20000} | Config];
init_per_group(_, Config) -> Config.

end_per_group(_, _Config) -> ok.

init_per_testcase(Case, Config) when Case =:= refuses_without_distribution;
                                     Case =:= refuses_nocookie ->
    Config;
init_per_testcase(Case, Config) ->
    Env = case Case of
              runtime_killed -> #{listen_port => free_port()};
              _ -> #{}
          end,
    {ok, Peer, B} = teleport_test_peer:start(unique(Case), [], Env),
    {ok, Srv} = erpc:call(B, teleport_test_server, start, [?SERVER], ?RPC_TIMEOUT),
    [{peer, Peer}, {b, B}, {server, Srv} | Config].

end_per_testcase(_Case, Config) ->
    teleport_nif:debug_drop_events(0),
    %% Cases that restart the origin's teleport leave it running again.
    {ok, _} = application:ensure_all_started(teleport),
    case ?config(peer, Config) of
        undefined -> ok;
        Peer -> teleport_test_peer:stop(Peer)
    end.

%%====================================================================
%% calls
%%====================================================================

relay_killed(Config) ->
    B = ?config(b, Config),
    answered_despite(Config, fun() ->
        erpc:call(B, fun() ->
            [exit(whereis(Name), kill) || Name <- teleport_call_relay:names()]
        end)
    end).

server_teleport_restarted(Config) ->
    B = ?config(b, Config),
    answered_despite(Config, fun() ->
        %% The server answers while teleport is down on its node.
        ok = erpc:call(B, application, stop, [teleport]),
        timer:sleep(?REPLY_AFTER),
        {ok, _} = erpc:call(B, application, ensure_all_started, [teleport])
    end).

caller_teleport_restarted(Config) ->
    answered_despite(Config, fun() ->
        ok = application:stop(teleport),
        timer:sleep(?REPLY_AFTER),
        {ok, _} = application:ensure_all_started(teleport)
    end).

connections_dropped(Config) ->
    B = ?config(b, Config),
    answered_despite(Config, fun() ->
        ok = teleport:disconnect(B),
        ok = erpc:call(B, teleport, disconnect, [node()]),
        %% Closed while the reply is on its way, too.
        timer:sleep(?REPLY_AFTER - 300),
        ok = erpc:call(B, teleport, disconnect, [node()])
    end).

server_dies(Config) ->
    Srv = ?config(server, Config),
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    %% Killed before its keeper watches it, the server is gone when the call comes:
    %% noproc, not its exit reason.
    ?assert(teleport_test_peer:wait_until(fun() -> keeper_watches_server(?config(b, Config)) end,
                                          10000)),
    exit(Srv, boom),
    ?assertMatch({exit, {boom, {teleport, gs_call, _}}}, outcome(Caller)).

keeper_killed(Config) ->
    B = ?config(b, Config),
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    %% Killed once it has told the caller it exists (at once for an `infinity'
    %% call; a finite one simply times out if its keeper dies unannounced).
    timer:sleep(300),
    Keeper = wait_for(fun() -> keeper_on(B) end),
    exit(Keeper, kill),
    ?assertMatch({exit, {{call_keeper_down, _}, {teleport, gs_call, _}}}, outcome(Caller)).

no_relay(Config) ->
    B = ?config(b, Config),
    %% Warm up the pools, then take every relay's name away.
    ?assertEqual(B, teleport:gs_call({?SERVER, B}, whoami, 10000)),
    Names = erpc:call(B, teleport_call_relay, names, []),
    Pids = erpc:call(B, fun() -> [begin P = whereis(N), unregister(N), P end || N <- Names] end),
    try
        Caller = call_async(Config, {echo, x}),
        ?assertMatch({exit, {{teleport, no_call_relay}, {teleport, gs_call, _}}}, outcome(Caller))
    after
        erpc:call(B, fun() -> [register(N, P) || {N, P} <- lists:zip(Names, Pids)] end)
    end.

request_lost(Config) ->
    B = ?config(b, Config),
    ?assertEqual(B, teleport:gs_call({?SERVER, B}, whoami, 10000)),
    %% A request large enough to still be on its way when our pool closes.
    Big = binary:copy(<<7>>, 200 * ?MiB),
    Caller = call_async(Config, {echo, Big}),
    timer:sleep(5),
    ok = teleport:disconnect(B),
    %% Either the request got through before the pool closed (then the reply
    %% comes), or the caller learns it was lost: never a wait without end.
    case outcome(Caller) of
        {reply, Reply} -> ?assertEqual(Big, Reply), ct:pal("the request got through first");
        Lost -> ?assertMatch({exit, {{request_lost, B}, {teleport, gs_call, _}}}, Lost)
    end.

%% Calls the server with a delayed reply, runs `Disturb' meanwhile, and expects
%% the reply: a small one (which comes back over disterl) and, at the same time,
%% a large one (over teleport, kept by the keeper until acknowledged).
answered_despite(Config, Disturb) ->
    Tag = make_ref(),
    Big = binary:copy(<<"r">>, ?MiB),
    Small = call_async(Config, {delayed_reply, ?REPLY_AFTER, {Tag, answered}}),
    Large = call_async(Config, {delayed_reply, ?REPLY_AFTER, {Tag, Big}}),
    %% Both requests are with their keepers: a fault before that may lose one
    %% (request_lost), which is request_lost's case, not this one.
    ?assert(teleport_test_peer:wait_until(
              fun() -> length(keeper_on(?config(b, Config))) >= 2 end, 10000)),
    Disturb(),
    ?assertEqual({reply, {Tag, answered}}, outcome(Small)),
    ?assertEqual({reply, {Tag, Big}}, outcome(Large)),
    %% And teleport still works afterwards.
    B = ?config(b, Config),
    ?assertEqual(B, teleport:gs_call({?SERVER, B}, whoami, 10000)).

call_async(Config, Request) ->
    B = ?config(b, Config),
    Timeout = ?config(timeout, Config),
    Self = self(),
    spawn_link(fun() ->
                       Outcome = try teleport:gs_call({?SERVER, B}, Request, Timeout) of
                                     Reply -> {reply, Reply}
                                 catch
                                     exit:Reason -> {exit, Reason}
                                 end,
                       Self ! {outcome, self(), Outcome}
               end).

outcome(Caller) ->
    receive
        {outcome, Caller, Outcome} -> Outcome
    after ?OUTCOME_TIMEOUT ->
            ct:fail({no_outcome_after, ?OUTCOME_TIMEOUT, erlang:process_info(Caller)})
    end.

%% Whether a keeper on B monitors its server (its first step: the server's end is
%% then seen with its reason).
keeper_watches_server(B) ->
    lists:any(fun(K) ->
                      case erpc:call(B, erlang, process_info, [K, monitors]) of
                          {monitors, [_ | _]} -> true;
                          _ -> false
                      end
              end, keeper_on(B)).

keeper_on(B) ->
    erpc:call(B, fun() ->
                         [P || P <- processes(),
                               element(1, proc_lib:translate_initial_call(P))
                                   =:= teleport_call]
                 end).

%%====================================================================
%% suspended senders
%%====================================================================

resume_lost(Config) ->
    suspended_then(Config, fun(_B) -> teleport_nif:debug_drop_events(1000) end).

pool_closed_while_suspended(Config) ->
    suspended_then(Config, fun(B) -> ok = teleport:disconnect(B) end).

teleport_restarted_while_suspended(Config) ->
    suspended_then(Config, fun(_B) ->
                                   ok = application:stop(teleport),
                                   {ok, _} = application:ensure_all_started(teleport)
                           end).

%% Stops B (SIGSTOP), suspends a sender on its full queue, runs `Disturb', lets
%% B go on (SIGCONT): the sender returns.
suspended_then(Config, Disturb) ->
    B = ?config(b, Config),
    {ok, _} = teleport_rel_remote:start_sink(B, ?SINK, self()),
    ?assertEqual(ok, teleport:send({?SINK, B}, warm)),
    OsPid = erpc:call(B, os, getpid, []),
    Big = binary:copy(<<1>>, 16 * ?MiB),
    Self = self(),
    signal("STOP", OsPid),
    try
        %% send_queue_bytes is 64 MiB: five of these fill it and the sixth waits.
        Sender = spawn_link(fun() ->
                                    Results = [teleport:send({?SINK, B}, Big, [{key, 1}])
                                               || _ <- lists:seq(1, 8)],
                                    Self ! {sent, self(), Results}
                            end),
        ?assert(teleport_test_peer:wait_until(fun() -> suspended(Sender) end, 20000)),
        Disturb(B),
        signal("CONT", OsPid),
        receive
            {sent, Sender, Results} ->
                ct:pal("send results: ~p", [Results]),
                ?assertEqual([], [R || R <- Results, R =/= ok, R =/= {error, noconnection}])
        after ?OUTCOME_TIMEOUT ->
                ct:fail({sender_still_waiting, erlang:process_info(Sender)})
        end
    after
        signal("CONT", OsPid)
    end.

suspended(Pid) ->
    erlang:process_info(Pid, [current_function, status])
        =:= [{current_function, {teleport, await_resume, 2}}, {status, waiting}].

signal(Sig, OsPid) ->
    true = lists:all(fun(C) -> C >= $0 andalso C =< $9 end, OsPid),
    _ = os:cmd("kill -" ++ Sig ++ " " ++ OsPid),
    ok.

%%====================================================================
%% the runtime and the application
%%====================================================================

runtime_killed(Config) ->
    B = ?config(b, Config),
    {_, Port} = erpc:call(B, teleport, listen_address, []),
    Old = erpc:call(B, erlang, whereis, [teleport_runtime]),
    ?assertEqual(B, teleport:gs_call({?SERVER, B}, whoami, 10000)),
    exit(Old, kill),
    ?assert(teleport_test_peer:wait_until(
              fun() ->
                      New = erpc:call(B, erlang, whereis, [teleport_runtime]),
                      is_pid(New) andalso New =/= Old
              end, 10000)),
    %% The new runtime holds the same fixed port: the old listener was closed first.
    ?assertMatch({_, Port}, erpc:call(B, teleport, listen_address, [])),
    ?assertEqual(B, teleport:gs_call({?SERVER, B}, whoami, 10000)),
    %% Exactly one listener on it (not an orphan beside the new one).
    Listeners = os:cmd("ss -Htln 'sport = :" ++ integer_to_list(Port) ++ "' | wc -l"),
    ?assertEqual(1, list_to_integer(string:trim(Listeners))).

refuses_without_distribution(_Config) ->
    Peer = case peer:start_link(#{connection => standard_io,
                                  args => teleport_test_peer:code_path_args()}) of
               {ok, P} -> P;
               {ok, P, nonode@nohost} -> P
           end,
    try
        ?assertMatch({error, {not_distributed, _}},
                     peer:call(Peer, application, start, [teleport])),
        ?assertEqual({error, not_started}, peer:call(Peer, teleport, listen_address, [])),
        %% Once distribution is up (and the cookie a real one), it starts.
        Name = list_to_atom(unique("late") ++ "@127.0.0.1"),
        {ok, _} = peer:call(Peer, net_kernel, start, [Name, #{name_domain => longnames}]),
        true = peer:call(Peer, erlang, set_cookie, [erlang:get_cookie()]),
        ?assertEqual(ok, peer:call(Peer, application, start, [teleport])),
        ?assertMatch({_, Port} when is_integer(Port), peer:call(Peer, teleport, listen_address, []))
    after
        teleport_test_peer:stop(Peer)
    end.

refuses_nocookie(_Config) ->
    {ok, Peer, _Node} = peer:start_link(#{name => unique("nocookie"), host => "127.0.0.1",
                                          longnames => true, connection => standard_io,
                                          args => ["-setcookie", "nocookie"]
                                                  ++ teleport_test_peer:code_path_args()}),
    try
        ?assertMatch({error, {nocookie, _}}, peer:call(Peer, application, start, [teleport])),
        ?assertEqual({error, not_started}, peer:call(Peer, teleport, listen_address, []))
    after
        teleport_test_peer:stop(Peer)
    end.

%%====================================================================
%% helpers
%%====================================================================

unique(Prefix) ->
    teleport_test_peer:unique_name(atom_to_list_or_string(Prefix)).

atom_to_list_or_string(A) when is_atom(A) -> atom_to_list(A);
atom_to_list_or_string(S) -> S.

free_port() ->
    {ok, S} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(S),
    ok = gen_tcp:close(S),
    Port.

wait_for(Fun) ->
    Found = fun() -> Fun() =/= [] end,
    ?assert(teleport_test_peer:wait_until(Found, 10000)),
    [One | _] = Fun(),
    One.

%%% @doc A rolling upgrade: a node of today's code beside a node running teleport
%%% as it was before the wire protocol had versions (protocol 1, commit a21bce0,
%%% built by scripts/build_old_main.sh; `TELEPORT_OLD_MAIN' names its ebin).
%%% Today's code speaks protocol 2 (interleaved frames, capabilities, TLS-bound
%%% proofs) and refuses protocol 1 by name, both ways:
%%% <ul>
%%% <li>`new_dials_old': `teleport:connect/1' from the new node to the old one
%%%     fails with `{handshake, {version, 1, 2}}' (the old node answered in
%%%     protocol 1); a send returns `{error, noconnection}'.</li>
%%% <li>`old_dials_new': the old node's connect fails (it cannot say why: it
%%%     only sees the connection closed); the new node counts the refusal and
%%%     logs `handshake_failed' with reason `version' and a detail naming both
%%%     protocol versions.</li>
%%% </ul>
%%% Distributed Erlang between them is untouched, and each keeps working with
%%% nodes of its own version.
-module(wire_version_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([new_dials_old/1, old_dials_new/1]).
%% logger handler callback
-export([log/2]).

-define(RPC_TIMEOUT, 30000).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [new_dials_old, old_dials_new].

init_per_suite(Config) ->
    case os:getenv("TELEPORT_OLD_MAIN") of
        false ->
            %% scripts/test.sh sets it wherever the git history is there to build
            %% from (the host's run); the OTP matrix's copies have no history.
            {skip, "TELEPORT_OLD_MAIN not set (scripts/build_old_main.sh builds it)"};
        Ebin ->
            true = filelib:is_dir(Ebin),
            case teleport_test_peer:start_local_teleport("version") of
                ok -> [{old_ebin, Ebin} | Config];
                {fail, _} = Fail -> Fail
            end
    end.

end_per_suite(_Config) ->
    teleport_test_peer:stop_local_teleport().

init_per_testcase(_Case, Config) ->
    %% A node with only the old teleport in its code path.
    Name = teleport_test_peer:unique_name("old_main"),
    {ok, Peer, Old} = peer:start_link(#{name => Name, host => "127.0.0.1", longnames => true,
                                        args => ["-setcookie", atom_to_list(erlang:get_cookie()),
                                                 "-start_epmd", "false",
                                                 "-pa", ?config(old_ebin, Config)],
                                        wait_boot => 60000}),
    {ok, _} = erpc:call(Old, application, ensure_all_started, [teleport], ?RPC_TIMEOUT),
    %% Really the old code: its handshake module predates versions.
    OldSource = erpc:call(Old, code, which, [teleport]),
    ?assertEqual(filename:join(?config(old_ebin, Config), "teleport.beam"), OldSource),
    [{old_peer, Peer}, {old, Old} | Config].

end_per_testcase(_Case, Config) ->
    _ = logger:remove_handler(version_ct),
    peer:stop(?config(old_peer, Config)).

new_dials_old(Config) ->
    Old = ?config(old, Config),
    ?assertEqual({error, {handshake, {version, 1, 2}}}, teleport:connect(Old)),
    ?assertEqual({error, noconnection}, teleport:send({some_name, Old}, hello)),
    %% Distributed Erlang is untouched.
    ?assertEqual(Old, erpc:call(Old, erlang, node, [])).

old_dials_new(Config) ->
    Old = ?config(old, Config),
    ok = logger:add_handler(version_ct, ?MODULE, #{config => #{to => self()},
                                                   filter_default => log}),
    Before = maps:get(handshake_failures, teleport:listener_stats()),
    Result = erpc:call(Old, teleport, connect, [node()], ?RPC_TIMEOUT),
    ct:pal("the old node's connect: ~p", [Result]),
    ?assertMatch({error, {handshake, _}}, Result),
    ?assert(maps:get(handshake_failures, teleport:listener_stats()) > Before),
    receive
        {logged, #{what := handshake_failed, reason := version, detail := Detail}} ->
            ct:pal("the new node logged: ~ts", [Detail]),
            ?assertNotEqual(nomatch, string:find(Detail, "protocol 1")),
            ?assertNotEqual(nomatch, string:find(Detail, "this node 2"))
    after 10000 ->
            ct:fail(no_version_refusal_logged)
    end.

%% logger handler: teleport's reports, to the test process.
-spec log(logger:log_event(), logger:handler_config()) -> ok.
log(#{msg := {report, Report}, meta := #{domain := [teleport]}}, #{config := #{to := To}}) ->
    To ! {logged, Report},
    ok;
log(_Event, _Config) ->
    ok.

%%% @doc What a node lets teleport_rpc do, and teleport_rpc under bad input:
%%% <ul>
%%% <li>`allow_list': the `rpc_modules' setting refuses calls and casts to
%%%     other modules (`{erpc, {module_not_allowed, M}}' in the caller), counts
%%%     them (`refused_rpcs') and logs them.</li>
%%% <li>`compression': arguments and results over the threshold travel
%%%     compressed (fewer bytes on the wire), per setting, per node and per
%%%     call; a compressed argument or result that would inflate past the
%%%     receiver's `max_frame_bytes' is refused before it is inflated
%%%     (`{erpc, too_large}', counted as `refused_compressed'), a lying header
%%%     too; a request over the sender's `max_frame_bytes' is not sent.</li>
%%% <li>`bad_input': unknown, dead and teleport-less nodes, teleport
%%%     restarting there, a function that never returns, a caller that dies
%%%     mid-call.</li>
%%% <li>`leaks': process counts on both nodes, the caller's monitors and
%%%     links, its mailbox, and the relays' state before and after a mixed
%%%     batch of calls, casts, requests (answered, failed, timed out,
%%%     abandoned, keyed), and callers killed mid-call.</li>
%%% </ul>
-module(rpc_limits_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2, init_per_testcase/2, end_per_testcase/2]).
-export([only_listed/1, except_listed/1, setting_changed/1,
         compressed_on_the_wire/1, compression_per_node/1, args_bomb/1, lying_header/1,
         result_bomb/1, cast_bomb/1, too_large/1,
         unknown_node/1, dead_node/1, node_without_teleport/1, teleport_restarting/1,
         never_returns/1, caller_dies/1,
         no_leaks/1]).
%% Run on the peers.
-export([zeros/1, hold/1, pid_of_keeper_free/0, teleport_processes/0, relay_state/0]).

-define(MiB, (1024 * 1024)).
-define(UNKNOWN, 'rpc_limits_nowhere@127.0.0.1').

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [{group, allow_list}, {group, compression}, {group, bad_input}, {group, leaks}].

groups() ->
    [{allow_list, [], [only_listed, except_listed, setting_changed]},
     {compression, [], [compressed_on_the_wire, compression_per_node, args_bomb, lying_header,
                        result_bomb, cast_bomb, too_large]},
     {bad_input, [], [unknown_node, dead_node, node_without_teleport, teleport_restarting,
                      never_returns, caller_dies]},
     {leaks, [], [no_leaks]}].

init_per_suite(Config) ->
    teleport_test_peer:init_per_suite(Config).

end_per_suite(_Config) ->
    ok.

%% A (this node) runs teleport with `max_frame_bytes' 1 MiB in `compression';
%% B with the group's settings; C with none.
init_per_group(Group, Config) ->
    {LocalEnv, EnvB} = case Group of
                           allow_list -> {#{}, #{rpc_modules => {only, [lists, ?MODULE]}}};
                           compression -> {#{max_frame_bytes => ?MiB},
                                           #{max_frame_bytes => 8 * ?MiB}};
                           _ -> {#{}, #{}}
                       end,
    ok = teleport_test_peer:start_local_teleport("rpc_limits", LocalEnv),
    {ok, PeerB, B} = teleport_test_peer:start(teleport_test_peer:unique_name("rpc_lim_b"), [], EnvB),
    {ok, PeerC, C} = teleport_test_peer:start(teleport_test_peer:unique_name("rpc_lim_c"), [], #{}),
    [unlink(P) || P <- [PeerB, PeerC]],
    [{local_env, LocalEnv}, {peers, [PeerB, PeerC]}, {b, B}, {c, C} | Config].

end_per_group(_Group, Config) ->
    [teleport_test_peer:stop(P) || P <- ?config(peers, Config)],
    teleport_test_peer:stop_local_teleport(?config(local_env, Config)).

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(_Case, _Config) ->
    _ = application:unset_env(teleport, rpc_compression),
    ok.

%%====================================================================
%% allow_list
%%====================================================================

only_listed(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    ok = erpc:call(B, teleport_rel_remote, forward_reports, [self(), rpc_module_not_allowed]),
    Refused = {error, {erpc, {module_not_allowed, erlang}}},
    ?assertEqual([1, 2, 3], teleport_rpc:call(B, lists, seq, [1, 3])),
    ?assertEqual(Refused, outcome(fun() -> teleport_rpc:call(B, erlang, node, []) end)),
    ?assertEqual(Refused, outcome(fun() -> teleport_rpc:call({B, k}, erlang, node, []) end)),
    ?assertEqual(Refused, outcome(fun() -> teleport_rpc:call(B, fun() -> node() end) end)),
    ?assertEqual(Refused, outcome(fun() ->
                                          teleport_rpc:receive_response(
                                            teleport_rpc:send_request(B, erlang, node, []), 5000)
                                  end)),
    ?assertEqual([Refused, {ok, C}],
                 teleport_rpc:multicall([B, C], erlang, node, [])),
    %% Casts refused too: counted, never run.
    Self = self(),
    ok = teleport_rpc:cast(B, erlang, send, [Self, cast_ran]),
    ok = teleport_rpc:cast({B, k}, erlang, send, [Self, cast_ran]),
    ?assertEqual(lists:seq(1, 5), teleport_rpc:call({B, k}, lists, seq, [1, 5])),
    receive cast_ran -> ct:fail(refused_cast_ran) after 200 -> ok end,
    ?assertEqual(7, refused(B, refused_rpcs)),
    %% A broadcast is a send to a registered process, not an RPC of a listed
    %% module: always allowed.
    {ok, _} = teleport_test_peer:start_sink(B, rpc_limits_sink, Self),
    ?assertEqual({[B], []}, teleport_rpc:sbcast([B], rpc_limits_sink, sbcast_ran)),
    receive {from_sink, B, sbcast_ran} -> ok after 5000 -> ct:fail(no_sbcast) end,
    ?assertEqual(7, refused(B, refused_rpcs)),
    %% Logged, a line at most every 10 s.
    receive
        {rel_report, B, #{what := rpc_module_not_allowed, module := erlang} = Report} ->
            ct:pal("logged: ~p", [Report])
    after 5000 ->
            ct:fail(refusal_not_logged)
    end.

except_listed(Config) ->
    B = ?config(b, Config),
    ok = erpc:call(B, application, set_env, [teleport, rpc_modules, {except, [os]}]),
    try
        ?assertEqual(B, teleport_rpc:call(B, erlang, node, [])),
        ?assertEqual({error, {erpc, {module_not_allowed, os}}},
                     outcome(fun() -> teleport_rpc:call(B, os, getpid, []) end))
    after
        ok = erpc:call(B, application, set_env, [teleport, rpc_modules, {only, [lists, ?MODULE]}])
    end.

%% The setting is read for each request: changed at run time, it applies.
setting_changed(Config) ->
    B = ?config(b, Config),
    ?assertMatch({error, {erpc, {module_not_allowed, erlang}}},
                 outcome(fun() -> teleport_rpc:call(B, erlang, node, []) end)),
    ok = erpc:call(B, application, set_env, [teleport, rpc_modules, all]),
    try
        ?assertEqual(B, teleport_rpc:call(B, erlang, node, []))
    after
        ok = erpc:call(B, application, set_env, [teleport, rpc_modules, {only, [lists, ?MODULE]}])
    end.

%%====================================================================
%% compression
%%====================================================================

%% 512 KiB of compressible arguments and results: compressed (setting, or a
%% call's option), far fewer bytes cross; uncompressed, all of them.
compressed_on_the_wire(Config) ->
    B = ?config(b, Config),
    Data = json_like(512 * 1024),
    Size = erlang:external_size(Data),
    {Out, In, Result} = wire(B, fun() -> teleport_rpc:call(B, erlang, hd, [[Data]]) end),
    ?assertEqual(Data, Result),
    ct:pal("uncompressed: ~b bytes, ~b out, ~b in", [Size, Out, In]),
    ?assert(Out > Size andalso In > Size),
    ok = application:set_env(teleport, rpc_compression, {6, 1024}),
    {OutZ, InZ, ResultZ} = wire(B, fun() -> teleport_rpc:call(B, erlang, hd, [[Data]]) end),
    ?assertEqual(Data, ResultZ),
    ct:pal("compressed by the setting: ~b out, ~b in", [OutZ, InZ]),
    ?assert(OutZ * 5 < Size andalso InZ * 5 < Size),
    %% A call's option overrides the setting.
    {OutOff, _, _} = wire(B, fun() -> teleport_rpc:call(B, erlang, phash2, [Data],
                                                         #{compression => off}) end),
    ?assert(OutOff > Size),
    %% Under the threshold, not compressed.
    {OutT, _, _} = wire(B, fun() -> teleport_rpc:call(B, erlang, phash2, [Data],
                                                      #{compression => {6, 2 * Size}}) end),
    ?assert(OutT > Size),
    %% Casts, requests and multicalls too.
    Self = self(),
    {OutC, _, _} = wire(B, fun() ->
                                   ok = teleport_rpc:cast(B, erlang, send, [Self, {cast, Data}]),
                                   receive {cast, Data} -> ok after 10000 -> ct:fail(no_cast) end
                           end),
    ?assert(OutC * 5 < Size),
    ?assertEqual([{ok, Data}], teleport_rpc:multicall([B], erlang, hd, [[Data]], #{compression => {1, 0}})),
    ?assertEqual(Data, teleport_rpc:receive_response(teleport_rpc:send_request(B, erlang, hd, [[Data]]),
                                                     10000)).

%% The setting per node: `#{Node => Compression, default => ...}'.
compression_per_node(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    Data = json_like(256 * 1024),
    Size = erlang:external_size(Data),
    ok = application:set_env(teleport, rpc_compression, #{B => {6, 0}, default => off}),
    {OutB, _, _} = wire(B, fun() -> teleport_rpc:call(B, erlang, phash2, [Data]) end),
    {OutC, _, _} = wire(C, fun() -> teleport_rpc:call(C, erlang, phash2, [Data]) end),
    ct:pal("~b bytes: ~b out to B (compressed), ~b out to C", [Size, OutB, OutC]),
    ?assert(OutB * 5 < Size),
    ?assert(OutC > Size).

%% 100 MiB of zeros compressed to ~100 KiB: B (max_frame_bytes 8 MiB) refuses it
%% unread; nothing runs; counted.
args_bomb(Config) ->
    B = ?config(b, Config),
    Before = refused(B, refused_compressed),
    Zeros = binary:copy(<<0>>, 100 * ?MiB),
    ?assertEqual({error, {erpc, too_large}},
                 outcome(fun() -> teleport_rpc:call(B, erlang, byte_size, [Zeros],
                                                    #{compression => {9, 0}}) end)),
    ?assertEqual({error, {erpc, too_large}},
                 outcome(fun() -> teleport_rpc:call({B, k}, erlang, byte_size, [Zeros],
                                                    #{compression => {9, 0}}) end)),
    ?assertEqual(Before + 2, refused(B, refused_compressed)),
    %% Under the limit, the same way it is inflated and run.
    Fine = binary:copy(<<0>>, 4 * ?MiB),
    ?assertEqual(4 * ?MiB, teleport_rpc:call(B, erlang, byte_size, [Fine], #{compression => {9, 0}})).

%% A header claiming 3 GiB over a few bytes: refused before binary_to_term
%% (which would set out to allocate it).
lying_header(Config) ->
    B = ?config(b, Config),
    Before = refused(B, refused_compressed),
    <<131, 80, _:32, Zlib/binary>> = term_to_binary(lists:duplicate(1000, x), [{compressed, 9}]),
    Bomb = <<131, 80, (3 * 1024 * ?MiB):32, Zlib/binary>>,
    ?assertEqual({ok, {erpc, too_large}}, raw_call(B, {'$teleport_z', Bomb})),
    %% A header under the limit over bytes that are not a term: badarg.
    Garbage = <<131, 80, 100:32, "not zlib">>,
    ?assertEqual({ok, {erpc, badarg}}, raw_call(B, {'$teleport_z', Garbage})),
    ?assertEqual(Before + 2, refused(B, refused_compressed)).

%% B's result is 100 MiB of zeros, compressed (the caller's compression goes
%% with the request): A (max_frame_bytes 1 MiB) refuses it unread.
result_bomb(Config) ->
    B = ?config(b, Config),
    Before = teleport_relay_sup:counters(),
    ?assertEqual({error, {erpc, too_large}},
                 outcome(fun() -> teleport_rpc:call(B, ?MODULE, zeros, [100 * ?MiB],
                                                    #{compression => {9, 0}}) end)),
    After = teleport_relay_sup:counters(),
    ?assertEqual(count(Before, B, refused_compressed) + 1, count(After, B, refused_compressed)).

%% A cast's compressed arguments over the limit: refused, counted, not run.
cast_bomb(Config) ->
    B = ?config(b, Config),
    Before = refused(B, refused_compressed),
    Self = self(),
    ok = application:set_env(teleport, rpc_compression, {9, 0}),
    ok = teleport_rpc:cast(B, erlang, send, [Self, binary:copy(<<0>>, 100 * ?MiB)]),
    ok = teleport_rpc:cast({B, k}, erlang, send, [Self, binary:copy(<<0>>, 100 * ?MiB)]),
    ?assert(teleport_test_peer:wait_until(fun() -> refused(B, refused_compressed) =:= Before + 2 end,
                                          10000)),
    receive Msg when is_binary(Msg) -> ct:fail(bomb_cast_ran) after 200 -> ok end.

%% Over A's max_frame_bytes (1 MiB): not sent, `{erpc, too_large}'; the same
%% data compressed fits and runs.
too_large(Config) ->
    B = ?config(b, Config),
    Random = crypto:strong_rand_bytes(2 * ?MiB),
    ?assertEqual({error, {erpc, too_large}},
                 outcome(fun() -> teleport_rpc:call(B, erlang, byte_size, [Random]) end)),
    ?assertEqual({error, {erpc, too_large}},
                 outcome(fun() -> teleport_rpc:receive_response(
                                    teleport_rpc:send_request(B, erlang, byte_size, [Random]), 5000)
                         end)),
    ?assertEqual([{error, {erpc, too_large}}], teleport_rpc:multicall([B], erlang, byte_size, [Random])),
    ?assertEqual(ok, teleport_rpc:cast(B, erlang, byte_size, [Random])),
    Zeros = binary:copy(<<0>>, 2 * ?MiB),
    ?assertEqual(2 * ?MiB, teleport_rpc:call(B, erlang, byte_size, [Zeros], #{compression => {1, 0}})),
    %% A result is bounded by A's limit once inflated, too.
    ?assertEqual({error, {erpc, too_large}},
                 outcome(fun() -> teleport_rpc:call(B, ?MODULE, zeros, [2 * ?MiB],
                                                    #{compression => {1, 0}}) end)),
    ?assertEqual(?MiB div 2, byte_size(teleport_rpc:call(B, ?MODULE, zeros, [?MiB div 2],
                                                         #{compression => {1, 0}}))).

%%====================================================================
%% bad_input
%%====================================================================

unknown_node(_Config) ->
    same(call, [?UNKNOWN, erlang, node, []]),
    same(call, [?UNKNOWN, erlang, node, [], 1000]),
    ?assertEqual({error, {erpc, noconnection}},
                 outcome(fun() -> teleport_rpc:call({?UNKNOWN, k}, erlang, node, []) end)),
    ?assertEqual(outcome(fun() -> erpc:receive_response(erpc:send_request(?UNKNOWN, erlang, node, []), 5000) end),
                 outcome(fun() -> teleport_rpc:receive_response(
                                    teleport_rpc:send_request(?UNKNOWN, erlang, node, []), 5000)
                         end)),
    same(multicall, [[?UNKNOWN], erlang, node, []]),
    same(cast, [?UNKNOWN, erlang, node, []]),
    same(call, ['not_even_a_node', erlang, node, []]).

%% A node that dies mid-call: both raise noconnection.
dead_node(_Config) ->
    {ok, Peer, D} = teleport_test_peer:start(teleport_test_peer:unique_name("rpc_dead")),
    unlink(Peer),
    Self = self(),
    Callers = [spawn(fun() ->
                             Self ! {Module, outcome(fun() -> Module:call(D, timer, sleep, [20000]) end)}
                     end) || Module <- [erpc, teleport_rpc]],
    true = teleport_test_peer:wait_until(
             fun() -> length(erpc:call(D, erlang, processes, [])) > 0 andalso
                          teleport_rpc_running(D) end, 10000),
    teleport_test_peer:stop(Peer),
    Got = [receive {Module, Outcome} -> Outcome after 20000 -> ct:fail({no_outcome, Module}) end
           || Module <- [erpc, teleport_rpc]],
    ct:pal("callers ~p: ~p", [Callers, Got]),
    ?assertEqual([{error, {erpc, noconnection}}, {error, {erpc, noconnection}}], Got).

%% A node disterl reaches where teleport does not run: notsup after 10 s (erpc,
%% over disterl, would call it); within a shorter timeout, timeout; casts
%% dropped.
node_without_teleport(Config) ->
    C = ?config(c, Config),
    ok = erpc:call(C, application, stop, [teleport]),
    try
        true = teleport_test_peer:wait_until(fun() -> not lists:member(C, teleport:nodes()) end,
                                             10000),
        ?assertEqual({error, {erpc, timeout}},
                     outcome(fun() -> teleport_rpc:call(C, erlang, node, [], 1000) end)),
        ?assertEqual({error, {erpc, notsup}},
                     outcome(fun() -> teleport_rpc:call(C, erlang, node, []) end)),
        ?assertEqual(ok, teleport_rpc:cast(C, erlang, node, []))
    after
        {ok, _} = erpc:call(C, application, ensure_all_started, [teleport])
    end,
    ?assertEqual(C, teleport_rpc:call(C, erlang, node, [], 10000)).

%% teleport restarting on the node: the call waits for it and runs.
teleport_restarting(Config) ->
    C = ?config(c, Config),
    ok = erpc:call(C, application, stop, [teleport]),
    true = teleport_test_peer:wait_until(fun() -> not lists:member(C, teleport:nodes()) end, 10000),
    Self = self(),
    _ = spawn_link(fun() -> Self ! {outcome, outcome(fun() -> teleport_rpc:call(C, erlang, node, []) end)} end),
    timer:sleep(500),
    {ok, _} = erpc:call(C, application, ensure_all_started, [teleport]),
    receive {outcome, Outcome} -> ?assertEqual({ok, C}, Outcome)
    after 20000 -> ct:fail(no_outcome)
    end.

%% A function that never returns: timeout; teleport's processes on B end, the
%% function's own process stays, as erpc's does.
never_returns(Config) ->
    B = ?config(b, Config),
    Before = erpc:call(B, erlang, system_info, [process_count]),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> erpc:call(B, timer, sleep, [infinity], 200) end)),
    AfterErpc = erpc:call(B, erlang, system_info, [process_count]),
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:call(B, timer, sleep, [infinity], 200) end)),
    true = teleport_test_peer:wait_until(
             fun() -> erpc:call(B, ?MODULE, pid_of_keeper_free, []) end, 5000),
    AfterTeleport = erpc:call(B, erlang, system_info, [process_count]),
    ct:pal("processes on B: ~b before, ~b after erpc, ~b after teleport_rpc",
           [Before, AfterErpc, AfterTeleport]),
    ?assertEqual(AfterErpc - Before, AfterTeleport - AfterErpc).

%% A caller killed mid-call: its waiter (async) and the keeper go; the
%% function runs to its end, then nothing is left.
caller_dies(Config) ->
    B = ?config(b, Config),
    BeforeA = teleport_processes(),
    BeforeB = erpc:call(B, erlang, system_info, [process_count]),
    Callers = [spawn(fun() -> teleport_rpc:call(B, timer, sleep, [1500]) end),
               spawn(fun() -> teleport_rpc:call({B, k}, timer, sleep, [1500], 10000) end),
               spawn(fun() ->
                             R = teleport_rpc:send_request(B, timer, sleep, [1500]),
                             teleport_rpc:receive_response(R)
                     end)],
    timer:sleep(300),
    [exit(Pid, kill) || Pid <- Callers],
    true = teleport_test_peer:wait_until(
             fun() -> teleport_processes() =:= BeforeA andalso
                          erpc:call(B, erlang, system_info, [process_count]) =:= BeforeB
             end, 10000).

%%====================================================================
%% leaks
%%====================================================================

no_leaks(Config) ->
    B = ?config(b, Config),
    C = ?config(c, Config),
    Self = self(),
    Mine = fun() -> process_info(self(), [monitors, monitored_by, links]) end,
    %% B and C connected (and global done with it) first: the batch would connect
    %% them (global connects the nodes it learns of), a process more on B.
    true = erpc:call(B, net_kernel, connect_node, [C]),
    ok = erpc:call(B, global, sync, []),
    [BeforeMine, BeforeA] = [Mine(), teleport_processes()],
    BeforeB = erpc:call(B, erlang, system_info, [process_count]),
    BeforeListB = erpc:call(B, erlang, processes, []),
    Batch = fun() ->
                    [B = teleport_rpc:call(B, erlang, node, []) || _ <- lists:seq(1, 50)],
                    [_ = outcome(fun() -> teleport_rpc:call(B, rpc_SUITE, raise, [Class, x]) end)
                     || Class <- [throw, error, exit]],
                    {exit, {signal, killed}} = outcome(fun() -> teleport_rpc:call(B, rpc_SUITE, kill_self, []) end),
                    {error, {erpc, timeout}} = outcome(fun() -> teleport_rpc:call(B, timer, sleep, [300], 50) end),
                    {error, {erpc, timeout}} = outcome(fun() -> teleport_rpc:call({B, k}, timer, sleep, [300], 50) end),
                    {error, {erpc, noconnection}} = outcome(fun() -> teleport_rpc:call(?UNKNOWN, erlang, node, []) end),
                    R = teleport_rpc:send_request(B, timer, sleep, [300]),
                    {error, {erpc, timeout}} = outcome(fun() -> teleport_rpc:receive_response(R, 10) end),
                    Coll = teleport_rpc:send_request(C, timer, sleep, [300], l, teleport_rpc:reqids_new()),
                    {error, {erpc, timeout}} = outcome(fun() -> teleport_rpc:receive_response(Coll, 10, true) end),
                    _ = teleport_rpc:multicall([B, C, ?UNKNOWN, node()], erlang, node, [], 1000),
                    _ = teleport_rpc:multicall([B, C], timer, sleep, [300], 50),
                    [ok = teleport_rpc:cast(D, erlang, node, []) || D <- [B, {B, k}, C]],
                    Big = teleport_rpc:call(B, binary, copy, [<<"x">>, 1 bsl 20]),
                    1048576 = byte_size(Big),
                    {[B], []} = teleport_rpc:sbcast([B], rex, {ignored_by_rex}),
                    Killed = spawn(fun() -> teleport_rpc:call(B, timer, sleep, [300]) end),
                    timer:sleep(50),
                    exit(Killed, kill),
                    ok
            end,
    ok = Batch(),
    %% Requests abandoned (a receive that timed out, a caller killed) while
    %% their functions still run: no waiter here, no keeper there.
    Held = teleport_rpc:send_request(B, ?MODULE, hold, [rpc_limits_held]),
    {error, {erpc, timeout}} = outcome(fun() -> teleport_rpc:receive_response(Held, 10) end),
    Owner = spawn(fun() -> teleport_rpc:call({B, k}, ?MODULE, hold, [rpc_limits_held2]) end),
    true = teleport_test_peer:wait_until(
             fun() -> is_pid(erpc:call(B, erlang, whereis, [rpc_limits_held2])) end, 5000),
    exit(Owner, kill),
    ?assert(teleport_test_peer:wait_until(
              fun() -> teleport_processes() =:= BeforeA andalso
                           erpc:call(B, ?MODULE, pid_of_keeper_free, []) end, 10000)),
    [erpc:call(B, erlang, send, [Name, release]) || Name <- [rpc_limits_held, rpc_limits_held2]],
    %% Every function has ended (the longest sleeps 300 ms) and every keeper
    %% noticed (within its 1 s tick).
    Settled = fun() ->
                      teleport_processes() =:= BeforeA andalso
                          erpc:call(B, erlang, system_info, [process_count]) =:= BeforeB andalso
                          lists:all(fun(S) -> S =:= empty end, erpc:call(B, ?MODULE, relay_state, []))
              end,
    Ok = teleport_test_peer:wait_until(Settled, 15000),
    ct:pal("teleport processes here ~p (before ~p), processes on B ~p (before ~p), relays ~p",
           [teleport_processes(), BeforeA, erpc:call(B, erlang, system_info, [process_count]),
            BeforeB, erpc:call(B, ?MODULE, relay_state, [])]),
    New = erpc:call(B, erlang, processes, []) -- BeforeListB,
    ct:pal("new processes on B: ~p",
           [[erpc:call(B, erlang, process_info, [P, [registered_name, initial_call, current_function,
                                                       dictionary]]) || P <- New]]),
    ?assert(Ok),
    ?assertEqual(BeforeMine, Mine()),
    timer:sleep(200),
    ?assertEqual({messages, []}, process_info(Self, messages)).

%%====================================================================
%% Helpers
%%====================================================================

same(Function, Args) ->
    ?assertEqual(outcome(fun() -> apply(erpc, Function, Args) end),
                 outcome(fun() -> apply(teleport_rpc, Function, Args) end), {Function, Args}).

outcome(Fun) ->
    try {ok, Fun()}
    catch Class:Reason -> {Class, Reason}
    end.

%% A's refusals counted on `Node' (its teleport:stats/1 for this node).
refused(Node, Key) ->
    maps:get(Key, erpc:call(Node, teleport, stats, [node()])).

count(Counters, Node, Key) ->
    maps:get(Key, maps:get(Node, Counters, #{}), 0).

%% Bytes out to `Node' and in from it while `Fun' runs, and its result.
wire(Node, Fun) ->
    {Out0, In0} = settled_bytes(Node),
    Result = Fun(),
    {Out1, In1} = settled_bytes(Node),
    {Out1 - Out0, In1 - In0, Result}.

%% The I/O threads count a frame once written or read whole, which may be just
%% after its call returned: the counts once two reads 50 ms apart agree.
settled_bytes(Node) ->
    #{bytes_out := Out, bytes_in := In} = teleport:stats(Node),
    timer:sleep(50),
    case teleport:stats(Node) of
        #{bytes_out := Out, bytes_in := In} -> {Out, In};
        _ -> settled_bytes(Node)
    end.

%% A JSON-like list of maps, about `Bytes' in external format.
json_like(Bytes) ->
    Item = fun(I) -> #{<<"id">> => I, <<"name">> => <<"user-", (integer_to_binary(I))/binary>>,
                       <<"email">> => <<"someone@example.com">>, <<"active">> => true,
                       <<"tags">> => [<<"alpha">>, <<"beta">>]}
           end,
    N = Bytes div erlang:external_size(Item(1)) + 1,
    [Item(I) || I <- lists:seq(1, N)].

%% A call to erlang:node/0 whose arguments are `Args' as they come on the wire.
raw_call(Node, Args) ->
    Request = {erlang, node, Args, group_leader(), off},
    Frames = fun(Call) -> {{'$teleport_rpc', Call, Request}, {'$teleport_probe', Call, probe}} end,
    teleport_call:request(Node, Frames, 0, 10000).

teleport_rpc_running(Node) ->
    lists:member(Node, teleport:nodes()).

%%% On the peers (and here)

zeros(Bytes) ->
    binary:copy(<<0>>, Bytes).

%% Registers as `Name' and waits for `release'.
hold(Name) ->
    true = register(Name, self()),
    receive release -> released end.

%% Whether no teleport_rpc keeper runs here. A runner is not one: it is the
%% function's own process, which runs to its end as erpc's does.
pid_of_keeper_free() ->
    [P || P <- teleport_processes(), is_keeper(P)] =:= [].

is_keeper(Pid) ->
    case process_info(Pid, dictionary) of
        {dictionary, D} -> proplists:get_value('$initial_call', D) =:= {teleport_rpc_exec, keeper, 5};
        undefined -> false
    end.

%% The processes of teleport_rpc's requests on this node: waiters, keepers,
%% workers.
teleport_processes() ->
    lists:sort([P || P <- processes(), is_request_process(P)]).

is_request_process(Pid) ->
    case process_info(Pid, [initial_call, dictionary]) of
        [{initial_call, Initial}, {dictionary, D}] ->
            lists:member(element(1, Initial), [teleport_rpc, teleport_rpc_exec])
                orelse lists:member(element(1, proplists:get_value('$initial_call', D, {none})),
                                    [teleport_rpc_exec, teleport_call]);
        undefined ->
            false
    end.

%% Each relay's state: `empty' when it holds nothing of a call.
relay_state() ->
    [case sys:get_state(whereis(Name)) of
         #{keepers := K, monitors := M, per_node := P, workers := W, running := U,
           queued_casts := Q} = S when map_size(K) + map_size(M) + map_size(P) + map_size(W)
                                       + map_size(U) + map_size(Q) =:= 0 ->
             case teleport_rpc_keys:fold(fun(_, _, _) -> busy end, empty, maps:get(keys, S)) of
                 empty -> empty;
                 busy -> S
             end;
         S ->
             S
     end || Name <- teleport_call_relay:names()].

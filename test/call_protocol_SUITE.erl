%%% @doc The gs_call protocol (erlang_src/teleport_call.erl) disturbed at every
%%% step, before its first hand-off too: the model says, for each place the
%%% request can be when a fault strikes, which outcomes a call may have, and
%%% every call must end with one of them within a bounded time, never wait on
%%% while both nodes are up, and never exit `nodedown' while the node is up.
%%%
%%% The test runner's node (A) calls a gen_server on a peer B over teleport. A
%%% request passes, in order (the steps):
%%% <ol>
%%% <li>`reach': teleport must be running on B. Faults: stopped, started again
%%%     500 ms later (the call waits: reply); stopped for good (the call exits
%%%     `{teleport_unreachable, B, not_started}' after 10 s, whatever its
%%%     timeout).</li>
%%% <li>`queue': the caller's connection, held on B behind a frame that waits
%%%     for a suspended decoder. Fault: A closes its pool. Allowed: the reply
%%%     (the bytes were in B's socket buffer and got through) or
%%%     `request_lost'.</li>
%%% <li>`decoder': a decoder process on B (the request has over 50,000 terms,
%%%     more than an I/O thread builds), held by suspending the decoders.
%%%     Faults: the decoder holding it killed (`request_lost'); teleport stopped
%%%     on B and started again (reply or `request_lost').</li>
%%% <li>`relay': a relay's mailbox on B, held by suspending the relays. Faults:
%%%     the relay holding it killed (`request_lost'); teleport stopped on B and
%%%     started again (the relay starts keepers for what it holds as it stops:
%%%     reply); no relay registered at all (`{teleport, no_call_relay}').</li>
%%% <li>`keeper': the process that makes the call on B. Faults: killed as soon
%%%     as it exists (before it told the caller it exists, for a finite call),
%%%     and killed once it has: `{call_keeper_down, killed}'.</li>
%%% <li>`server': killed while it holds the call: its exit reason.</li>
%%% </ol>
%%% The `rpc_infinity' and `rpc_finite' groups run the same steps with
%%% `teleport_rpc:call/5' (erpc's exceptions: a lost request is
%%% `{erpc, noconnection}', teleport absent for good `{erpc, notsup}'; no
%%% decoder step: an RPC request's structure-heavy arguments travel packed in a
%%% binary, teleport_rpc_codec, so no decoder builds them), where an
%%% unkeyed call has a runner, the process that applies the function and
%%% delivers its outcome, in the keeper's place. Its steps: the runner killed at
%%% once (before its 100 ms timer has it announced), once announced, and once the
%%% caller watches it (after a second): each `{signal, killed}', as erpc says it;
%%% the relays killed while the runner works, before it is announced (the timer
%%% reaches the restarted relay: the reply) and, later, with the runner killed
%%% after them (only the caller's monitor sees it: `{signal, killed}'). The
%%% storm runs with RPC callers too.
%%%
%%% The answer's way back (relays killed after the keeper started, teleport
%%% restarted on either node, connections dropped while a small or a large
%%% reply travels) is faults_SUITE's `calls' groups.
%%%
%%% Each step and fault runs with an `infinity' call and a 20 s one. The
%%% `storm' group then runs the issue that found the holes: 48 processes on A
%%% loop on `infinity' calls while B's relays are suspended and killed with
%%% calls queued, decoders are killed, and teleport restarts on B every 2.5 s;
%%% every call ends, every reply is its own request's, and the exits are only
%%% `request_lost', `call_keeper_down' and `no_call_relay' (counts printed).
%%% `sends_across_restarts': the same restart loop under a stream of
%%% `teleport:send/2': each returns `ok' or `{error, noconnection}', what
%%% arrives is in order without duplicates and only ever what returned `ok'
%%% (what was lost of that is printed, beside `dropped_out'), and the stream
%%% goes on after the restarts.
-module(call_protocol_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0,
         init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2,
         init_per_testcase/2, end_per_testcase/2]).
-export([reach_teleport_restarting/1, reach_teleport_absent/1,
         queue_pool_closed/1,
         decoder_killed/1, decoder_teleport_restarted/1,
         relay_killed/1, relay_teleport_restarted/1, relay_none/1,
         keeper_killed_at_once/1, keeper_killed_announced/1,
         server_killed/1,
         storm_faults/1, storm_restarts/1, sends_across_restarts/1,
         runner_killed_at_once/1, runner_killed_announced/1, runner_killed_watched/1,
         relays_killed_under_runner/1, relays_killed_then_runner/1]).
%% Run on B.
-export([suspend/1, resume/1, queued/1, keepers/0, keeper_watches_server/0, seq_sink/1,
         runners/0, rpc_serve/1]).

-define(SERVER, protocol_server).
-define(SINK, protocol_sink).
-define(RPC_TIMEOUT, 30000).
-define(MiB, (1024 * 1024)).
%% Over teleport_call's ?UNREACHABLE_MS: how long an absent teleport is waited for.
-define(UNREACHABLE_MS, 10000).
%% A liveness bound, not a measurement: an outcome later than this after the
%% fault means a wait that would not have ended.
-define(OUTCOME_BOUND_MS, 20000).
%% A request the receiving I/O thread leaves to a decoder (over 50,000 terms).
-define(BIG_TERM, lists:seq(1, 60000)).
-define(STORM_CALLERS, 48).
-define(STORM_MS, 15000).

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [{group, infinity}, {group, finite}, {group, storm},
     {group, rpc_infinity}, {group, rpc_finite}, {group, rpc_storm}].

groups() ->
    Steps = [reach_teleport_restarting, reach_teleport_absent,
             queue_pool_closed,
             decoder_killed, decoder_teleport_restarted,
             relay_killed, relay_teleport_restarted, relay_none,
             keeper_killed_at_once, keeper_killed_announced,
             server_killed],
    RpcSteps = [reach_teleport_restarting, reach_teleport_absent,
                queue_pool_closed,
                relay_killed, relay_teleport_restarted, relay_none,
                runner_killed_at_once, runner_killed_announced, runner_killed_watched,
                relays_killed_under_runner, relays_killed_then_runner],
    [{infinity, [], Steps},
     {finite, [], Steps},
     {storm, [], [storm_faults, storm_restarts, sends_across_restarts]},
     {rpc_infinity, [], RpcSteps},
     {rpc_finite, [], RpcSteps},
     {rpc_storm, [], [storm_faults, storm_restarts]}].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("protocol") of
        ok -> Config;
        {fail, _} = Fail -> Fail
    end.

end_per_suite(_Config) ->
    teleport_test_peer:stop_local_teleport().

init_per_group(Group, Config) ->
    Timeout = case Group of
                  finite -> 20000;
                  rpc_finite -> 20000;
                  _ -> infinity
              end,
    Mode = case lists:member(Group, [rpc_infinity, rpc_finite, rpc_storm]) of
               true -> rpc;
               false -> gs_call
           end,
    [{timeout, Timeout}, {mode, Mode} | Config].

end_per_group(_, _Config) -> ok.

init_per_testcase(Case, Config) ->
    {ok, Peer, B} = teleport_test_peer:start(teleport_test_peer:unique_name(atom_to_list(Case))),
    {ok, _} = erpc:call(B, teleport_test_server, start, [?SERVER], ?RPC_TIMEOUT),
    %% Warm: the pools both ways are open, so a step's timing is its own.
    ?assertEqual(B, teleport:gs_call({?SERVER, B}, whoami, 10000)),
    [{peer, Peer}, {b, B} | Config].

end_per_testcase(_Case, Config) ->
    {ok, _} = application:ensure_all_started(teleport),
    teleport_test_peer:stop(?config(peer, Config)).

%%====================================================================
%% reach: teleport on B
%%====================================================================

reach_teleport_restarting(Config) ->
    B = ?config(b, Config),
    ok = erpc:call(B, application, stop, [teleport]),
    pool_gone(B),
    Caller = call_async(Config, {echo, restarted}),
    timer:sleep(500),
    {ok, _} = erpc:call(B, application, ensure_all_started, [teleport]),
    expect(Caller, [{reply, restarted}]).

reach_teleport_absent(Config) ->
    B = ?config(b, Config),
    ok = erpc:call(B, application, stop, [teleport]),
    pool_gone(B),
    Started = erlang:monotonic_time(millisecond),
    Caller = call_async(Config, {echo, never}),
    Outcome = outcome(Caller, ?UNREACHABLE_MS + ?OUTCOME_BOUND_MS),
    Waited = erlang:monotonic_time(millisecond) - Started,
    ct:pal("teleport absent on B: ~p after ~b ms", [Outcome, Waited]),
    case ?config(mode, Config) of
        gs_call ->
            ?assertMatch({exit, {{teleport_unreachable, B, not_started}, {teleport, gs_call, _}}},
                         Outcome);
        rpc ->
            ?assertEqual({exit, {erpc, notsup}}, Outcome)
    end,
    %% It waited for teleport to come back before giving up.
    ?assert(Waited >= ?UNREACHABLE_MS).

%%====================================================================
%% queue: the caller's connection
%%====================================================================

queue_pool_closed(Config) ->
    B = ?config(b, Config),
    {ok, _} = teleport_rel_remote:start_sink(B, ?SINK, self()),
    Decoders = erpc:call(B, teleport_decoder, names, []),
    ok = erpc:call(B, ?MODULE, suspend, [Decoders]),
    Self = self(),
    Timeout = ?config(timeout, Config),
    %% One process sends a frame B's I/O thread leaves to a (suspended) decoder,
    %% which pauses that connection on B, then calls: its request waits behind.
    Caller = spawn_link(fun() ->
                                ok = teleport:send({?SINK, B}, ?BIG_TERM),
                                Self ! {outcome, self(), call(?config(mode, Config), B,
                                                               {echo, queued}, Timeout)}
                        end),
    ok = wait_for(fun() -> queued_on(B, Decoders) > 0 end),
    timer:sleep(100),
    ok = teleport:disconnect(B),
    %% Resumed once the caller has probed over a new pool.
    timer:sleep(2500),
    ok = erpc:call(B, ?MODULE, resume, [Decoders]),
    expect(Caller, [{reply, queued}, lost(Config)]).

%%====================================================================
%% decoder
%%====================================================================

decoder_killed(Config) ->
    held_in(Config, teleport_decoder, fun(Holder, _Names) ->
        exit(Holder, kill)
    end, [lost(Config)]).

decoder_teleport_restarted(Config) ->
    B = ?config(b, Config),
    held_in(Config, teleport_decoder, fun(_Holder, Names) ->
        restart_teleport(B, Names)
    end, [{reply, ?BIG_TERM}, lost(Config)]).

%%====================================================================
%% relay
%%====================================================================

relay_killed(Config) ->
    held_in(Config, teleport_call_relay, fun(Holder, _Names) ->
        exit(Holder, kill)
    end, [lost(Config)]).

relay_teleport_restarted(Config) ->
    B = ?config(b, Config),
    held_in(Config, teleport_call_relay, fun(_Holder, Names) ->
        restart_teleport(B, Names)
    end, [{reply, ?BIG_TERM}]).

relay_none(Config) ->
    B = ?config(b, Config),
    Names = erpc:call(B, teleport_call_relay, names, []),
    Pids = erpc:call(B, fun() -> [begin P = whereis(N), unregister(N), P end || N <- Names] end),
    try
        Caller = call_async(Config, {echo, x}),
        expect(Caller, [case ?config(mode, Config) of
                            gs_call -> {exit, {teleport, no_call_relay}};
                            rpc -> {exit, {erpc, noconnection}}
                        end])
    after
        erpc:call(B, fun() -> [register(N, P) || {N, P} <- lists:zip(Names, Pids)] end)
    end.

%%====================================================================
%% keeper and server
%%====================================================================

keeper_killed_at_once(Config) ->
    B = ?config(b, Config),
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    %% Polled from B itself, so it dies well within the 100 ms a finite call's
    %% keeper waits before it announces itself.
    Killed = erpc:call(B, fun() ->
                                  {ok, K} = poll(fun() ->
                                                         case keepers() of
                                                             [K | _] -> {ok, K};
                                                             [] -> false
                                                         end
                                                 end, 1),
                                  exit(K, kill),
                                  K
                          end, ?RPC_TIMEOUT),
    ct:pal("keeper ~p killed", [Killed]),
    expect(Caller, [{exit, {call_keeper_down, killed}}]).

keeper_killed_announced(Config) ->
    B = ?config(b, Config),
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    timer:sleep(300),
    ok = wait_for(fun() -> erpc:call(B, ?MODULE, keepers, []) =/= [] end),
    [exit(K, kill) || K <- erpc:call(B, ?MODULE, keepers, [])],
    expect(Caller, [{exit, {call_keeper_down, killed}}]).

server_killed(Config) ->
    B = ?config(b, Config),
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    %% Killed before its keeper watches it, the server is gone when the call comes:
    %% noproc, not its exit reason.
    ok = wait_for(fun() -> erpc:call(B, ?MODULE, keeper_watches_server, []) end),
    exit(erpc:call(B, erlang, whereis, [?SERVER]), boom),
    expect(Caller, [{exit, boom}]).

%%====================================================================
%% runner (RPC calls)
%%====================================================================

runner_killed_at_once(Config) ->
    B = ?config(b, Config),
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    %% Polled from B itself: killed well within the 100 ms before its relay
    %% announces it, so only the relay can tell the caller.
    erpc:call(B, fun() -> {ok, R} = poll(fun() -> first(runners()) end, 1), exit(R, kill) end,
              ?RPC_TIMEOUT),
    expect(Caller, [{exit, {signal, killed}}]).

runner_killed_announced(Config) ->
    runner_killed_after(Config, 300).

%% After its first second the caller monitors the runner: its DOWN and the
%% relay's report race, and both say the same.
runner_killed_watched(Config) ->
    runner_killed_after(Config, 1500).

runner_killed_after(Config, Ms) ->
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    timer:sleep(Ms),
    kill_runners(?config(b, Config)),
    expect(Caller, [{exit, {signal, killed}}]).

%% The relays go (and are restarted) as soon as the runner exists: its timer
%% still has it announced, by the new relay, so the caller does not probe into
%% a relay that never heard of the call.
relays_killed_under_runner(Config) ->
    B = ?config(b, Config),
    Caller = call_async(Config, {delayed_reply, 1500, late}),
    erpc:call(B, fun() ->
                         {ok, _} = poll(fun() -> first(runners()) end, 1),
                         [exit(whereis(N), kill) || N <- teleport_call_relay:names()]
                 end, ?RPC_TIMEOUT),
    expect(Caller, [{reply, late}]).

%% Relays killed once the caller watches the runner, then the runner: no relay
%% knows it, the caller's own monitor reports it.
relays_killed_then_runner(Config) ->
    B = ?config(b, Config),
    Caller = call_async(Config, {delayed_reply, 5000, late}),
    timer:sleep(1500),
    erpc:call(B, fun() -> [exit(whereis(N), kill) || N <- teleport_call_relay:names()] end),
    timer:sleep(100),
    kill_runners(B),
    expect(Caller, [{exit, {signal, killed}}]).

kill_runners(B) ->
    ok = wait_for(fun() -> erpc:call(B, ?MODULE, runners, []) =/= [] end),
    [exit(R, kill) || R <- erpc:call(B, ?MODULE, runners, [])].

first([X | _]) -> {ok, X};
first([]) -> false.

%%====================================================================
%% storm
%%====================================================================

%% Relays suspended with calls piling up and then killed, decoders killed with
%% big requests queued, every relay unregistered for a moment.
storm_faults(Config) ->
    B = ?config(b, Config),
    storm(Config, fun(I) ->
        Relays = erpc:call(B, teleport_call_relay, names, []),
        Decoders = erpc:call(B, teleport_decoder, names, []),
        case I rem 3 of
            0 ->
                Relay = lists:nth(1 + I rem length(Relays), Relays),
                ok = erpc:call(B, ?MODULE, suspend, [[Relay]]),
                timer:sleep(200),
                erpc:call(B, fun() -> exit(whereis(Relay), kill) end);
            1 ->
                ok = erpc:call(B, ?MODULE, suspend, [Decoders]),
                timer:sleep(200),
                [Busiest | _] = lists:reverse(lists:keysort(3, erpc:call(B, ?MODULE, queued,
                                                                          [Decoders]))),
                exit(element(2, Busiest), kill),
                ok = erpc:call(B, ?MODULE, resume, [Decoders]);
            2 ->
                Pids = erpc:call(B, fun() -> [begin P = whereis(N), unregister(N), P end
                                              || N <- Relays] end),
                timer:sleep(50),
                erpc:call(B, fun() -> [try register(N, P) catch error:badarg -> false end
                                       || {N, P} <- lists:zip(Relays, Pids)] end)
        end,
        %% Slow enough for the relays' supervisor (10 restarts in 10 s): faster,
        %% teleport itself would go down, which is the supervisor's design.
        timer:sleep(1200)
    end, [request_lost, call_keeper_down, {teleport, no_call_relay}, noconnection]).

%% The restart loop: teleport stopped and started on B every 2.5 s.
storm_restarts(Config) ->
    B = ?config(b, Config),
    storm(Config, fun(_) ->
        timer:sleep(2500),
        ok = erpc:call(B, application, stop, [teleport]),
        {ok, _} = erpc:call(B, application, ensure_all_started, [teleport])
    end, [request_lost, noconnection]).

sends_across_restarts(Config) ->
    B = ?config(b, Config),
    Sink = erpc:call(B, erlang, spawn, [?MODULE, seq_sink, [[]]]),
    true = erpc:call(B, erlang, register, [?SINK, Sink]),
    DroppedBefore = maps:get(dropped_out, teleport:stats(B)),
    Self = self(),
    Stop = atomics:new(1, []),
    Sender = spawn_link(fun() -> Self ! {sent, seq_sender(B, Stop, 1, [])} end),
    Until = erlang:monotonic_time(millisecond) + ?STORM_MS,
    Restarts = disturb_until(fun(_) ->
                                     timer:sleep(2500),
                                     ok = erpc:call(B, application, stop, [teleport]),
                                     {ok, _} = erpc:call(B, application, ensure_all_started, [teleport])
                             end, Until, 0),
    atomics:put(Stop, 1, 1),
    Results = receive {sent, R} -> R
              after ?OUTCOME_BOUND_MS -> ct:fail({sender_stuck, erlang:process_info(Sender, current_stacktrace)})
              end,
    %% Afterwards the stream goes on.
    ok = wait_for(fun() -> teleport:send({?SINK, B}, {after_restarts, 0}) =:= ok end),
    Sink ! {report, self()},
    Got = receive {seqs, Sink, Seqs} -> Seqs after ?RPC_TIMEOUT -> ct:fail(sink_silent) end,
    Oks = [N || {N, ok} <- Results],
    Refused = [N || {N, {error, noconnection}} <- Results],
    Other = [X || {_, Res} = X <- Results, Res =/= ok, Res =/= {error, noconnection}],
    Dropped = maps:get(dropped_out, teleport:stats(B)) - DroppedBefore,
    ct:pal("~b restarts: ~b sends ok, ~b refused (noconnection), ~b ok'd but not arrived "
           "(dropped_out counted ~b)",
           [Restarts, length(Oks), length(Refused), length(Oks -- Got), Dropped]),
    ?assertEqual([], Other),
    ?assertEqual(Got, lists:usort(Got)),
    ?assertEqual([], Got -- Oks),
    ?assert(length(Refused) > 0),
    ?assert(length(Got) > 0).

seq_sender(B, Stop, N, Acc) ->
    case atomics:get(Stop, 1) of
        1 -> lists:reverse(Acc);
        0 ->
            Result = teleport:send({?SINK, B}, {seq, N}),
            %% Paced (about 10,000 a second): a stream, not a flood that fills the queue.
            _ = N rem 10 =:= 0 andalso timer:sleep(1),
            seq_sender(B, Stop, N + 1, [{N, Result} | Acc])
    end.

%% On B: keeps the sequence numbers it gets, newest first, outside teleport's
%% supervision (it outlives the restarts).
-spec seq_sink([integer()]) -> no_return().
seq_sink(Seqs) ->
    receive
        {seq, N} -> seq_sink([N | Seqs]);
        {report, To} -> To ! {seqs, self(), lists:reverse(Seqs)}, seq_sink(Seqs);
        _ -> seq_sink(Seqs)
    end.

%% ?STORM_CALLERS processes loop on infinity calls (every tenth request a big
%% one, for the decoders) while `Disturb(I)' runs over and over for ?STORM_MS;
%% then each must finish its call in progress within the bound.
storm(Config, Disturb, AllowedExits) ->
    B = ?config(b, Config),
    Mode = ?config(mode, Config),
    Self = self(),
    Stop = atomics:new(1, []),
    Callers = [spawn_link(fun() -> storm_caller(Mode, B, Self, Stop, N, #{}) end)
               || N <- lists:seq(1, ?STORM_CALLERS)],
    Until = erlang:monotonic_time(millisecond) + ?STORM_MS,
    Faults = disturb_until(Disturb, Until, 0),
    atomics:put(Stop, 1, 1),
    Tallies = [receive {storm_done, C, Tally} -> Tally
               after ?OUTCOME_BOUND_MS + 2 * ?UNREACHABLE_MS ->
                       ct:fail({caller_still_waiting, C, erlang:process_info(C, current_stacktrace)})
               end || C <- Callers],
    Total = lists:foldl(fun(T, Acc) -> maps:merge_with(fun(_, X, Y) -> X + Y end, T, Acc) end,
                        #{}, Tallies),
    ct:pal("~b callers, ~b disturbances over ~b ms: ~p", [?STORM_CALLERS, Faults, ?STORM_MS, Total]),
    Bad = maps:without([replies | AllowedExits], Total),
    ?assertEqual(#{}, Bad),
    ?assert(maps:get(replies, Total, 0) > 0).

disturb_until(Disturb, Until, I) ->
    case erlang:monotonic_time(millisecond) < Until of
        true -> Disturb(I), disturb_until(Disturb, Until, I + 1);
        false -> I
    end.

storm_caller(Mode, B, Parent, Stop, N, Tally) ->
    case atomics:get(Stop, 1) of
        1 ->
            Parent ! {storm_done, self(), Tally};
        0 ->
            Tag = {N, erlang:unique_integer()},
            Request = case rand:uniform(10) of
                          1 -> {Tag, ?BIG_TERM};
                          _ -> {Tag, small}
                      end,
            %% An RPC call's lost request is erpc's noconnection.
            Key = case call(Mode, B, {echo, Request}, infinity) of
                      {reply, Request} -> replies;
                      {reply, Other} -> {wrong_reply, Other};
                      {exit, {{request_lost, B}, _}} -> request_lost;
                      {exit, {{call_keeper_down, _}, _}} -> call_keeper_down;
                      {exit, {erpc, noconnection}} -> noconnection;
                      {exit, {Reason, _}} -> Reason
                  end,
            storm_caller(Mode, B, Parent, Stop, N,
                         maps:update_with(Key, fun(C) -> C + 1 end, 1, Tally))
    end.

%%====================================================================
%% Helpers
%%====================================================================

%% Holds a call's request in a process of `Module' (the decoders or the relays:
%% all suspended), runs `Fault(Holder, Names)' on the one that got it, resumes
%% the rest, and expects one of `Allowed'.
held_in(Config, Module, Fault, Allowed) ->
    B = ?config(b, Config),
    Names = erpc:call(B, Module, names, []),
    ok = erpc:call(B, ?MODULE, suspend, [Names]),
    Caller = call_async(Config, {echo, ?BIG_TERM}),
    ok = wait_for(fun() -> queued_on(B, Names) > 0 end),
    [Holder | _] = [P || {_, P, Len} <- erpc:call(B, ?MODULE, queued, [Names]), Len > 0],
    Fault(Holder, Names),
    ok = erpc:call(B, ?MODULE, resume, [Names]),
    expect(Caller, Allowed).

%% Stops teleport on B (while `Suspended' hold what they hold), lets them go on,
%% and starts it again.
restart_teleport(B, Suspended) ->
    Stopper = spawn_link(fun() -> ok = erpc:call(B, application, stop, [teleport], ?RPC_TIMEOUT) end),
    timer:sleep(100),
    ok = erpc:call(B, ?MODULE, resume, [Suspended]),
    ok = wait_for(fun() -> not is_process_alive(Stopper) end),
    {ok, _} = erpc:call(B, application, ensure_all_started, [teleport]).

lost(Config) ->
    case ?config(mode, Config) of
        gs_call -> {exit, {request_lost, ?config(b, Config)}};
        rpc -> {exit, {erpc, noconnection}}
    end.

%% B's teleport stopped: this node has seen its connections close. Until then a
%% request is queued on the old pool and lost with it (the queue step's request_lost),
%% which a busy machine makes likely.
pool_gone(B) ->
    ok = wait_for(fun() -> not lists:member(B, teleport:nodes()) end).

call_async(Config, Request) ->
    B = ?config(b, Config),
    Timeout = ?config(timeout, Config),
    Self = self(),
    Mode = ?config(mode, Config),
    spawn_link(fun() -> Self ! {outcome, self(), call(Mode, B, Request, Timeout)} end).

%% A gs_call to the server on B, or an RPC call that does what the server would.
call(rpc, B, Request, Timeout) ->
    try teleport_rpc:call(B, ?MODULE, rpc_serve, [Request], Timeout) of
        Reply -> {reply, Reply}
    catch
        error:{erpc, Reason} -> {exit, {erpc, Reason}};
        exit:{signal, Reason} -> {exit, {signal, Reason}}
    end;
call(gs_call, B, Request, Timeout) ->
    try teleport:gs_call({?SERVER, B}, Request, Timeout) of
        Reply -> {reply, Reply}
    catch
        exit:Reason -> {exit, Reason}
    end.

outcome(Caller, Within) ->
    receive
        {outcome, Caller, Outcome} -> Outcome
    after Within ->
            ct:fail({no_outcome_after, Within, erlang:process_info(Caller, current_stacktrace)})
    end.

%% The call's outcome must be one of `Allowed' (`{reply, R}' or `{exit, Reason}'
%% without gs_call's location), and come within the bound.
expect(Caller, Allowed) ->
    Started = erlang:monotonic_time(millisecond),
    Outcome = case outcome(Caller, ?OUTCOME_BOUND_MS) of
                  {exit, {Reason, {teleport, gs_call, _}}} -> {exit, Reason};
                  Other -> Other
              end,
    ct:pal("outcome ~P after ~b ms", [Outcome, 12, erlang:monotonic_time(millisecond) - Started]),
    ?assert(lists:member(Outcome, Allowed), {Outcome, Allowed}).

queued_on(B, Names) ->
    lists:sum([Len || {_, _, Len} <- erpc:call(B, ?MODULE, queued, [Names])]).

wait_for(Fun) ->
    case teleport_test_peer:wait_until(Fun, 10000) of
        true -> ok;
        false -> ct:fail(condition_never_held)
    end.

poll(Fun, Ms) ->
    case Fun() of
        false -> timer:sleep(Ms), poll(Fun, Ms);
        Found -> Found
    end.

%%% On B

-spec suspend([atom()]) -> ok.
suspend(Names) ->
    _ = [sys:suspend(whereis(N)) || N <- Names],
    ok.

-spec resume([atom()]) -> ok.
resume(Names) ->
    _ = [try sys:resume(whereis(N)) catch _:_ -> ok end || N <- Names],
    ok.

%% `{Name, Pid, MessageQueueLen}' of each registered process named.
-spec queued([atom()]) -> [{atom(), pid(), non_neg_integer()}].
queued(Names) ->
    [{N, P, Len} || N <- Names, P <- [whereis(N)], is_pid(P),
                    {message_queue_len, Len} <- [erlang:process_info(P, message_queue_len)]].

%% Whether a keeper on this node monitors its server (its first step: the call
%% reached the server's node and the server's end will be seen with its reason).
-spec keeper_watches_server() -> boolean().
keeper_watches_server() ->
    lists:any(fun(K) ->
                      case erlang:process_info(K, monitors) of
                          {monitors, [_ | _]} -> true;
                          _ -> false
                      end
              end, keepers()).

%% The RPC runners alive on this node.
-spec runners() -> [pid()].
runners() ->
    [P || P <- processes(), proc_lib:translate_initial_call(P) =:= {teleport_rpc_exec, runner, 5}].

%% What an RPC call in the `rpc' groups runs: the test server's requests.
-spec rpc_serve({echo, term()} | {delayed_reply, non_neg_integer(), term()}) -> term().
rpc_serve({echo, X}) -> X;
rpc_serve({delayed_reply, Ms, Reply}) -> timer:sleep(Ms), Reply.

%% The keepers alive on this node.
-spec keepers() -> [pid()].
keepers() ->
    [P || P <- processes(),
          element(1, proc_lib:translate_initial_call(P)) =:= teleport_call].

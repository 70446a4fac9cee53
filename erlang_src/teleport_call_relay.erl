%% @private
%% @doc Takes the gs_calls that arrive over teleport and starts a keeper for each
%% (teleport_call): the NIF can send to a registered process but not spawn one.
%%
%% The NIF hands a relay `{'$teleport_call', Dest, {Caller, CallerRef, Timeout}, Request}'.
%% The keeper is not linked to the relay, so a relay that dies or is restarted,
%% and teleport restarting, lose no call already under way. Several relays share
%% the load; the NIF picks one by hashing the call tuple and skips one that is
%% being restarted.
%%
%% A relay remembers the keepers it started until they end, to answer a
%% caller's probe (`Dest' = `?PROBE', same call tuple, so
%% the same relay, after the request on the same connection): `started' with
%% the keeper, or `unknown' when it holds none for that call. A keeper that
%% ends abnormally (killed) is reported to its caller at once. A relay stopped
%% by its supervisor (teleport stopping) first starts keepers for the calls
%% still in its mailbox and answers the probes there.
%%
%% Relays also take teleport_rpc's requests (see teleport_rpc_exec): RPC calls
%% (a runner that applies the function and delivers the outcome, kept and
%% reported as a keeper is, and announced on its behalf when its timer says it
%% is slow; a keeper and its worker for a `{Node, Key}' call), casts, probes of
%% `{Node, Key}' calls
%% (whose call tuple rides in the destination: the NIF hashes the key), and
%% large RPC outcomes for callers on this node, passed on to the caller's
%% alias. A relay holds the queues of the `{Node, Key}' requests that reach it
%% (teleport_rpc_keys) and starts each when the one before it on its key has
%% ended.
-module(teleport_call_relay).
-behaviour(gen_server).

-export([start_link/1, names/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").
-include("teleport_call.hrl").

%% The relay's registered name (runners' timers reach whichever relay has it),
%% CallerRef => Keeper (or runner), the keeper's monitor => {CallerRef, the
%% caller's node, what the process is: `keeper' or `{runner, Compression}'},
%% the keepers alive per caller node, when each kind of bounded log line was last
%% written with how many came since; the `{Node, Key}' requests' queues, the
%% workers of keyed calls that said they are ready (CallerRef => Worker), the
%% monitors of keyed workers (=> the request's id: a keyed call's worker from
%% its ready on, a keyed cast's from its start), and the keyed casts queued per
%% peer.
-type state() :: #{name := atom(),
                   keepers := #{reference() => pid()},
                   monitors := #{reference() => {reference(), node(), kind()}},
                   per_node := #{node() => pos_integer()},
                   logged := #{atom() => {integer(), non_neg_integer()}},
                   keys := teleport_rpc_keys:keys(),
                   workers := #{reference() => pid()},
                   running := #{reference() => reference()},
                   queued_casts := #{node() => pos_integer()}}.

-type kind() :: keeper | {runner, teleport_rpc_codec:compression()}.

-define(MALFORMED_LOG_MS, 10000).
%% Calls one peer node may have under way at once on this node, shared evenly by the
%% relays (the NIF spreads a peer's calls over them): a peer cannot make the node
%% spawn keepers until it runs out of processes.
-define(MAX_CALLS_PER_PEER, 10000).
%% `{Node, Key}' casts one peer may have queued here behind their keys' earlier
%% requests (shared by the relays likewise): the queues' memory is bounded.
-define(MAX_QUEUED_CASTS_PER_PEER, 100000).
-define(IS_CALL(Caller, Ref, Timeout),
        (is_pid(Caller) andalso is_reference(Ref)
         andalso (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)))).

-spec names() -> [atom()].
names() ->
    [list_to_atom("teleport_call_relay_" ++ integer_to_list(I))
     || I <- lists:seq(1, erlang:system_info(schedulers))].

-spec start_link(atom()) -> {ok, pid()} | {error, term()}.
start_link(Name) ->
    gen_server:start_link({local, Name}, ?MODULE, Name, []).

-spec init(atom()) -> {ok, state()}.
init(Name) ->
    %% So that a shutdown runs terminate/2, which hands on what is still queued.
    process_flag(trap_exit, true),
    %% Keepers inherit this group leader. Not the application's: stopping the
    %% application kills every process under its group leader, and a keeper
    %% must outlive a restart of teleport (the supervisor still stops relays).
    _ = is_pid(whereis(user)) andalso group_leader(whereis(user), self()),
    {ok, #{name => Name, keepers => #{}, monitors => #{}, per_node => #{}, logged => #{},
           keys => teleport_rpc_keys:new(), workers => #{}, running => #{},
           queued_casts => #{}}}.

-spec handle_call(term(), gen_server:from(), state()) -> {reply, {error, unsupported}, state()}.
handle_call(_Request, _From, State) ->
    {reply, {error, unsupported}, State}.

-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Request, State) ->
    {noreply, State}.

-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info({'$teleport_call', _, _, _} = Call, State) ->
    {noreply, take(Call, State)};
handle_info({'$teleport_ready', Ref, Worker}, State) when is_reference(Ref), is_pid(Worker) ->
    {noreply, ready(Ref, Worker, State)};
handle_info({'$teleport_slow', Ref, Runner}, State) when is_reference(Ref), is_pid(Runner) ->
    %% A runner's timer, which may reach a relay restarted since: announced if
    %% the runner still works (a late announcement is dropped with the alias).
    _ = is_process_alive(Runner) andalso erlang:send(Ref, {'$teleport_started', Ref, Runner}),
    {noreply, State};
handle_info({'DOWN', Mon, process, _, Reason}, #{monitors := Monitors, running := Running} = State) ->
    case {maps:take(Mon, Monitors), maps:take(Mon, Running)} of
        {{{Ref, Node, Kind}, Monitors1}, _} ->
            {noreply, keeper_down(Ref, Node, Kind, Reason, State#{monitors := Monitors1})};
        {error, {Id, Running1}} ->
            {noreply, worker_down(Id, State#{running := Running1})};
        {error, error} ->
            {noreply, State}
    end;
handle_info(Other, State) ->
    ?LOG_DEBUG(#{what => unexpected_message, message => Other}, #{domain => [teleport]}),
    {noreply, State}.

-spec terminate(term(), state()) -> ok.
terminate(_Reason, State) ->
    drain_keyed_casts(drain(State)).

drain(State) ->
    receive
        {'$teleport_call', _, _, _} = Call -> drain(take(Call, State))
    after 0 ->
            State
    end.

%% `{Node, Key}' casts still queued here run, each key's in their order, in a
%% process per key (workers of keyed calls waiting for their turn see this relay
%% go and run).
drain_keyed_casts(#{keys := Keys, running := Running}) ->
    RunningIds = maps:values(Running),
    teleport_rpc_keys:fold(
      fun(_Key, Requests, ok) ->
              Casts = [Cast || {Id, {cast, Cast}} <- Requests, not lists:member(Id, RunningIds)],
              _ = Casts =/= [] andalso spawn(teleport_rpc_exec, run_in_order, [Casts]),
              ok
      end, ok, Keys).

%%% Requests

%% gs_call probes, and those of `{Node, Key}' RPC calls.
take({'$teleport_call', ?PROBE, {Caller, Ref, _Timeout}, _}, State)
  when is_pid(Caller), is_reference(Ref) ->
    answer_probe(Ref, State);
take({'$teleport_call', {?PROBE, {Caller, Ref, _Timeout}}, _, _}, State)
  when is_pid(Caller), is_reference(Ref) ->
    answer_probe(Ref, State);
%% teleport_rpc.
take({'$teleport_call', ?RPC, {Caller, Ref, Timeout}, Request}, State)
  when ?IS_CALL(Caller, Ref, Timeout) ->
    rpc_call(Caller, Ref, Timeout, Request, none, State);
take({'$teleport_call', {?RPC, {Caller, Ref, Timeout}}, {?KEY, Key}, Request}, State)
  when ?IS_CALL(Caller, Ref, Timeout) ->
    rpc_call(Caller, Ref, Timeout, Request, {key, Key}, State);
take({'$teleport_call', ?CAST, Slot, Request} = Call, State) ->
    case teleport_rpc_exec:valid_cast(Request) of
        true -> rpc_cast(Slot, Request, State);
        false -> malformed(Call, State)
    end;
take({'$teleport_call', {?FORWARD, Ref, Msg}, _, _}, State) when is_reference(Ref) ->
    erlang:send(Ref, Msg),
    State;
%% gs_call.
take({'$teleport_call', Dest, {Caller, Ref, Timeout}, Request}, State)
  when (is_pid(Dest) orelse is_atom(Dest)), ?IS_CALL(Caller, Ref, Timeout) ->
    start_keeper(Ref, node(Caller), {teleport_call, keeper, [Dest, Caller, Ref, Timeout, Request]},
                 keeper, State);
take(Call, State) ->
    malformed(Call, State).

answer_probe(Ref, #{keepers := Keepers} = State) ->
    erlang:send(Ref, case Keepers of
                         #{Ref := Keeper} -> {'$teleport_started', Ref, Keeper};
                         #{} -> {'$teleport_unknown', Ref}
                     end),
    State.

%% A peer that passed the cookie check but sent a malformed call: dropped rather
%% than crash. Logged at most every ?MALFORMED_LOG_MS, bounded, without the request.
malformed({'$teleport_call', Dest, Call, _Request}, State) ->
    bounded_log(malformed_call, notice,
                #{dest => teleport_log:bounded(Dest), call => teleport_log:bounded(Call)}, State).

start_keeper(Ref, Node, {M, F, A}, Kind, #{keepers := Keepers, monitors := Monitors,
                                           per_node := PerNode} = State) ->
    Count = maps:get(Node, PerNode, 0),
    case Count >= ?MAX_CALLS_PER_PEER div length(names()) of
        true ->
            refuse(Node, Ref, State);
        false ->
            {Keeper, Mon} = proc_lib:spawn_opt(M, F, A, [monitor]),
            State#{keepers := Keepers#{Ref => Keeper}, monitors := Monitors#{Mon => {Ref, Node, Kind}},
                   per_node := PerNode#{Node => Count + 1}}
    end.

%% Over its share of ?MAX_CALLS_PER_PEER: the caller exits with the reason at once,
%% the refusal is counted (teleport:stats/1, refused_calls) and logged at most
%% every ?MALFORMED_LOG_MS.
refuse(Node, Ref, State) ->
    erlang:send(Ref, {'$teleport_down', Ref, undefined, {teleport, too_many_calls}}),
    teleport_relay_sup:count(refused_calls, Node),
    teleport_telemetry:execute([teleport, frame, refused], #{count => 1},
                               #{node => Node, kind => call, reason => too_many_calls}),
    bounded_log(too_many_calls, warning, #{peer => Node, limit => ?MAX_CALLS_PER_PEER}, State).

keeper_down(Ref, Node, Kind, Reason, #{keepers := Keepers, per_node := PerNode} = State) ->
    %% A keeper or runner ends normally once its outcome is out; one that was
    %% killed may not have told its caller it existed. A runner catches what its
    %% function raises: only an exit signal kills it, which erpc reports as such.
    _ = case {Reason, Kind} of
            {normal, _} ->
                ok;
            {_, keeper} ->
                erlang:send(Ref, {'$teleport_down', Ref, undefined, {call_keeper_down, Reason}});
            {_, {runner, Compression}} ->
                {reply, Outcome} = teleport_rpc_exec:ended(Ref, Reason, Compression),
                erlang:send(Ref, {'$teleport_reply', Ref, undefined, Outcome})
        end,
    PerNode1 = case PerNode of
                   #{Node := 1} -> maps:remove(Node, PerNode);
                   #{Node := N} -> PerNode#{Node := N - 1}
               end,
    keyed_call_over(Ref, State#{keepers := maps:remove(Ref, Keepers), per_node := PerNode1}).

%%% teleport_rpc

rpc_call(Caller, Ref, Timeout, Request, Key, State) ->
    Node = node(Caller),
    case teleport_rpc_exec:valid_call(Request) of
        false ->
            malformed({'$teleport_call', ?RPC, {Caller, Ref, Timeout}, Request}, State);
        true ->
            Module = element(1, Request),
            case teleport_rpc_exec:allowed(Module, element(2, Request)) of
                false ->
                    %% The caller's answer, as erpc would raise it: nothing ran.
                    erlang:send(Ref, {'$teleport_reply', Ref, undefined,
                                      {erpc, {module_not_allowed, Module}}}),
                    refuse_rpc(Node, Module, State);
                true ->
                    {MFA, Kind} =
                        case Key of
                            none ->
                                {{teleport_rpc_exec, runner,
                                  [Caller, Ref, Timeout, Request, maps:get(name, State)]},
                                 {runner, element(5, Request)}};
                            {key, _} ->
                                {{teleport_rpc_exec, keeper, [Caller, Ref, Timeout, Request, self()]},
                                 keeper}
                        end,
                    State1 = start_keeper(Ref, Node, MFA, Kind, State),
                    case {Key, State1} of
                        {{key, K}, #{keepers := #{Ref := _}}} -> queue_keyed(K, Ref, call, State1);
                        _ -> State1
                    end
            end
    end.

rpc_cast(Slot, {From, M, F, Args, GroupLeader}, State) ->
    Node = node(From),
    Cast = {Node, M, F, Args, GroupLeader},
    case {teleport_rpc_exec:allowed(M, F), Slot} of
        {false, _} ->
            refuse_rpc(Node, M, State);
        {true, {?KEY, Key}} ->
            queue_keyed_cast(Key, Cast, State);
        {true, _} ->
            _ = spawn(teleport_rpc_exec, cast_worker, tuple_to_list(Cast)),
            State
    end.

%% The `rpc_modules' setting refuses `Module': counted (refused_rpcs), logged.
refuse_rpc(Node, Module, State) ->
    teleport_relay_sup:count(refused_rpcs, Node),
    bounded_log(rpc_module_not_allowed, notice, #{peer => Node, module => Module}, State).

queue_keyed_cast(Key, {Node, _, _, _, _} = Cast, #{queued_casts := Queued} = State) ->
    Count = maps:get(Node, Queued, 0),
    case Count >= ?MAX_QUEUED_CASTS_PER_PEER div length(names()) of
        true ->
            teleport_relay_sup:count(refused_casts, Node),
            bounded_log(too_many_keyed_casts, warning,
                        #{peer => Node, limit => ?MAX_QUEUED_CASTS_PER_PEER}, State);
        false ->
            queue_keyed(Key, make_ref(), {cast, Cast},
                        State#{queued_casts := Queued#{Node => Count + 1}})
    end.

queue_keyed(Key, Id, Entry, #{keys := Keys} = State) ->
    case teleport_rpc_keys:push(Key, Id, Entry, Keys) of
        {true, Keys1} -> start_keyed({Id, Entry}, State#{keys := Keys1});
        {false, Keys1} -> State#{keys := Keys1}
    end.

%% A keyed request's turn has come: a cast's worker starts; a call's worker
%% (started by its keeper) is told, once it has said it is ready.
start_keyed(none, State) ->
    State;
start_keyed({Id, {cast, Cast}}, #{running := Running} = State) ->
    {_, Mon} = erlang:spawn_opt(teleport_rpc_exec, cast_worker, tuple_to_list(Cast), [monitor]),
    State#{running := Running#{Mon => Id}};
start_keyed({Ref, call}, #{workers := Workers} = State) ->
    _ = case Workers of
            #{Ref := Worker} -> Worker ! {'$teleport_turn', Ref};
            #{} -> ok
        end,
    State.

%% A keyed call's worker is ready: from now on its entry lasts as long as it does
%% (the keeper may end first: a caller that gave up), and it runs in its turn.
ready(Ref, Worker, #{keys := Keys, workers := Workers, running := Running} = State) ->
    case teleport_rpc_keys:member(Ref, Keys) of
        true ->
            _ = teleport_rpc_keys:is_head(Ref, Keys) andalso (Worker ! {'$teleport_turn', Ref}),
            Mon = erlang:monitor(process, Worker),
            State#{workers := Workers#{Ref => Worker}, running := Running#{Mon => Ref}};
        false ->
            %% Its keeper ended before the worker said it was ready: nothing to keep
            %% it in order with.
            Worker ! {'$teleport_turn', Ref},
            State
    end.

%% A keyed request's worker ended: the next on its key starts.
worker_down(Id, #{workers := Workers} = State) ->
    dequeue(Id, State#{workers := maps:remove(Id, Workers)}).

%% A keyed call's keeper ended: if no worker of its said it was ready (the
%% keeper was killed), it leaves the queue; else the worker holds its place.
keyed_call_over(Ref, #{workers := Workers} = State) ->
    case Workers of
        #{Ref := _} -> State;
        #{} -> dequeue(Ref, State)
    end.

dequeue(Id, #{keys := Keys, queued_casts := Queued} = State) ->
    {Entry, Next, Keys1} = teleport_rpc_keys:remove(Id, Keys),
    Queued1 = case Entry of
                  {cast, {Node, _, _, _, _}} ->
                      case Queued of
                          #{Node := 1} -> maps:remove(Node, Queued);
                          #{Node := N} -> Queued#{Node := N - 1}
                      end;
                  _ ->
                      Queued
              end,
    start_keyed(Next, State#{keys := Keys1, queued_casts := Queued1}).

%%% Logging

%% Logs one line of kind `What' at most every ?MALFORMED_LOG_MS, with how many
%% were not logged since the last.
bounded_log(What, Level, Report, #{logged := Logged} = State) ->
    Now = erlang:monotonic_time(millisecond),
    {LastLog, Unlogged} = maps:get(What, Logged, {Now - ?MALFORMED_LOG_MS, 0}),
    case Now - LastLog >= ?MALFORMED_LOG_MS of
        true ->
            ?LOG(Level, Report#{what => What, unlogged_since_last => Unlogged},
                 #{domain => [teleport]}),
            State#{logged := Logged#{What => {Now, 0}}};
        false ->
            State#{logged := Logged#{What => {LastLog, Unlogged + 1}}}
    end.

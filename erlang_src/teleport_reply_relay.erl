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
-module(teleport_reply_relay).
-behaviour(gen_server).

-export([start_link/1, names/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").
-include("teleport_call.hrl").

%% CallerRef => Keeper, the keeper's monitor => {CallerRef, the caller's node},
%% the keepers alive per caller node, and when a malformed call or a refusal was
%% last logged, with how many came since.
-type state() :: #{keepers := #{reference() => pid()},
                   monitors := #{reference() => {reference(), node()}},
                   per_node := #{node() => pos_integer()},
                   malformed := {integer(), non_neg_integer()},
                   refused := {integer(), non_neg_integer()}}.

-define(MALFORMED_LOG_MS, 10000).
%% Calls one peer node may have under way at once on this node, shared evenly by the
%% relays (the NIF spreads a peer's calls over them): a peer cannot make the node
%% spawn keepers until it runs out of processes.
-define(MAX_CALLS_PER_PEER, 10000).

-spec names() -> [atom()].
names() ->
    [list_to_atom("teleport_reply_relay_" ++ integer_to_list(I))
     || I <- lists:seq(1, erlang:system_info(schedulers))].

-spec start_link(atom()) -> {ok, pid()} | {error, term()}.
start_link(Name) ->
    gen_server:start_link({local, Name}, ?MODULE, [], []).

-spec init([]) -> {ok, state()}.
init([]) ->
    %% So that a shutdown runs terminate/2, which hands on what is still queued.
    process_flag(trap_exit, true),
    %% Keepers inherit this group leader. Not the application's: stopping the
    %% application kills every process under its group leader, and a keeper
    %% must outlive a restart of teleport (the supervisor still stops relays).
    _ = is_pid(whereis(user)) andalso group_leader(whereis(user), self()),
    LongAgo = erlang:monotonic_time(millisecond) - ?MALFORMED_LOG_MS,
    {ok, #{keepers => #{}, monitors => #{}, per_node => #{},
           malformed => {LongAgo, 0}, refused => {LongAgo, 0}}}.

-spec handle_call(term(), gen_server:from(), state()) -> {reply, {error, unsupported}, state()}.
handle_call(_Request, _From, State) ->
    {reply, {error, unsupported}, State}.

-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Request, State) ->
    {noreply, State}.

-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info({'$teleport_call', _, _, _} = Call, State) ->
    {noreply, take(Call, State)};
handle_info({'DOWN', Mon, process, _, Reason},
            #{keepers := Keepers, monitors := Monitors, per_node := PerNode} = State) ->
    case maps:take(Mon, Monitors) of
        {{Ref, Node}, Monitors1} ->
            %% A keeper ends normally once its outcome is out; one that was killed may
            %% not have told its caller it existed.
            _ = Reason =:= normal orelse
                erlang:send(Ref, {'$teleport_down', Ref, undefined, {call_keeper_down, Reason}}),
            PerNode1 = case PerNode of
                           #{Node := 1} -> maps:remove(Node, PerNode);
                           #{Node := N} -> PerNode#{Node := N - 1}
                       end,
            {noreply, State#{keepers := maps:remove(Ref, Keepers), monitors := Monitors1,
                             per_node := PerNode1}};
        error ->
            {noreply, State}
    end;
handle_info(Other, State) ->
    ?LOG_DEBUG(#{what => unexpected_message, message => Other}, #{domain => [teleport]}),
    {noreply, State}.

-spec terminate(term(), state()) -> ok.
terminate(_Reason, State) ->
    drain(State).

drain(State) ->
    receive
        {'$teleport_call', _, _, _} = Call -> drain(take(Call, State))
    after 0 ->
            ok
    end.

take({'$teleport_call', ?PROBE, {Caller, Ref, _Timeout}, _}, #{keepers := Keepers} = State)
  when is_pid(Caller), is_reference(Ref) ->
    erlang:send(Ref, case Keepers of
                         #{Ref := Keeper} -> {'$teleport_started', Ref, Keeper};
                         #{} -> {'$teleport_unknown', Ref}
                     end),
    State;
take({'$teleport_call', Dest, {Caller, Ref, Timeout}, Request}, State)
  when (is_pid(Dest) orelse is_atom(Dest)), is_pid(Caller), is_reference(Ref),
       (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)) ->
    start_keeper(Dest, Caller, Ref, Timeout, Request, State);
take({'$teleport_call', Dest, Call, _Request}, #{malformed := {LastLog, Unlogged}} = State) ->
    %% A peer that passed the cookie check but sent a malformed call: dropped
    %% rather than crash. Logged at most every ?MALFORMED_LOG_MS, bounded, without
    %% the request.
    Now = erlang:monotonic_time(millisecond),
    case Now - LastLog >= ?MALFORMED_LOG_MS of
        true ->
            ?LOG_NOTICE(#{what => malformed_call, dest => teleport_log:bounded(Dest),
                          call => teleport_log:bounded(Call), unlogged_since_last => Unlogged},
                        #{domain => [teleport]}),
            State#{malformed := {Now, 0}};
        false ->
            State#{malformed := {LastLog, Unlogged + 1}}
    end.

start_keeper(Dest, Caller, Ref, Timeout, Request,
             #{keepers := Keepers, monitors := Monitors, per_node := PerNode} = State) ->
    Node = node(Caller),
    Count = maps:get(Node, PerNode, 0),
    case Count >= ?MAX_CALLS_PER_PEER div length(names()) of
        true ->
            refuse(Node, Ref, State);
        false ->
            {Keeper, Mon} = proc_lib:spawn_opt(teleport_call, keeper,
                                               [Dest, Caller, Ref, Timeout, Request], [monitor]),
            State#{keepers := Keepers#{Ref => Keeper}, monitors := Monitors#{Mon => {Ref, Node}},
                   per_node := PerNode#{Node => Count + 1}}
    end.

%% Over its share of ?MAX_CALLS_PER_PEER: the caller exits with the reason at once,
%% the refusal is counted (teleport:stats/1, refused_calls) and logged at most
%% every ?MALFORMED_LOG_MS.
refuse(Node, Ref, #{refused := {LastLog, Unlogged}} = State) ->
    erlang:send(Ref, {'$teleport_down', Ref, undefined, {teleport, too_many_calls}}),
    teleport_relay_sup:count(refused_calls, Node),
    Now = erlang:monotonic_time(millisecond),
    case Now - LastLog >= ?MALFORMED_LOG_MS of
        true ->
            ?LOG_WARNING(#{what => too_many_calls, peer => Node, limit => ?MAX_CALLS_PER_PEER,
                           unlogged_since_last => Unlogged}, #{domain => [teleport]}),
            State#{refused := {Now, 0}};
        false ->
            State#{refused := {LastLog, Unlogged + 1}}
    end.

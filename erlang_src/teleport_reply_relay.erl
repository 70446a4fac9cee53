%% @private
%% @doc Makes gs_calls that arrive over teleport, on the caller's behalf.
%%
%% The NIF hands a relay `{'$teleport_call', Dest, {Caller, CallerRef, Timeout}, Request}'.
%% The relay monitors Dest, then sends it `{'$gen_call', {self(), Mon}, Request}',
%% so the server sees an ordinary gen_server call. Whatever happens next goes
%% back to the caller over teleport: `{CallerRef, Reply}', or
%% `{'$teleport_down', CallerRef, Reason}' if the server dies first. Monitoring
%% here, on the server's node and before the request is delivered, is what
%% makes the exit reason exact (a monitor set up from the caller's node over
%% disterl could arrive after the server had already died, and say `noproc').
%% Several relays share the load; the NIF picks one by hashing the call.
-module(teleport_reply_relay).
-behaviour(gen_server).

-export([start_link/1, names/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-include_lib("kernel/include/logger.hrl").

%% Calls in flight: monitor ref -> where the outcome goes.
-type state() :: #{reference() => {pid(), reference(), reference() | infinity}}.

-spec names() -> [atom()].
names() ->
    [list_to_atom("teleport_reply_relay_" ++ integer_to_list(I))
     || I <- lists:seq(1, erlang:system_info(schedulers))].

-spec start_link(atom()) -> {ok, pid()} | {error, term()}.
start_link(Name) ->
    gen_server:start_link({local, Name}, ?MODULE, [], []).

-spec init([]) -> {ok, state()}.
init([]) ->
    {ok, #{}}.

-spec handle_call(term(), gen_server:from(), state()) -> {reply, {error, unsupported}, state()}.
handle_call(_Request, _From, State) ->
    {reply, {error, unsupported}, State}.

-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Request, State) ->
    {noreply, State}.

-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info({'$teleport_call', Dest, {Caller, CallerRef, Timeout}, Request}, State)
  when (is_pid(Dest) orelse is_atom(Dest)), is_pid(Caller), is_reference(CallerRef),
       (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)) ->
    Mon = erlang:monitor(process, Dest),
    %% An unregistered name raises here; the monitor already says noproc.
    catch erlang:send(Dest, {'$gen_call', {self(), Mon}, Request}),
    %% Forget the call once the caller has given up on it, so a server that
    %% never answers cannot grow this map.
    Timer = case Timeout of
                infinity -> infinity;
                _ -> erlang:start_timer(Timeout, self(), {expired, Mon})
            end,
    {noreply, State#{Mon => {Caller, CallerRef, Timer}}};
handle_info({'$teleport_call', _Dest, _Call, _Request} = Bad, State) ->
    %% A peer that passed the cookie check but sent a malformed call: drop it
    %% rather than crash (a crash would restart teleport's runtime).
    ?LOG_NOTICE(#{what => malformed_call, call => Bad}, #{domain => [teleport]}),
    {noreply, State};
handle_info({Mon, Reply}, State) when is_map_key(Mon, State) ->
    erlang:demonitor(Mon, [flush]),
    {{Caller, CallerRef, Timer}, State1} = maps:take(Mon, State),
    cancel(Timer),
    forward(Caller, {CallerRef, Reply}),
    {noreply, State1};
handle_info({'DOWN', Mon, process, _, Reason}, State) when is_map_key(Mon, State) ->
    {{Caller, CallerRef, Timer}, State1} = maps:take(Mon, State),
    cancel(Timer),
    forward(Caller, {'$teleport_down', CallerRef, Reason}),
    {noreply, State1};
handle_info({timeout, _Timer, {expired, Mon}}, State) ->
    erlang:demonitor(Mon, [flush]),
    {noreply, maps:remove(Mon, State)};
handle_info(Other, State) ->
    %% Late replies to expired calls, strays: never let them pile up.
    ?LOG_DEBUG(#{what => unexpected_message, message => Other}, #{domain => [teleport]}),
    {noreply, State}.

forward(Caller, Msg) ->
    case teleport:send(Caller, Msg) of
        ok -> ok;
        {error, Reason} ->
            ?LOG_DEBUG(#{what => call_outcome_not_sent, caller => Caller, reason => Reason},
                       #{domain => [teleport]})
    end.

cancel(infinity) -> ok;
cancel(Timer) -> _ = erlang:cancel_timer(Timer, [{async, true}, {info, false}]), ok.

%% @private
%% @doc Takes the gs_calls that arrive over teleport and starts a keeper for each
%% (teleport_call): the NIF can send to a registered process but not spawn one.
%%
%% The NIF hands a relay `{'$teleport_call', Dest, {Caller, CallerRef, Timeout}, Request}'.
%% The keeper is not linked to the relay, so a relay that dies or is restarted,
%% and teleport restarting, lose no call already under way. Several relays share
%% the load; the NIF picks one by hashing the call and skips one being restarted.
-module(teleport_reply_relay).
-behaviour(gen_server).

-export([start_link/1, names/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-include_lib("kernel/include/logger.hrl").

-spec names() -> [atom()].
names() ->
    [list_to_atom("teleport_reply_relay_" ++ integer_to_list(I))
     || I <- lists:seq(1, erlang:system_info(schedulers))].

-spec start_link(atom()) -> {ok, pid()} | {error, term()}.
start_link(Name) ->
    gen_server:start_link({local, Name}, ?MODULE, [], []).

-spec init([]) -> {ok, no_state}.
init([]) ->
    %% Keepers inherit this group leader. Not the application's: stopping the
    %% application kills every process under its group leader, and a keeper
    %% must outlive a restart of teleport (the supervisor still stops relays).
    _ = is_pid(whereis(user)) andalso group_leader(whereis(user), self()),
    {ok, no_state}.

-spec handle_call(term(), gen_server:from(), no_state) -> {reply, {error, unsupported}, no_state}.
handle_call(_Request, _From, State) ->
    {reply, {error, unsupported}, State}.

-spec handle_cast(term(), no_state) -> {noreply, no_state}.
handle_cast(_Request, State) ->
    {noreply, State}.

-spec handle_info(term(), no_state) -> {noreply, no_state}.
handle_info({'$teleport_call', Dest, {Caller, CallerRef, Timeout}, Request}, State)
  when (is_pid(Dest) orelse is_atom(Dest)), is_pid(Caller), is_reference(CallerRef),
       (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)) ->
    _ = proc_lib:spawn(teleport_call, keeper, [Dest, Caller, CallerRef, Timeout, Request]),
    {noreply, State};
handle_info({'$teleport_call', _Dest, _Call, _Request} = Bad, State) ->
    %% A peer that passed the cookie check but sent a malformed call: drop it
    %% rather than crash.
    ?LOG_NOTICE(#{what => malformed_call, call => Bad}, #{domain => [teleport]}),
    {noreply, State};
handle_info(Other, State) ->
    ?LOG_DEBUG(#{what => unexpected_message, message => Other}, #{domain => [teleport]}),
    {noreply, State}.

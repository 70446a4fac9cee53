%% @private
%% @doc Carries gs_call replies back over teleport. A call arriving over
%% teleport is delivered as `{'$gen_call', {Relay, Tag}, Request}'; the server's
%% reply comes here as `{Tag, Reply}' and goes on to the caller with
%% teleport:send/2. Several relays share the load; the NIF picks one by the tag.
-module(teleport_reply_relay).
-behaviour(gen_server).

-export([start_link/1, names/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-include_lib("kernel/include/logger.hrl").

-spec names() -> [atom()].
names() ->
    [list_to_atom("teleport_reply_relay_" ++ integer_to_list(I))
     || I <- lists:seq(1, erlang:system_info(schedulers))].

start_link(Name) ->
    gen_server:start_link({local, Name}, ?MODULE, [], []).

init([]) ->
    {ok, #{}}.

handle_call(_Request, _From, State) ->
    {reply, {error, unsupported}, State}.

handle_cast(_Request, State) ->
    {noreply, State}.

handle_info({{'$teleport_reply', Caller, Mref}, Reply}, State) ->
    case teleport:send(Caller, {Mref, Reply}) of
        ok -> ok;
        {error, Reason} ->
            ?LOG_DEBUG(#{what => reply_not_sent, caller => Caller, reason => Reason},
                       #{domain => [teleport]})
    end,
    {noreply, State};
handle_info(Other, State) ->
    %% Never let strays pile up in the mailbox.
    ?LOG_DEBUG(#{what => unexpected_message, message => Other}, #{domain => [teleport]}),
    {noreply, State}.

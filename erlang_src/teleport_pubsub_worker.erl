%% @private
%% @doc One of a node's `teleport_pubsub' workers: a member of one `pg' group,
%% registered under the group's name (so `direct_broadcast' can name it on a
%% node), it hands what other nodes broadcast to this node's subscribers.
-module(teleport_pubsub_worker).
-behaviour(gen_server).

-export([start_link/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(SCOPE, 'Elixir.Phoenix.PubSub').

-spec start_link(atom(), atom()) -> gen_server:start_ret().
start_link(PubSub, Group) ->
    gen_server:start_link({local, Group}, ?MODULE, {PubSub, Group}, []).

init({PubSub, Group}) ->
    ok = pg:join(?SCOPE, Group, self()),
    {ok, PubSub}.

handle_call(_Request, _From, PubSub) ->
    {reply, {error, unsupported}, PubSub}.

handle_cast(_Request, PubSub) ->
    {noreply, PubSub}.

handle_info({forward_to_local, Topic, Message, Dispatcher}, PubSub) ->
    ok = local_broadcast(PubSub, Topic, Message, Dispatcher),
    {noreply, PubSub};
handle_info(_Other, PubSub) ->
    {noreply, PubSub}.

%% Phoenix.PubSub is Elixir's, loaded by the application using the adapter: named
%% through a variable, as xref and dialyzer cannot know it when teleport is built.
local_broadcast(PubSub, Topic, Message, Dispatcher) ->
    Module = 'Elixir.Phoenix.PubSub',
    Module:local_broadcast(PubSub, Topic, Message, Dispatcher).

%% @doc A `Phoenix.PubSub' adapter whose broadcasts cross nodes over teleport.
%%
%% ```
%% {Phoenix.PubSub, name: MyApp.PubSub, adapter: :teleport_pubsub}
%% '''
%%
%% It implements the callbacks of the `Phoenix.PubSub.Adapter' behaviour
%% (`node_name/1', `child_spec/1', `broadcast/4', `direct_broadcast/5'; the
%% attribute is left out because the behaviour is Elixir's, absent when
%% teleport is built) and keeps the semantics of the default adapter,
%% `Phoenix.PubSub.PG2':
%% <ul>
%% <li>Membership comes from `pg', in the scope of phoenix_pubsub (`Phoenix.PubSub'): each
%%     node runs `pool_size' workers, each in its own `pg' group, named as the
%%     default adapter names them (the adapter name, then `<adapter name>_2' ...).
%%     A broadcast goes to the workers of one group on every other node; the
%%     worker dispatches it to the node's subscribers.</li>
%% <li>`broadcast_pool_size' (default `pool_size', at most `pool_size'): the
%%     number of groups this node broadcasts to. A process always picks the same
%%     group (by a hash of its pid), so its broadcasts reach each node in the
%%     order it made them, through one worker.</li>
%% <li>The messages are the default adapter's (`{forward_to_local, Topic,
%%     Message, Dispatcher}'), and so are the groups: nodes running either
%%     adapter under one PubSub name reach each other (a rolling migration).</li>
%% </ul>
%% What changes is the carrier: `teleport:send/2' instead of `!', so a large
%% broadcast does not delay other traffic to a node (disterl's ticks, calls,
%% small broadcasts of other processes). Where teleport cannot carry a message
%% (teleport does not run on the peer, or it refuses the message, e.g. over
%% `max_frame_bytes'), it goes over distributed Erlang, as the default adapter
%% would send it: nothing is dropped that the default adapter would deliver.
-module(teleport_pubsub).
-behaviour(supervisor).

%% Phoenix.PubSub.Adapter
-export([node_name/1, child_spec/1, broadcast/4, direct_broadcast/5]).
%% Supervision
-export([start_link/1, init/1]).

-export_type([option/0]).

%% phoenix_pubsub's pg scope (started by its application).
-define(SCOPE, 'Elixir.Phoenix.PubSub').

-type option() :: {name, atom()} | {adapter_name, atom()}
                | {pool_size, pos_integer()} | {broadcast_pool_size, pos_integer()}
                | {atom(), term()}.
%% What `Phoenix.PubSub' passes its adapter: its own options (a keyword list),
%% with `adapter_name' added.

%% @doc This node's name, as the default adapter gives it.
-spec node_name(atom()) -> node().
node_name(_AdapterName) ->
    node().

%% @doc The adapter's supervisor, for the supervision tree of `Phoenix.PubSub'.
-spec child_spec([option()]) -> supervisor:child_spec().
child_spec(Opts) ->
    #{id => ?MODULE, start => {?MODULE, start_link, [Opts]}, type => supervisor}.

%% @doc Sends `Message' to the subscribers of `Topic' on every other node that runs
%% this PubSub (its local subscribers are Phoenix.PubSub's to reach).
-spec broadcast(atom(), binary(), term(), module()) -> ok.
broadcast(AdapterName, Topic, Message, Dispatcher) ->
    Forward = {forward_to_local, Topic, Message, Dispatcher},
    Here = node(),
    _ = [forward(Worker, Forward)
         || Worker <- pg:get_members(?SCOPE, group(AdapterName)), node(Worker) =/= Here],
    ok.

%% @doc Sends `Message' to the subscribers of `Topic' on `Node' (which may be this
%% node). A node that is not reachable gets nothing, as with the default adapter.
-spec direct_broadcast(atom(), node(), binary(), term(), module()) -> ok.
direct_broadcast(AdapterName, Node, Topic, Message, Dispatcher) ->
    forward({group(AdapterName), Node}, {forward_to_local, Topic, Message, Dispatcher}).

%% @private
-spec start_link([option()]) -> supervisor:startlink_ret().
start_link(Opts) ->
    PubSub = fetch(name, Opts),
    AdapterName = fetch(adapter_name, Opts),
    PoolSize = proplists:get_value(pool_size, Opts, 1),
    BroadcastPoolSize = proplists:get_value(broadcast_pool_size, Opts, PoolSize),
    if
        not (is_integer(PoolSize) andalso PoolSize >= 1) ->
            {error, {bad_pool_size, PoolSize}};
        not (is_integer(BroadcastPoolSize) andalso BroadcastPoolSize >= 1) ->
            {error, {bad_broadcast_pool_size, BroadcastPoolSize}};
        BroadcastPoolSize > PoolSize ->
            %% A node must listen on every group it broadcasts to (the others
            %% may still run the smaller pool: see broadcast_pool_size).
            {error, {broadcast_pool_size_over_pool_size, BroadcastPoolSize, PoolSize}};
        true ->
            supervisor:start_link(?MODULE, {PubSub, AdapterName, PoolSize, BroadcastPoolSize})
    end.

%% @private
init({PubSub, AdapterName, PoolSize, BroadcastPoolSize}) ->
    Groups = groups(AdapterName, PoolSize),
    %% Read on every broadcast: a literal for every process, copied by none.
    persistent_term:put(AdapterName, list_to_tuple(lists:sublist(Groups, BroadcastPoolSize))),
    Workers = [#{id => Group, start => {teleport_pubsub_worker, start_link, [PubSub, Group]}}
               || Group <- Groups],
    {ok, {#{strategy => one_for_one}, Workers}}.

%%% Internal

%% The default adapter's group names: the first is the adapter's name itself (so
%% nodes of pool_size 1, and of phoenix_pubsub 2.0, meet the others in it).
groups(AdapterName, PoolSize) ->
    [AdapterName | [list_to_atom(atom_to_list(AdapterName) ++ "_" ++ integer_to_list(N))
                    || N <- lists:seq(2, PoolSize)]].

%% The group this process broadcasts to: always the same one.
group(AdapterName) ->
    Groups = persistent_term:get(AdapterName),
    element(1 + erlang:phash2(self(), tuple_size(Groups)), Groups).

%% Over teleport; what teleport cannot carry, over distributed Erlang.
forward(Dest, Message) ->
    case teleport:send(Dest, Message) of
        ok -> ok;
        {error, _} ->
            _ = erlang:send(Dest, Message),
            ok
    end.

fetch(Key, Opts) ->
    case proplists:get_value(Key, Opts) of
        undefined -> erlang:error({missing_option, Key}, [Opts]);
        Value -> Value
    end.

%% @private
%% @doc Supervises the processes the NIF's I/O threads hand work to: the call relays
%% (calls) and the decoders (frames decoded on a dirty scheduler), one_for_one:
%% one that crashes is restarted alone, without touching the runtime and its pools.
-module(teleport_relay_sup).
-behaviour(supervisor).

-export([start_link/0, init/1, count/2, counters/0]).

%% Counts of what the relays refused, per peer node ({Name, Node} => N).
-define(COUNTERS, teleport_relay_counters).

-spec start_link() -> supervisor:startlink_ret().
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% Owned by this supervisor: it outlives its relays.
    ?COUNTERS = ets:new(?COUNTERS, [named_table, public, {write_concurrency, true}]),
    Relays = [#{id => Name, start => {teleport_call_relay, start_link, [Name]}}
              || Name <- teleport_call_relay:names()],
    Decoders = [#{id => Name, start => {teleport_decoder, start_link, [Name]}}
                || Name <- teleport_decoder:names()],
    {ok, {#{strategy => one_for_one, intensity => 10, period => 10}, Relays ++ Decoders}}.

%% @doc Counts one `Name' (e.g. `refused_calls') for the peer `Node' (nothing
%% while teleport is not running).
-spec count(atom(), node()) -> ok.
count(Name, Node) ->
    try ets:update_counter(?COUNTERS, {Name, Node}, 1, {{Name, Node}, 0}) of
        _ -> ok
    catch
        error:badarg -> ok
    end.

%% @doc Every count, by peer node: `#{Node => #{Name => N}}' (empty if teleport is
%% not running).
-spec counters() -> #{node() => #{atom() => non_neg_integer()}}.
counters() ->
    try ets:tab2list(?COUNTERS) of
        Counts ->
            lists:foldl(fun({{Name, Node}, N}, Acc) ->
                                maps:update_with(Node, fun(M) -> M#{Name => N} end,
                                                 #{Name => N}, Acc)
                        end, #{}, Counts)
    catch
        error:badarg -> #{}
    end.

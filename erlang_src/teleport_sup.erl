%% @private
%% @doc Top supervisor. Order matters: call relays exist before the runtime
%% can deliver a call, and the connector needs the runtime. rest_for_one: a
%% restarted runtime means fresh pools, so the connector restarts with it.
-module(teleport_sup).
-behaviour(supervisor).

-export([start_link/0, init/1]).

start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

init([]) ->
    Relays = #{id => teleport_relay_sup,
               start => {teleport_relay_sup, start_link, []},
               type => supervisor},
    Runtime = #{id => teleport_runtime,
                start => {teleport_runtime, start_link, []},
                shutdown => 30000},
    Connector = #{id => teleport_connector,
                  start => {teleport_connector, start_link, []}},
    {ok, {#{strategy => rest_for_one, intensity => 5, period => 10},
          [Relays, Runtime, Connector]}}.

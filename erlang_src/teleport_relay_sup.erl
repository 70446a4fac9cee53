%% @private
%% @doc Supervises the reply relays, one_for_one: a relay that crashes is
%% restarted alone, without touching the runtime and its pools.
-module(teleport_relay_sup).
-behaviour(supervisor).

-export([start_link/0, init/1]).

-spec start_link() -> supervisor:startlink_ret().
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    Relays = [#{id => Name, start => {teleport_reply_relay, start_link, [Name]}}
              || Name <- teleport_reply_relay:names()],
    {ok, {#{strategy => one_for_one, intensity => 10, period => 10}, Relays}}.

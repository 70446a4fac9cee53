%% @private
%% @doc Supervises the processes reader threads hand work to: the reply relays
%% (calls) and the decoders (frames decoded on a dirty scheduler), one_for_one:
%% one that crashes is restarted alone, without touching the runtime and its pools.
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
    Decoders = [#{id => Name, start => {teleport_decoder, start_link, [Name]}}
                || Name <- teleport_decoder:names()],
    {ok, {#{strategy => one_for_one, intensity => 10, period => 10}, Relays ++ Decoders}}.

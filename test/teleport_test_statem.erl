%%% @doc A gen_statem for teleport's tests, started on peer nodes (not linked).
%%% Calls: `{echo, X}' replies `X'; `whoami' replies `node()'; `{stop, Reason}'
%%% stops with `Reason' without replying.
-module(teleport_test_statem).
-behaviour(gen_statem).

-export([start/1, start_anon/0]).
-export([callback_mode/0, init/1, ready/3]).

%% @doc Starts the state machine registered locally as `Name'.
-spec start(atom()) -> {ok, pid()} | {error, term()}.
start(Name) when is_atom(Name) ->
    gen_statem:start({local, Name}, ?MODULE, [], []).

%% @doc Starts an unregistered state machine.
-spec start_anon() -> {ok, pid()} | {error, term()}.
start_anon() ->
    gen_statem:start(?MODULE, [], []).

%% @private
callback_mode() ->
    state_functions.

%% @private
init([]) ->
    {ok, ready, #{}}.

%% @private
ready({call, From}, {echo, X}, _Data) ->
    {keep_state_and_data, [{reply, From, X}]};
ready({call, From}, whoami, _Data) ->
    {keep_state_and_data, [{reply, From, node()}]};
ready({call, _From}, {stop, Reason}, _Data) ->
    {stop, Reason};
ready({call, From}, Other, _Data) ->
    {keep_state_and_data, [{reply, From, {unknown_call, Other}}]};
ready(_EventType, _Event, _Data) ->
    keep_state_and_data.

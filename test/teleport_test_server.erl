%%% @doc A gen_server for teleport's tests, started on peer nodes. Not linked
%%% to whoever starts it, so it outlives the erpc process that starts it.
%%%
%%% Calls:
%%% <ul>
%%% <li>`{echo, X}' replies `X'.</li>
%%% <li>`{sleep, Ms}' sleeps `Ms' milliseconds, then replies `ok'.</li>
%%% <li>`{stop, Reason}' stops with `Reason' without replying, so the caller
%%%     sees the exit reason.</li>
%%% <li>`{delayed_reply, Ms, X}' returns at once; a helper process replies `X'
%%%     with `gen_server:reply/2' after `Ms' milliseconds.</li>
%%% <li>`whoami' replies `node()'.</li>
%%% </ul>
%%% Cast `{forward, Pid, X}' does `Pid ! {cast_received, X}' (a plain send).
-module(teleport_test_server).
-behaviour(gen_server).

-export([start/1, start_anon/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% @doc Starts the server registered locally as `Name'.
-spec start(atom()) -> {ok, pid()} | {error, term()}.
start(Name) when is_atom(Name) ->
    gen_server:start({local, Name}, ?MODULE, [], []).

%% @doc Starts an unregistered server.
-spec start_anon() -> {ok, pid()} | {error, term()}.
start_anon() ->
    gen_server:start(?MODULE, [], []).

%% @private
init([]) ->
    {ok, #{}}.

%% @private
handle_call({echo, X}, _From, State) ->
    {reply, X, State};
handle_call({sleep, Ms}, _From, State) when is_integer(Ms), Ms >= 0 ->
    timer:sleep(Ms),
    {reply, ok, State};
handle_call({stop, Reason}, _From, State) ->
    {stop, Reason, State};
handle_call({delayed_reply, Ms, X}, From, State) when is_integer(Ms), Ms >= 0 ->
    _ = spawn(fun() ->
                      timer:sleep(Ms),
                      gen_server:reply(From, X)
              end),
    {noreply, State};
handle_call(whoami, _From, State) ->
    {reply, node(), State};
%% The OS clock when the call arrived: on one host it splits a call's time into
%% its way there and its way back.
handle_call(clock, _From, State) ->
    {reply, os:system_time(microsecond), State};
handle_call(Other, _From, State) ->
    {reply, {unknown_call, Other}, State}.

%% @private
handle_cast({forward, Pid, X}, State) ->
    Pid ! {cast_received, X},
    {noreply, State};
handle_cast(_Other, State) ->
    {noreply, State}.

%% @private
handle_info(_Other, State) ->
    {noreply, State}.

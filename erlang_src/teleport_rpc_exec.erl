%% @private
%% @doc What a node runs for teleport_rpc's requests from its peers: relays
%% (teleport_call_relay) take them from call frames, check them against the
%% `rpc_modules' setting, and start these processes.
%%
%% A call runs on gs_call's protocol (teleport_call). The relay starts a fresh
%% process for it, as erpc's `spawn_request' does, which applies the function
%% with `erpc:execute_call/4' (so results, exceptions and stack traces are
%% erpc's own) and delivers the outcome as a keeper does: small outcomes over
%% disterl, large ones over teleport to a relay on the caller's node, which
%% passes them to the caller's alias (a late one is dropped there).
%% <ul>
%% <li>An unkeyed call's process is a runner ({@link runner/5}): it applies the
%%     function and delivers the outcome itself. Its relay monitors it and
%%     reports it if it is killed (`{signal, Reason}', as erpc does), and
%%     announces it to the caller if the call takes over 100 ms (a timer the
%%     runner sets), so that the caller can watch it as it watches a keeper.
%%     One process per call: a keeper beside the worker cost a quarter of the
%%     calls per second with many concurrent callers (BENCHMARKS.md).</li>
%% <li>A `{Node, Key}' call needs a keeper ({@link keeper/5}): its worker waits
%%     for its turn before it applies the function, and the keeper watches it as
%%     a gs_call keeper watches its server.</li>
%% </ul>
%% A call that times out is not stopped: as with erpc, the function runs to its
%% end and its result is dropped.
%%
%% A cast is a worker alone (`erpc:execute_cast/3'). Requests to `{Node, Key}'
%% reach one relay per key (the NIF picks the relay by the key), in the order
%% sent (one connection per key), and run one at a time: a keyed call's worker
%% reports ready and waits for its turn; a keyed cast's worker starts when the
%% one before it has ended. A worker waiting for its turn runs at once if the
%% relay dies (teleport stopping): nothing waits forever, and the order is kept
%% only while teleport runs.
%%
%% Workers take the caller's group leader, as erpc's do: output goes to the
%% caller's node.
-module(teleport_rpc_exec).

-export([runner/5, keeper/5, worker/5, cast_worker/5, run_in_order/1, allowed/2, valid_call/1,
         valid_cast/1, ended/3]).
-export_type([call_request/0, cast_request/0, outcome/0]).

-include("teleport_call.hrl").

-type call_request() :: {module(), atom(), list() | tuple(), pid(),
                         teleport_rpc_codec:compression()}.
%% `{M, F, Args, GroupLeader, Compression}': Args possibly compressed; results
%% over the compression's threshold go back compressed.
-type cast_request() :: {pid(), module(), atom(), list() | tuple(), pid()}.
%% `{From, M, F, Args, GroupLeader}'.
-type outcome() :: {return, term()} | {throw, term()} | {exit, term()}
                 | {error, term(), list()} | {erpc, term()} | {signal, term()}.
%% How an apply ended, whatever ran it (see teleport_rpc): `{return, Value}',
%% the exceptions erpc passes on (`throw', `exit' (raised as
%% `exit({exception, R})'), `error' with its stack), an `{erpc, Reason}' error,
%% or `{signal, Reason}': the process was killed by an exit signal.

%% @doc The body of an unkeyed RPC call's runner (spawned by the relay
%% registered as `Relay'): applies the function and delivers the outcome. The
%% timer tells the relay, whichever process has the name by then, to announce a
%% runner still working after ?ANNOUNCE_AFTER_MS.
-spec runner(pid(), reference(), timeout(), call_request(), atom()) -> ok.
runner(Caller, Ref, Timeout, {M, F, Args, GroupLeader, Compression}, Relay) ->
    Deadline = teleport_call:deadline(Timeout),
    true = group_leader(GroupLeader, self()),
    Slow = erlang:send_after(?ANNOUNCE_AFTER_MS, Relay, {'$teleport_slow', Ref, self()}),
    %% The apply ends the process with its outcome: caught here, as the outcome
    %% still has to be delivered.
    Outcome = try apply_call(Ref, {M, F, Args}, node(Caller)) catch exit:Ended -> Ended end,
    _ = erlang:cancel_timer(Slow, [{async, true}, {info, false}]),
    teleport_call:deliver_outcome(ended(Ref, Outcome, Compression), Caller, Ref, Deadline).

%% @doc The body of a `{Node, Key}' RPC call's keeper (spawned by a relay).
%% `Turn' is the relay whose turn the call waits for.
-spec keeper(pid(), reference(), timeout(), call_request(), pid()) -> ok.
keeper(Caller, Ref, Timeout, {M, F, Args, GroupLeader, Compression}, Turn) ->
    {_, Mon} = erlang:spawn_opt(?MODULE, worker,
                                [Ref, {M, F, Args}, GroupLeader, Turn, node(Caller)], [monitor]),
    OnDown = fun(Reason) -> ended(Ref, Reason, Compression) end,
    teleport_call:serve(Mon, Caller, Ref, Timeout,
                        #{announce => when_slow, on_down => OnDown, large => forward}).

%% @doc What the caller gets for a call's process that ended with `Reason' (its
%% exit reason, as `erpc:execute_call/4' or an exit signal made it), packed as
%% the call's compression says: a keeper's, a runner's, or a relay's for a
%% runner killed.
-spec ended(reference(), term(), teleport_rpc_codec:compression()) -> teleport_call:outcome().
ended(Ref, Reason, Compression) ->
    {reply, teleport_rpc_codec:pack(normalize(Ref, Reason), Compression)}.

%% @doc The process that applies a call's function; it ends with erpc's exit
%% reason for it (`{Ref, return, Value}', ...), which its keeper turns into an
%% {@link outcome()}.
-spec worker(reference(), {module(), atom(), list() | tuple()}, pid(), pid(), node()) ->
    no_return().
worker(Ref, MFA, GroupLeader, Turn, Peer) ->
    true = group_leader(GroupLeader, self()),
    wait_turn(Ref, Turn),
    apply_call(Ref, MFA, Peer).

%% Applies a call's function; ends the process with erpc's exit reason for it.
-spec apply_call(reference(), {module(), atom(), list() | tuple()}, node()) -> no_return().
apply_call(Ref, {M, F, Args}, Peer) ->
    case teleport_rpc_codec:unpack(Args, Peer) of
        {ok, A} -> erpc:execute_call(Ref, M, F, A);
        {error, Why} -> exit({Ref, error, {erpc, Why}})
    end.

%% A `{Node, Key}' call's worker tells the relay it is ready and waits for the
%% calls before it on its key; if the relay dies meanwhile, it runs.
wait_turn(Ref, Relay) ->
    Mon = erlang:monitor(process, Relay),
    Relay ! {'$teleport_ready', Ref, self()},
    receive
        {'$teleport_turn', Ref} -> erlang:demonitor(Mon, [flush]), ok;
        {'DOWN', Mon, process, _, _} -> ok
    end.

%% @doc The process that applies a cast's function (as `erpc:cast/4''s does).
-spec cast_worker(node(), module(), atom(), list() | tuple(), pid()) -> term().
cast_worker(Peer, M, F, Args, GroupLeader) ->
    true = group_leader(GroupLeader, self()),
    case teleport_rpc_codec:unpack(Args, Peer) of
        {ok, A} -> erpc:execute_cast(M, F, A);
        {error, _} -> ok
    end.

%% @doc Runs `{Node, Key}' casts a stopping relay still held, one after the other
%% in their order, each in a worker of its own (spawned by the relay as it stops,
%% one such process per key).
-spec run_in_order([{node(), module(), atom(), list() | tuple(), pid()}]) -> ok.
run_in_order(Casts) ->
    lists:foreach(fun({Peer, M, F, A, GroupLeader}) ->
                          {_, Mon} = erlang:spawn_opt(?MODULE, cast_worker,
                                                      [Peer, M, F, A, GroupLeader], [monitor]),
                          receive {'DOWN', Mon, process, _, _} -> ok end
                  end, Casts).

%% @doc Whether the `rpc_modules' setting lets peers call `Module:Function'.
%% teleport_rpc:sbcast/3's function is always allowed: it does no more than
%% teleport:send/2 to a registered name.
-spec allowed(module(), atom()) -> boolean().
allowed(teleport_rpc, sbcast_here) ->
    true;
allowed(Module, _Function) ->
    case application:get_env(teleport, rpc_modules, all) of
        all -> true;
        {only, Modules} -> lists:member(Module, Modules);
        {except, Modules} -> not lists:member(Module, Modules);
        _ -> false
    end.

%% @doc Whether a call's request is well formed.
-spec valid_call(term()) -> boolean().
valid_call({M, F, Args, GroupLeader, Compression}) ->
    is_atom(M) andalso is_atom(F) andalso valid_args(Args) andalso is_pid(GroupLeader)
        andalso teleport_rpc_codec:valid(Compression);
valid_call(_) ->
    false.

%% @doc Whether a cast's request is well formed.
-spec valid_cast(term()) -> boolean().
valid_cast({From, M, F, Args, GroupLeader}) ->
    is_pid(From) andalso is_atom(M) andalso is_atom(F) andalso valid_args(Args)
        andalso is_pid(GroupLeader);
valid_cast(_) ->
    false.

valid_args(Args) when is_list(Args) -> true;
valid_args({'$teleport_z', Bin}) -> is_binary(Bin);
valid_args(_) -> false.

%% A worker's exit reason as an outcome(), as erpc reads a spawned
%% process's `DOWN' reason (`Ref' tags erpc's own results).
-spec normalize(reference(), term()) -> outcome().
normalize(Ref, {Ref, return, Value}) -> {return, Value};
normalize(Ref, {Ref, throw, Value}) -> {throw, Value};
normalize(Ref, {Ref, exit, Reason}) -> {exit, Reason};
normalize(Ref, {Ref, error, Reason, Stack}) -> {error, Reason, Stack};
normalize(Ref, {Ref, error, {erpc, Reason}}) -> {erpc, Reason};
normalize(_Ref, noconnection) -> {erpc, noconnection};
normalize(_Ref, Reason) -> {signal, Reason}.

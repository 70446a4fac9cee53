%% @private
%% @doc The `gs_call' protocol: the caller's side (`call/5') and the keeper, a
%% process spawned on the server's node for each call (`keeper/5').
%%
%% The request and the reply travel over teleport; disterl carries only small
%% control messages. Its aim: a call's answer is never lost while the caller,
%% the server and both nodes live, whatever happens to relays, connections or
%% teleport itself on either side; and no side waits forever.
%%
%% <ol>
%% <li>The caller makes an alias `Ref', watches the server's node
%%     (`monitor_node', no message), and sends
%%     `{Dest, {Caller, Ref, Timeout}, Request}' as a call frame.</li>
%% <li>On the server's node a relay spawns a keeper (unlinked: killing relays or
%%     restarting teleport does not touch it). The keeper tells the caller it
%%     exists (`started', over disterl), monitors the server and sends it an
%%     ordinary `$gen_call' with itself as `From'.</li>
%% <li>The keeper forwards the outcome (the reply, or the server's exit reason)
%%     over teleport, then keeps it until the caller acknowledges. If the pool
%%     that carried it changed in the meantime (closed, reopened, teleport
%%     restarted), the frame may be lost: the keeper sends the outcome again
%%     over disterl, to the alias, which drops it if the caller already has
%%     one. If teleport cannot take it at all, it goes over disterl at once.</li>
%% <li>A caller that never heard of a keeper, while its own pool to the server's
%%     node changed, gives up after a grace period: the request may be lost.
%%     A keeper that dies before the caller has the outcome is seen by a
%%     monitor the caller sets on it once the call has taken a second.</li>
%% </ol>
%%
%% Slow paths (a call over a second, a keeper waiting for its acknowledgement)
%% check every `?TICK_MS'; the fast path costs two small disterl messages
%% (started, ack) and no monitors across nodes.
-module(teleport_call).

-export([call/5, keeper/5]).

-define(TICK_MS, 1000).
%% Ticks a caller waits for its keeper after its pool changed under the request.
-define(LOST_REQUEST_TICKS, 2).

-type outcome() :: {reply, term()} | {down, term()}.

%%% Caller

%% @doc Calls `Target' (a pid or a name) on `Node' over teleport. Returns the
%% reply or exits with `{Reason, {teleport, gs_call, [Dest, Request, Timeout]}}'.
-spec call(node(), pid() | atom(), teleport:dest(), term(), timeout()) -> term().
call(Node, Target, Dest, Request, Timeout) ->
    Deadline = deadline(Timeout),
    Ref = erlang:alias(),
    true = erlang:monitor_node(Node, true),
    Before = teleport_nif:pool_generation(Node),
    Sent = teleport:send_frame(Node, call, {Target, {self(), Ref, Timeout}, Request}),
    After = teleport_nif:pool_generation(Node),
    Wait = #{ref => Ref, node => Node, dest => Dest, request => Request, timeout => Timeout,
             deadline => Deadline, keeper => undefined, keeper_mon => undefined,
             %% A pool that changed between the two readings may have lost the frame
             %% already; one opened by this send (none before) is fine.
             sent_on => case Before of
                            none -> After;
                            _ -> Before
                        end,
             suspect => 0},
    case Sent of
        ok -> await(Wait);
        {error, noconnection} -> fail({nodedown, Node}, Wait);
        {error, Reason} -> fail(Reason, Wait)
    end.

await(#{ref := Ref, node := Node, keeper := Keeper, keeper_mon := KeeperMon} = Wait) ->
    receive
        {'$teleport_reply', Ref, From, Reply} ->
            ack(From, Ref),
            done(Wait),
            Reply;
        {'$teleport_down', Ref, From, Reason} ->
            ack(From, Ref),
            fail(Reason, Wait);
        {'$teleport_started', Ref, From} when Keeper =:= undefined ->
            await(Wait#{keeper := From});
        {nodedown, Node} ->
            fail({nodedown, Node}, Wait);
        {'DOWN', KeeperMon, process, _, Reason} when is_reference(KeeperMon) ->
            %% Keepers exit only after the outcome left over disterl (which would
            %% have arrived first) or once acknowledged: this outcome is gone.
            fail({call_keeper_down, Reason}, Wait#{keeper_mon := undefined})
    after tick(Wait) ->
            check(Wait)
    end.

%% A tick: the deadline, the keeper's monitor, a request that may be lost.
check(#{deadline := Deadline} = Wait) ->
    case remaining(Deadline) of
        0 -> fail(timeout, Wait);
        _ -> await(watch(Wait))
    end.

watch(#{keeper := undefined, node := Node, sent_on := SentOn, suspect := Suspect} = Wait) ->
    case teleport_nif:pool_generation(Node) of
        SentOn when Suspect =:= 0 -> Wait;
        _ when Suspect >= ?LOST_REQUEST_TICKS -> fail({request_lost, Node}, Wait);
        _ -> Wait#{suspect := Suspect + 1}
    end;
watch(#{keeper := Keeper, keeper_mon := undefined} = Wait) ->
    Wait#{keeper_mon := erlang:monitor(process, Keeper)};
watch(Wait) ->
    Wait.

ack(Keeper, Ref) when is_pid(Keeper) ->
    erlang:send(Keeper, {'$teleport_ack', Ref}, [noconnect]),
    ok;
ack(undefined, _Ref) ->
    ok.

done(#{ref := Ref, node := Node, keeper_mon := KeeperMon}) ->
    erlang:unalias(Ref),
    _ = is_reference(KeeperMon) andalso erlang:demonitor(KeeperMon, [flush]),
    erlang:monitor_node(Node, false),
    receive {nodedown, Node} -> ok after 0 -> ok end.

-spec fail(term(), map()) -> no_return().
fail(Reason, #{dest := Dest, request := Request, timeout := Timeout} = Wait) ->
    done(Wait),
    exit({Reason, {teleport, gs_call, [Dest, Request, Timeout]}}).

%%% Keeper (on the server's node)

%% @doc The body of a call's keeper, spawned by a relay.
-spec keeper(pid() | atom(), pid(), reference(), timeout(), term()) -> ok.
keeper(Dest, Caller, Ref, Timeout, Request) ->
    Deadline = deadline(Timeout),
    erlang:send(Ref, {'$teleport_started', Ref, self()}),
    Mon = erlang:monitor(process, Dest),
    %% An unregistered name raises here; the monitor already says noproc.
    try erlang:send(Dest, {'$gen_call', {self(), Mon}, Request}) catch error:badarg -> ok end,
    case await_server(Mon, Caller, Deadline, undefined) of
        {outcome, Outcome} -> deliver(Outcome, Caller, Ref, Deadline);
        caller_gone -> ok
    end.

-spec await_server(reference(), pid(), integer() | infinity, reference() | undefined) ->
    {outcome, outcome()} | caller_gone.
await_server(Mon, Caller, Deadline, CallerMon) ->
    receive
        {Mon, Reply} ->
            erlang:demonitor(Mon, [flush]),
            {outcome, {reply, Reply}};
        {'DOWN', Mon, process, _, Reason} ->
            {outcome, {down, Reason}};
        {'DOWN', CallerMon, process, _, _} ->
            erlang:demonitor(Mon, [flush]),
            caller_gone
    after tick(#{deadline => Deadline}) ->
            case remaining(Deadline) of
                0 ->
                    %% The caller has given up: so do we (the server's reply is dropped).
                    erlang:demonitor(Mon, [flush]),
                    caller_gone;
                _ ->
                    await_server(Mon, Caller, Deadline, watch_caller(Caller, CallerMon))
            end
    end.

%% Sends the outcome over teleport and keeps it until the caller has it.
deliver(Outcome, Caller, Ref, Deadline) ->
    Node = node(Caller),
    Msg = message(Outcome, Ref),
    Generation = teleport_nif:pool_generation(Node),
    case teleport:send(Caller, Msg) of
        ok -> await_ack(Msg, Caller, Ref, Node, Generation, Deadline, undefined);
        {error, _} -> resend(Ref, Msg)
    end.

await_ack(Msg, Caller, Ref, Node, Generation, Deadline, CallerMon) ->
    receive
        {'$teleport_ack', Ref} ->
            demonitor_caller(CallerMon);
        {'DOWN', CallerMon, process, _, _} ->
            ok
    after tick(#{deadline => Deadline}) ->
            case {remaining(Deadline), teleport_nif:pool_generation(Node)} of
                {0, _} ->
                    demonitor_caller(CallerMon);
                {_, Generation} ->
                    await_ack(Msg, Caller, Ref, Node, Generation, Deadline,
                              watch_caller(Caller, CallerMon));
                {_, _Changed} ->
                    demonitor_caller(CallerMon),
                    resend(Ref, Msg)
            end
    end.

%% Over disterl, to the alias: dropped by the caller's VM if it already has one.
resend(Ref, Msg) ->
    erlang:send(Ref, Msg),
    ok.

message({reply, Reply}, Ref) -> {'$teleport_reply', Ref, self(), Reply};
message({down, Reason}, Ref) -> {'$teleport_down', Ref, self(), Reason}.

%% Watching the caller costs two disterl messages, so only slow calls pay it.
watch_caller(Caller, undefined) -> erlang:monitor(process, Caller);
watch_caller(_Caller, CallerMon) -> CallerMon.

demonitor_caller(undefined) -> ok;
demonitor_caller(CallerMon) -> erlang:demonitor(CallerMon, [flush]), ok.

%%% Time

deadline(infinity) -> infinity;
deadline(Timeout) -> erlang:monotonic_time(millisecond) + Timeout.

remaining(infinity) -> infinity;
remaining(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

tick(#{deadline := Deadline}) ->
    case remaining(Deadline) of
        infinity -> ?TICK_MS;
        Left -> min(Left, ?TICK_MS)
    end.

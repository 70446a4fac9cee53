%% @private
%% @doc The `gs_call' protocol: the caller's side (`call/5') and the keeper, a
%% process spawned on the server's node for each call (`keeper/5').
%%
%% The request travels over teleport, and so does a large reply; small replies
%% and control messages take disterl. Its aim: a call's answer is never lost while the caller,
%% the server and both nodes live, whatever happens to relays, connections or
%% teleport itself on either side; and no side waits forever.
%%
%% <ol>
%% <li>The caller makes an alias `Ref', watches the server's node
%%     (`monitor_node', no message), and sends
%%     `{Dest, {Caller, Ref, Timeout}, Request}' as a call frame.</li>
%% <li>On the server's node a relay spawns a keeper (unlinked: killing relays or
%%     restarting teleport does not touch it). The keeper monitors the server and
%%     sends it an ordinary `$gen_call' with itself as `From'; if the server has
%%     not answered within `?ANNOUNCE_AFTER_MS' (at once for an `infinity'
%%     call), it tells the caller it exists (`started', over disterl).</li>
%% <li>An outcome (the reply, or the server's exit reason) of up to
%%     `?DISTERL_REPLY_MAX' bytes goes back over disterl to the caller's alias,
%%     as gen_server's own reply would. A larger one goes over teleport, and
%%     the keeper keeps it until the caller acknowledges. If the pool
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
%% check every `?TICK_MS'. A fast call with a small reply costs one spawn and
%% no control message; a large reply, one acknowledgement over disterl.
-module(teleport_call).

-export([call/5, keeper/5]).

-define(TICK_MS, 1000).
%% A keeper whose server has not answered by then tells the caller it exists.
-define(ANNOUNCE_AFTER_MS, 100).
%% Outcomes up to this size (external format) go back over disterl. An
%% acknowledgement over disterl cost a small call ~50 us (p50, 2 cores); a
%% reply this small holds up nothing behind it.
-define(DISTERL_REPLY_MAX, 65536).
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
             sent_on => After,
             %% A pool that closed (or a runtime that changed) while the frame was
             %% being queued may have taken it along; one opened for it is fine.
             suspect => case Before =/= none andalso pool_closed_since(Before, After) of
                            true -> 1;
                            false -> 0
                        end},
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
    case pool_closed_since(SentOn, teleport_nif:pool_generation(Node)) of
        false when Suspect =:= 0 -> Wait;
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
    Mon = erlang:monitor(process, Dest),
    %% An unregistered name raises here; the monitor already says noproc.
    try erlang:send(Dest, {'$gen_call', {self(), Mon}, Request}) catch error:badarg -> ok end,
    %% A call without a timeout must learn of a keeper killed however early.
    AnnounceAfter = case Timeout of
                        infinity -> 0;
                        _ -> ?ANNOUNCE_AFTER_MS
                    end,
    Outcome = case await_server(Mon, AnnounceAfter, Deadline) of
                  {outcome, _} = Early ->
                      Early;
                  slow ->
                      %% Only a call still running tells its caller it exists: fast
                      %% ones cost no disterl message for it.
                      erlang:send(Ref, {'$teleport_started', Ref, self()}),
                      watch_server(Mon, Caller, Deadline, undefined)
              end,
    case Outcome of
        {outcome, Result} -> deliver(Result, Caller, Ref, Deadline);
        caller_gone -> ok
    end.

%% The server's answer within `Ms', or `slow'.
await_server(Mon, Ms, Deadline) ->
    receive
        {Mon, Reply} ->
            erlang:demonitor(Mon, [flush]),
            {outcome, {reply, Reply}};
        {'DOWN', Mon, process, _, Reason} ->
            {outcome, {down, Reason}}
    after min(Ms, tick(#{deadline => Deadline})) ->
            slow
    end.

-spec watch_server(reference(), pid(), integer() | infinity, reference() | undefined) ->
    {outcome, outcome()} | caller_gone.
watch_server(Mon, Caller, Deadline, CallerMon) ->
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
                    watch_server(Mon, Caller, Deadline, watch_caller(Caller, CallerMon))
            end
    end.

%% A small outcome goes over disterl, as gen_server's own reply would: one
%% message, reliable while the nodes are connected (else the caller sees
%% nodedown), and no acknowledgement to wait for. A large one goes over
%% teleport, and is kept until the caller has it.
deliver(Outcome, Caller, Ref, Deadline) ->
    Msg = message(Outcome, Ref),
    case erlang:external_size(Msg) =< ?DISTERL_REPLY_MAX of
        true -> resend(Ref, Msg);
        false -> deliver_over_teleport(Msg, Caller, Ref, Deadline)
    end.

deliver_over_teleport(Msg, Caller, Ref, Deadline) ->
    Node = node(Caller),
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
            case {remaining(Deadline),
                  pool_closed_since(Generation, teleport_nif:pool_generation(Node))} of
                {0, _} ->
                    demonitor_caller(CallerMon);
                {_, false} ->
                    await_ack(Msg, Caller, Ref, Node, Generation, Deadline,
                              watch_caller(Caller, CallerMon));
                {_, true} ->
                    demonitor_caller(CallerMon),
                    resend(Ref, Msg)
            end
    end.

%% Over disterl, to the alias: dropped by the caller's VM if it already has one.
%% Nothing to acknowledge (the keeper field is cleared): disterl does not lose it.
resend(Ref, Msg) ->
    erlang:send(Ref, setelement(3, Msg, undefined)),
    ok.

message({reply, Reply}, Ref) -> {'$teleport_reply', Ref, self(), Reply};
message({down, Reason}, Ref) -> {'$teleport_down', Ref, self(), Reason}.

%% Whether the pool a frame was queued on (`pool_generation' read then) may have
%% closed since: a close counted since, or another runtime altogether.
pool_closed_since({Runtime, _, Closed}, {Runtime, _, Closed}) -> false;
pool_closed_since(_Then, _Now) -> true.

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

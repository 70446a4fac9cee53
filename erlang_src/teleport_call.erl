%% @private
%% @doc The `gs_call' protocol: the caller's side (`call/5') and the keeper, a
%% process spawned on the server's node for each call (`keeper/5').
%%
%% The request travels over teleport, and so does a large reply; small replies
%% and control messages take disterl. Its aim: a call's answer is never lost while
%% the caller, the server and both nodes live, whatever happens to relays,
%% connections or teleport itself on either side; and every wait ends, with the
%% reply or an exit that says what happened.
%%
%% <ol>
%% <li>The caller makes an alias `Ref', watches the server's node
%%     (`monitor_node', no message), and sends
%%     `{Dest, {Caller, Ref, Timeout}, Request}' as a call frame. If teleport
%%     cannot reach the node although disterl can (teleport restarting there),
%%     it tries again, within the call's time and at most `?UNREACHABLE_MS'.</li>
%% <li>On the server's node a relay spawns a keeper (unlinked: killing relays or
%%     restarting teleport does not touch it) and keeps its pid until it ends.
%%     The keeper monitors the server and sends it an ordinary `$gen_call'
%%     with itself as `From'; if the server has not answered within
%%     `?ANNOUNCE_AFTER_MS' (at once for an `infinity' call), it tells the
%%     caller it exists (`started', over disterl).</li>
%% <li>An outcome (the reply, or the server's exit reason) of up to
%%     `?DISTERL_REPLY_MAX' bytes goes back over disterl to the caller's alias,
%%     as gen_server's own reply would. A larger one goes over teleport, and
%%     the keeper keeps it until the caller acknowledges. If the pool
%%     that carried it changed in the meantime (closed, reopened, teleport
%%     restarted), the frame may be lost: the keeper sends the outcome again
%%     over disterl, to the alias, which drops it if the caller already has
%%     one. If teleport cannot take it at all, it goes over disterl at once.</li>
%% <li>A caller that has not heard of a keeper for `?PROBE_AFTER_MS' sends a
%%     probe after its request: a call frame to `?PROBE' with the same call
%%     tuple, so it takes the same connection (behind the request, whatever
%%     the request's size) and the same relay. Whatever became of the request
%%     has happened by the time the relay reads the probe: the relay names the
%%     request's keeper if it has one (`started'), or says it has none
%%     (`unknown'): the request was lost on the way (a relay or decoder killed
%%     with it, a connection closed under it, no process to take it), and the
%%     call exits `{request_lost, Node}'. Probes are repeated, less and less
%%     often, while none is answered.</li>
%% <li>A keeper that dies before the caller has the outcome is seen by a
%%     monitor the caller sets on it once the call has taken a second.</li>
%% </ol>
%%
%% An unkeyed teleport_rpc call has no keeper: its runner (teleport_rpc_exec)
%% applies the function and then does a keeper's delivery itself
%% ({@link deliver_outcome/4}), and its relay announces it when slow and reports
%% it killed. Everything above holds with the runner in the keeper's place.
%%
%% Slow paths (a call over a second, a keeper waiting for its acknowledgement)
%% check every `?TICK_MS'. A fast call with a small reply costs one spawn and
%% no control message; a large reply, one acknowledgement over disterl.
%%
%% teleport_rpc runs its calls on the same protocol: {@link request/4} is the
%% caller's side whatever the request (the frames it sends are the caller's to
%% make), and {@link serve/5} the keeper's once it has started the work (a
%% `$gen_call' to a server for gs_call; for an RPC, a process that applies the
%% function: see teleport_rpc_exec).
-module(teleport_call).

-export([call/5, request/4, request/5, keeper/5, serve/5, deliver_outcome/4, deadline/1]).
-export_type([frames/0, outcome/0, serve_opts/0, request_opts/0]).

-include("teleport_call.hrl").

-define(TICK_MS, 1000).
%% Outcomes up to this size (external format) go back over disterl. An
%% acknowledgement over disterl cost a small call ~50 us (p50, 2 cores); a
%% reply this small holds up nothing behind it.
-define(DISTERL_REPLY_MAX, 65536).
%% A caller without news of a keeper this long probes; unanswered probes are
%% repeated after twice as long each time, up to `?PROBE_MAX_MS'.
-define(PROBE_AFTER_MS, ?TICK_MS).
-define(PROBE_MAX_MS, 16 * ?TICK_MS).
%% How long a call waits for teleport on a node that disterl reaches (teleport
%% restarting there), to send its request or a probe.
-define(UNREACHABLE_MS, 10000).
%% Pauses between attempts to reach teleport there.
-define(RETRY_MIN_MS, 20).
-define(RETRY_MAX_MS, 500).

-type outcome() :: {reply, term()} | {down, term()}.
%% What a keeper sends back: the server's reply, or its exit reason.
-type frames() :: fun((Call :: {pid(), reference(), timeout()}) ->
                             {Request :: term(), Probe :: term()}).
%% Makes a request's call frame and its probe frame from the call tuple
%% `{Caller, Ref, Timeout}' (see {@link request/4}).
-type serve_opts() :: #{announce := at_once | when_slow,
                        on_down := fun((term()) -> outcome()),
                        large := direct | forward}.
%% How a keeper serves (see {@link serve/5}).
-type request_opts() :: #{sent => fun((ok | {error, term()}) -> term()),
                          watch => reference(),
                          keeper_down => fun((term()) -> term())}.
%% See {@link request/5}.

%%% Caller

%% @doc Calls `Target' (a pid or a name) on `Node' over teleport. Returns the
%% reply or exits with `{Reason, {teleport, gs_call, [Dest, Request, Timeout]}}'.
-spec call(node(), pid() | atom(), teleport:dest(), term(), timeout()) -> term().
call(Node, Target, Dest, Request, Timeout) ->
    Frames = fun(Call) -> {{Target, Call, Request}, {?PROBE, Call, probe}} end,
    case request(Node, Frames, erlang:phash2(self()), Timeout) of
        {ok, Reply} -> Reply;
        {error, Reason} -> exit({Reason, {teleport, gs_call, [Dest, Request, Timeout]}})
    end.

%% @doc The caller's side of one request: makes the call tuple
%% `{self(), Ref, Timeout}' (`Ref' an alias), sends the call frame `Frames'
%% makes from it on the connection `ConnKey' picks, and waits (probing with
%% the probe frame when a second passes without news of a keeper). Returns
%% `{ok, Reply}' (a keeper's reply) or `{error, Reason}': a keeper's `down'
%% outcome, or why the protocol ended the call (`timeout', `{nodedown, Node}',
%% `{request_lost, Node}', `{teleport_unreachable, Node, Why}', ...). Nothing
%% of the request is left behind: alias, monitors, probe answers.
-spec request(node(), frames(), non_neg_integer(), timeout()) -> {ok, term()} | {error, term()}.
request(Node, Frames, ConnKey, Timeout) ->
    request(Node, Frames, ConnKey, Timeout, #{}).

%% @doc {@link request/4} with options: `sent', a fun called with what queuing
%% the request frame returned, before the wait (whoever must know that the
%% request is on its connection); `watch', a monitor whose `DOWN' ends the wait
%% (`{error, watched_down}'); `keeper_down', what a keeper that the caller
%% watches ended with means when it is neither `normal' nor `noconnection'
%% (`{ok, KeeperDown(Reason)}'; without it, `{error, {call_keeper_down, Reason}}'):
%% a runner killed while its function ran.
-spec request(node(), frames(), non_neg_integer(), timeout(), request_opts()) ->
    {ok, term()} | {error, term()}.
request(Node, Frames, ConnKey, Timeout, Opts) ->
    Ref = erlang:alias(),
    true = erlang:monitor_node(Node, true),
    {Frame, Probe} = Frames({self(), Ref, Timeout}),
    Wait = #{ref => Ref, node => Node, conn_key => ConnKey, probe => Probe,
             deadline => deadline(Timeout), watch => maps:get(watch, Opts, undefined),
             keeper_down => maps:get(keeper_down, Opts, undefined),
             keeper => undefined, keeper_mon => undefined,
             probe_at => now_ms() + ?PROBE_AFTER_MS, probe_every => ?PROBE_AFTER_MS,
             probed => false},
    Sent = send_frame(Frame, Wait),
    _ = (maps:get(sent, Opts, fun(_) -> ok end))(Sent),
    case Sent of
        ok -> await(Wait);
        {error, Reason} -> fail(Reason, Wait)
    end.

%% Queues a call frame (a request or a probe) to the node. Teleport away on a node
%% disterl still reaches is waited for, within the call's time.
send_frame(Frame, Wait) ->
    send_frame(Frame, Wait, now_ms(), ?RETRY_MIN_MS).

send_frame(Frame, #{node := Node, conn_key := ConnKey, deadline := Deadline} = Wait,
           Since, Pause) ->
    case teleport:send_frame(Node, call, Frame, ConnKey) of
        {error, noconnection} ->
            case node_up(Node) of
                false ->
                    {error, {nodedown, Node}};
                true ->
                    Waited = now_ms() - Since,
                    case {remaining(Deadline), Waited >= ?UNREACHABLE_MS} of
                        {0, _} -> {error, timeout};
                        {_, true} -> {error, {teleport_unreachable, Node, why_unreachable(Node)}};
                        {Left, false} ->
                            timer:sleep(lists:min([Pause, Left, ?UNREACHABLE_MS - Waited])),
                            send_frame(Frame, Wait, Since, min(2 * Pause, ?RETRY_MAX_MS))
                    end
            end;
        Other ->
            Other
    end.

%% Whether disterl still reaches the node (a nodedown already delivered counts).
node_up(Node) ->
    receive
        {nodedown, Node} = Down -> self() ! Down, false
    after 0 ->
            lists:member(Node, erlang:nodes(connected))
    end.

%% Why teleport could not open a pool to the node, for the exit reason.
why_unreachable(Node) ->
    case teleport_connector:ensure(Node, discover) of
        ok -> noconnection;
        {error, {backoff, Reason}} -> Reason;
        {error, Reason} -> Reason
    end.

await(#{ref := Ref, node := Node, keeper := Keeper, keeper_mon := KeeperMon,
        watch := Watch} = Wait) ->
    receive
        {'$teleport_reply', Ref, From, Reply} ->
            ack(From, Ref),
            done(Wait),
            {ok, Reply};
        {'$teleport_down', Ref, From, Reason} ->
            ack(From, Ref),
            fail(Reason, Wait);
        {'$teleport_started', Ref, From} when Keeper =:= undefined ->
            await(Wait#{keeper := From});
        {'$teleport_started', Ref, _From} ->
            await(Wait);
        {'$teleport_unknown', Ref} when Keeper =:= undefined ->
            fail({request_lost, Node}, Wait);
        {'$teleport_unknown', Ref} ->
            await(Wait);
        {nodedown, Node} ->
            fail({nodedown, Node}, Wait);
        {'DOWN', KeeperMon, process, _, Reason} when is_reference(KeeperMon) ->
            %% Keepers exit only after the outcome left over disterl (which would
            %% have arrived first) or once acknowledged: this outcome is gone.
            keeper_down(Reason, Wait#{keeper_mon := undefined});
        {'DOWN', Watch, process, _, _} when is_reference(Watch) ->
            fail(watched_down, Wait)
    after tick(Wait) ->
            check(Wait)
    end.

keeper_down(Reason, #{keeper_down := KeeperDown} = Wait) ->
    case fail({call_keeper_down, Reason}, Wait) of
        {error, {call_keeper_down, _}} = Failed
          when KeeperDown =:= undefined; Reason =:= normal; Reason =:= noconnection ->
            Failed;
        {error, {call_keeper_down, _}} ->
            {ok, KeeperDown(Reason)};
        Taken ->
            Taken
    end.

%% A tick: the deadline, the keeper's monitor, a probe due.
check(#{deadline := Deadline} = Wait) ->
    case remaining(Deadline) of
        0 -> fail(timeout, Wait);
        _ -> watch(Wait)
    end.

watch(#{keeper := undefined, probe_at := ProbeAt} = Wait) ->
    case now_ms() >= ProbeAt of
        true -> probe(Wait);
        false -> await(Wait)
    end;
watch(#{keeper := Keeper, keeper_mon := undefined} = Wait) ->
    await(Wait#{keeper_mon := erlang:monitor(process, Keeper)});
watch(Wait) ->
    await(Wait).

probe(#{probe := Probe, probe_every := Every} = Wait) ->
    case send_frame(Probe, Wait) of
        ok ->
            Next = min(2 * Every, ?PROBE_MAX_MS),
            await(Wait#{probe_at := now_ms() + Every, probe_every := Next, probed := true});
        %% Teleport stayed away longer than a restart takes: the request went with it.
        {error, {teleport_unreachable, Node, _}} ->
            fail({request_lost, Node}, Wait);
        {error, Reason} ->
            fail(Reason, Wait)
    end.

ack(Keeper, Ref) when is_pid(Keeper) ->
    erlang:send(Keeper, {'$teleport_ack', Ref}, [noconnect]),
    ok;
ack(undefined, _Ref) ->
    ok.

done(#{ref := Ref, node := Node, keeper_mon := KeeperMon, probed := Probed}) ->
    erlang:unalias(Ref),
    _ = is_reference(KeeperMon) andalso erlang:demonitor(KeeperMon, [flush]),
    erlang:monitor_node(Node, false),
    receive {nodedown, Node} -> ok after 0 -> ok end,
    %% Answers to probes (and a keeper's announcement racing them) that came
    %% before the alias went: never left in the caller's mailbox.
    _ = Probed andalso flush_probe_answers(Ref),
    ok.

flush_probe_answers(Ref) ->
    receive
        {'$teleport_started', Ref, _} -> flush_probe_answers(Ref);
        {'$teleport_unknown', Ref} -> flush_probe_answers(Ref)
    after 0 ->
            true
    end.

%% The wait ended without an outcome. One that came after the wait ended and
%% before the alias went is taken (as gen:call does), and nothing of the call is
%% left in the mailbox.
fail(Reason, #{ref := Ref} = Wait) ->
    done(Wait),
    Result = receive
                 {'$teleport_reply', Ref, From, Reply} -> ack(From, Ref), {ok, Reply};
                 {'$teleport_down', Ref, From, Down} -> ack(From, Ref), {error, Down}
             after 0 ->
                     {error, Reason}
             end,
    _ = flush_probe_answers(Ref),
    Result.

%%% Keeper (on the server's node)

%% @doc The body of a gs_call's keeper, spawned by a relay: sends the request
%% to the server as a `$gen_call' and serves its reply or exit reason.
-spec keeper(pid() | atom(), pid(), reference(), timeout(), term()) -> ok.
keeper(Dest, Caller, Ref, Timeout, Request) ->
    Mon = erlang:monitor(process, Dest),
    %% An unregistered name raises here; the monitor already says noproc.
    try erlang:send(Dest, {'$gen_call', {self(), Mon}, Request}) catch error:badarg -> ok end,
    %% A call without a timeout must learn of a keeper killed however early.
    Announce = case Timeout of
                   infinity -> at_once;
                   _ -> when_slow
               end,
    serve(Mon, Caller, Ref, Timeout,
          #{announce => Announce, on_down => fun(Reason) -> {down, Reason} end,
            large => direct}).

%% @doc A keeper's work once the request is with whoever answers it, watched
%% by the monitor `Mon': `{Mon, Reply}' is a reply, `Mon''s `DOWN' goes
%% through `on_down' (gs_call: the server's exit reason). Tells the caller it
%% exists `at_once' or `when_slow' (after 100 ms without an outcome), gives up when the
%% caller dies or its timeout passes, and delivers the outcome: over disterl
%% up to 64 KiB, else over teleport, `direct' to the caller's pid (gs_call),
%% or `forward'ed to its alias through a relay on its node (so that a late one
%% is dropped there), and kept until the caller acknowledges it.
-spec serve(reference(), pid(), reference(), timeout(), serve_opts()) -> ok.
serve(Mon, Caller, Ref, Timeout, #{announce := Announce, on_down := OnDown, large := Large}) ->
    Deadline = deadline(Timeout),
    AnnounceAfter = case Announce of
                        at_once -> 0;
                        when_slow -> ?ANNOUNCE_AFTER_MS
                    end,
    Outcome = case await_server(Mon, AnnounceAfter, Deadline, OnDown) of
                  {outcome, _} = Early ->
                      Early;
                  slow ->
                      case remaining(Deadline) of
                          0 ->
                              %% The caller has given up: nothing to announce.
                              erlang:demonitor(Mon, [flush]),
                              caller_gone;
                          _ ->
                              %% Only a call still running tells its caller it
                              %% exists: fast ones cost no disterl message for it.
                              erlang:send(Ref, {'$teleport_started', Ref, self()}),
                              watch_server(Mon, Caller, Deadline, undefined, OnDown)
                      end
              end,
    case Outcome of
        {outcome, Result} -> deliver(Result, Caller, Ref, Deadline, Large);
        caller_gone -> ok
    end.

%% The server's answer within `Ms', or `slow'.
await_server(Mon, Ms, Deadline, OnDown) ->
    receive
        {Mon, Reply} ->
            erlang:demonitor(Mon, [flush]),
            {outcome, {reply, Reply}};
        {'DOWN', Mon, process, _, Reason} ->
            {outcome, OnDown(Reason)}
    after min(Ms, tick(#{deadline => Deadline})) ->
            slow
    end.

-spec watch_server(reference(), pid(), integer() | infinity, reference() | undefined,
                   fun((term()) -> outcome())) -> {outcome, outcome()} | caller_gone.
watch_server(Mon, Caller, Deadline, CallerMon, OnDown) ->
    receive
        {Mon, Reply} ->
            erlang:demonitor(Mon, [flush]),
            {outcome, {reply, Reply}};
        {'DOWN', Mon, process, _, Reason} ->
            {outcome, OnDown(Reason)};
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
                    watch_server(Mon, Caller, Deadline, watch_caller(Caller, CallerMon), OnDown)
            end
    end.

%% @doc A keeper's delivery, for a process that produced the outcome itself (an
%% RPC runner): the outcome goes to the caller as {@link serve/5} would send it
%% (`forward'ed when large), unless the caller's `Deadline' has passed (it has
%% given up: nothing is sent).
-spec deliver_outcome(outcome(), pid(), reference(), integer() | infinity) -> ok.
deliver_outcome(Outcome, Caller, Ref, Deadline) ->
    case remaining(Deadline) of
        0 -> ok;
        _ -> deliver(Outcome, Caller, Ref, Deadline, forward)
    end.

%% A small outcome goes over disterl, as gen_server's own reply would: one
%% message, reliable while the nodes are connected (else the caller sees
%% nodedown), and no acknowledgement to wait for. A large one goes over
%% teleport, and is kept until the caller has it.
deliver(Outcome, Caller, Ref, Deadline, Large) ->
    Msg = message(Outcome, Ref),
    case erlang:external_size(Msg) =< ?DISTERL_REPLY_MAX of
        true -> resend(Ref, Msg);
        false -> deliver_over_teleport(Msg, Caller, Ref, Deadline, Large)
    end.

deliver_over_teleport(Msg, Caller, Ref, Deadline, Large) ->
    Node = node(Caller),
    Generation = teleport_nif:pool_generation(Node),
    Sent = case Large of
               direct ->
                   teleport:send(Caller, Msg);
               forward ->
                   %% A call frame: a relay there sends it on to the alias (the NIF
                   %% picks the relay by `Ref' and tries the next if one is gone).
                   teleport:send_frame(Node, call, {{?FORWARD, Ref, Msg}, Ref, forward},
                                       erlang:phash2(self()))
           end,
    case Sent of
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

now_ms() -> erlang:monotonic_time(millisecond).

%% @doc When a call made now with `Timeout' ends (monotonic ms), as keepers and
%% runners count it.
-spec deadline(timeout()) -> integer() | infinity.
deadline(infinity) -> infinity;
deadline(Timeout) -> now_ms() + Timeout.

remaining(infinity) -> infinity;
remaining(Deadline) -> max(0, Deadline - now_ms()).

tick(#{deadline := Deadline}) ->
    case remaining(Deadline) of
        infinity -> ?TICK_MS;
        Left -> min(Left, ?TICK_MS)
    end.

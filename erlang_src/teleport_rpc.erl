%% @doc erpc's API and semantics over teleport, with gen_rpc's `{Node, Key}'
%% destinations and rpc's broadcasts.
%%
%% Code switches from `erpc' by changing the module name: the functions take
%% the same arguments and return or raise the same things, `{erpc, Reason}'
%% error terms included. The request and its arguments travel over teleport;
%% a result of up to 64 KiB comes back over distributed Erlang (one message,
%% as erpc's own), a larger one over teleport. A call runs on `gs_call''s
%% protocol (see {@link teleport:gs_call/3}): every call ends, a late result
%% never reaches the caller's mailbox, and a lost request is noticed.
%%
%% The function runs on the remote node in a fresh process, as with erpc
%% (`erpc:execute_call/4' applies it there, with the caller's group leader).
%% Raised in the caller, as erpc raises them:
%% <ul>
%% <li>`throw:Value', `exit:{exception, Reason}', `error:{exception, Reason,
%%     Stack}' (the remote stack): the function raised it;</li>
%% <li>`exit:{signal, Reason}': the process applying it was killed by an exit
%%     signal;</li>
%% <li>`error:{erpc, badarg}': a bad argument (as erpc checks them);</li>
%% <li>`error:{erpc, timeout}': the timeout passed (the function may or may not
%%     run; as with erpc it is not stopped);</li>
%% <li>`error:{erpc, noconnection}': distributed Erlang lost the node, or
%%     teleport lost the request or the process serving it there (the
%%     function may or may not have run), or could not reach the node for 10 s
%%     while distributed Erlang could;</li>
%% <li>`error:{erpc, notsup}': teleport does not run on the node, or the
%%     arguments hold a term its release cannot read;</li>
%% <li>`error:{erpc, system_limit}': the node refused the call, as it had
%%     10,000 under way from this node;</li>
%% <li>`error:{erpc, {module_not_allowed, Module}}': the node's `rpc_modules'
%%     setting does not let peers call `Module';</li>
%% <li>`error:{erpc, too_large}': the request, or a compressed argument or
%%     result once inflated, is over `max_frame_bytes'.</li>
%% </ul>
%%
%% Beyond erpc:
%% <ul>
%% <li>A destination may be `{Node, Key}' (`Key' any term): requests to one
%%     `{Node, Key}' from this node travel on one connection and run on `Node'
%%     one at a time, in the order sent (a call to `{Node, Key}' waits for the
%%     casts and calls sent to it before); different keys run side by side
%%     (gen_rpc's sharding). `Node' alone: no order, as erpc. The order holds
%%     while teleport runs on `Node' (requests queued there when it stops run
%%     at once).</li>
%% <li>`call/5' and `multicall/5' take erpc's options map (OTP 28's
%%     `#{timeout => T, always_spawn => B}', on every release) with one more
%%     key, `compression' (`off' or `{Level, ThresholdBytes}'; default the
%%     `rpc_compression' setting).</li>
%% <li>{@link abcast/3} and {@link sbcast/3}, as `rpc' has them.</li>
%% </ul>
%% Calls to this node (`node()') are erpc's own. A cast that teleport cannot
%% send (the node cannot be reached) is dropped, as erpc's is to a node it
%% cannot connect to.
-module(teleport_rpc).

-export([call/2, call/3, call/4, call/5, cast/2, cast/4,
         send_request/2, send_request/4, send_request/6,
         receive_response/1, receive_response/2, receive_response/3,
         wait_response/1, wait_response/2, wait_response/3,
         check_response/2, check_response/3,
         multicall/2, multicall/3, multicall/4, multicall/5,
         multicast/2, multicast/4,
         reqids_new/0, reqids_add/3, reqids_size/1, reqids_to_list/1,
         abcast/2, abcast/3, sbcast/2, sbcast/3]).
%% Internal: a request's waiter, and what sbcast runs on each node.
-export([waiter/6, sbcast_here/2]).

-export_type([dest/0, request_id/0, request_id_collection/0, call_options/0]).

-include("teleport_call.hrl").

-type dest() :: node() | {node(), term()}.
%% A node, or `{Node, Key}': see the module's documentation.
-type call_options() :: #{timeout => erpc:timeout_time(), always_spawn => boolean(),
                          compression => teleport_rpc_codec:compression()}.
%% erpc's options (OTP 28), and `compression'.
-opaque request_id() :: {reference(), pid()}.
%% What {@link send_request/4} returns.
-opaque request_id_collection() :: #{reference() => {pid(), term()}}.
%% Request ids with labels, as erpc's.

-define(MAX_INT_TIMEOUT, 4294967295).
-define(IS_TIMEOUT(T), (T =:= infinity orelse (is_integer(T) andalso T >= 0
                                               andalso T =< ?MAX_INT_TIMEOUT))).
-define(IS_REQUEST(Mon, Waiter), (is_reference(Mon) andalso is_pid(Waiter))).

%%% Calls

%% @equiv call(Dest, Fun, infinity)
-spec call(dest(), function()) -> term().
call(Dest, Fun) ->
    call(Dest, Fun, infinity).

%% @doc `call(Dest, erlang, apply, [Fun, []], Timeout)', as `erpc:call/3'.
-spec call(dest(), function(), erpc:timeout_time() | call_options()) -> term().
call(Dest, Fun, Timeout) when is_function(Fun, 0) ->
    call(Dest, erlang, apply, [Fun, []], Timeout);
call(_Dest, _Fun, _Timeout) ->
    error({erpc, badarg}).

%% @equiv call(Dest, Module, Function, Args, infinity)
-spec call(dest(), module(), atom(), [term()]) -> term().
call(Dest, M, F, A) ->
    call(Dest, M, F, A, infinity).

%% @doc Applies `Module:Function(Args...)' on the destination's node and
%% returns its value, or raises as `erpc:call/5' (see the module's
%% documentation). `Timeout': erpc's (ms up to 4294967295, `infinity',
%% `{abs, MonotonicMs}') or an options map.
-spec call(dest(), module(), atom(), [term()], erpc:timeout_time() | call_options()) -> term().
call(Dest, M, F, A, Options) when is_atom(M), is_atom(F), is_list(A) ->
    case destination(Dest) of
        {Node, _Key} when Node =:= node() ->
            erpc:call(Node, M, F, A, local_timeout(Options));
        {Node, Key} ->
            {Timeout, Compression} = options(Options),
            Call = fun() -> raise(remote_call(Node, Key, {M, F, A}, Timeout, Compression, #{})) end,
            case teleport_telemetry:enabled() of
                false ->
                    Call();
                true ->
                    Metadata = #{call => rpc, node => Node, destination => Dest,
                                 destination_kind => case Key of
                                                         none -> node;
                                                         {key, _} -> key
                                                     end,
                                 mfa => {M, F, length(A)},
                                 request_size => erlang:external_size(A), timeout => Timeout},
                    teleport_telemetry:span(
                      [teleport, call], Metadata,
                      fun() ->
                              Result = Call(),
                              {Result, Metadata#{reply_size => erlang:external_size(Result)}}
                      end)
            end;
        badarg ->
            error({erpc, badarg})
    end;
call(_Dest, _M, _F, _A, _Options) ->
    error({erpc, badarg}).

%% @equiv cast(Dest, erlang, apply, [Fun, []])
-spec cast(dest(), function()) -> ok.
cast(Dest, Fun) ->
    cast(Dest, erlang, apply, [Fun, []]).

%% @doc Applies `Module:Function(Args...)' on the destination's node, without
%% waiting, as `erpc:cast/4'. Returns `ok'.
-spec cast(dest(), module(), atom(), [term()]) -> ok.
cast(Dest, M, F, A) when is_atom(M), is_atom(F), is_list(A) ->
    case destination(Dest) of
        {Node, _Key} when Node =:= node() -> erpc:cast(Node, M, F, A);
        {Node, Key} -> remote_cast(Node, Key, M, F, A);
        badarg -> error({erpc, badarg})
    end;
cast(_Dest, _M, _F, _A) ->
    error({erpc, badarg}).

%%% Asynchronous calls

%% @equiv send_request(Dest, erlang, apply, [Fun, []])
-spec send_request(dest(), function()) -> request_id().
send_request(Dest, Fun) when is_function(Fun, 0) ->
    send_request(Dest, erlang, apply, [Fun, []]);
send_request(_Dest, _Fun) ->
    error({erpc, badarg}).

%% @doc Sends a call request, as `erpc:send_request/4'; its result is had with
%% {@link receive_response/2}, {@link wait_response/2} or
%% {@link check_response/2}. `send_request(Dest, Fun, Label, Collection)' adds
%% it to a collection, as `erpc:send_request/4' does.
%%
%% A process of teleport's on this node (the request's waiter) makes the call
%% and sends the caller its outcome; it goes with the request when the caller
%% abandons it (a receive that times out) or dies. A request to `{Node, Key}' is
%% on its connection when this returns, so order holds with the caller's next
%% requests to that key.
-spec send_request(dest(), module(), atom(), [term()]) -> request_id();
                  (dest(), function(), term(), request_id_collection()) ->
          request_id_collection().
send_request(Dest, M, F, A) when is_atom(M), is_atom(F), is_list(A) ->
    case destination(Dest) of
        {Node, Key} -> start_request(Node, Key, {M, F, A}, infinity, default);
        badarg -> error({erpc, badarg})
    end;
send_request(Dest, Fun, Label, Collection) when is_function(Fun, 0), is_map(Collection) ->
    send_request(Dest, erlang, apply, [Fun, []], Label, Collection);
send_request(_, _, _, _) ->
    error({erpc, badarg}).

%% @doc {@link send_request/4}, the request added to `Collection' with `Label'.
-spec send_request(dest(), module(), atom(), [term()], term(), request_id_collection()) ->
    request_id_collection().
send_request(Dest, M, F, A, Label, Collection) when is_atom(M), is_atom(F), is_list(A),
                                                    is_map(Collection) ->
    case destination(Dest) of
        {Node, Key} ->
            {Mon, Waiter} = start_request(Node, Key, {M, F, A}, infinity, default),
            Collection#{Mon => {Waiter, Label}};
        badarg ->
            error({erpc, badarg})
    end;
send_request(_, _, _, _, _, _) ->
    error({erpc, badarg}).

%% @equiv receive_response(RequestId, infinity)
-spec receive_response(request_id()) -> term().
receive_response({Mon, Waiter} = RequestId) when ?IS_REQUEST(Mon, Waiter) ->
    receive_response(RequestId, infinity);
receive_response(_) ->
    error({erpc, badarg}).

%% @doc Waits for a request's result, as `erpc:receive_response/2': returns
%% it or raises; past the timeout the request is abandoned (its result will
%% never arrive) and `{erpc, timeout}' raised.
-spec receive_response(request_id(), erpc:timeout_time()) -> term().
receive_response({Mon, Waiter}, Tmo) when ?IS_REQUEST(Mon, Waiter) ->
    Timeout = timeout_value(Tmo),
    receive
        {Mon, Outcome} -> raise(Outcome);
        {'DOWN', Mon, process, _, Reason} -> waiter_lost(Reason)
    after Timeout ->
            case abandon(Mon, Waiter) of
                true -> error({erpc, timeout});
                false -> raise(take_outcome(Mon))
            end
    end;
receive_response(_, _) ->
    error({erpc, badarg}).

%% @doc One result of a collection's requests, as
%% `erpc:receive_response/3': `{Result, Label, NewCollection}', or
%% `no_request' for an empty collection; an exception the request raised is
%% raised as `{Reason, Label, NewCollection}' of its class; past the timeout
%% every request of the collection is abandoned and `{erpc, timeout}' raised.
-spec receive_response(request_id_collection(), erpc:timeout_time(), boolean()) ->
    {term(), term(), request_id_collection()} | no_request.
receive_response(Collection, Tmo, Delete) when map_size(Collection) =:= 0,
                                              is_boolean(Delete) ->
    _ = timeout_value(Tmo),
    no_request;
receive_response(Collection, Tmo, Delete) when is_map(Collection), is_boolean(Delete) ->
    case collection_wait(Collection, timeout_value(Tmo), false, Delete) of
        timeout ->
            maps:foreach(fun(Mon, {Waiter, _Label}) when ?IS_REQUEST(Mon, Waiter) ->
                                 _ = abandon(Mon, Waiter) orelse drop_outcome(Mon);
                            (_, _) ->
                                 error({erpc, badarg})
                         end, Collection),
            error({erpc, timeout});
        Result ->
            Result
    end;
receive_response(_, _, _) ->
    error({erpc, badarg}).

%% @equiv wait_response(RequestId, 0)
-spec wait_response(request_id()) -> {response, term()} | no_response.
wait_response({Mon, Waiter} = RequestId) when ?IS_REQUEST(Mon, Waiter) ->
    wait_response(RequestId, 0);
wait_response(_) ->
    error({erpc, badarg}).

%% @doc Waits up to `WaitTime' for a request's result, as
%% `erpc:wait_response/2': `{response, Result}' (or its exception raised), or
%% `no_response' (the request stays under way).
-spec wait_response(request_id(), erpc:timeout_time()) -> {response, term()} | no_response.
wait_response({Mon, Waiter}, WaitTime) when ?IS_REQUEST(Mon, Waiter) ->
    Timeout = timeout_value(WaitTime),
    receive
        {Mon, Outcome} -> {response, raise(Outcome)};
        {'DOWN', Mon, process, _, Reason} -> waiter_lost(Reason)
    after Timeout ->
            no_response
    end;
wait_response(_, _) ->
    error({erpc, badarg}).

%% @doc As `erpc:wait_response/3': {@link receive_response/3} that returns
%% `no_response' past `WaitTime' and abandons nothing.
-spec wait_response(request_id_collection(), erpc:timeout_time(), boolean()) ->
    {{response, term()}, term(), request_id_collection()} | no_response | no_request.
wait_response(Collection, WaitTime, Delete) when map_size(Collection) =:= 0,
                                                 is_boolean(Delete) ->
    _ = timeout_value(WaitTime),
    no_request;
wait_response(Collection, WaitTime, Delete) when is_map(Collection), is_boolean(Delete) ->
    case collection_wait(Collection, timeout_value(WaitTime), true, Delete) of
        timeout -> no_response;
        Result -> Result
    end;
wait_response(_, _, _) ->
    error({erpc, badarg}).

%% @doc Whether `Message' is the request's result, as `erpc:check_response/2'.
-spec check_response(term(), request_id()) -> {response, term()} | no_response.
check_response({Mon, Outcome}, {Mon, Waiter}) when ?IS_REQUEST(Mon, Waiter) ->
    {response, raise(Outcome)};
check_response({'DOWN', Mon, process, _, Reason}, {Mon, Waiter}) when ?IS_REQUEST(Mon, Waiter) ->
    waiter_lost(Reason);
check_response(_Message, {Mon, Waiter}) when ?IS_REQUEST(Mon, Waiter) ->
    no_response;
check_response(_, _) ->
    error({erpc, badarg}).

%% @doc Whether `Message' is the result of one of the collection's requests, as
%% `erpc:check_response/3'.
-spec check_response(term(), request_id_collection(), boolean()) ->
    {{response, term()}, term(), request_id_collection()} | no_response | no_request.
check_response(_Message, Collection, Delete) when map_size(Collection) =:= 0,
                                                  is_boolean(Delete) ->
    no_request;
check_response({Mon, Outcome}, Collection, Delete) when is_reference(Mon),
                                                        is_map_key(Mon, Collection),
                                                        is_boolean(Delete) ->
    collection_result(Mon, Outcome, Collection, true, Delete);
check_response({'DOWN', Mon, process, _, Reason}, Collection, Delete)
  when is_reference(Mon), is_map_key(Mon, Collection), is_boolean(Delete) ->
    collection_result(Mon, waiter_down(Reason), Collection, true, Delete);
check_response(_Message, Collection, Delete) when is_map(Collection), is_boolean(Delete) ->
    no_response;
check_response(_, _, _) ->
    error({erpc, badarg}).

%%% Request id collections

%% @doc An empty collection, as `erpc:reqids_new/0'.
-spec reqids_new() -> request_id_collection().
reqids_new() ->
    #{}.

%% @doc How many requests the collection holds.
-spec reqids_size(request_id_collection()) -> non_neg_integer().
reqids_size(Collection) when is_map(Collection) ->
    map_size(Collection);
reqids_size(_) ->
    error({erpc, badarg}).

%% @doc Adds a request with `Label'; `{erpc, badarg}' if it is there already.
-spec reqids_add(request_id(), term(), request_id_collection()) -> request_id_collection().
reqids_add({Mon, _}, _Label, Collection) when is_map_key(Mon, Collection) ->
    error({erpc, badarg});
reqids_add({Mon, Waiter}, Label, Collection) when ?IS_REQUEST(Mon, Waiter), is_map(Collection) ->
    Collection#{Mon => {Waiter, Label}};
reqids_add(_, _, _) ->
    error({erpc, badarg}).

%% @doc The collection's requests, with their labels.
-spec reqids_to_list(request_id_collection()) -> [{request_id(), term()}].
reqids_to_list(Collection) when is_map(Collection) ->
    maps:fold(fun(Mon, {Waiter, Label}, Acc) when ?IS_REQUEST(Mon, Waiter) ->
                      [{{Mon, Waiter}, Label} | Acc];
                 (_, _, _) ->
                      error({erpc, badarg})
              end, [], Collection);
reqids_to_list(_) ->
    error({erpc, badarg}).

%%% Several nodes

%% @equiv multicall(Dests, Fun, infinity)
-spec multicall([dest()], function()) -> [{ok, term()} | {atom(), term()}].
multicall(Dests, Fun) ->
    multicall(Dests, Fun, infinity).

%% @equiv multicall(Dests, erlang, apply, [Fun, []], Timeout)
-spec multicall([dest()], function(), erpc:timeout_time() | call_options()) ->
    [{ok, term()} | {atom(), term()}].
multicall(Dests, Fun, Timeout) when is_function(Fun, 0) ->
    multicall(Dests, erlang, apply, [Fun, []], Timeout);
multicall(_Dests, _Fun, _Timeout) ->
    error({erpc, badarg}).

%% @equiv multicall(Dests, Module, Function, Args, infinity)
-spec multicall([dest()], module(), atom(), [term()]) -> [{ok, term()} | {atom(), term()}].
multicall(Dests, M, F, A) ->
    multicall(Dests, M, F, A, infinity).

%% @doc Calls every destination at once, as `erpc:multicall/5': one result per
%% destination, in their order, each `{ok, Value}' or the exception the call
%% raised as `{Class, Reason}' (`{error, {erpc, timeout}}' for those without a
%% result by the timeout). An error is never hidden in a value.
-spec multicall([dest()], module(), atom(), [term()], erpc:timeout_time() | call_options()) ->
    [{ok, term()} | {atom(), term()}].
multicall(Dests, M, F, A, Options) ->
    {Targets, Timeout, Compression} =
        try
            true = is_atom(M) andalso is_atom(F) andalso is_list(A),
            {Timeout0, Compression0} = options(Options),
            {[case destination(Dest) of
                  badarg -> error(badarg);
                  Target -> Target
              end || Dest <- Dests], Timeout0, Compression0}
        catch
            error:_ -> error({erpc, badarg})
        end,
    Requests = [start_request(Node, Key, {M, F, A}, Timeout, Compression)
                || {Node, Key} <- Targets],
    Deadline = deadline(Timeout),
    [collect(Request, Deadline) || Request <- Requests].

%% One multicall result by the deadline, as `{ok, V}' or `{Class, Reason}'.
collect({Mon, Waiter}, Deadline) ->
    receive
        {Mon, Outcome} -> result_item(Outcome);
        {'DOWN', Mon, process, _, Reason} -> result_item(waiter_down(Reason))
    after time_left(Deadline) ->
            case abandon(Mon, Waiter) of
                true -> {error, {erpc, timeout}};
                false -> result_item(take_outcome(Mon))
            end
    end.

%% @equiv multicast(Dests, erlang, apply, [Fun, []])
-spec multicast([dest()], function()) -> ok.
multicast(Dests, Fun) ->
    multicast(Dests, erlang, apply, [Fun, []]).

%% @doc Casts to every destination, as `erpc:multicast/4'.
-spec multicast([dest()], module(), atom(), [term()]) -> ok.
multicast(Dests, M, F, A) ->
    Targets = try
                  true = is_atom(M) andalso is_atom(F) andalso is_list(A),
                  [case destination(Dest) of
                       badarg -> error(badarg);
                       Target -> Target
                   end || Dest <- Dests]
              catch
                  error:_ -> error({erpc, badarg})
              end,
    lists:foreach(fun({Node, _Key}) when Node =:= node() -> erpc:cast(Node, M, F, A);
                     ({Node, Key}) -> remote_cast(Node, Key, M, F, A)
                  end, Targets).

%% @equiv abcast([node() | nodes()], Name, Msg)
-spec abcast(atom(), term()) -> abcast.
abcast(Name, Msg) ->
    abcast([node() | nodes()], Name, Msg).

%% @doc Sends `Msg' to the process registered as `Name' on each destination's
%% node, without waiting, as `rpc:abcast/3' (over teleport: a `{Node, Key}'
%% destination's messages keep their order with each other).
-spec abcast([dest()], atom(), term()) -> abcast.
abcast(Dests, Name, Msg) when is_atom(Name) ->
    lists:foreach(fun(Dest) ->
                          try abcast_one(destination(Dest), Name, Msg)
                          catch error:badarg -> ok
                          end
                  end, Dests),
    abcast.

abcast_one({Node, _Key}, Name, Msg) when Node =:= node() ->
    erlang:send({Name, Node}, Msg);
abcast_one({Node, none}, Name, Msg) ->
    teleport:send({Name, Node}, Msg);
abcast_one({Node, {key, Key}}, Name, Msg) ->
    teleport:send({Name, Node}, Msg, [{key, Key}]).

%% @equiv sbcast([node() | nodes()], Name, Msg)
-spec sbcast(atom(), term()) -> {[dest()], [dest()]}.
sbcast(Name, Msg) ->
    sbcast([node() | nodes()], Name, Msg).

%% @doc Sends `Msg' to the process registered as `Name' on each destination's
%% node and waits until each has it (or is known not to), as `rpc:sbcast/3':
%% `{GoodDests, BadDests}', the bad ones those without such a process or
%% that could not be reached.
-spec sbcast([dest()], atom(), term()) -> {[dest()], [dest()]}.
sbcast(Dests, Name, Msg) when is_atom(Name), is_list(Dests) ->
    Results = multicall(Dests, ?MODULE, sbcast_here, [Name, Msg]),
    lists:foldr(fun({Dest, {ok, true}}, {Good, Bad}) -> {[Dest | Good], Bad};
                   ({Dest, _}, {Good, Bad}) -> {Good, [Dest | Bad]}
                end, {[], []}, lists:zip(Dests, Results)).

%% @private
%% @doc Runs on each of sbcast's nodes: whether `Name' was there to take `Msg'.
-spec sbcast_here(atom(), term()) -> boolean().
sbcast_here(Name, Msg) ->
    case whereis(Name) of
        undefined -> false;
        Pid -> Pid ! Msg, true
    end.

%%% Internal: the caller's side

-type key() :: none | {key, term()}.

destination(Node) when is_atom(Node) -> {Node, none};
destination({Node, Key}) when is_atom(Node) -> {Node, {key, Key}};
destination(_) -> badarg.

%% One call to another node, as an {@link teleport_rpc_exec:outcome()}.
remote_call(Node, Key, {M, F, A}, Timeout, Compression, Opts) ->
    Zip = teleport_rpc_codec:compression(Node, Compression),
    Request = {M, F, teleport_rpc_codec:pack(A, Zip), group_leader(), Zip},
    {Frames, ConnKey} = call_frames(Key, Request),
    %% An unkeyed call's "keeper" is its runner, which only an exit signal kills.
    Opts1 = case Key of
                none -> Opts#{keeper_down => fun(Reason) -> {signal, Reason} end};
                {key, _} -> Opts
            end,
    case teleport_call:request(Node, Frames, ConnKey, Timeout, Opts1) of
        {ok, Outcome} -> inflate(Outcome, Node);
        {error, Reason} -> failure(Reason)
    end.

%% A `{Node, Key}' request's call tuple rides in its destination: the slot the
%% NIF hashes to pick the relay is the key's.
-spec call_frames(key(), teleport_rpc_exec:call_request()) ->
    {teleport_call:frames(), non_neg_integer()}.
call_frames(none, Request) ->
    {fun(Call) -> {{?RPC, Call, Request}, {?PROBE, Call, probe}} end, erlang:phash2(self())};
call_frames({key, Key}, Request) ->
    Slot = {?KEY, Key},
    {fun(Call) -> {{{?RPC, Call}, Slot, Request}, {{?PROBE, Call}, Slot, probe}} end,
     erlang:phash2(Key)}.

remote_cast(Node, Key, M, F, A) ->
    Zip = teleport_rpc_codec:compression(Node, default),
    Request = {self(), M, F, teleport_rpc_codec:pack(A, Zip), group_leader()},
    {Slot, ConnKey} = case Key of
                          none -> {self(), erlang:phash2(self())};
                          {key, K} -> {{?KEY, K}, erlang:phash2(K)}
                      end,
    _ = teleport:send_frame(Node, call, {?CAST, Slot, Request}, ConnKey),
    ok.

%% A result that came compressed.
inflate(Outcome, Node) ->
    case teleport_rpc_codec:unpack(Outcome, Node) of
        {ok, Inflated} -> Inflated;
        {error, Why} -> {erpc, Why}
    end.

%% Why teleport ended a call, as erpc would say it.
failure(timeout) -> {erpc, timeout};
failure({nodedown, _}) -> {erpc, noconnection};
failure({teleport_unreachable, _, not_started}) -> {erpc, notsup};
failure({teleport_unreachable, _, _}) -> {erpc, noconnection};
failure({request_lost, _}) -> {erpc, noconnection};
failure({call_keeper_down, _}) -> {erpc, noconnection};
failure({teleport, no_call_relay}) -> {erpc, noconnection};
failure({teleport, too_many_calls}) -> {erpc, system_limit};
failure(unsupported_by_peer) -> {erpc, notsup};
failure(too_large) -> {erpc, too_large};
failure(Other) -> {erpc, Other}.

%% The outcome raised (or returned) as erpc does.
-spec raise(teleport_rpc_exec:outcome()) -> term().
raise({return, Value}) -> Value;
raise({throw, Value}) -> throw(Value);
raise({exit, Reason}) -> exit({exception, Reason});
raise({error, Reason, Stack}) -> error({exception, Reason, Stack});
raise({erpc, Reason}) -> error({erpc, Reason});
raise({signal, Reason}) -> exit({signal, Reason}).

%% The outcome as a multicall result.
result_item({return, Value}) -> {ok, Value};
result_item({throw, Value}) -> {throw, Value};
result_item({exit, Reason}) -> {exit, {exception, Reason}};
result_item({error, Reason, Stack}) -> {error, {exception, Reason, Stack}};
result_item({erpc, Reason}) -> {error, {erpc, Reason}};
result_item({signal, Reason}) -> {exit, {signal, Reason}}.

%% The outcome of an erpc call on this node.
capture(Call) ->
    try {return, Call()}
    catch
        throw:Value -> {throw, Value};
        exit:{exception, Reason} -> {exit, Reason};
        exit:{signal, Reason} -> {signal, Reason};
        error:{exception, Reason, Stack} -> {error, Reason, Stack};
        error:{erpc, Reason} -> {erpc, Reason}
    end.

%%% Internal: requests and their waiters

%% Starts a request's waiter: `{Mon, Waiter}', `Mon' both a monitor of the waiter
%% and the alias its outcome comes to (`{Mon, Outcome}'), gone once that came.
start_request(Node, Key, MFA, Timeout, Compression) ->
    {Waiter, Mon} = spawn_opt(?MODULE, waiter, [self(), Node, Key, MFA, Timeout, Compression],
                              [{monitor, [{alias, reply_demonitor}]}]),
    Waiter ! {'$teleport_rpc_go', Mon},
    _ = case Key of
            {key, _} when Node =/= node() ->
                %% Its frame queued before the caller's next one to the key.
                receive
                    {'$teleport_rpc_sent', Mon} -> ok;
                    {'DOWN', Mon, process, _, _} = Down -> self() ! Down
                end;
            _ ->
                ok
        end,
    {Mon, Waiter}.

%% @private
%% @doc A request's waiter: makes the call (a local one with erpc) and sends its
%% outcome to the caller's alias. Ends with the caller.
-spec waiter(pid(), node(), key(), {module(), atom(), list()}, timeout(),
             teleport_rpc_codec:compression() | default) -> ok.
waiter(Caller, Node, Key, {M, F, A} = MFA, Timeout, Compression) ->
    CallerMon = erlang:monitor(process, Caller),
    receive
        {'$teleport_rpc_go', Alias} ->
            Outcome = case Node =:= node() of
                          true ->
                              %% A process of erpc's, as for other nodes (a finite
                              %% timeout makes it spawn one).
                              capture(fun() -> erpc:call(Node, M, F, A, local_timeout(
                                                                         #{timeout => Timeout,
                                                                           always_spawn => true}))
                                      end);
                          false ->
                              Sent = fun(_) -> Caller ! {'$teleport_rpc_sent', Alias} end,
                              Opts = case Key of
                                         none -> #{watch => CallerMon};
                                         {key, _} -> #{watch => CallerMon, sent => Sent}
                                     end,
                              remote_call(Node, Key, MFA, Timeout, Compression, Opts)
                      end,
            Alias ! {Alias, Outcome},
            ok;
        {'DOWN', CallerMon, process, _, _} ->
            ok
    end.

%% A waiter that died before it sent an outcome (killed): the request's fate
%% is unknown.
waiter_down(_Reason) ->
    {erpc, noconnection}.

-spec waiter_lost(term()) -> no_return().
waiter_lost(_Reason) ->
    error({erpc, noconnection}).

%% Gives up a request: `true' if its outcome had not come (it never will: its
%% alias is gone and the waiter ends), `false' if it is in the mailbox.
abandon(Mon, Waiter) ->
    case erlang:demonitor(Mon, [info]) of
        true -> exit(Waiter, kill), true;
        false -> false
    end.

%% The outcome (or the waiter's `DOWN') of a request whose monitor is gone.
take_outcome(Mon) ->
    receive
        {Mon, Outcome} -> Outcome;
        {'DOWN', Mon, process, _, Reason} -> waiter_down(Reason)
    after 0 ->
            error({erpc, badarg})
    end.

%% The first result of a collection's requests within `Timeout', else `timeout'.
collection_wait(Collection, Timeout, Wrap, Delete) ->
    receive
        {Mon, Outcome} when is_map_key(Mon, Collection) ->
            collection_result(Mon, Outcome, Collection, Wrap, Delete);
        {'DOWN', Mon, process, _, Reason} when is_map_key(Mon, Collection) ->
            collection_result(Mon, waiter_down(Reason), Collection, Wrap, Delete)
    after Timeout ->
            timeout
    end.

%% A collection's request abandoned whose outcome came: dropped (if it is still
%% in the mailbox: the caller may have had it already).
drop_outcome(Mon) ->
    receive
        {Mon, _} -> true;
        {'DOWN', Mon, process, _, _} -> true
    after 0 ->
            true
    end.

collection_result(Mon, Outcome, Collection, Wrap, Delete) ->
    {{_Waiter, Label}, Collection1} =
        case Delete of
            true -> maps:take(Mon, Collection);
            false -> {maps:get(Mon, Collection), Collection}
        end,
    try raise(Outcome) of
        Result when Wrap -> {{response, Result}, Label, Collection1};
        Result -> {Result, Label, Collection1}
    catch
        Class:Reason -> erlang:Class({Reason, Label, Collection1})
    end.

%%% Internal: options and time

%% A call's options: `{Timeout, Compression}' (ms or infinity; `default': the
%% setting's).
options(#{} = Options) ->
    Timeout = timeout_value(maps:get(timeout, Options, infinity)),
    _ = is_boolean(maps:get(always_spawn, Options, false)) orelse error({erpc, badarg}),
    Compression = maps:get(compression, Options, default),
    _ = Compression =:= default orelse teleport_rpc_codec:valid(Compression)
        orelse error({erpc, badarg}),
    {Timeout, Compression};
options(Timeout) ->
    {timeout_value(Timeout), default}.

%% erpc:call/5's timeout for a call on this node: erpc's own form (releases
%% before OTP 28 take no options map). A finite timeout makes erpc spawn.
local_timeout(#{} = Options) ->
    case {maps:get(timeout, Options, infinity), maps:get(always_spawn, Options, false)} of
        {infinity, true} -> ?MAX_INT_TIMEOUT;
        {Timeout, _} -> Timeout
    end;
local_timeout(Timeout) ->
    Timeout.

%% erpc's timeouts, as ms or infinity.
timeout_value(Timeout) when ?IS_TIMEOUT(Timeout) ->
    Timeout;
timeout_value({abs, At}) when is_integer(At) ->
    case At - erlang:monotonic_time(millisecond) of
        Left when Left < 0 -> 0;
        Left when Left > ?MAX_INT_TIMEOUT -> error({erpc, badarg});
        Left -> Left
    end;
timeout_value(_) ->
    error({erpc, badarg}).

deadline(infinity) -> infinity;
deadline(Timeout) -> erlang:monotonic_time(millisecond) + Timeout.

time_left(infinity) -> infinity;
time_left(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

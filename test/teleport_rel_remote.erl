%%% @doc Processes that reliability_SUITE runs on peer nodes.
%%%
%%% <ul>
%%% <li>A summarising sink: forwards `{rel_sink, node(), Summary}' for every
%%%     message to a pid, over distributed Erlang. A message `{Tag, Id, Seq, Bin}'
%%%     is summarised as `{Tag, Id, Seq, byte_size(Bin)}': the suite moves
%%%     hundreds of 10 MiB binaries and must not send them back over disterl.</li>
%%% <li>A collector (for nodes the suite cannot reach over disterl, inside
%%%     network namespaces): keeps what sinks forward to it until asked.</li>
%%% <li>A long-lived sender, so that messages sent minutes apart through
%%%     separate `peer:call/5's still come from one process.</li>
%%% <li>A flood: one process sending until teleport refuses.</li>
%%% <li>A TCP probe: does anything accept connections at an address, seen
%%%     from this node's network namespace.</li>
%%% <li>A logger handler that forwards teleport's reports of one kind.</li>
%%% </ul>
-module(teleport_rel_remote).

-export([start_sink/3, spawn_sink/2, summary/1]).
-export([start_collector/1, collected/2]).
-export([start_sender/0, sender_send/5]).
-export([flood/5]).
-export([inbound_connections/0, thread_names/0]).
-export([blocked_senders/0]).
-export([tcp_probe/2]).
-export([forward_reports/2]).
%% logger handler callback
-export([log/2]).

-define(RPC_TIMEOUT, 30000).

%%--------------------------------------------------------------------
%% Sink

%% @doc Starts a sink registered as `Name' on `Node'. Returns its pid.
-spec start_sink(node(), atom(), pid()) -> {ok, pid()} | {error, term()}.
start_sink(Node, Name, Forward) ->
    erpc:call(Node, ?MODULE, spawn_sink, [Name, Forward], ?RPC_TIMEOUT).

%% @private Runs on the sink's node; the sink is linked to nobody.
-spec spawn_sink(atom(), pid()) -> {ok, pid()} | {error, term()}.
spawn_sink(Name, Forward) ->
    Pid = spawn(fun() -> sink_loop(Forward) end),
    try register(Name, Pid) of
        true -> {ok, Pid}
    catch
        error:badarg ->
            exit(Pid, kill),
            {error, {already_registered, Name}}
    end.

sink_loop(Forward) ->
    receive
        Msg ->
            Forward ! {rel_sink, node(), summary(Msg)},
            sink_loop(Forward)
    end.

-spec summary(term()) -> term().
summary({Tag, Id, Seq, Bin}) when is_binary(Bin) -> {Tag, Id, Seq, byte_size(Bin)};
summary(Other) -> Other.

%%--------------------------------------------------------------------
%% Collector

%% @doc Starts (or finds) a collector registered as `Name' on this node.
-spec start_collector(atom()) -> {ok, pid()}.
start_collector(Name) ->
    case whereis(Name) of
        undefined ->
            Pid = spawn(fun() -> collector_loop([]) end),
            true = register(Name, Pid),
            {ok, Pid};
        Pid ->
            {ok, Pid}
    end.

%% @doc The summaries with `Tag' a collector on this node has received, in arrival order.
-spec collected(atom(), term()) -> [term()].
collected(Name, Tag) ->
    Ref = make_ref(),
    Name ! {collected, self(), Ref},
    receive
        {Ref, All} -> [S || {rel_sink, _, S} <- All, element(1, S) =:= Tag]
    after ?RPC_TIMEOUT ->
            exit(collector_not_answering)
    end.

collector_loop(Acc) ->
    receive
        {collected, From, Ref} ->
            From ! {Ref, lists:reverse(Acc)},
            collector_loop(Acc);
        Msg ->
            collector_loop([Msg | Acc])
    end.

%%--------------------------------------------------------------------
%% Sender

%% @doc A process that sends what it is told to; it lives until killed.
-spec start_sender() -> {ok, pid()}.
start_sender() ->
    {ok, spawn(fun sender_loop/0)}.

%% @doc Makes `Sender' do `teleport:send(Dest, Msg, Opts)'; returns its result.
-spec sender_send(pid(), teleport:dest(), term(), [teleport:send_option()], timeout()) -> term().
sender_send(Sender, Dest, Msg, Opts, Timeout) ->
    Ref = make_ref(),
    Sender ! {send, self(), Ref, Dest, Msg, Opts},
    receive
        {Ref, Result} -> Result
    after Timeout ->
            {sender_stuck, erlang:process_info(Sender, [current_function, status])}
    end.

sender_loop() ->
    receive
        {send, From, Ref, Dest, Msg, Opts} ->
            From ! {Ref, teleport:send(Dest, Msg, Opts)},
            sender_loop()
    end.

%%--------------------------------------------------------------------
%% Flood

%% @doc Sends `{Tag, flood, Seq, Bin}' (`Bin' is `Size' bytes) until a send is
%% not `ok' or `Max' were sent. Returns `{Oks, Last, Ms}': how many were ok,
%% the first other result (or `max_reached'), and how long the last send took.
-spec flood(teleport:dest(), term(), pos_integer(), [teleport:send_option()], pos_integer()) ->
    {non_neg_integer(), term(), non_neg_integer()}.
flood(Dest, Tag, Size, Opts, Max) ->
    Bin = binary:copy(<<7>>, Size),
    flood(Dest, Tag, Bin, Opts, Max, 1).

flood(_Dest, _Tag, _Bin, _Opts, Max, Seq) when Seq > Max ->
    {Max, max_reached, 0};
flood(Dest, Tag, Bin, Opts, Max, Seq) ->
    T0 = erlang:monotonic_time(millisecond),
    case teleport:send(Dest, {Tag, flood, Seq, Bin}, Opts) of
        ok -> flood(Dest, Tag, Bin, Opts, Max, Seq + 1);
        Other -> {Seq - 1, Other, erlang:monotonic_time(millisecond) - T0}
    end.

%%--------------------------------------------------------------------
%% Threads

%% @doc How many inbound teleport connections this node reads (from every peer),
%% authenticated or still in their handshake: the listener's open sockets.
-spec inbound_connections() -> non_neg_integer().
inbound_connections() ->
    maps:get(inbound_connections, teleport:listener_stats()).

%% @doc The names of this VM's OS threads.
-spec thread_names() -> [string()].
thread_names() ->
    Dir = "/proc/self/task",
    {ok, Tasks} = file:list_dir(Dir),
    [binary_to_list(string:trim(Comm)) || Task <- Tasks,
                          {ok, Comm} <- [file:read_file(filename:join([Dir, Task, "comm"]))]].

%% @doc Processes of this node waiting in teleport:send for a queue to drain.
-spec blocked_senders() -> [pid()].
blocked_senders() ->
    [Pid || Pid <- erlang:processes(),
            erlang:process_info(Pid, [current_function, status])
                =:= [{current_function, {teleport, await_resume, 2}}, {status, waiting}]].

%% @doc Connects to `Ip':`Port' from this node and closes again: `ok', or why not
%% (`{error, econnrefused}' when nothing listens there).
-spec tcp_probe(inet:ip_address(), inet:port_number()) -> ok | {error, term()}.
tcp_probe(Ip, Port) ->
    case gen_tcp:connect(Ip, Port, [binary, {active, false}], 5000) of
        {ok, Socket} -> gen_tcp:close(Socket);
        {error, _} = Error -> Error
    end.

%%--------------------------------------------------------------------
%% Reports

%% @doc Sends `{rel_report, node(), Report}' to `Forward' for every report this
%% node logs with `what => What' (a logger handler, until the node stops).
-spec forward_reports(pid(), atom()) -> ok.
forward_reports(Forward, What) ->
    Id = list_to_atom("rel_reports_" ++ atom_to_list(What)),
    ok = logger:add_handler(Id, ?MODULE, #{config => #{forward => Forward, what => What}}).

%% @private
log(#{msg := {report, #{what := What} = Report}}, #{config := #{forward := Forward, what := What}}) ->
    Forward ! {rel_report, node(), Report},
    ok;
log(_Event, _Config) ->
    ok.

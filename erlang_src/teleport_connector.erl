%% @private
%% @doc Opens pools on demand. However many processes send to a fresh node at
%% once, one worker finds the peer's listener and opens one pool; every caller
%% waits for that outcome. Opening runs in a worker so one slow or dead peer
%% never delays pools to the others.
%%
%% After a failed open, further attempts to that node fail at once until a
%% backoff has passed (100 ms, doubling up to 5 s), so senders to a dead node
%% cannot cause a connect storm. A disterl nodeup for the node clears it: a
%% node that comes back is reconnected to on the next send.
-module(teleport_connector).
-behaviour(gen_server).

-export([start_link/0, ensure/2]).
-export([open_worker/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-include_lib("kernel/include/logger.hrl").

-type address() :: discover | {inet:ip_address(), inet:port_number()}.

start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Returns once the pool to `Node' is up, or why it could not be opened
%% (the NIF's reasons are terms, see teleport:connect/2).
-spec ensure(node(), address()) -> ok | {error, teleport:connect_error()}.
ensure(Node, Address) ->
    try
        gen_server:call(?MODULE, {ensure, Node, Address}, open_deadline())
    catch
        exit:{timeout, _} -> {error, timeout};
        exit:{noproc, _} -> {error, not_started}
    end.

-define(BACKOFF_MIN_MS, 100).
-define(BACKOFF_MAX_MS, 5000).

init([]) ->
    ok = net_kernel:monitor_nodes(true),
    %% failures: Node => {Delay, RetryAt, LastReason}
    {ok, #{pending => #{}, workers => #{}, failures => #{}}}.

handle_call({ensure, Node, Address}, From,
            #{pending := Pending, workers := Workers, failures := Failures} = State) ->
    Now = erlang:monotonic_time(millisecond),
    case {Pending, Failures} of
        {#{Node := Waiting}, _} ->
            {noreply, State#{pending := Pending#{Node := [From | Waiting]}}};
        {_, #{Node := {_Delay, RetryAt, Reason}}} when Now < RetryAt ->
            {reply, {error, {backoff, Reason}}, State};
        _ ->
            {_Pid, Ref} = spawn_monitor(?MODULE, open_worker, [Node, Address]),
            {noreply, State#{pending := Pending#{Node => [From]},
                             workers := Workers#{Ref => Node}}}
    end.

handle_cast(_Request, State) ->
    {noreply, State}.

handle_info({'DOWN', Ref, process, _, Exit}, #{pending := Pending, workers := Workers} = State) ->
    case maps:take(Ref, Workers) of
        {Node, Workers1} ->
            Result = case Exit of
                         {opened, R} -> R;
                         Crash -> {error, {internal, Crash}}
                     end,
            {Waiting, Pending1} = maps:take(Node, Pending),
            _ = [gen_server:reply(From, Result) || From <- Waiting],
            {noreply, State#{pending := Pending1, workers := Workers1,
                             failures := record_outcome(Node, Result, maps:get(failures, State))}};
        error ->
            {noreply, State}
    end;
handle_info({nodeup, Node}, #{failures := Failures} = State) ->
    {noreply, State#{failures := maps:remove(Node, Failures)}};
handle_info(_Other, State) ->
    {noreply, State}.

record_outcome(Node, ok, Failures) ->
    maps:remove(Node, Failures);
record_outcome(Node, {error, Reason}, Failures) ->
    Delay = case Failures of
                #{Node := {Previous, _, _}} -> min(2 * Previous, ?BACKOFF_MAX_MS);
                #{} -> ?BACKOFF_MIN_MS
            end,
    failure_events(Node, Reason, Delay),
    Failures#{Node => {Delay, erlang:monotonic_time(millisecond) + Delay, Reason}}.

%% Telemetry (docs/telemetry.md): the peer refused our handshake, or we its; and
%% the backoff any failed open starts.
failure_events(Node, Reason, Delay) ->
    case Reason of
        {handshake, Why} ->
            teleport_telemetry:execute([teleport, handshake, refused], #{count => 1},
                                       #{direction => outbound, node => Node, reason => Why});
        _ ->
            ok
    end,
    teleport_telemetry:execute([teleport, peer, backoff],
                               #{delay => erlang:convert_time_unit(Delay, millisecond, native)},
                               #{node => Node, reason => Reason}).

%% @doc The worker's body: its exit reason carries the outcome to the connector.
-spec open_worker(node(), address()) -> no_return().
open_worker(Node, Address) ->
    exit({opened, open(Node, Address)}).

open(Node, Address) ->
    case address(Node, Address) of
        {ok, {Ip, Port}} ->
            PoolSize = teleport_config:get(pool_size),
            case teleport_nif:open_pool(Node, Ip, Port, PoolSize, self()) of
                ok -> ok;
                not_started -> {error, not_started};
                opening ->
                    receive
                        {teleport_pool, Node, Result} -> Result
                    after open_deadline() ->
                        {error, timeout}
                    end
            end;
        {error, _} = Error ->
            ?LOG_DEBUG(#{what => peer_address_unknown, peer => Node, reason => Error},
                       #{domain => [teleport]}),
            Error
    end.

address(_Node, {_Ip, _Port} = Addr) ->
    {ok, Addr};
address(Node, discover) ->
    case maps:find(Node, teleport_config:get(peer_addresses)) of
        {ok, Addr} -> {ok, Addr};
        error -> discover(Node)
    end.

%% Ask the peer over distributed Erlang where it listens; a wildcard address
%% means "my host", which comes from the node name as in distributed Erlang.
discover(Node) ->
    try erpc:call(Node, teleport, listen_address, [], teleport_config:get(connect_timeout)) of
        {error, _} = Error -> Error;
        {Ip, Port} -> host_address(Node, Ip, Port)
    catch
        error:{erpc, noconnection} -> {error, noconnection};
        error:{erpc, timeout} -> {error, timeout};
        Class:Reason -> {error, {Class, Reason}}
    end.

host_address(Node, Ip, Port) when Ip =:= {0, 0, 0, 0}; Ip =:= {0, 0, 0, 0, 0, 0, 0, 0} ->
    Family = case tuple_size(Ip) of 4 -> inet; 8 -> inet6 end,
    [_, Host] = string:split(atom_to_list(Node), "@"),
    case inet:getaddr(Host, Family) of
        {ok, Addr} -> {ok, {Addr, Port}};
        {error, Reason} -> {error, {bad_host, Host, Reason}}
    end;
host_address(_Node, Ip, Port) ->
    {ok, {Ip, Port}}.

%% Long enough for the lookup, a connect and a handshake per connection.
open_deadline() ->
    Connect = teleport_config:get(connect_timeout),
    Handshake = teleport_config:get(handshake_timeout),
    2 * Connect + teleport_config:get(pool_size) * (Connect + Handshake) + 1000.

%% @doc Example: a gen_server on node b answers teleport:gs_call with 50 MiB
%% replies. Run with scripts/example_big_reply.sh. Node a calls it 10 times
%% with teleport:gs_call and 10 times with gen_server:call (disterl), and
%% meanwhile measures how long a tiny disterl call to b takes: the number that
%% suffers when big replies share disterl's one connection.
-module(teleport_big_reply).
-behaviour(gen_server).

-export([main/0]).
-export([init/1, handle_call/3, handle_cast/2]).

-define(REPLY_BYTES, 52428800). % 50 MiB
-define(CALLS, 10).

main() ->
    {ok, _} = application:ensure_all_started(teleport),
    {ok, Peer, B} = peer:start_link(#{name => big_reply_b, host => "127.0.0.1", longnames => true,
                                       args => ["-pa" | code:get_path()]}),
    try
        {ok, _} = erpc:call(B, application, ensure_all_started, [teleport]),
        {ok, _} = erpc:call(B, gen_server, start, [{local, big_server}, ?MODULE, [], []]),
        Server = {big_server, B},
        <<_:?REPLY_BYTES/binary>> = teleport:gs_call(Server, blob, 60000),  % opens the pool
        run("teleport:gs_call", fun() -> teleport:gs_call(Server, blob, 60000) end, Server),
        run("gen_server:call ", fun() -> gen_server:call(Server, blob, 60000) end, Server),
        io:format("example: ok~n")
    after
        peer:stop(Peer)
    end.

%% Big calls in one process; small disterl pings in another, timed.
run(Label, Call, Server) ->
    Self = self(),
    Pinger = spawn_link(fun() -> ping_loop(Server, Self, []) end),
    T0 = erlang:monotonic_time(microsecond),
    [<<_:?REPLY_BYTES/binary>> = Call() || _ <- lists:seq(1, ?CALLS)],
    T1 = erlang:monotonic_time(microsecond),
    Pinger ! stop,
    Pings = receive {pings, P} -> lists:sort(P) end,
    io:format("~s: ~b x 50 MiB replies in ~.2f s (~.1f MiB/s); "
              "meanwhile a tiny disterl call took p50 ~.2f ms, max ~.2f ms (~b calls)~n",
              [Label, ?CALLS, (T1 - T0) / 1.0e6, ?CALLS * 50 / ((T1 - T0) / 1.0e6),
               percentile(Pings, 0.5) / 1000, lists:last(Pings) / 1000, length(Pings)]).

ping_loop(Server, Parent, Acc) ->
    receive
        stop -> Parent ! {pings, Acc}
    after 0 ->
        T0 = erlang:monotonic_time(microsecond),
        pong = gen_server:call(Server, ping, 60000),
        ping_loop(Server, Parent, [erlang:monotonic_time(microsecond) - T0 | Acc])
    end.

percentile(Sorted, P) ->
    lists:nth(max(1, ceil(P * length(Sorted))), Sorted).

init([]) ->
    {ok, #{blob => crypto:strong_rand_bytes(?REPLY_BYTES)}}.

handle_call(blob, _From, #{blob := Blob} = State) -> {reply, Blob, State};
handle_call(ping, _From, State) -> {reply, pong, State}.

handle_cast(_, State) -> {noreply, State}.

%% @doc Two-node demo (run by scripts/demo.sh): this node (a) starts a peer
%% node b, both run teleport; a sends messages to a process registered on b
%% (one of them 10 MiB) and calls a gen_server on b with teleport:gs_call.
%% b prints what arrived. Everything crosses on teleport's own connections.
-module(teleport_demo).
-behaviour(gen_server).

-export([main/0]).
-export([init/1, handle_call/3, handle_cast/2]).

main() ->
    {ok, _} = application:ensure_all_started(teleport),
    {ok, Peer, B} = peer:start_link(#{name => demo_b, host => "127.0.0.1", longnames => true,
                                       args => ["-pa" | code:get_path()]}),
    try
        {ok, _} = erpc:call(B, application, ensure_all_started, [teleport]),
        Self = self(),
        _ = erpc:call(B, erlang, spawn, [fun() -> register(shell_proc, self()), Self ! ready, printer(3, Self) end]),
        receive ready -> ok end,
        {ok, _} = erpc:call(B, gen_server, start, [{local, demo_server}, ?MODULE, [], []]),

        io:format("a: teleport:send({shell_proc, ~p}, hello) -> ~p~n", [B, teleport:send({shell_proc, B}, hello)]),
        ok = teleport:send({shell_proc, B}, {a_tuple, [1, 2, 3], #{map => <<"value">>}}),
        Big = crypto:strong_rand_bytes(10 * 1024 * 1024),
        T0 = erlang:monotonic_time(microsecond),
        ok = teleport:send({shell_proc, B}, {big, Big}),
        receive {printed, 3} -> ok after 30000 -> error(demo_timeout) end,
        T1 = erlang:monotonic_time(microsecond),
        io:format("a: 10 MiB message delivered and seen in ~.1f ms~n", [(T1 - T0) / 1000]),

        Reply = teleport:gs_call({demo_server, B}, {reverse, "teleport"}),
        io:format("a: teleport:gs_call({demo_server, ~p}, {reverse, \"teleport\"}) -> ~p~n", [B, Reply]),
        io:format("a: teleport:stats() -> ~p~n", [teleport:stats()]),
        io:format("demo: ok~n")
    after
        peer:stop(Peer)
    end.

printer(0, _Origin) ->
    ok;
printer(N, Origin) ->
    receive
        {big, Bin} -> io:format("b: shell_proc got {big, <<~b bytes>>}~n", [byte_size(Bin)]);
        Msg -> io:format("b: shell_proc got ~p~n", [Msg])
    end,
    case N of
        1 -> Origin ! {printed, 3};
        _ -> ok
    end,
    printer(N - 1, Origin).

init([]) -> {ok, #{}}.
handle_call({reverse, S}, _From, State) -> {reply, lists:reverse(S), State}.
handle_cast(_, State) -> {noreply, State}.

%%% @doc What a peer that should not be trusted, or a careless one, can make a
%%% node do, and whether the node's operator gets to see it.
%%%
%%% <ul>
%%% <li>`logs_reach_default_handler': a peer node whose logging nobody
%%%     configured (OTP's default handler, its stock filters, writing to a file)
%%%     shows teleport's notices: a garbage connection to its listener logs
%%%     `handshake_failed'. 200 malformed call frames of 100 KB each from a
%%%     client that knows the cookie log one bounded line (at most one per 10 s),
%%%     not 20 MB; removing teleport's filter from the default handler silences
%%%     teleport there.</li>
%%% <li>`made_up_pool_cannot_evict': a client that knows the cookie connects to
%%%     this node as peer B (whose pool here is live) and announces a pool B
%%%     never opened (counter 2^64-1): this node asks B over distributed Erlang,
%%%     B denies it, the connection is closed, and B's pool still carries B's
%%%     messages, before and after. Without a live pool of B here nothing is
%%%     asked (B's own next pool is accepted as it comes).</li>
%%% <li>`calls_per_peer_capped': 10,500 gs_calls at once from one peer to a
%%%     slow server: about 10,000 run, the rest exit `{teleport, too_many_calls}'
%%%     at once, counted in `refused_calls'; the node keeps serving.</li>
%%% <li>`connections_per_peer_capped': a peer's 65th connection is closed.</li>
%%% <li>`partial_frame_times_out': a client that starts a large body and stops
%%%     sending is closed once `handshake_timeout' (plus a second per MiB) has
%%%     passed; what the node held for the body is let go.</li>
%%% <li>`claimed_names_make_no_atoms': a client that knows the cookie and names
%%%     itself with a made-up node name creates no atom for it (stats key it by
%%%     a binary).</li>
%%% <li>`handshake_flood_throttled': a node with `max_handshake_failures_per_ip'
%%%     10 flooded with garbage connections from 127.0.0.2: once the source has
%%%     failed 10 handshakes its connections are closed at accept, counted in
%%%     `throttled_handshakes' and logged once (the node's default handler, to a
%%%     file); meanwhile this node's messages to it over its established pool
%%%     arrive, and a new node dialing from 127.0.0.1 connects.</li>
%%% </ul>
-module(security_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("kernel/include/file.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([logs_reach_default_handler/1, made_up_pool_cannot_evict/1, calls_per_peer_capped/1,
         connections_per_peer_capped/1, partial_frame_times_out/1,
         claimed_names_make_no_atoms/1, handshake_flood_throttled/1]).

-define(RPC_TIMEOUT, 30000).

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [logs_reach_default_handler, made_up_pool_cannot_evict, calls_per_peer_capped,
     connections_per_peer_capped, partial_frame_times_out, claimed_names_make_no_atoms,
     handshake_flood_throttled].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("security") of
        ok -> Config;
        {fail, _} = Fail -> Fail
    end.

end_per_suite(_Config) ->
    teleport_test_peer:stop_local_teleport().

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(_Case, Config) ->
    _ = [teleport_test_peer:stop(P) || P <- proplists:get_value(peers, Config, [])],
    ok.

%%====================================================================
%% Logging
%%====================================================================

logs_reach_default_handler(Config) ->
    Log = filename:join(?config(priv_dir, Config), "default_handler.log"),
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name("logs"),
                                                default_handler_to(Log)),
    try
        %% The default handler as OTP ships it: only the file differs.
        {ok, #{filters := Filters, filter_default := stop}} =
            erpc:call(Node, logger, get_handler_config, [default]),
        ?assertEqual([domain, no_domain, remote_gl, teleport], lists:sort([Id || {Id, _} <- Filters])),
        {ok, Address} = erpc:call(Node, teleport_nif, listen_address, []),
        %% A garbage connection: handshake_failed, at notice.
        {ok, Garbage} = gen_tcp:connect(element(1, Address), element(2, Address),
                                        [binary, {active, false}]),
        ok = gen_tcp:send(Garbage, <<255, 255, "not a handshake">>),
        {error, closed} = gen_tcp:recv(Garbage, 0, 10000),
        ok = gen_tcp:close(Garbage),
        ok = wait_for_text(Node, Log, <<"handshake_failed">>),
        %% Malformed calls: one line, bounded.
        {ok, Socket} = teleport_raw_client:connect(Address, Node, erlang:get_cookie(),
                                                   #{announce => teleport_raw_client:pool_epoch(1, 1)}),
        Before = file_size(Node, Log),
        Big = binary:copy(<<"x">>, 100000),
        [ok = teleport_raw_client:send_frame(Socket, call, term_to_binary({some_server, Big, Big}))
         || _ <- lists:seq(1, 200)],
        ok = wait_for_text(Node, Log, <<"malformed_call">>),
        timer:sleep(500),
        Grown = file_size(Node, Log) - Before,
        {ok, Text} = file:read_file(Log),
        Lines = length(binary:matches(Text, <<"malformed_call">>)),
        ct:pal("200 malformed call frames of 100 KB: ~b line(s), the log grew by ~b bytes",
               [Lines, Grown]),
        ?assertEqual(1, Lines),
        ?assert(Grown < 4000),
        teleport_raw_client:close(Socket),
        %% The operator can silence teleport there.
        ok = erpc:call(Node, logger, remove_handler_filter, [default, teleport]),
        SizeBefore = file_size(Node, Log),
        {ok, Again} = gen_tcp:connect(element(1, Address), element(2, Address), [binary, {active, false}]),
        ok = gen_tcp:send(Again, <<255, 255, "garbage">>),
        {error, closed} = gen_tcp:recv(Again, 0, 10000),
        timer:sleep(500),
        ?assertEqual(SizeBefore, file_size(Node, Log))
    after
        teleport_test_peer:stop(Peer)
    end.

%%====================================================================
%% Pools
%%====================================================================

made_up_pool_cannot_evict(_Config) ->
    {ok, Peer, B} = teleport_test_peer:start(teleport_test_peer:unique_name("evict_b")),
    try
        Self = self(),
        Sink = spawn_link(fun() -> forward(Self) end),
        true = register(evict_sink, Sink),
        %% B's pool to us, live.
        ok = erpc:call(B, teleport, send, [{evict_sink, node()}, before]),
        receive {forwarded, before} -> ok after 10000 -> ct:fail(nothing_before) end,
        Failures = maps:get(handshake_failures, teleport:listener_stats()),
        %% A client that knows the cookie, speaking as B, with a pool B never opened.
        {ok, Address} = teleport_nif:listen_address(),
        {ok, Socket} = teleport_raw_client:connect(
                         Address, node(), erlang:get_cookie(),
                         #{client_node => B,
                           announce => teleport_raw_client:pool_epoch(1 bsl 62, (1 bsl 64) - 1)}),
        ok = teleport_raw_client:send_term(Socket, evict_sink, from_the_impostor),
        ?assertEqual(closed, teleport_raw_client:await_closed(Socket, 15000)),
        %% Refused after the handshake: not a handshake failure.
        ?assertEqual(Failures, maps:get(handshake_failures, teleport:listener_stats())),
        %% B's pool was not touched: its messages still arrive, and the impostor's never did.
        [ok = erpc:call(B, teleport, send, [{evict_sink, node()}, {'after', I}]) || I <- lists:seq(1, 50)],
        [receive {forwarded, {'after', I}} -> ok after 10000 -> ct:fail({lost, I}) end
         || I <- lists:seq(1, 50)],
        receive {forwarded, from_the_impostor} -> ct:fail(impostor_delivered) after 200 -> ok end,
        #{connects := Connects} = erpc:call(B, teleport, stats, [node()]),
        ?assertEqual(1, Connects)
    after
        catch_unregister(evict_sink),
        teleport_test_peer:stop(Peer)
    end.

%%====================================================================
%% Caps
%%====================================================================

calls_per_peer_capped(_Config) ->
    {ok, Peer, B} = teleport_test_peer:start(teleport_test_peer:unique_name("calls_b"), ["+P", "100000"]),
    try
        {ok, _} = erpc:call(B, teleport_test_server, start, [capped_server]),
        ?assertEqual(B, teleport:gs_call({capped_server, B}, whoami, 10000)),
        Self = self(),
        N = 10500,
        Callers = [spawn(fun() ->
                                 Self ! {outcome, try teleport:gs_call({capped_server, B},
                                                                        {delayed_reply, 4000, ok}, 30000)
                                                  catch exit:{Reason, _} -> Reason
                                                  end}
                         end) || _ <- lists:seq(1, N)],
        Outcomes = [receive {outcome, O} -> O after 60000 -> ct:fail(calls_hung) end || _ <- Callers],
        Counts = lists:foldl(fun(O, Acc) -> maps:update_with(O, fun(C) -> C + 1 end, 1, Acc) end,
                             #{}, Outcomes),
        Refused = maps:get(refused_calls, erpc:call(B, teleport, stats, [node()])),
        ct:pal("~b calls at once: ~p; refused_calls on B ~p", [N, Counts, Refused]),
        ?assertEqual([ok, {teleport, too_many_calls}], lists:sort(maps:keys(Counts))),
        ?assert(maps:get(ok, Counts) =< 10000),
        ?assert(maps:get(ok, Counts) >= 9000),
        ?assertEqual(maps:get({teleport, too_many_calls}, Counts), Refused),
        %% And it serves again.
        ?assertEqual(B, teleport:gs_call({capped_server, B}, whoami, 10000))
    after
        teleport_test_peer:stop(Peer)
    end.

connections_per_peer_capped(_Config) ->
    {ok, Address} = teleport_nif:listen_address(),
    Name = 'capped_conns@127.0.0.1',
    Epoch = teleport_raw_client:pool_epoch(77, 1),
    Sockets = [begin
                   {ok, S} = teleport_raw_client:connect(Address, node(), erlang:get_cookie(),
                                                         #{client_node => Name, announce => Epoch}),
                   S
               end || _ <- lists:seq(1, 65)],
    try
        Closed = [S || S <- Sockets, teleport_raw_client:await_closed(S, 500) =:= closed],
        ?assertEqual([lists:last(Sockets)], Closed),
        ?assertEqual(64, length([C || #{direction := inbound} = C
                                          <- maps:get(per_connection, stats_of(Name))]))
    after
        [teleport_raw_client:close(S) || S <- Sockets]
    end.

partial_frame_times_out(_Config) ->
    {ok, Peer, B} = teleport_test_peer:start(teleport_test_peer:unique_name("partial_b"), [],
                                             #{handshake_timeout => 500}),
    try
        {ok, Address} = erpc:call(B, teleport_nif, listen_address, []),
        {ok, S} = teleport_raw_client:connect(Address, B, erlang:get_cookie(),
                                              #{announce => teleport_raw_client:pool_epoch(5, 1)}),
        %% BulkStart (kind 4): a Send body of 200,000 bytes; then 10 of them, and no more.
        ok = teleport_raw_client:send_frame(S, 4, <<1, 200000:32>>),
        ok = teleport_raw_client:send_frame(S, 5, binary:copy(<<0>>, 10)),
        Partial = fun() -> maps:get(partial_bytes, erpc:call(B, teleport, stats, ['teleport_raw_client@127.0.0.1'])) end,
        ok = wait_until(fun() -> Partial() =:= 200000 end),
        Started = erlang:monotonic_time(millisecond),
        ?assertEqual(closed, teleport_raw_client:await_closed(S, 10000)),
        Took = erlang:monotonic_time(millisecond) - Started,
        ct:pal("the stalled body's connection closed after ~b ms", [Took]),
        ?assert(Took < 5000),
        ok = wait_until(fun() -> Partial() =:= 0 end)
    after
        teleport_test_peer:stop(Peer)
    end.

claimed_names_make_no_atoms(_Config) ->
    {ok, Address} = teleport_nif:listen_address(),
    Made = "made_up_" ++ integer_to_list(erlang:unique_integer([positive])) ++ "@127.0.0.9",
    ?assertError(badarg, list_to_existing_atom(Made)),
    {ok, S} = teleport_raw_client:connect(Address, node(), erlang:get_cookie(),
                                          #{client_node => list_to_binary(Made),
                                            announce => teleport_raw_client:pool_epoch(9, 1)}),
    try
        ok = teleport_raw_client:send_term(S, nobody_here, hello),
        ok = wait_until(fun() -> is_map_key(list_to_binary(Made), teleport:stats()) end),
        ?assertError(badarg, list_to_existing_atom(Made))
    after
        teleport_raw_client:close(S)
    end.

%%====================================================================
%% Handshake floods
%%====================================================================

handshake_flood_throttled(Config) ->
    Log = filename:join(?config(priv_dir, Config), "flood.log"),
    {ok, Peer, T} = teleport_test_peer:start(teleport_test_peer:unique_name("flooded"),
                                             default_handler_to(Log),
                                             #{max_handshake_failures_per_ip => 10}),
    try
        {ok, _} = teleport_test_peer:start_sink(T, flood_sink_t, self()),
        %% Our pool to T, up before the flood.
        ok = teleport:send({flood_sink_t, T}, before),
        receive {from_sink, T, before} -> ok after 10000 -> ct:fail(nothing_before) end,
        {Ip, Port} = teleport_test_peer:connectable(erpc:call(T, teleport, listen_address, [])),
        Started = erlang:monotonic_time(millisecond),
        Flood = [spawn_link(fun() -> flood(Ip, Port, {127, 0, 0, 2}) end) || _ <- lists:seq(1, 4)],
        Throttled = fun() -> maps:get(throttled_handshakes, erpc:call(T, teleport, listener_stats, [])) end,
        ok = wait_until(fun() -> Throttled() > 0 end),
        %% Our messages still arrive.
        [ok = teleport:send({flood_sink_t, T}, {during, I}) || I <- lists:seq(1, 100)],
        [receive {from_sink, T, {during, I}} -> ok after 10000 -> ct:fail({lost, I}) end
         || I <- lists:seq(1, 100)],
        %% A new node, dialing from 127.0.0.1, connects.
        {ok, PeerC, C} = teleport_test_peer:start(teleport_test_peer:unique_name("newcomer")),
        try
            ?assertEqual(ok, erpc:call(C, teleport, connect, [T])),
            ?assertEqual(ok, erpc:call(C, teleport, send, [{flood_sink_t, T}, from_c])),
            receive {from_sink, T, from_c} -> ok after 10000 -> ct:fail(nothing_from_c) end
        after
            teleport_test_peer:stop(PeerC)
        end,
        %% Still throttled after.
        AfterC = Throttled(),
        ok = wait_until(fun() -> Throttled() > AfterC end),
        [begin unlink(F), exit(F, kill) end || F <- Flood],
        Took = erlang:monotonic_time(millisecond) - Started,
        Stats = erpc:call(T, teleport, listener_stats, []),
        ct:pal("flood of ~b ms: ~p", [Took, Stats]),
        ?assert(maps:get(handshake_failures, Stats) > maps:get(throttled_handshakes, Stats)),
        %% Logged: once per 10 s for that source.
        ok = wait_for_text(T, Log, <<"throttled">>),
        {ok, Text} = file:read_file(Log),
        Lines = length(binary:matches(Text, <<"throttled">>)),
        ?assert(Lines >= 1 andalso Lines =< 1 + Took div 10000, {Lines, Took})
    after
        teleport_test_peer:stop(Peer)
    end.

%% Connects from `Source', sends garbage and waits for the close, until killed.
flood(Ip, Port, Source) ->
    case gen_tcp:connect(Ip, Port, [binary, {active, false}, {ip, Source}], 5000) of
        {ok, S} ->
            _ = gen_tcp:send(S, <<0, 0>>),
            _ = gen_tcp:recv(S, 0, 5000),
            gen_tcp:close(S);
        {error, _} ->
            timer:sleep(10)
    end,
    flood(Ip, Port, Source).

stats_of(Name) ->
    maps:get(Name, teleport:stats(), #{per_connection => []}).

wait_until(Fun) ->
    case teleport_test_peer:wait_until(Fun, 10000) of
        true -> ok;
        false -> ct:fail(condition_never_held)
    end.

forward(To) ->
    receive Msg -> To ! {forwarded, Msg}, forward(To) end.

catch_unregister(Name) ->
    try unregister(Name) catch error:badarg -> ok end.

%% `erl' arguments for a peer whose default handler, otherwise as OTP ships it, writes
%% to the file `Log'.
default_handler_to(Log) ->
    ["-kernel", "logger",
     lists:flatten(io_lib:format("[{handler,default,logger_std_h,#{config=>#{file=>~p}}}]", [Log]))].

wait_for_text(Node, Log, Text) ->
    Found = teleport_test_peer:wait_until(
              fun() ->
                      _ = erpc:call(Node, logger_std_h, filesync, [default]),
                      case file:read_file(Log) of
                          {ok, Bin} -> binary:match(Bin, Text) =/= nomatch;
                          _ -> false
                      end
              end, 10000),
    case Found of
        true -> ok;
        false -> ct:fail({not_logged, Text, file:read_file(Log)})
    end.

file_size(Node, Log) ->
    _ = erpc:call(Node, logger_std_h, filesync, [default]),
    {ok, #file_info{size = Size}} = file:read_file_info(Log),
    Size.

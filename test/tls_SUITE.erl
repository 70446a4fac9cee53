%%% @doc teleport over TLS 1.3 (the `tls' setting): two peers with certificates
%%% from one CA exchange `send' and `gs_call' both ways and round-trip a 10 MiB
%%% binary; a peer whose certificate comes from another CA is refused both ways
%%% (`{error, {handshake, _}}') and counted by the listener; bad settings or files
%%% make `application:start(teleport)' fail. Certificates are made with the
%%% `openssl' command in the suite's private directory (the suite is skipped
%%% without it).
-module(tls_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([send_both_ways/1, gs_call_both_ways/1, big_binary_round_trip/1,
         other_ca_refused/1, plaintext_peer_refused/1, bad_config_refuses_to_start/1]).

-define(SINK, tls_ct_sink).
-define(SERVER, tls_ct_server).
-define(RPC_TIMEOUT, 30000).
-define(MSG_TIMEOUT, 30000).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [send_both_ways, gs_call_both_ways, big_binary_round_trip, other_ca_refused,
     plaintext_peer_refused, bad_config_refuses_to_start].

init_per_suite(Config) ->
    case {os:type(), os:find_executable("openssl")} of
        {{unix, Os}, Openssl} when Os =/= linux, Os =/= freebsd; Openssl =:= false ->
            {skip, "TLS needs a Linux or FreeBSD build and the openssl command "
                   "(to make the test certificates)"};
        _ ->
            case teleport_test_peer:ensure_distributed() of
                ok -> start_suite(Config);
                {fail, _} = Fail -> Fail
            end
    end.

start_suite(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "certs"),
    ok = filelib:ensure_path(Dir),
    Tls = teleport_test_peer:tls_env(Dir),
    Other = teleport_test_peer:make_ca(Dir, "other_ca"),
    OtherTls = teleport_test_peer:make_node_tls(Dir, Other, "other_node"),
    {PeerA, NodeA} = start_peer("tls_ct_a", Tls),
    {PeerB, NodeB} = start_peer("tls_ct_b", Tls),
    true = unlink(PeerA),
    true = unlink(PeerB),
    [{tls, Tls}, {other_tls, OtherTls}, {peer_a, PeerA}, {node_a, NodeA},
     {peer_b, PeerB}, {node_b, NodeB} | Config].

end_per_suite(Config) ->
    _ = [teleport_test_peer:stop(Peer)
         || Key <- [peer_a, peer_b], {_, Peer} <- [lists:keyfind(Key, 1, Config)]],
    ok.

init_per_testcase(_Case, Config) ->
    put(tls_ct_peers, []),
    Config.

end_per_testcase(_Case, _Config) ->
    _ = [teleport_test_peer:stop(Peer) || Peer <- get(tls_ct_peers)],
    ok.

%%--------------------------------------------------------------------
%% Cases

send_both_ways(Config) ->
    {A, B} = {?config(node_a, Config), ?config(node_b, Config)},
    Me = self(),
    [begin
         {ok, _} = teleport_test_peer:start_sink(To, ?SINK, Me),
         Tag = make_ref(),
         Msgs = [{Tag, N, binary:copy(<<N>>, N * 97)} || N <- lists:seq(1, 200)],
         ok = erpc:call(From, lists, foreach,
                        [fun(M) -> ok = teleport:send({?SINK, To}, M) end, Msgs],
                        ?RPC_TIMEOUT),
         %% In order, whole.
         [receive {from_sink, To, M} -> ok after ?MSG_TIMEOUT -> ct:fail({missing, From, To, M}) end
          || M <- Msgs]
     end || {From, To} <- [{A, B}, {B, A}]],
    %% Both pools are TLS connections of the listener's: nothing refused.
    [?assertEqual(0, maps:get(handshake_failures,
                              erpc:call(N, teleport, listener_stats, [], ?RPC_TIMEOUT)))
     || N <- [A, B]].

gs_call_both_ways(Config) ->
    {A, B} = {?config(node_a, Config), ?config(node_b, Config)},
    [begin
         X = {make_ref(), lists:seq(1, 100)},
         ?assertEqual(X, erpc:call(From, teleport, gs_call, [{?SERVER, To}, {echo, X}],
                                   ?RPC_TIMEOUT)),
         ?assertEqual(To, erpc:call(From, teleport, gs_call, [{?SERVER, To}, whoami],
                                    ?RPC_TIMEOUT))
     end || {From, To} <- [{A, B}, {B, A}]],
    %% Over teleport (over TLS), not over distributed Erlang.
    ?assert(lists:member(B, erpc:call(A, teleport, nodes, [], ?RPC_TIMEOUT))),
    ?assert(lists:member(A, erpc:call(B, teleport, nodes, [], ?RPC_TIMEOUT))).

big_binary_round_trip(Config) ->
    {A, B} = {?config(node_a, Config), ?config(node_b, Config)},
    Big = rand:bytes(10 * 1024 * 1024),
    Hash = erlang:md5(Big),
    %% A asks B to echo 10 MiB: it crosses A -> B and back B -> A, both over TLS.
    Fun = fun() ->
                  Reply = teleport:gs_call({?SERVER, B}, {echo, Big}, 60000),
                  {byte_size(Reply), erlang:md5(Reply)}
          end,
    ?assertEqual({byte_size(Big), Hash}, erpc:call(A, erlang, apply, [Fun, []], 120000)),
    #{bytes_out := Out} = erpc:call(A, teleport, stats, [B], ?RPC_TIMEOUT),
    ?assert(Out >= byte_size(Big)).

other_ca_refused(Config) ->
    A = ?config(node_a, Config),
    {_, X} = start_case_peer("tls_ct_x", ?config(other_tls, Config)),
    Before = failures(A),
    %% A refuses X's certificate (not from its CA), and X refuses A's.
    ?assertMatch({error, {handshake, tls_unknown_ca}},
                 erpc:call(A, teleport, connect, [X], ?RPC_TIMEOUT)),
    ?assertMatch({error, {handshake, _}}, erpc:call(X, teleport, connect, [A], ?RPC_TIMEOUT)),
    ?assert(teleport_test_peer:wait_until(fun() -> failures(A) > Before end, 10000)),
    ?assertNot(lists:member(X, erpc:call(A, teleport, nodes, [], ?RPC_TIMEOUT))),
    ?assertNot(lists:member(A, erpc:call(X, teleport, nodes, [], ?RPC_TIMEOUT))).

plaintext_peer_refused(Config) ->
    A = ?config(node_a, Config),
    {_, P} = start_case_peer("tls_ct_p", disabled),
    Before = failures(A),
    ?assertMatch({error, {handshake, _}}, erpc:call(P, teleport, connect, [A], ?RPC_TIMEOUT)),
    ?assertMatch({error, {handshake, _}}, erpc:call(A, teleport, connect, [P], ?RPC_TIMEOUT)),
    ?assert(teleport_test_peer:wait_until(fun() -> failures(A) > Before end, 10000)),
    ?assert(teleport_test_peer:wait_until(fun() -> failures(P) >= 1 end, 10000)).

bad_config_refuses_to_start(Config) ->
    Tls = ?config(tls, Config),
    Dir = filename:dirname(maps:get(certfile, Tls)),
    Missing = Tls#{certfile => filename:join(Dir, "missing.pem")},
    WrongKey = Tls#{keyfile => maps:get(keyfile, ?config(other_tls, Config))},
    Garbage = filename:join(Dir, "garbage.pem"),
    ok = file:write_file(Garbage, <<"not a certificate\n">>),
    NotPem = Tls#{cacertfile => Garbage},
    BadVerify = Tls#{verify => sometimes},
    BadCipher = Tls#{ciphers => ["TLS_RSA_WITH_RC4_128_MD5"]},
    NoKey = maps:remove(keyfile, Tls),
    [begin
         Result = teleport_test_peer:start(teleport_test_peer:unique_name("tls_ct_bad"), [],
                                           #{tls => Bad}),
         ct:pal("tls ~p:~n~p", [Bad, Result]),
         %% application:ensure_all_started/1 returned {error, _} (no crash loop: the
         %% peer answered, and was stopped).
         ?assertMatch({error, {teleport_start_failed, _,
                               {error, {badmatch, {error, _}}}}}, Result)
     end || Bad <- [Missing, WrongKey, NotPem, BadVerify, BadCipher, NoKey]].

%%--------------------------------------------------------------------
%% Helpers

failures(Node) ->
    maps:get(handshake_failures, erpc:call(Node, teleport, listener_stats, [], ?RPC_TIMEOUT)).

start_peer(Prefix, Tls) ->
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name(Prefix), [],
                                                #{tls => Tls, pool_size => 2}),
    {ok, _} = erpc:call(Node, teleport_test_server, start, [?SERVER], ?RPC_TIMEOUT),
    {Peer, Node}.

start_case_peer(Prefix, Tls) ->
    {Peer, Node} = start_peer(Prefix, Tls),
    put(tls_ct_peers, [Peer | get(tls_ct_peers)]),
    {Peer, Node}.

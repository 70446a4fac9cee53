%%% @doc End-to-end tests of teleport between real BEAM nodes on loopback.
%%%
%%% The test runner's node (the "origin") runs teleport and starts two peer
%%% nodes, A and B, that run it too; some cases start their own peers (C, D,
%%% W). What the suite proves:
%%% <ul>
%%% <li>`teleport:send/2' delivers to remote pids, to `{Name, Node}', to local
%%%     pids and names (without opening a pool to ourselves); bad
%%%     destinations raise `badarg' like `erlang:send/2'; an unreachable node
%%%     gives `{error, noconnection}' in bounded time.</li>
%%% <li>Every kind of term (UTF-8 atoms, bignums, floats, heap, refc and sub
%%%     binaries, bitstrings, improper lists, the OTP 24 call tag, big tuples
%%%     and maps, local and remote pids/refs, ports, local and external funs, a
%%%     list nested 10,000 deep) crosses teleport both ways unchanged and in
%%%     order.</li>
%%% <li>`gs_call'/`gs_cast' work against gen_server and gen_statem, with
%%%     large replies and delayed replies, and fail exactly like
%%%     `gen_server:call': timeout (promptly), noproc, nodedown, the server's
%%%     exit reason, and a node dying mid-call (promptly, not at the
%%%     timeout).</li>
%%% <li>Ordering per sender and per node holds for one sender, for many, and
%%%     for 100 processes racing to be the first to send to a fresh node,
%%%     which must end with exactly one pool of `pool_size' connections.</li>
%%% <li>`stats/0' counts traffic on both ends, per peer and per connection
%%%     (outbound by pool slot, inbound on the receiver); `connect/1,2' and
%%%     `disconnect/1' open and close pools, and a closed pool reopens on the
%%%     next send.</li>
%%% <li>A node with another cookie can neither open a pool to us nor accept
%%%     ours, and nothing it sends arrives.</li>
%%% </ul>
%%% Peers report what they receive with a "sink" process that forwards every
%%% message back to the origin over distributed Erlang (never over teleport),
%%% to the process registered here as `teleport_ct_collector': the test case
%%% process. Every test message carries a fresh tag, so stragglers from an
%%% earlier case can never satisfy a later one.
-module(teleport_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

%% Common Test callbacks
-export([suite/0, all/0, groups/0,
         init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2,
         init_per_testcase/2, end_per_testcase/2]).

%% Test cases
-export([send_to_pid/1, send_to_registered_name/1, send_to_local_name/1,
         send_to_self_pid/1, local_send_paths/1, send_badarg/1,
         send_unreachable_node/1,
         roundtrip_corpus/1,
         gs_call_gen_server/1, gs_call_gen_statem/1, gs_call_big_reply/1, gs_cast/1,
         gs_call_timeout/1, gs_call_noproc/1, gs_call_nodedown/1,
         gs_call_server_dies/1, gs_call_node_dies_during_call/1,
         ordering_per_sender/1, ordering_many_senders/1, concurrent_first_senders/1,
         send_with_key_keeps_order/1, send_unordered_delivers_all/1, send_option_badarg/1,
         backoff_after_failure/1, connect_refused/1,
         stats_counts/1, stats_per_connection/1, connect_disconnect/1,
         removed_setting_ignored/1, io_thread_priority_idle/1, reader_busy_wait/1,
         big_term_waits_for_a_decoder_not_the_io_thread/1, io_threads_as_configured/1,
         sndbuf_sizes_outbound_connections/1, wrong_cookie_refused/1]).
%% Run on A.
-export([io_thread_count/0]).

%% Helpers other suites may reuse.
-export([collect/2, collect/3]).

-define(POOL_SIZE, 4).
%% More I/O threads than `auto' gives on CI's 2 cores (1): a pool's connections,
%% and the peers' inbound ones, spread over threads; other suites run at `auto'.
-define(IO_THREADS, 3).
-define(SINK, teleport_ct_sink).
-define(COLLECTOR, teleport_ct_collector).
-define(SERVER, teleport_ct_server).
-define(STATEM, teleport_ct_statem).
-define(NOBODY, 'nobody@127.0.0.1').
%% Generous, but bounded: these run on noisy 2-core machines.
-define(MSG_TIMEOUT, 60000).
-define(RPC_TIMEOUT, 30000).

%%====================================================================
%% Common Test callbacks
%%====================================================================

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [{group, send},
     {group, terms},
     {group, calls},
     {group, call_errors},
     {group, ordering},
     {group, pools},
     {group, security}].

groups() ->
    [{send, [], [send_to_pid, send_to_registered_name, send_to_local_name,
                 send_to_self_pid, local_send_paths, send_badarg,
                 send_unreachable_node]},
     {terms, [], [roundtrip_corpus]},
     {calls, [], [gs_call_gen_server, gs_call_gen_statem, gs_call_big_reply, gs_cast]},
     {call_errors, [], [gs_call_timeout, gs_call_noproc, gs_call_nodedown,
                        gs_call_server_dies, gs_call_node_dies_during_call]},
     {ordering, [], [ordering_per_sender, ordering_many_senders,
                     concurrent_first_senders, send_with_key_keeps_order,
                     send_unordered_delivers_all, send_option_badarg]},
     {pools, [], [stats_counts, stats_per_connection, connect_disconnect, backoff_after_failure,
                  connect_refused, removed_setting_ignored, io_thread_priority_idle, reader_busy_wait,
                  big_term_waits_for_a_decoder_not_the_io_thread, io_threads_as_configured,
                  sndbuf_sizes_outbound_connections]},
     {security, [], [wrong_cookie_refused]}].

init_per_suite(Config) ->
    case teleport_test_peer:ensure_distributed() of
        ok ->
            start_suite(Config);
        {fail, _} = Fail ->
            Fail
    end.

start_suite(Config) ->
    %% Settings apply at start: restarts teleport if something started it.
    ok = teleport_test_peer:start_local_teleport("teleport_ct", #{pool_size => ?POOL_SIZE,
                                                                  io_threads => ?IO_THREADS}),
    %% Peers are linked to this process until everything is set up: if any
    %% step crashes, they are halted with it (end_per_suite does not run).
    {{PeerA, NodeA}, {PeerB, NodeB}} =
        try
            {start_suite_peer("teleport_ct_a"), start_suite_peer("teleport_ct_b")}
        catch
            Class:Reason:Stack ->
                _ = application:stop(teleport),
                erlang:raise(Class, Reason, Stack)
        end,
    %% init_per_suite's process exits when it returns: that must not halt
    %% the peers. end_per_suite stops them.
    true = unlink(PeerA),
    true = unlink(PeerB),
    ct:pal("origin ~p listens on ~p; peers ~p and ~p",
           [node(), teleport:listen_address(), NodeA, NodeB]),
    [{peer_a, PeerA}, {node_a, NodeA}, {peer_b, PeerB}, {node_b, NodeB} | Config].

%% A peer for the whole suite: a sink, a gen_server and a gen_statem on it.
start_suite_peer(Prefix) ->
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name(Prefix), [],
                                                #{io_threads => ?IO_THREADS}),
    {ok, _} = teleport_test_peer:start_sink(Node, ?SINK, {?COLLECTOR, node()}),
    {ok, _} = erpc:call(Node, teleport_test_server, start, [?SERVER], ?RPC_TIMEOUT),
    {ok, _} = erpc:call(Node, teleport_test_statem, start, [?STATEM], ?RPC_TIMEOUT),
    {Peer, Node}.

end_per_suite(Config) ->
    _ = [teleport_test_peer:stop(Peer)
         || Key <- [peer_a, peer_b], {_, Peer} <- [lists:keyfind(Key, 1, Config)]],
    teleport_test_peer:stop_local_teleport(#{pool_size => ?POOL_SIZE, io_threads => ?IO_THREADS}).

init_per_group(_Group, Config) ->
    Config.

end_per_group(_Group, _Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    flush(),
    claim_collector(),
    put(teleport_ct_peers, []),
    put(teleport_ct_remote_procs, []),
    Config.

end_per_testcase(_Case, _Config) ->
    %% Normally this runs in the test case's process. If it does not (a
    %% timetrap fired), that process is dead and took its linked peers and
    %% helpers with it; remote processes on A and B go with end_per_suite.
    _ = [exit(Pid, kill) || Pid <- get_list(teleport_ct_remote_procs)],
    _ = [teleport_test_peer:stop(Peer) || Peer <- get_list(teleport_ct_peers)],
    _ = case whereis(?COLLECTOR) =:= self() of
            true -> unregister(?COLLECTOR);
            false -> ok
        end,
    ok.

%%====================================================================
%% send
%%====================================================================

send_to_pid(Config) ->
    A = ?config(node_a, Config),
    SinkA = erpc:call(A, erlang, whereis, [?SINK], ?RPC_TIMEOUT),
    ?assert(is_pid(SinkA)),
    ?assertEqual(A, node(SinkA)),
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send(SinkA, {Tag, by_pid})),
    ?assertEqual([{A, by_pid}], collect(Tag, 1, ?MSG_TIMEOUT)),
    ?assert(lists:member(A, teleport:nodes())).

send_to_registered_name(Config) ->
    A = ?config(node_a, Config),
    B = ?config(node_b, Config),
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, A}, {Tag, to_a})),
    ?assertEqual([{A, to_a}], collect(Tag, 1, ?MSG_TIMEOUT)),
    ?assertEqual(ok, teleport:send({?SINK, B}, {Tag, to_b})),
    ?assertEqual([{B, to_b}], collect(Tag, 1, ?MSG_TIMEOUT)),
    %% An unregistered name on a live node is accepted and dropped, like `!'.
    ?assertEqual(ok, teleport:send({teleport_ct_no_such_name, A}, {Tag, dropped})),
    ?assertEqual(ok, teleport:send({?SINK, A}, {Tag, after_drop})),
    ?assertEqual([{A, after_drop}], collect(Tag, 1, ?MSG_TIMEOUT)).

send_to_local_name(_Config) ->
    Name = teleport_ct_local,
    Fwd = start_local_forwarder(),
    true = register(Name, Fwd),
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send(Name, {Tag, by_atom})),
    ?assertEqual(ok, teleport:send({Name, node()}, {Tag, by_name_node})),
    ?assertEqual([{Tag, by_atom}, {Tag, by_name_node}], forwarded(Fwd, 2, ?MSG_TIMEOUT)),
    ?assertNot(lists:member(node(), teleport:nodes())).

send_to_self_pid(_Config) ->
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send(self(), {Tag, one})),
    ?assertEqual(ok, teleport:send(self(), {Tag, two})),
    ?assertEqual([one, two], receive_tagged(Tag, 2, ?MSG_TIMEOUT)),
    ?assertNot(lists:member(node(), teleport:nodes())).

local_send_paths(_Config) ->
    Fwd = start_local_forwarder(),
    Tag = make_ref(),
    %% A local pid, the collector (this process) by atom and by {Name, node()}.
    ?assertEqual(ok, teleport:send(Fwd, {Tag, to_pid})),
    ?assertEqual([{Tag, to_pid}], forwarded(Fwd, 1, ?MSG_TIMEOUT)),
    ?assertEqual(ok, teleport:send(?COLLECTOR, {Tag, by_atom})),
    ?assertEqual(ok, teleport:send({?COLLECTOR, node()}, {Tag, by_name_node})),
    ?assertEqual([by_atom, by_name_node], receive_tagged(Tag, 2, ?MSG_TIMEOUT)),
    %% gs_call and gs_cast to local processes work too.
    {ok, Srv} = teleport_test_server:start_anon(),
    track_proc(Srv),
    ?assertEqual({Tag, local}, teleport:gs_call(Srv, {echo, {Tag, local}})),
    ?assertEqual(ok, teleport:gs_cast(Srv, {forward, self(), {Tag, cast}})),
    ?assertEqual([{Tag, cast}], receive_casts(Tag, 1, ?MSG_TIMEOUT)),
    %% None of it opened a pool to ourselves.
    ?assertNot(lists:member(node(), teleport:nodes())).

send_badarg(_Config) ->
    ?assertError(badarg, teleport:send("str", msg)),
    ?assertError(badarg, teleport:send({1, 2}, msg)),
    ?assertError(badarg, teleport:send({a, "n"}, msg)),
    ?assertError(badarg, teleport:send({"a", node()}, msg)),
    ?assertError(badarg, teleport:send({a, b, c}, msg)),
    ?assertError(badarg, teleport:send(42, msg)),
    ?assertError(badarg, teleport:send(make_ref(), msg)),
    ?assertEqual(undefined, whereis(teleport_ct_not_registered)),
    ?assertError(badarg, teleport:send(teleport_ct_not_registered, msg)),
    %% The same destinations are badarg for erlang:send/2 (what send mimics).
    ?assertError(badarg, erlang:send(teleport_ct_not_registered, msg)),
    ?assertError(badarg, erlang:send({1, 2}, msg)).

send_unreachable_node(_Config) ->
    Tag = make_ref(),
    {Result, Ms} = timed(fun() -> teleport:send({?SINK, ?NOBODY}, {Tag, lost}) end),
    ct:pal("send to ~p: ~p after ~p ms", [?NOBODY, Result, Ms]),
    ?assertEqual({error, noconnection}, Result),
    ?assertMatch(T when T < 15000, Ms),
    %% It stays an error, in bounded time, and leaves no pool behind.
    {Again, Ms2} = timed(fun() -> teleport:send({?SINK, ?NOBODY}, {Tag, lost}) end),
    ?assertEqual({error, noconnection}, Again),
    ?assertMatch(T when T < 15000, Ms2),
    ?assertNot(lists:member(?NOBODY, teleport:nodes())).

%% A failed open is not retried at once: no connect storm to a dead node.
backoff_after_failure(_Config) ->
    Ghost = 'ghost_backoff@127.0.0.1',
    ?assertMatch({error, _}, teleport:connect(Ghost)),
    ?assertMatch({error, {backoff, _}}, in_backoff(fun() -> teleport:connect(Ghost) end)),
    ?assertEqual({error, noconnection}, teleport:send({?SINK, Ghost}, x)),
    %% Past the backoff it tries again (and fails again).
    ?assert(teleport_test_peer:wait_until(
              fun() ->
                      case teleport:connect(Ghost) of
                          {error, {backoff, _}} -> false;
                          {error, _} -> true
                      end
              end, 10000)).

%% Nothing listens at the address: the reason says so, as a term to match.
connect_refused(_Config) ->
    {ok, Listen} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(Listen),
    ok = gen_tcp:close(Listen),
    Node = 'refused_port@127.0.0.1',
    ?assertEqual({error, {connect, econnrefused}}, teleport:connect(Node, {{127, 0, 0, 1}, Port})),
    %% Within the backoff, the same reason comes back, wrapped.
    ?assertEqual({error, {backoff, {connect, econnrefused}}},
                 in_backoff(fun() -> teleport:connect(Node, {{127, 0, 0, 1}, Port}) end)).

%% `Connect' again right after a failed open: within the backoff (100 ms after the
%% failure, doubling with each one) it answers {error, {backoff, _}}. A machine too busy
%% to ask within it makes a fresh attempt, which fails again with a longer backoff: ask
%% again until one lands inside.
in_backoff(Connect) ->
    in_backoff(Connect, 6).

in_backoff(Connect, Tries) ->
    case Connect() of
        {error, {backoff, _}} = InBackoff -> InBackoff;
        {error, _} when Tries > 1 -> in_backoff(Connect, Tries - 1);
        Other -> Other
    end.

%%====================================================================
%% terms
%%====================================================================

roundtrip_corpus(Config) ->
    A = ?config(node_a, Config),
    B = ?config(node_b, Config),
    {ok, Echo} = teleport_test_peer:start_echo(A, self()),
    track_proc(Echo),
    Corpus = corpus(B),
    {Labels, Terms} = lists:unzip(Corpus),
    T0 = now_ms(),
    _ = [?assertEqual({Label, ok}, {Label, teleport:send(Echo, Term)})
         || {Label, Term} <- Corpus],
    Got = receive_echoes(Echo, length(Terms), ?MSG_TIMEOUT),
    ct:pal("~p terms echoed through ~p in ~p ms", [length(Terms), A, now_ms() - T0]),
    check_corpus(Labels, Terms, Got),
    %% The funs still work after two trips.
    Back = maps:from_list(lists:zip(Labels, Got)),
    ?assertEqual(42, (maps:get(fun_local, Back))(41)),
    ?assertEqual(49, (maps:get(fun_closure, Back))(42)),
    ?assertEqual([3, 2, 1], (maps:get(fun_external, Back))([1, 2, 3])).

corpus(PeerB) ->
    Big = det_bytes(1024 * 1024),
    PidB = erpc:call(PeerB, erlang, whereis, [?SINK], ?RPC_TIMEOUT),
    true = is_pid(PidB) andalso node(PidB) =:= PeerB,
    RefB = erpc:call(PeerB, erlang, make_ref, [], ?RPC_TIMEOUT),
    PeerB = node(RefB),
    %% An atom the peers have never seen.
    NewAtom = list_to_atom("teleport_ct_fresh_" ++ integer_to_list(erlang:unique_integer([positive]))),
    Deep = lists:foldl(fun(_, Acc) -> [Acc] end, [], lists:seq(1, 10000)),
    N = 7,
    [{atom, hello},
     {atom_latin1, 'héllo'},
     {atom_cjk, '日本語'},
     {atom_empty, ''},
     {atom_fresh, NewAtom},
     {atom_bool, true},
     {int_zero, 0},
     {int_small, 42},
     {int_255, 255},
     {int_256, 256},
     {int_negative, -1},
     {int_min32, -2147483648},
     {int_max32, 2147483647},
     {int_max_small_64, (1 bsl 59) - 1},
     {bignum_2_64, 1 bsl 64},
     {bignum_neg_2_200, -(1 bsl 200)},
     {bignum_huge, (1 bsl 5000) + 12345},
     {float_zero, 0.0},
     {float_big, 1.5e300},
     {float_negative, -3.25},
     {float_tiny, 5.0e-324},
     {float_pi, math:pi()},
     {bin_empty, <<>>},
     {bin_10, <<"0123456789">>},
     {bin_64, det_bytes(64)},
     {bin_65, det_bytes(65)},
     {bin_1mib, Big},
     {sub_binary, binary:part(Big, 3, 1000)},
     {bits_3, <<1:3>>},
     {bits_abc_4, <<"abc", 5:4>>},
     {nil, []},
     {list_ints, [1, 2, 3]},
     {list_mixed, [a, 1, 2.5, "s", <<"b">>, {t}, #{k => v}, []]},
     {improper_atom, [a | b]},
     {improper_bin, [1, 2 | <<"x">>]},
     {call_tag_otp24, [alias | make_ref()]},
     {string, "hello"},
     {string_unicode, "héllo 日本語"},
     {string_long, lists:duplicate(70000, $z)},
     {tuple_empty, {}},
     {tuple_1, {a}},
     {tuple_300, list_to_tuple(lists:seq(1, 300))},
     {map_empty, #{}},
     {map_small, #{a => 1, <<"b">> => [2], 3 => {c}, 4.5 => 'héllo'}},
     {map_40, maps:from_list([{K, K * K} || K <- lists:seq(1, 40)])},
     {map_nested, #{{a, 1} => #{<<"k">> => [1, 2, 3], {b, {c}} => #{}},
                    {tuple, key} => #{#{inner => key} => {deep, #{x => y}}}}},
     {pid_self, self()},
     {pid_peer_b, PidB},
     {ref_local, make_ref()},
     {ref_peer_b, RefB},
     {port, hd(erlang:ports())},
     {fun_local, fun(X) -> X + 1 end},
     {fun_closure, fun(X) -> X + N end},
     {fun_external, fun lists:reverse/1},
     {deep_list, Deep},
     {mixed, {mixed, [#{list => lists:seq(1, 1000),
                        sub => binary:part(Big, 100, 70000),
                        self => self(),
                        ref => RefB,
                        float => -3.25,
                        big => -(1 bsl 200)},
                      {<<1:3>>, [a | b], '日本語', list_to_tuple(lists:seq(1, 50))},
                      fun lists:reverse/1
                      | <<"tail">>]}}].

%% Compares element by element, naming the first term that differs.
check_corpus(Labels, Terms, Got) ->
    case length(Got) =:= length(Terms) of
        true ->
            ok;
        false ->
            {_, Missing} = lists:split(length(Got), Labels),
            ct:fail({echoes_missing, length(Got), of_, length(Terms),
                     first_missing, hd(Missing)})
    end,
    Bad = [{Label, short(Sent), short(Back)}
           || {Label, Sent, Back} <- lists:zip3(Labels, Terms, Got), Sent =/= Back],
    ?assertEqual([], Bad).

%%====================================================================
%% calls
%%====================================================================

gs_call_gen_server(Config) ->
    A = ?config(node_a, Config),
    B = ?config(node_b, Config),
    SrvA = erpc:call(A, erlang, whereis, [?SERVER], ?RPC_TIMEOUT),
    ?assert(is_pid(SrvA)),
    Tag = make_ref(),
    ?assertEqual({Tag, by_pid}, teleport:gs_call(SrvA, {echo, {Tag, by_pid}})),
    ?assertEqual({Tag, by_name}, teleport:gs_call({?SERVER, A}, {echo, {Tag, by_name}})),
    ?assertEqual({Tag, t3}, teleport:gs_call({?SERVER, A}, {echo, {Tag, t3}}, 10000)),
    ?assertEqual(A, teleport:gs_call({?SERVER, A}, whoami)),
    ?assertEqual(B, teleport:gs_call({?SERVER, B}, whoami)),
    %% gen_server:reply/2 from another process, later.
    {Delayed, Ms} = timed(fun() ->
                                  teleport:gs_call({?SERVER, A}, {delayed_reply, 300, {Tag, late}},
                                                   10000)
                          end),
    ?assertEqual({Tag, late}, Delayed),
    ?assertMatch(T when T >= 250, Ms),
    %% Many calls in a row, each its own reply.
    ?assertEqual(lists:seq(1, 200),
                 [teleport:gs_call(SrvA, {echo, I}) || I <- lists:seq(1, 200)]),
    %% The server is still alive and well.
    ?assertEqual(ok, teleport:gs_call(SrvA, {sleep, 0})).

gs_call_gen_statem(Config) ->
    A = ?config(node_a, Config),
    StatemA = erpc:call(A, erlang, whereis, [?STATEM], ?RPC_TIMEOUT),
    ?assert(is_pid(StatemA)),
    Tag = make_ref(),
    ?assertEqual({Tag, by_name}, teleport:gs_call({?STATEM, A}, {echo, {Tag, by_name}})),
    ?assertEqual({Tag, by_pid}, teleport:gs_call(StatemA, {echo, {Tag, by_pid}}, 10000)),
    ?assertEqual(A, teleport:gs_call(StatemA, whoami)),
    %% A gen_statem stopping in the call: the caller gets its reason.
    {ok, Doomed} = erpc:call(A, teleport_test_statem, start_anon, [], ?RPC_TIMEOUT),
    track_proc(Doomed),
    ?assertEqual({exit, {bye, {teleport, gs_call, [Doomed, {stop, bye}, 10000]}}},
                 catch_exit(fun() -> teleport:gs_call(Doomed, {stop, bye}, 10000) end)).

gs_call_big_reply(Config) ->
    A = ?config(node_a, Config),
    Big = det_bytes(5 * 1024 * 1024),
    {Reply, Ms} = timed(fun() -> teleport:gs_call({?SERVER, A}, {echo, Big}, ?MSG_TIMEOUT) end),
    ct:pal("5 MiB echoed by a gen_server on ~p in ~p ms", [A, Ms]),
    ?assert(is_binary(Reply)),
    ?assertEqual(byte_size(Big), byte_size(Reply)),
    ?assert(Reply =:= Big),
    %% A big reply does not get in the way of the next small one.
    ?assertEqual(small, teleport:gs_call({?SERVER, A}, {echo, small})).

gs_cast(Config) ->
    A = ?config(node_a, Config),
    SrvA = erpc:call(A, erlang, whereis, [?SERVER], ?RPC_TIMEOUT),
    Tag = make_ref(),
    ?assertEqual(ok, teleport:gs_cast({?SERVER, A}, {forward, self(), {Tag, by_name}})),
    ?assertEqual(ok, teleport:gs_cast(SrvA, {forward, self(), {Tag, by_pid}})),
    ?assertEqual([{Tag, by_name}, {Tag, by_pid}], receive_casts(Tag, 2, ?MSG_TIMEOUT)),
    %% Always ok, like gen_server:cast: missing name, unreachable node.
    ?assertEqual(ok, teleport:gs_cast({teleport_ct_no_such_name, A}, {forward, self(), {Tag, no}})),
    ?assertEqual(ok, teleport:gs_cast({?SERVER, ?NOBODY}, {forward, self(), {Tag, no}})),
    ?assertEqual([], receive_casts(Tag, 1, 500)).

%%====================================================================
%% call errors
%%====================================================================

gs_call_timeout(Config) ->
    A = ?config(node_a, Config),
    {ok, Srv} = erpc:call(A, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    track_proc(Srv),
    Req = {sleep, 2000},
    {Result, Ms} = timed(fun() -> catch_exit(fun() -> teleport:gs_call(Srv, Req, 100) end) end),
    ct:pal("gs_call with timeout 100 returned after ~p ms", [Ms]),
    ?assertEqual({exit, {timeout, {teleport, gs_call, [Srv, Req, 100]}}}, Result),
    ?assertMatch(T when T >= 90 andalso T < 1500, Ms).

gs_call_noproc(Config) ->
    A = ?config(node_a, Config),
    Dest = {teleport_ct_no_such_name, A},
    ?assertEqual({exit, {noproc, {teleport, gs_call, [Dest, {echo, x}, 5000]}}},
                 catch_exit(fun() -> teleport:gs_call(Dest, {echo, x}, 5000) end)),
    %% A pid that is dead.
    {ok, Srv} = erpc:call(A, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    Mref = monitor(process, Srv),
    exit(Srv, kill),
    receive {'DOWN', Mref, process, Srv, _} -> ok after ?RPC_TIMEOUT -> ct:fail(server_not_killed) end,
    ?assertEqual({exit, {noproc, {teleport, gs_call, [Srv, {echo, x}, 5000]}}},
                 catch_exit(fun() -> teleport:gs_call(Srv, {echo, x}, 5000) end)).

gs_call_nodedown(_Config) ->
    Dest = {x, ?NOBODY},
    {Result, Ms} = timed(fun() -> catch_exit(fun() -> teleport:gs_call(Dest, hello, 5000) end) end),
    ct:pal("gs_call to ~p: ~p after ~p ms", [Dest, Result, Ms]),
    ?assertMatch({exit, {Reason, {teleport, gs_call, [Dest, hello, 5000]}}}
                   when Reason =:= {nodedown, ?NOBODY} orelse Reason =:= noconnection,
                 Result).

gs_call_server_dies(Config) ->
    A = ?config(node_a, Config),
    {ok, Srv} = erpc:call(A, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    track_proc(Srv),
    ?assertEqual({exit, {boom, {teleport, gs_call, [Srv, {stop, boom}, 5000]}}},
                 catch_exit(fun() -> teleport:gs_call(Srv, {stop, boom}) end)),
    ?assertNot(erpc:call(A, erlang, is_process_alive, [Srv], ?RPC_TIMEOUT)),
    %% Again and again: the caller must learn the server's own exit reason
    %% every time, never noproc (the server was alive when the call was made)
    %% or a timeout.
    Rounds = 100,
    Reasons = [begin
                   {ok, S} = erpc:call(A, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
                   track_proc(S),
                   case catch_exit(fun() -> teleport:gs_call(S, {stop, {boom, I}}) end) of
                       {exit, {{boom, I}, {teleport, gs_call, [S, {stop, {boom, I}}, 5000]}}} ->
                           boom;
                       {exit, {Other, _}} ->
                           Other;
                       Returned ->
                           Returned
                   end
               end || I <- lists:seq(1, Rounds)],
    ?assertEqual(#{boom => Rounds}, count(Reasons)).

gs_call_node_dies_during_call(_Config) ->
    {CPeer, C} = start_case_peer("teleport_ct_c"),
    {ok, Srv} = erpc:call(C, teleport_test_server, start_anon, [], ?RPC_TIMEOUT),
    Req = {sleep, 10000},
    CallTimeout = 20000,
    Parent = self(),
    Caller = spawn_link(fun() ->
                                Parent ! {call_result, self(),
                                          catch_exit(fun() ->
                                                             teleport:gs_call(Srv, Req, CallTimeout)
                                                     end)}
                        end),
    %% Wait until the server is inside the call, then kill its node.
    ?assert(teleport_test_peer:wait_until(fun() -> sleeping(C, Srv) end, ?RPC_TIMEOUT)),
    T0 = now_ms(),
    ok = teleport_test_peer:stop(CPeer),
    Result = receive
                 {call_result, Caller, R} -> R
             after CallTimeout + 10000 ->
                     ct:fail(call_never_returned)
             end,
    Ms = now_ms() - T0,
    ct:pal("call exited ~p ms after ~p was stopped: ~p", [Ms, C, Result]),
    ?assertMatch({exit, {Reason, {teleport, gs_call, [Srv, Req, CallTimeout]}}}
                   when Reason =:= {nodedown, C} orelse Reason =:= noconnection,
                 Result),
    ?assertMatch(T when T < 8000, Ms),
    %% The pool to the dead node does not linger.
    ?assert(teleport_test_peer:wait_until(fun() -> not lists:member(C, teleport:nodes()) end, 10000)).

%%====================================================================
%% ordering
%%====================================================================

ordering_per_sender(Config) ->
    A = ?config(node_a, Config),
    Count = 10000,
    Tag = make_ref(),
    T0 = now_ms(),
    Errors = [{I, R} || I <- lists:seq(1, Count),
                        R <- [teleport:send({?SINK, A}, {Tag, {seq, I}})], R =/= ok],
    ?assertEqual([], Errors),
    Got = payloads(collect(Tag, Count, ?MSG_TIMEOUT)),
    Ms = max(1, now_ms() - T0),
    ct:pal("~p messages to ~p and back in ~p ms (~p msg/s)",
           [Count, A, Ms, Count * 1000 div Ms]),
    ?assertEqual(none, first_divergence([{seq, I} || I <- lists:seq(1, Count)], Got)).

ordering_many_senders(Config) ->
    A = ?config(node_a, Config),
    Senders = 8,
    PerSender = 2000,
    Tag = make_ref(),
    T0 = now_ms(),
    Results = run_senders(Senders, fun(I) -> send_seq({?SINK, A}, Tag, I, PerSender) end,
                          ?MSG_TIMEOUT),
    ?assertEqual([{I, []} || I <- lists:seq(1, Senders)], Results),
    Got = payloads(collect(Tag, Senders * PerSender, ?MSG_TIMEOUT)),
    Ms = max(1, now_ms() - T0),
    ct:pal("~p senders x ~p messages to ~p in ~p ms (~p msg/s)",
           [Senders, PerSender, A, Ms, Senders * PerSender * 1000 div Ms]),
    check_per_sender(Got, Senders, PerSender).

%% Two processes share a key: together they form one ordered stream.
send_with_key_keeps_order(Config) ->
    A = ?config(node_a, Config),
    Tag = make_ref(),
    Count = 2000,
    Key = {shared, make_ref()},
    Self = self(),
    Half = fun(Range) ->
                   spawn_link(fun() ->
                                      [ok = teleport:send({?SINK, A}, {Tag, {seq, I}}, [{key, Key}])
                                       || I <- Range],
                                      Self ! {half_done, self()}
                              end)
           end,
    %% The second half starts only once the first has been queued: arrival
    %% order must then be 1..Count even though two processes sent.
    P1 = Half(lists:seq(1, Count div 2)),
    receive {half_done, P1} -> ok after ?MSG_TIMEOUT -> ct:fail(first_half_stuck) end,
    P2 = Half(lists:seq(Count div 2 + 1, Count)),
    receive {half_done, P2} -> ok after ?MSG_TIMEOUT -> ct:fail(second_half_stuck) end,
    Got = payloads(collect(Tag, Count, ?MSG_TIMEOUT)),
    ?assertEqual(none, first_divergence([{seq, I} || I <- lists:seq(1, Count)], Got)).

%% unordered spreads one sender over the pool: everything arrives, in some order.
send_unordered_delivers_all(Config) ->
    A = ?config(node_a, Config),
    Tag = make_ref(),
    Count = 2000,
    Before = stat(erpc:call(A, teleport, stats, [], ?RPC_TIMEOUT), node(), messages_in),
    SlotsBefore = messages_out_by_slot(teleport:stats(A)),
    [?assertEqual(ok, teleport:send({?SINK, A}, {Tag, {seq, I}}, [unordered]))
     || I <- lists:seq(1, Count)],
    Got = payloads(collect(Tag, Count, ?MSG_TIMEOUT)),
    ?assertEqual([{seq, I} || I <- lists:seq(1, Count)], lists:sort(Got)),
    %% Spread over the pool: every slot carried a share (a key stepping by the pool
    %% size once sent all of them down one connection).
    SlotsAfter = messages_out_by_slot(teleport:stats(A)),
    Used = [Slot || {Slot, N} <- maps:to_list(SlotsAfter), N - maps:get(Slot, SlotsBefore, 0) > 0],
    ?assertEqual(?POOL_SIZE, length(Used)),
    %% Counted by A's reader right after each delivery.
    ?assert(teleport_test_peer:wait_until(fun() ->
                               stat(erpc:call(A, teleport, stats, [], ?RPC_TIMEOUT), node(),
                                    messages_in) - Before >= Count
                       end, 10000)).

send_option_badarg(Config) ->
    A = ?config(node_a, Config),
    ?assertError({badarg, bogus}, teleport:send({?SINK, A}, x, [bogus])),
    %% nosuspend with room in the queue just sends.
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, A}, {Tag, quick}, [nosuspend])),
    ?assertEqual([{A, quick}], collect(Tag, 1, ?MSG_TIMEOUT)).

concurrent_first_senders(_Config) ->
    {_DPeer, D} = start_case_peer("teleport_ct_d"),
    {ok, _} = teleport_test_peer:start_sink(D, ?SINK, {?COLLECTOR, node()}),
    ?assertNot(lists:member(D, teleport:nodes())),
    ?assertEqual(0, stat(teleport:stats(), D, connections)),
    Senders = 100,
    PerSender = 50,
    Tag = make_ref(),
    T0 = now_ms(),
    Results = run_senders(Senders, fun(I) -> send_seq({?SINK, D}, Tag, I, PerSender) end,
                          ?MSG_TIMEOUT),
    ?assertEqual([{I, []} || I <- lists:seq(1, Senders)], Results),
    Got = payloads(collect(Tag, Senders * PerSender, ?MSG_TIMEOUT)),
    ct:pal("~p racing first senders x ~p messages to fresh ~p in ~p ms",
           [Senders, PerSender, D, now_ms() - T0]),
    check_per_sender(Got, Senders, PerSender),
    %% One pool, not one per racer.
    ?assertEqual([D], [N || N <- teleport:nodes(), N =:= D]),
    ?assertEqual({ok, ?POOL_SIZE}, application:get_env(teleport, pool_size)),
    ?assert(teleport_test_peer:wait_until(fun() -> stat(teleport:stats(), D, connections) =:= ?POOL_SIZE end,
                       10000)),
    ?assertEqual(?POOL_SIZE, stat(teleport:stats(), D, connections)),
    ?assertMatch(Out when Out >= Senders * PerSender,
                          stat(teleport:stats(), D, messages_out)).

%%====================================================================
%% pools
%%====================================================================

stats_counts(Config) ->
    ?assertMatch(#{messages_out := 0, connections := 0}, teleport:stats('never_seen@127.0.0.1')),
    A = ?config(node_a, Config),
    Me = node(),
    ?assertEqual(ok, teleport:connect(A)),
    Before = teleport:stats(),
    BeforeA = erpc:call(A, teleport, stats, [], ?RPC_TIMEOUT),
    Count = 1000,
    Tag = make_ref(),
    Payload = det_bytes(100),
    _ = [?assertEqual(ok, teleport:send({?SINK, A}, {Tag, {I, Payload}}))
         || I <- lists:seq(1, Count)],
    ?assertEqual(Count, length(collect(Tag, Count, ?MSG_TIMEOUT))),
    %% Counters may trail delivery a little; they must get there.
    OutOk = fun(S) ->
                    stat(S, A, messages_out) >= stat(Before, A, messages_out) + Count
                        andalso stat(S, A, bytes_out) >= stat(Before, A, bytes_out) + Count * 100
            end,
    InOk = fun(S) ->
                   stat(S, Me, messages_in) >= stat(BeforeA, Me, messages_in) + Count
                       andalso stat(S, Me, bytes_in) >= stat(BeforeA, Me, bytes_in) + Count * 100
           end,
    _ = teleport_test_peer:wait_until(fun() -> OutOk(teleport:stats()) end, 10000),
    _ = teleport_test_peer:wait_until(fun() -> InOk(erpc:call(A, teleport, stats, [], ?RPC_TIMEOUT)) end, 10000),
    After = teleport:stats(),
    AfterA = erpc:call(A, teleport, stats, [], ?RPC_TIMEOUT),
    ct:pal("origin -> ~p: before ~p~nafter ~p~n~p's view of origin: before ~p~nafter ~p",
           [A, maps:get(A, Before, none), maps:get(A, After, none),
            A, maps:get(Me, BeforeA, none), maps:get(Me, AfterA, none)]),
    ?assert(is_map(maps:get(A, After))),
    ?assert(is_map(maps:get(Me, AfterA))),
    ?assertMatch(N when N >= Count,
                        stat(After, A, messages_out) - stat(Before, A, messages_out)),
    ?assertMatch(N when N >= Count * 100,
                        stat(After, A, bytes_out) - stat(Before, A, bytes_out)),
    ?assertMatch(N when N >= Count,
                        stat(AfterA, Me, messages_in) - stat(BeforeA, Me, messages_in)),
    ?assertMatch(N when N >= Count * 100,
                        stat(AfterA, Me, bytes_in) - stat(BeforeA, Me, bytes_in)),
    ?assertEqual(?POOL_SIZE, stat(After, A, connections)),
    ?assertMatch(Q when is_integer(Q) andalso Q >= 0, stat(After, A, queued_bytes)).

%% Every documented key of every connection entry, one outbound entry per slot
%% of our pool and one inbound entry per connection on the receiver, with counts
%% that match the traffic (one key: one connection) and add up to the peer's
%% totals.
%% The suite runs `io_threads' 3 (not what `auto' gives here): every node has
%% exactly that many I/O threads, however many connections its pools hold.
io_threads_as_configured(Config) ->
    A = ?config(node_a, Config),
    ok = teleport:connect(A),
    case os:type() of
        {unix, linux} ->
            ?assertEqual(?IO_THREADS, io_thread_count()),
            ?assertEqual(?IO_THREADS, erpc:call(A, ?MODULE, io_thread_count, [], ?RPC_TIMEOUT));
        _ ->
            {skip, "counts threads in /proc"}
    end.

%% `sndbuf': `auto' (the origin's) gives a loopback connection 512 KiB, which Linux
%% reports doubled; `kernel' leaves the kernel's own; a size sets that size.
sndbuf_sizes_outbound_connections(_Config) ->
    case os:type() of
        {unix, linux} ->
            {_, K} = start_case_peer("sndbuf_k", #{sndbuf => kernel}),
            {_, F} = start_case_peer("sndbuf_f", #{sndbuf => 65536}),
            Buffers = fun(From, To) ->
                              ok = erpc:call(From, teleport, connect, [To], ?RPC_TIMEOUT),
                              Stats = erpc:call(From, teleport, stats, [To], ?RPC_TIMEOUT),
                              [B || #{direction := outbound, send_buffer := B}
                                        <- maps:get(per_connection, Stats)]
                      end,
            Auto = Buffers(node(), K),
            Kernel = Buffers(K, node()),
            Fixed = Buffers(F, node()),
            ct:pal("send buffers: auto ~p, kernel ~p, 65536 ~p", [Auto, Kernel, Fixed]),
            ?assertEqual(lists:duplicate(?POOL_SIZE, 2 * 512 * 1024), Auto),
            %% The peers' pools are of the default size.
            ?assertEqual(lists:duplicate(2, 2 * 65536), Fixed),
            ?assertEqual(2, length(Kernel)),
            ?assertEqual([], [B || B <- Kernel, B =:= 2 * 512 * 1024]);
        _ ->
            {skip, "send buffer sizing is Linux's"}
    end.

%% Threads of this VM named by teleport's engine ("teleport-io<N>-<node>").
io_thread_count() ->
    length([Name || "teleport-io" ++ _ = Name <- teleport_rel_remote:thread_names()]).

stats_per_connection(Config) ->
    A = ?config(node_a, Config),
    Me = node(),
    %% A fresh pool: its connections carry only this case's traffic.
    ?assertEqual(ok, teleport:disconnect(A)),
    ?assert(teleport_test_peer:wait_until(fun() -> not lists:member(A, teleport:nodes()) end, 10000)),
    ?assertEqual(ok, teleport:connect(A)),
    Before = teleport:stats(A),
    StatsOfA = fun() -> erpc:call(A, teleport, stats, [Me], ?RPC_TIMEOUT) end,
    BeforeA = StatsOfA(),
    {Keyed, Spread, Nobody, Size} = {300, 700, 5, 100},
    Payload = det_bytes(Size),
    Tag = make_ref(),
    _ = [ok = teleport:send({?SINK, A}, {Tag, {I, Payload}}, [{key, one_key}])
         || I <- lists:seq(1, Keyed)],
    ?assertEqual(Keyed, length(collect(Tag, Keyed, ?MSG_TIMEOUT))),
    %% One key, one connection.
    KeyedOk = fun() -> lists:sort([Out || #{messages_out := Out} <- outbound(teleport:stats(A))])
                           =:= lists:duplicate(?POOL_SIZE - 1, 0) ++ [Keyed] end,
    ?assert(teleport_test_peer:wait_until(KeyedOk, 10000), teleport:stats(A)),
    _ = [ok = teleport:send({?SINK, A}, {Tag, {I, Payload}}, [unordered])
         || I <- lists:seq(1, Spread)],
    _ = [ok = teleport:send({teleport_ct_nobody, A}, {Tag, I}, [unordered])
         || I <- lists:seq(1, Nobody)],
    ?assertEqual(Spread, length(collect(Tag, Spread, ?MSG_TIMEOUT))),
    Total = Keyed + Spread + Nobody,
    Sum = fun(Key, Conns) -> lists:sum([maps:get(Key, C) || C <- Conns]) end,
    Settled = fun() ->
                      Out = outbound(teleport:stats(A)),
                      In = inbound(StatsOfA()),
                      Sum(messages_out, Out) =:= Total andalso Sum(queued_bytes, Out) =:= 0
                          andalso length(In) =:= ?POOL_SIZE
                          andalso Sum(messages_in, In) =:= Total
                          andalso Sum(undeliverable_in, In) =:= Nobody
              end,
    ?assert(teleport_test_peer:wait_until(Settled, 10000), {teleport:stats(A), StatsOfA()}),
    After = teleport:stats(A),
    AfterA = StatsOfA(),
    ct:pal("origin's stats for ~p: ~p~n~p's stats for origin: ~p", [A, After, A, AfterA]),
    Out = outbound(After),
    In = inbound(AfterA),
    OutKeys = [bytes_out, connected_ms, direction, index, local, messages_out, queued_bytes, remote]
        ++ [send_buffer || os:type() =:= {unix, linux}],
    InKeys = [bytes_in, connected_ms, direction, local, messages_in, partial_bytes, remote,
              undeliverable_in],
    ?assertEqual(lists:duplicate(?POOL_SIZE, OutKeys), [lists:sort(maps:keys(C)) || C <- Out]),
    ?assertEqual(lists:duplicate(?POOL_SIZE, InKeys), [lists:sort(maps:keys(C)) || C <- In]),
    ?assertEqual(lists:seq(0, ?POOL_SIZE - 1), [I || #{index := I} <- Out]),
    %% No large body is under way once everything arrived.
    ?assertEqual([0], lists:usort([P || #{partial_bytes := P} <- In])),
    ?assertEqual(0, maps:get(partial_bytes, AfterA)),
    %% The connections add up to the peer's totals over this case.
    Delta = fun(Key, S0, S1) -> maps:get(Key, S1) - maps:get(Key, S0) end,
    ?assertEqual(Delta(messages_out, Before, After), Sum(messages_out, Out)),
    ?assertEqual(Delta(bytes_out, Before, After), Sum(bytes_out, Out)),
    ?assertEqual(Delta(messages_in, BeforeA, AfterA), Sum(messages_in, In)),
    ?assertEqual(Delta(bytes_in, BeforeA, AfterA), Sum(bytes_in, In)),
    ?assertEqual(Delta(undeliverable_in, BeforeA, AfterA), Nobody),
    ?assert(Sum(bytes_out, Out) >= (Keyed + Spread) * Size),
    %% Every outbound connection goes to A's listener, and A sees each of them,
    %% from the other end, with the same counts.
    {_, APort} = erpc:call(A, teleport, listen_address, [], ?RPC_TIMEOUT),
    _ = [begin
             ?assertMatch({{_, _, _, _}, APort}, Remote),
             ?assertMatch({{_, _, _, _}, P} when is_integer(P) andalso P > 0, Local),
             ?assert(is_integer(Ms) andalso Ms >= 0),
             ?assertMatch([#{messages_in := MsgOut, bytes_in := BytesOut, connected_ms := InMs}]
                            when is_integer(InMs) andalso InMs >= 0,
                          [C || #{local := L, remote := R} = C <- In, L =:= Remote, R =:= Local])
         end || #{local := Local, remote := Remote, connected_ms := Ms,
                  messages_out := MsgOut, bytes_out := BytesOut} <- Out].

messages_out_by_slot(Stats) ->
    maps:from_list([{I, N} || #{index := I, messages_out := N} <- outbound(Stats)]).

outbound(#{per_connection := Conns}) -> [C || #{direction := outbound} = C <- Conns].

inbound(#{per_connection := Conns}) -> [C || #{direction := inbound} = C <- Conns].

connect_disconnect(Config) ->
    A = ?config(node_a, Config),
    B = ?config(node_b, Config),
    ?assertEqual(ok, teleport:connect(A)),
    ?assert(lists:member(A, teleport:nodes())),
    ?assertEqual(ok, teleport:connect(A)),  % already open: still ok
    ?assertEqual([A], [N || N <- teleport:nodes(), N =:= A]),
    ?assertEqual(ok, teleport:disconnect(A)),
    ?assert(teleport_test_peer:wait_until(fun() -> not lists:member(A, teleport:nodes()) end, 10000)),
    ?assertEqual(0, stat(teleport:stats(), A, connections)),
    %% The next send reopens the pool.
    Tag = make_ref(),
    ?assertEqual(ok, teleport:send({?SINK, A}, {Tag, reopened})),
    ?assertEqual([{A, reopened}], collect(Tag, 1, ?MSG_TIMEOUT)),
    ?assert(lists:member(A, teleport:nodes())),
    ?assertEqual({Tag, call}, teleport:gs_call({?SERVER, A}, {echo, {Tag, call}})),
    %% connect/2 with an explicit address, no lookup.
    ?assertEqual(ok, teleport:disconnect(B)),
    ?assert(teleport_test_peer:wait_until(fun() -> not lists:member(B, teleport:nodes()) end, 10000)),
    AddrB = teleport_test_peer:connectable(erpc:call(B, teleport, listen_address, [],
                                                     ?RPC_TIMEOUT)),
    ?assertMatch({Ip, Port} when is_tuple(Ip) andalso is_integer(Port) andalso Port > 0, AddrB),
    ?assertEqual(ok, teleport:connect(B, AddrB)),
    ?assert(lists:member(B, teleport:nodes())),
    ?assertEqual(ok, teleport:send({?SINK, B}, {Tag, explicit})),
    ?assertEqual([{B, explicit}], collect(Tag, 1, ?MSG_TIMEOUT)),
    %% Disconnecting from a node we never had a pool to is harmless.
    ?assertEqual(ok, teleport:disconnect(?NOBODY)).

%%====================================================================
%% security
%%====================================================================

wrong_cookie_refused(_Config) ->
    {W, WNode} = start_case_isolated("teleport_ct_w", wrong_cookie),
    ?assertNotEqual(wrong_cookie, erlang:get_cookie()),
    ?assertEqual(wrong_cookie, peer:call(W, erlang, get_cookie, [], ?RPC_TIMEOUT)),
    %% W is really running teleport.
    WAddr = teleport_test_peer:connectable(peer:call(W, teleport, listen_address, [],
                                                     ?RPC_TIMEOUT)),
    ?assertMatch({Ip, Port} when is_tuple(Ip) andalso is_integer(Port) andalso Port > 0, WAddr),
    %% We cannot open a pool to W...
    {Out, OutMs} = timed(fun() -> teleport:connect(WNode, WAddr) end),
    ct:pal("connect to ~p at ~p: ~p after ~p ms", [WNode, WAddr, Out, OutMs]),
    %% W closes without a word after our proof: the cookies differ.
    ?assertEqual({error, {handshake, bad_cookie}}, Out),
    ?assertNot(lists:member(WNode, teleport:nodes())),
    ?assertEqual(0, stat(teleport:stats(), WNode, connections)),
    ?assert(maps:get(handshake_failures, teleport:stats(WNode)) >= 1),
    #{handshake_failures := InFailuresBefore} = teleport:listener_stats(),
    %% ...nor W to us...
    OriginAddr = teleport_test_peer:connectable(teleport:listen_address()),
    In = peer:call(W, teleport, connect, [node(), OriginAddr], ?RPC_TIMEOUT),
    ct:pal("~p connecting to us at ~p: ~p", [WNode, OriginAddr, In]),
    ?assertEqual({error, {handshake, bad_cookie}}, In),
    ?assertNot(lists:member(node(), peer:call(W, teleport, nodes, [], ?RPC_TIMEOUT))),
    %% Our listener counted W's failed handshake (it cannot be put under W's name).
    ?assert(teleport_test_peer:wait_until(fun() ->
                               maps:get(handshake_failures, teleport:listener_stats()) > InFailuresBefore
                       end, 10000)),
    %% ...and nothing W sends reaches our registered process.
    Tag = make_ref(),
    ?assertEqual(self(), whereis(?COLLECTOR)),
    ?assertMatch({error, _}, peer:call(W, teleport, send, [{?COLLECTOR, node()}, {Tag, from_w}],
                                       ?RPC_TIMEOUT)),
    receive
        {Tag, _} = Leaked -> ct:fail({message_from_wrong_cookie_node_arrived, Leaked})
    after 500 ->
            ok
    end,
    ?assertEqual(0, stat(teleport:stats(), WNode, messages_in)).

%%====================================================================
%% Helpers
%%====================================================================

%% @doc The next `N' messages forwarded by any sink, as `{Node, Msg}' in
%% arrival order; fewer if `Timeout' ms pass first.
-spec collect(non_neg_integer(), timeout()) -> [{node(), term()}].
collect(N, Timeout) ->
    collect_any(N, deadline(Timeout), []).

%% @doc The next `N' messages `{Tag, Payload}' forwarded by any sink, as
%% `{Node, Payload}' in arrival order; fewer if `Timeout' ms pass first.
-spec collect(term(), non_neg_integer(), timeout()) -> [{node(), term()}].
collect(Tag, N, Timeout) ->
    collect_tagged(Tag, N, deadline(Timeout), []).

collect_any(0, _Deadline, Acc) ->
    lists:reverse(Acc);
collect_any(N, Deadline, Acc) ->
    receive
        {from_sink, Node, Msg} -> collect_any(N - 1, Deadline, [{Node, Msg} | Acc])
    after remaining(Deadline) ->
            lists:reverse(Acc)
    end.

collect_tagged(_Tag, 0, _Deadline, Acc) ->
    lists:reverse(Acc);
collect_tagged(Tag, N, Deadline, Acc) ->
    receive
        {from_sink, Node, {Tag, Payload}} ->
            collect_tagged(Tag, N - 1, Deadline, [{Node, Payload} | Acc])
    after remaining(Deadline) ->
            lists:reverse(Acc)
    end.

payloads(Collected) ->
    [P || {_Node, P} <- Collected].

%% Messages {Tag, X} sent straight to this process: the Xs in arrival order.
receive_tagged(Tag, N, Timeout) ->
    receive_tagged_loop(Tag, N, deadline(Timeout), []).

receive_tagged_loop(_Tag, 0, _Deadline, Acc) ->
    lists:reverse(Acc);
receive_tagged_loop(Tag, N, Deadline, Acc) ->
    receive
        {Tag, X} -> receive_tagged_loop(Tag, N - 1, Deadline, [X | Acc])
    after remaining(Deadline) ->
            lists:reverse(Acc)
    end.

%% {cast_received, {Tag, X}} sent by a teleport_test_server.
receive_casts(Tag, N, Timeout) ->
    Deadline = deadline(Timeout),
    receive_casts_loop(Tag, N, Deadline, []).

receive_casts_loop(_Tag, 0, _Deadline, Acc) ->
    lists:reverse(Acc);
receive_casts_loop(Tag, N, Deadline, Acc) ->
    receive
        {cast_received, {Tag, _} = X} -> receive_casts_loop(Tag, N - 1, Deadline, [X | Acc])
    after remaining(Deadline) ->
            lists:reverse(Acc)
    end.

%% Echoes from one echo process, in arrival order; fails at once on an echo error.
receive_echoes(Echo, N, Timeout) ->
    Deadline = deadline(Timeout),
    receive_echoes_loop(Echo, N, Deadline, []).

receive_echoes_loop(_Echo, 0, _Deadline, Acc) ->
    lists:reverse(Acc);
receive_echoes_loop(Echo, N, Deadline, Acc) ->
    receive
        {teleport_ct_echo, Echo, M} ->
            receive_echoes_loop(Echo, N - 1, Deadline, [M | Acc]);
        {teleport_ct_echo_error, Echo, Error} ->
            ct:fail({echo_could_not_send_back, length(Acc) + 1, Error})
    after remaining(Deadline) ->
            lists:reverse(Acc)
    end.

%% A local process that forwards everything to its parent.
start_local_forwarder() ->
    Parent = self(),
    spawn_link(fun() -> forward_loop(Parent) end).

forward_loop(Parent) ->
    receive
        M ->
            Parent ! {forwarded, self(), M},
            forward_loop(Parent)
    end.

forwarded(Fwd, N, Timeout) ->
    Deadline = deadline(Timeout),
    forwarded_loop(Fwd, N, Deadline, []).

forwarded_loop(_Fwd, 0, _Deadline, Acc) ->
    lists:reverse(Acc);
forwarded_loop(Fwd, N, Deadline, Acc) ->
    receive
        {forwarded, Fwd, M} -> forwarded_loop(Fwd, N - 1, Deadline, [M | Acc])
    after remaining(Deadline) ->
            lists:reverse(Acc)
    end.

%% Spawns Count linked processes; once all are ready, releases them at once.
%% Each runs Fun(I); returns [{I, Result}] sorted by I.
run_senders(Count, Fun, Timeout) ->
    Parent = self(),
    Go = make_ref(),
    Pids = [{I, spawn_link(fun() ->
                                   Parent ! {ready, Go, self()},
                                   receive
                                       Go -> ok
                                   end,
                                   Parent ! {done, Go, self(), Fun(I)}
                           end)}
            || I <- lists:seq(1, Count)],
    Deadline = deadline(Timeout),
    _ = [receive
             {ready, Go, Pid} -> ok
         after remaining(Deadline) ->
                 ct:fail({sender_not_ready, I})
         end || {I, Pid} <- Pids],
    _ = [Pid ! Go || {_, Pid} <- Pids],
    [receive
         {done, Go, Pid, Result} -> {I, Result}
     after remaining(Deadline) ->
             ct:fail({sender_not_done, I})
     end || {I, Pid} <- Pids].

%% Sends {Tag, {I, Seq}} for Seq in 1..N; returns the sends that were not ok.
send_seq(Dest, Tag, I, N) ->
    [{Seq, R} || Seq <- lists:seq(1, N),
                 R <- [teleport:send(Dest, {Tag, {I, Seq}})], R =/= ok].

%% Got is [{I, Seq}]; each sender's sequence must be 1..PerSender in order.
check_per_sender(Got, Senders, PerSender) ->
    BySender = lists:foldl(fun({I, Seq}, Acc) ->
                                   maps:update_with(I, fun(L) -> [Seq | L] end, [Seq], Acc)
                           end, #{}, Got),
    Expected = lists:seq(1, PerSender),
    Bad = [{sender, I, Div}
           || I <- lists:seq(1, Senders),
              Div <- [first_divergence(Expected, lists:reverse(maps:get(I, BySender, [])))],
              Div =/= none],
    ?assertEqual([], Bad),
    ?assertEqual(Senders * PerSender, length(Got)).

%% none, or where Got first differs from Expected.
first_divergence(Expected, Got) ->
    first_divergence(Expected, Got, 1).

first_divergence([], [], _) ->
    none;
first_divergence([E | Es], [E | Gs], I) ->
    first_divergence(Es, Gs, I + 1);
first_divergence([E | Es], [], I) ->
    {missing_from, I, first_missing, E, missing_count, length(Es) + 1};
first_divergence([], [G | Gs], I) ->
    {unexpected_from, I, G, extra_count, length(Gs) + 1};
first_divergence([E | _], [G | _], I) ->
    {at, I, expected, E, got, G}.

%% A message of more terms than an I/O thread builds (over 50,000) goes whole to a
%% decoder process on the receiving node. With its decoders held, that node's one I/O
%% thread still delivers another peer's messages; once they run again the big message
%% arrives, ahead of the later messages of its own connection.
big_term_waits_for_a_decoder_not_the_io_thread(_Config) ->
    {_, B} = start_case_peer("bigterm_b", #{io_threads => 1}),
    {_, C} = start_case_peer("bigterm_c"),
    Sink = list_to_atom("bigterm_sink_" ++ integer_to_list(erlang:unique_integer([positive]))),
    {ok, _} = teleport_test_peer:start_sink(B, Sink, self()),
    Decoders = erpc:call(B, teleport_decoder, names, []),
    _ = [ok = erpc:call(B, sys, suspend, [D]) || D <- Decoders],
    Big = lists:seq(1, 200000),
    try
        ?assertEqual(ok, teleport:send({Sink, B}, {big, Big})),
        ?assertEqual(ok, teleport:send({Sink, B}, after_big)),
        ?assertEqual(ok, erpc:call(C, teleport, send, [{Sink, B}, from_c])),
        receive {from_sink, B, from_c} -> ok
        after ?MSG_TIMEOUT -> ct:fail(io_thread_held_up)
        end,
        receive {from_sink, B, Early} -> ct:fail({delivered_without_a_decoder, Early})
        after 300 -> ok
        end
    after
        _ = [erpc:call(B, sys, resume, [D]) || D <- Decoders]
    end,
    receive {from_sink, B, {big, Got}} -> ?assert(Got =:= Big)
    after ?MSG_TIMEOUT -> ct:fail(big_term_lost)
    end,
    receive {from_sink, B, Next} -> ?assertEqual(after_big, Next)
    after ?MSG_TIMEOUT -> ct:fail(after_big_lost)
    end.

%% A peer whose environment still sets the removed `io_chunk_bytes' starts, and large
%% messages cross both ways intact.
removed_setting_ignored(_Config) ->
    {_, B} = start_case_peer("removed", #{io_chunk_bytes => 4096}),
    ?assertEqual({ok, 4096}, erpc:call(B, application, get_env, [teleport, io_chunk_bytes])),
    {ok, Echo} = teleport_test_peer:start_echo(B, self()),
    track_proc(Echo),
    Msgs = [crypto:strong_rand_bytes(3 * 1024 * 1024 + 7), small,
            {crypto:strong_rand_bytes(100000), [crypto:strong_rand_bytes(5000)]}],
    [?assertEqual(ok, teleport:send(Echo, M)) || M <- Msgs],
    Back = [receive {teleport_ct_echo, Echo, Got} -> Got
            after ?MSG_TIMEOUT -> ct:fail({no_echo, I})
            end || I <- lists:seq(1, length(Msgs))],
    ?assert(Back =:= Msgs).

%% A peer with `io_thread_priority' idle: its I/O threads (which write its pool to us
%% and read ours to it) are SCHED_IDLE, its schedulers are not, and neither are this
%% node's I/O threads (priority normal).
io_thread_priority_idle(_Config) ->
    {_, B} = start_case_peer("idle", #{io_thread_priority => idle}),
    {ok, Echo} = teleport_test_peer:start_echo(B, self()),
    track_proc(Echo),
    Big = crypto:strong_rand_bytes(1024 * 1024),
    [?assertEqual(ok, teleport:send(Echo, M)) || M <- [small, Big]],
    [receive {teleport_ct_echo, Echo, M} -> ok
     after ?MSG_TIMEOUT -> ct:fail({no_echo, M})
     end || M <- [small, Big]],
    Policies = fun(Threads, Prefix) ->
                       lists:usort([P || {Name, P} <- Threads, lists:prefix(Prefix, Name)])
               end,
    Theirs = erpc:call(B, teleport_test_peer, thread_policies, []),
    ?assertEqual([5], Policies(Theirs, "teleport-io")),
    %% Scheduler 1's thread: "1_scheduler" on OTP 25, "erts_sched_1" on 27 and 29.
    ?assertEqual([0], Policies(Theirs, "1_scheduler") ++ Policies(Theirs, "erts_sched_1")),
    Ours = teleport_test_peer:thread_policies(),
    ?assertEqual([0], Policies(Ours, "teleport-io")).

%% Ping-pong with two peers in turn: the one whose I/O threads busy-wait (10 ms here, so
%% that a slow machine's round trips fit) receives nearly every ping while polling; the
%% one whose threads do not sleeps for most (not all: a thread preempted by the scheduler
%% it woke can find the next ping already there). Sleeps counted per thread by the kernel.
reader_busy_wait(_Config) ->
    Trips = 300,
    Sleeps = fun(BusyWaitUs) ->
                     {Peer, B} = start_case_peer("poll", #{reader_busy_wait_us => BusyWaitUs}),
                     {ok, Echo} = teleport_test_peer:start_echo(B, self()),
                     ping_pong(Echo, 20), % connections up, readers past their first wait
                     Before = erpc:call(B, teleport_test_peer, thread_sleeps, ["teleport-io"]),
                     ping_pong(Echo, Trips),
                     After = erpc:call(B, teleport_test_peer, thread_sleeps, ["teleport-io"]),
                     teleport_test_peer:stop(Peer),
                     After - Before
             end,
    Polling = Sleeps(10000),
    NotPolling = Sleeps(0),
    ct:log("reader sleeps over ~b round trips: busy wait 10 ms ~b, none ~b",
           [Trips, Polling, NotPolling]),
    ?assert(NotPolling >= Trips div 2),
    ?assert(Polling =< Trips div 4).

ping_pong(Echo, N) ->
    lists:foreach(fun(I) ->
                          ok = teleport:send(Echo, I),
                          receive {teleport_ct_echo, Echo, I} -> ok
                          after ?MSG_TIMEOUT -> ct:fail({no_echo, I})
                          end
                  end, lists:seq(1, N)).

%% A peer for one test case, stopped in end_per_testcase.
start_case_peer(Prefix) ->
    start_case_peer(Prefix, #{}).

%% With `AppEnv' set in the peer before teleport starts there.
start_case_peer(Prefix, AppEnv) ->
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name(Prefix), [], AppEnv),
    put(teleport_ct_peers, [Peer | get_list(teleport_ct_peers)]),
    {Peer, Node}.

start_case_isolated(Prefix, Cookie) ->
    {ok, Peer, Node} = teleport_test_peer:start_isolated(teleport_test_peer:unique_name(Prefix),
                                                         Cookie),
    put(teleport_ct_peers, [Peer | get_list(teleport_ct_peers)]),
    {Peer, Node}.

%% A process (here or on a peer) that is not linked to us: killed in end_per_testcase.
track_proc(Pid) ->
    put(teleport_ct_remote_procs, [Pid | get_list(teleport_ct_remote_procs)]).

get_list(Key) ->
    case get(Key) of
        undefined -> [];
        L -> L
    end.

claim_collector() ->
    case whereis(?COLLECTOR) of
        undefined -> true = register(?COLLECTOR, self());
        Self when Self =:= self() -> true;
        Stale ->
            %% Left by a case whose process is about to die; take it over.
            unregister(?COLLECTOR),
            ct:pal("took over ~p from ~p", [?COLLECTOR, Stale]),
            true = register(?COLLECTOR, self())
    end.

flush() ->
    receive
        _ -> flush()
    after 0 ->
            ok
    end.

sleeping(Node, Pid) ->
    case erpc:call(Node, erlang, process_info, [Pid, current_function], ?RPC_TIMEOUT) of
        {current_function, {timer, sleep, 1}} -> true;
        _ -> false
    end.

%% #{Element => Occurrences}
count(List) ->
    lists:foldl(fun(X, Acc) -> maps:update_with(X, fun(C) -> C + 1 end, 1, Acc) end, #{}, List).

stat(Stats, Node, Key) ->
    maps:get(Key, maps:get(Node, Stats, #{}), 0).

catch_exit(Fun) ->
    try Fun() of
        Value -> {returned, Value}
    catch
        exit:Reason -> {exit, Reason}
    end.

timed(Fun) ->
    T0 = now_ms(),
    Result = Fun(),
    {Result, now_ms() - T0}.

now_ms() ->
    erlang:monotonic_time(millisecond).

deadline(Timeout) ->
    now_ms() + Timeout.

remaining(Deadline) ->
    max(0, Deadline - now_ms()).

%% Deterministic pseudo-random bytes.
det_bytes(N) ->
    {Bin, _} = rand:bytes_s(N, rand:seed_s(exsss, {17, 42, 2024})),
    Bin.

short(Term) ->
    lists:flatten(io_lib:format("~P", [Term, 12])).

%%% @doc The receive side of teleport (native/teleport_nif/src/decode.rs and
%%% deliver.rs) against real traffic between BEAM nodes on loopback.
%%%
%%% <ul>
%%% <li>`random_terms_roundtrip': 3,000 terms from a seeded generator (every
%%%     type: atoms in ASCII, Latin-1 and UTF-8, integers up to 2^300, floats
%%%     including -0.0, binaries of 0..200 bytes and of 65..100 KiB, sub-binaries,
%%%     bitstrings, strings, proper and improper lists, tuples up to ~450
%%%     elements, small and large maps with compound keys, local and remote
%%%     pids, refs and ports, funs, nested to a bounded random depth) go to an
%%%     echo on peer A and come back, all with teleport:send: each arrives
%%%     `=:=', in order, and with the same external encoding.</li>
%%% <li>`deep_nesting': a list nested 1,000,000 deep and a tuple nested
%%%     100,000 deep make the same round trip.</li>
%%% <li>`large_binary_is_referenced_not_copied': on the receiving node a
%%%     20 MiB binary is a sub-binary of its frame (referenced size = the
%%%     frame), while a 100 KiB binary among 1 MiB of others is a copy of its
%%%     own (referenced size = its size).</li>
%%% <li>`decoder_fuzz_after_auth': a raw client (teleport_raw_client) that
%%%     knows the cookie sends ~3,000 mutated frames to peer F (byte flips,
%%%     truncations, extensions, huge length fields, deep nesting without
%%%     content, LIST_EXT of 0xFFFFFFFF, duplicate map keys, unknown tags,
%%%     ATOM_CACHE_REF, compressed bodies, terms that are not {Dest, Msg},
%%%     bad destinations, new atoms, broken frame headers, announced-but-
%%%     missing bodies), reconnecting whenever F closes the connection. F
%%%     must stay up and keep working (a teleport:send, a gs_call), its
%%%     memory(total) grow by less than 50 MiB, and every frame must be
%%%     delivered exactly as F's own `binary_to_term/1' decodes it, or be
%%%     dropped as undeliverable, or close its connection; a frame that
%%%     `binary_to_term/1' rejects must close it. The judging runs on F, and
%%%     only plain data comes back over disterl. Counts of delivered, dropped
%%%     and closed frames and F's atom_count growth are printed.</li>
%%% <li>`duplicate_map_keys_rejected': MAP_EXT with a repeated key (small
%%%     and over 32 pairs) closes the connection, as for binary_to_term.</li>
%%% <li>`malformed_call_frames': call frames (kind 2) whose fields are not
%%%     what teleport:gs_call sends close or are dropped, without taking down
%%%     the receiving node's teleport.</li>
%%% </ul>
%%% Every random choice comes from `rand' seeded with one seed per run,
%%% printed at the start of each case; set DECODER_SUITE_SEED="A,B,C" to
%%% replay it. (Pids, refs and ports differ between runs; the shape of every
%%% term and every mutation does not.)
-module(decoder_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0,
         init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).

-export([random_terms_roundtrip/1, deep_nesting/1,
         large_binary_is_referenced_not_copied/1, decoder_fuzz_after_auth/1,
         duplicate_map_keys_rejected/1, malformed_call_frames/1]).

%% The term generator, also used by encoder_SUITE.
-export([gen_top/1, fixed_terms/1]).

%% Run on peers.
-export([size_reporter/1, map_checker/1, peer_vitals/0, fuzz_sink/2, peer_context/0,
         teleport_state/0]).

-define(COLLECTOR, decoder_ct_collector).
-define(FUZZ_SINK, decoder_fuzz_sink).
-define(SERVER, decoder_ct_server).
-define(RAW_NODE, 'decoder_raw_client@127.0.0.1').
-define(RPC_TIMEOUT, 30000).
-define(MSG_TIMEOUT, 60000).
-define(RANDOM_TERMS, 3000).
-define(MUTATIONS, 3000).
-define(FUZZ_MS, 60000).
%% How long one fuzz frame may take to be answered (probe back, or closed).
-define(FRAME_TIMEOUT, 15000).
-define(MiB, 1048576).
-define(KiB, 1024).

%%====================================================================
%% Common Test callbacks
%%====================================================================

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [random_terms_roundtrip,
     deep_nesting,
     large_binary_is_referenced_not_copied,
     decoder_fuzz_after_auth,
     duplicate_map_keys_rejected,
     malformed_call_frames].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("decoder_ct") of
        ok -> start_suite(Config);
        {fail, _} = Fail -> Fail
    end.

start_suite(Config) ->
    %% Linked to this process until both are up: a crash halts them.
    {ok, PeerA, A} = start_peer("decoder_a"),
    {ok, PeerB, B} = start_peer("decoder_b"),
    true = unlink(PeerA),
    true = unlink(PeerB),
    Seed = teleport_test_peer:seed("DECODER_SUITE_SEED"),
    ct:pal("decoder_SUITE seed ~p (replay: DECODER_SUITE_SEED=\"~b,~b,~b\"); peers ~p, ~p",
           [Seed | tuple_to_list(Seed)] ++ [A, B]),
    [{seed, Seed}, {peer_a, PeerA}, {node_a, A}, {peer_b, PeerB}, {node_b, B} | Config].

end_per_suite(Config) ->
    _ = [teleport_test_peer:stop(?config(Key, Config)) || Key <- [peer_a, peer_b]],
    teleport_test_peer:stop_local_teleport().

init_per_testcase(Case, Config) ->
    flush(),
    true = register(?COLLECTOR, self()),
    put(decoder_ct_peers, []),
    put(decoder_ct_remote_procs, []),
    Seed = ?config(seed, Config),
    ct:pal("~p: seed ~p (replay: DECODER_SUITE_SEED=\"~b,~b,~b\")",
           [Case, Seed | tuple_to_list(Seed)]),
    _ = rand:seed(exsss, Seed),
    Config.

end_per_testcase(_Case, _Config) ->
    _ = [exit(Pid, kill) || Pid <- get_list(decoder_ct_remote_procs)],
    _ = [teleport_test_peer:stop(Peer) || Peer <- get_list(decoder_ct_peers)],
    _ = case whereis(?COLLECTOR) =:= self() of
            true -> unregister(?COLLECTOR);
            false -> ok
        end,
    ok.

%%====================================================================
%% random_terms_roundtrip
%%====================================================================

random_terms_roundtrip(Config) ->
    A = ?config(node_a, Config),
    Ctx = context(Config),
    Fixed = fixed_terms(Ctx),
    Random = [gen_top(Ctx) || _ <- lists:seq(1, ?RANDOM_TERMS)],
    Terms = Fixed ++ Random,
    Bytes = lists:sum([byte_size(term_to_binary(T)) || T <- Terms]),
    Big = length([T || T <- Terms, byte_size(term_to_binary(T)) > 64 * ?KiB]),
    ct:pal("~b terms (~b fixed, ~b random), ~.1f MiB encoded, ~b over 64 KiB",
           [length(Terms), length(Fixed), length(Random), Bytes / ?MiB, Big]),
    {ok, Echo} = teleport_test_peer:start_echo(A, self()),
    track_proc(Echo),
    Indexed = lists:zip(lists:seq(1, length(Terms)), Terms),
    T0 = now_ms(),
    %% A separate sender, so replies are read while later terms still go out.
    Self = self(),
    Sender = spawn_link(fun() ->
                                _ = [ok = teleport:send(Echo, {I, T}) || {I, T} <- Indexed],
                                Self ! {sent, self()}
                        end),
    Deadline = T0 + ?MSG_TIMEOUT,
    Problems = check_echoes(Echo, Indexed, Deadline, []),
    receive {sent, Sender} -> ok after 1000 -> ok end,
    ct:pal("~b terms echoed through ~p in ~b ms; ~b problems",
           [length(Terms), A, now_ms() - T0, length(Problems)]),
    case Problems of
        [] -> ok;
        _ ->
            [ct:pal("problem: ~ts", [P]) || P <- lists:sublist(Problems, 20)],
            ct:fail({roundtrip_problems, length(Problems), hd(Problems)})
    end.

%% In order: each echo must be the next index, =:= to what was sent, and
%% encode to the same bytes. `=:=' alone would miss a float whose sign was
%% lost (0.0 =:= -0.0 in OTP 25) or a map with a wrong internal layout; the
%% external encoding is deterministic for equal terms built from the same
%% keys (small maps are written in key order, large ones in hash order), so
%% it is compared for every term, not a sample.
check_echoes(_Echo, [], _Deadline, Acc) ->
    lists:reverse(Acc);
check_echoes(Echo, [{I, Sent} | Rest] = All, Deadline, Acc) ->
    receive
        {teleport_ct_echo, Echo, {I, Got}} ->
            Problem = case Got =:= Sent of
                          false ->
                              [fmt("term ~b differs: sent ~W got ~W", [I, Sent, 12, Got, 12])];
                          true ->
                              case term_to_binary(Got) =:= term_to_binary(Sent) of
                                  true -> [];
                                  false -> [fmt("term ~b =:= but encodes differently: ~W",
                                                [I, Sent, 12])]
                              end
                      end,
            check_echoes(Echo, Rest, Deadline, Problem ++ Acc);
        {teleport_ct_echo, Echo, {J, _}} ->
            lists:reverse(Acc, [fmt("out of order: expected ~b, got ~b", [I, J])]);
        {teleport_ct_echo_error, Echo, Error} ->
            lists:reverse(Acc, [fmt("echo could not send back (~b): ~W", [I, Error, 12])])
    after max(0, Deadline - now_ms()) ->
        lists:reverse(Acc, [fmt("~b of ~b terms missing, the first is ~b",
                                [length(All), length(All) + length(Acc), I])])
    end.

%%====================================================================
%% deep_nesting
%%====================================================================

deep_nesting(Config) ->
    A = ?config(node_a, Config),
    {ok, Echo} = teleport_test_peer:start_echo(A, self()),
    track_proc(Echo),
    DeepList = lists:foldl(fun(_, Acc) -> [Acc] end, [], lists:seq(1, 1000000)),
    DeepTuple = lists:foldl(fun(_, Acc) -> {Acc} end, {}, lists:seq(1, 100000)),
    [begin
         T0 = now_ms(),
         ok = teleport:send(Echo, {Label, Term}),
         receive
             {teleport_ct_echo, Echo, {Label, Got}} ->
                 %% Never print these: formatting them is what would hang.
                 ?assert(Got =:= Term),
                 ct:pal("~p: round trip in ~b ms", [Label, now_ms() - T0]);
             {teleport_ct_echo_error, Echo, Error} ->
                 ct:fail({echo_error, Label, Error})
         after ?MSG_TIMEOUT ->
             ct:fail({no_echo, Label})
         end
     end || {Label, Term} <- [{list_1000000_deep, DeepList}, {tuple_100000_deep, DeepTuple}]],
    %% The node decoded them on a plain thread and is still fine.
    ?assertEqual(A, erpc:call(A, erlang, node, [], ?RPC_TIMEOUT)),
    Tag = make_ref(),
    ok = teleport:send(Echo, Tag),
    receive {teleport_ct_echo, Echo, Tag} -> ok after ?MSG_TIMEOUT -> ct:fail(no_echo_after) end.

%%====================================================================
%% large_binary_is_referenced_not_copied
%%====================================================================

large_binary_is_referenced_not_copied(Config) ->
    A = ?config(node_a, Config),
    Reporter = erpc:call(A, erlang, spawn, [?MODULE, size_reporter, [self()]], ?RPC_TIMEOUT),
    track_proc(Reporter),
    %% 20 MiB alone in its frame: the decoder makes it a sub-binary of the frame buffer.
    Big = rand_bin(20 * ?MiB),
    Msg1 = {sizes_of, big, Big},
    Frame1 = byte_size(term_to_binary({Reporter, Msg1})),
    ok = teleport:send(Reporter, Msg1),
    [{Size1, Ref1}] = await_sizes(big),
    ct:pal("20 MiB binary: byte_size ~b, referenced_byte_size ~b, frame body ~b",
           [Size1, Ref1, Frame1]),
    ?assertEqual(20 * ?MiB, Size1),
    ?assert(Ref1 >= Size1),
    ?assert(Ref1 =< Frame1 + 64),
    ?assert(Ref1 - Size1 < 4096),
    %% 100 KiB among 1 MiB of others: under a quarter of the frame, so copied.
    Small = rand_bin(100 * ?KiB),
    Others = [rand_bin(128 * ?KiB) || _ <- lists:seq(1, 8)],
    Msg2 = {sizes_of, mixed, {Small, Others}},
    Frame2 = byte_size(term_to_binary({Reporter, Msg2})),
    ok = teleport:send(Reporter, Msg2),
    [{Size2, Ref2} | OtherSizes] = await_sizes(mixed),
    ct:pal("100 KiB binary in a ~b byte frame: byte_size ~b, referenced_byte_size ~b; "
           "the 128 KiB ones: ~w", [Frame2, Size2, Ref2, OtherSizes]),
    ?assertEqual(100 * ?KiB, Size2),
    ?assertEqual(100 * ?KiB, Ref2),
    %% Each 128 KiB binary is under a quarter of the frame too: all copies.
    ?assertEqual([{128 * ?KiB, 128 * ?KiB} || _ <- Others], OtherSizes),
    Reporter ! stop.

await_sizes(Tag) ->
    receive
        {sizes, Tag, Sizes} -> Sizes
    after ?MSG_TIMEOUT ->
        ct:fail({no_sizes, Tag})
    end.

%% @private Runs on a peer: reports, over distributed Erlang, the size and the
%% referenced size of every binary in each `{sizes_of, Tag, Term}' it gets.
size_reporter(Parent) ->
    receive
        stop ->
            ok;
        {sizes_of, Tag, Term} ->
            Parent ! {sizes, Tag, [{byte_size(B), binary:referenced_byte_size(B)}
                                   || B <- binaries(Term)]},
            size_reporter(Parent)
    end.

binaries(B) when is_binary(B) -> [B];
binaries(T) when is_tuple(T) -> binaries(tuple_to_list(T));
binaries(L) when is_list(L) -> lists:append([binaries(X) || X <- L]);
binaries(_) -> [].

%%====================================================================
%% decoder_fuzz_after_auth
%%====================================================================

decoder_fuzz_after_auth(Config) ->
    {F, Fuzz0} = start_fuzz_target("decoder_f"),
    Ctx = context(Config),
    Vitals0 = erpc:call(F, ?MODULE, peer_vitals, [], ?RPC_TIMEOUT),
    Fuzz = Fuzz0#{ctx => Ctx, bases => fuzz_bases(Ctx, Fuzz0)},
    T0 = now_ms(),
    Result = fuzz_loop(Fuzz, 1, not_connected, T0 + ?FUZZ_MS,
                       #{outcomes => #{}, violations => [], reconnects => 0, alive => ok,
                         allowed => []}),
    Ms = now_ms() - T0,
    #{n := N, outcomes := Outcomes, violations := Violations, reconnects := Reconnects,
      alive := Alive, allowed := Allowed} = Result,
    report_fuzz(N, Ms, Reconnects, Outcomes, Allowed),
    ?assertEqual(ok, Alive),
    %% F is still alive and its teleport still works: a normal message, a gs_call.
    ?assertEqual(F, erpc:call(F, erlang, node, [], ?RPC_TIMEOUT)),
    Tag = make_ref(),
    ok = teleport:send({?FUZZ_SINK, F}, {maps:get(secret, Fuzz), pass, {after_fuzz, Tag}}),
    receive
        {from_sink, F, {after_fuzz, Tag}} -> ok
    after ?MSG_TIMEOUT ->
        ct:fail(no_delivery_after_fuzz)
    end,
    ?assertEqual({echo, Tag}, teleport:gs_call({?SERVER, F}, {echo, {echo, Tag}}, 10000)),
    Vitals1 = erpc:call(F, ?MODULE, peer_vitals, [], ?RPC_TIMEOUT),
    Stats = erpc:call(F, teleport, stats, [?RAW_NODE], ?RPC_TIMEOUT),
    Growth = maps:get(memory_total, Vitals1) - maps:get(memory_total, Vitals0),
    ct:pal("F memory(total) ~.1f -> ~.1f MiB (growth ~.1f), RSS ~.1f -> ~.1f MiB, "
           "atom_count ~b -> ~b (+~b)~nF's counters for the raw client: ~p",
           [maps:get(memory_total, Vitals0) / ?MiB, maps:get(memory_total, Vitals1) / ?MiB,
            Growth / ?MiB, maps:get(rss, Vitals0) / ?MiB, maps:get(rss, Vitals1) / ?MiB,
            maps:get(atom_count, Vitals0), maps:get(atom_count, Vitals1),
            maps:get(atom_count, Vitals1) - maps:get(atom_count, Vitals0), Stats]),
    ?assert(Growth < 50 * ?MiB),
    case Violations of
        [] ->
            ok;
        _ ->
            ByKind = count_by([{What, Kind} || {What, Kind, _, _} <- Violations]),
            ct:pal("~b frames broke the rules ({what, mutation}, count): ~p",
                   [length(Violations), ByKind]),
            [ct:pal("frame ~b, ~p after mutation ~p: ~ts", [I, What, Kind, Detail])
             || {What, Kind, I, Detail} <- lists:sublist(lists:reverse(Violations), 12)],
            ct:fail({fuzz_violations, ByKind})
    end.

report_fuzz(N, Ms, Reconnects, Outcomes, Allowed) ->
    Totals = lists:sort(maps:to_list(
                          maps:fold(fun({_, Outcome}, C, M) ->
                                            maps:update_with(Outcome, fun(T) -> T + C end, C, M)
                                    end, #{}, Outcomes))),
    ct:pal("~b mutated frames in ~b ms: ~p; ~b connections~n"
           "{mutation, outcome} => count: ~p",
           [N, Ms, Totals, Reconnects, lists:sort(maps:to_list(Outcomes))]),
    case Allowed of
        [] ->
            ok;
        _ ->
            %% Compressed bodies (tag 80) are the expected ones: the decoder does not
            %% support them. Any other kind is listed in full.
            Others = [A || {K, _, _} = A <- lists:reverse(Allowed), K =/= compressed],
            ct:pal("valid for binary_to_term/1 but refused by teleport (allowed): ~b, "
                   "{mutation, reason} => count: ~w~nother than compressed:~n~ts",
                   [length(Allowed), count_by([{K, W} || {K, W, _} <- Allowed]),
                    [io_lib:format("  ~w ~w~n", [K, B]) || {K, _, B} <- Others]])
    end.

%% A peer F with a fuzz sink and a gen_server.
start_fuzz_target(Prefix) ->
    {ok, Peer, F} = teleport_test_peer:start(teleport_test_peer:unique_name(Prefix)),
    put(decoder_ct_peers, [Peer | get_list(decoder_ct_peers)]),
    Secret = make_ref(),
    SinkPid = erpc:call(F, erlang, spawn, [?MODULE, fuzz_sink, [self(), Secret]], ?RPC_TIMEOUT),
    true = erpc:call(F, erlang, register, [?FUZZ_SINK, SinkPid], ?RPC_TIMEOUT),
    {ok, _} = erpc:call(F, teleport_test_server, start, [?SERVER], ?RPC_TIMEOUT),
    DeadPid = erpc:call(F, erlang, spawn, [erlang, is_atom, [x]], ?RPC_TIMEOUT),
    Address = teleport_test_peer:connectable(erpc:call(F, teleport, listen_address, [],
                                                       ?RPC_TIMEOUT)),
    Fuzz = #{node => F, address => Address, sink_pid => SinkPid, dead_pid => DeadPid,
             secret => Secret},
    {F, Fuzz#{announce => raw_protocol(Fuzz, ?FUZZ_SINK, {Secret, pass})}}.

%% One mutation per round: tell F's sink (over disterl) which body is coming,
%% send the mutated frame, then a valid probe frame for the sink. The sink
%% judges on F, with F's own binary_to_term/1 as the oracle, and reports only
%% plain data back (fuzzed terms never travel over disterl: a pid of this node
%% with a mutated serial is a fine term on F and a corrupt one here).
fuzz_loop(#{node := F} = Fuzz, N, Conn, Deadline, Acc) ->
    case N > ?MUTATIONS orelse now_ms() > Deadline of
        true ->
            close_conn(Conn),
            Acc#{n => N - 1};
        false when N rem 100 =:= 0 ->
            case try erpc:call(F, erlang, node, [], 10000) catch C:R -> {C, R} end of
                F ->
                    fuzz_round(Fuzz, N, Conn, Deadline, Acc);
                Other ->
                    close_conn(Conn),
                    Acc#{n => N - 1, alive => {dead_after, N - 1, Other}}
            end;
        false ->
            fuzz_round(Fuzz, N, Conn, Deadline, Acc)
    end.

fuzz_round(Fuzz, N, Conn0, Deadline, Acc) ->
    {Conn, Acc1} = ensure_conn(Fuzz, Conn0, Acc),
    case Conn of
        {error, Reason} ->
            Acc1#{n => N - 1, alive => {cannot_connect, N, Reason}};
        Socket ->
            {Kind, Wire} = mutation(Fuzz),
            Outcome = send_mutation(Fuzz, Socket, N, Wire),
            Acc2 = record(Kind, N, Outcome, Acc1),
            Next = case Outcome of
                       {alive, _} -> Socket;
                       _ -> close_conn(Socket), not_connected
                   end,
            fuzz_loop(Fuzz, N + 1, Next, Deadline, Acc2)
    end.

send_mutation(_Fuzz, Socket, _N, {hangup, Bytes}) ->
    %% A header announcing a big body, part of it, and we hang up.
    _ = teleport_raw_client:send_bytes(Socket, Bytes),
    teleport_raw_client:close(Socket),
    hangup;
send_mutation(#{node := F, secret := Secret} = Fuzz, Socket, N, Wire) ->
    {FrameKind, Body} = case Wire of
                            {K, B} -> {frame_kind(K), iolist_to_binary(B)};
                            Raw -> {raw, iolist_to_binary(Raw)}
                        end,
    {?FUZZ_SINK, F} ! {Secret, expect, N, FrameKind, Body},
    _ = case FrameKind of
            raw -> teleport_raw_client:send_bytes(Socket, Body);
            _ -> teleport_raw_client:send_frame(Socket, FrameKind, Body)
        end,
    _ = teleport_raw_client:send_term(Socket, ?FUZZ_SINK, {decoder_probe, Secret, N}),
    await_result(Fuzz, Socket, N).

await_result(#{node := F, secret := Secret} = Fuzz, Socket, N) ->
    receive
        {fuzz_result, N, Result} ->
            {alive, Result};
        {fuzz_result, Old, _} when Old < N ->
            await_result(Fuzz, Socket, N);
        {tcp_closed, Socket} ->
            closed_result(F, Secret, N);
        {tcp_error, Socket, _} ->
            closed_result(F, Secret, N)
    after ?FRAME_TIMEOUT ->
        stuck
    end.

closed_result(F, Secret, N) ->
    {?FUZZ_SINK, F} ! {Secret, closed, N},
    receive
        {fuzz_result, N, Result} -> {closed, Result}
    after ?FRAME_TIMEOUT ->
        stuck
    end.

record(Kind, _N, hangup, Acc) ->
    count_outcome(Kind, hangup, Acc);
record(Kind, N, stuck, #{violations := V} = Acc) ->
    count_outcome(Kind, stuck,
                  Acc#{violations => [{stuck, Kind, N, "neither the probe nor a close within "
                                       "the frame timeout"} | V]});
record(Kind, N, {_, #{outcome := Outcome, verdict := Verdict}}, Acc0) ->
    Acc = count_outcome(Kind, Outcome, Acc0),
    case {Kind, Verdict} of
        {_, ok} ->
            Acc;
        {valid, {allowed, _, Body}} ->
            #{violations := V} = Acc,
            Acc#{violations => [{valid_frame_refused, Kind, N,
                                 fmt("an unmutated send frame closed the connection: ~w",
                                     [Body])} | V]};
        {_, {allowed, Why, Body}} ->
            #{allowed := Allowed} = Acc,
            Acc#{allowed => [{Kind, Why, Body} | Allowed]};
        {_, {violation, What, Detail}} ->
            #{violations := V} = Acc,
            Acc#{violations => [{What, Kind, N, Detail} | V]}
    end.

ensure_conn(Fuzz, not_connected, #{reconnects := R} = Acc) ->
    case raw_connect(Fuzz) of
        {ok, Socket} -> {Socket, Acc#{reconnects => R + 1}};
        {error, _} = Error -> {Error, Acc}
    end;
ensure_conn(_Fuzz, Socket, Acc) ->
    {Socket, Acc}.

close_conn(not_connected) ->
    ok;
close_conn({error, _}) ->
    ok;
close_conn(Socket) ->
    teleport_raw_client:close(Socket),
    %% A close F reported before ours: drop it, it would only pile up here.
    receive {tcp_closed, Socket} -> ok after 0 -> ok end,
    receive {tcp_error, Socket, _} -> ok after 0 -> ok end.

count_outcome(Kind, Outcome, #{outcomes := O} = Acc) ->
    Acc#{outcomes => maps:update_with({Kind, Outcome}, fun(C) -> C + 1 end, 1, O)}.

frame_kind(send) -> 1;
frame_kind(call) -> 2;
frame_kind(K) when is_integer(K) -> K.

%% @private Runs on F, registered as the fuzz sink. Control messages from the
%% test (over disterl) and the probes (over teleport) carry `Secret', which
%% no delivered term can contain; everything else is a delivery.
fuzz_sink(Parent, Secret) ->
    fuzz_sink(Parent, Secret, #{}, []).

fuzz_sink(Parent, Secret, Expected, Delivered) ->
    receive
        {Secret, expect, N, Kind, Body} ->
            fuzz_sink(Parent, Secret, Expected#{N => {Kind, Body}}, Delivered);
        {decoder_probe, Secret, N} ->
            %% The connection survived frame N: all it delivered is here.
            {KindBody, Expected1} = take_expected(Secret, N, Expected),
            Parent ! {fuzz_result, N, judge(KindBody, alive, lists:reverse(Delivered))},
            fuzz_sink(Parent, Secret, Expected1, []);
        {Secret, closed, N} ->
            {KindBody, Expected1} = take_expected(Secret, N, Expected),
            Parent ! {fuzz_result, N, judge(KindBody, closed, lists:reverse(Delivered))},
            fuzz_sink(Parent, Secret, Expected1, []);
        {Secret, pass, Msg} ->
            Parent ! {from_sink, node(), Msg},
            fuzz_sink(Parent, Secret, Expected, Delivered);
        Msg ->
            fuzz_sink(Parent, Secret, Expected, [Msg | Delivered])
    end.

take_expected(Secret, N, Expected) ->
    case maps:take(N, Expected) of
        {KindBody, Rest} ->
            {KindBody, Rest};
        error ->
            receive
                {Secret, expect, N, Kind, Body} -> {{Kind, Body}, Expected}
            after 10000 ->
                {missing, Expected}
            end
    end.

%% On F: what F's binary_to_term/1 makes of the body decides what teleport may
%% do with the frame:
%%   {deliver, Msg}  valid {Sink, Msg}: must arrive as Msg, =:= and with the
%%                   same encoding (teleport may refuse what it does not
%%                   support, e.g. compressed bodies: reported, allowed);
%%   drop            valid {Dest, _}, Dest a pid or name that is not the sink;
%%   close           a valid term that is not {pid() | atom(), _}, or not a send frame;
%%   invalid         binary_to_term refuses it (or leaves bytes over): it must
%%                   close the connection, never be delivered nor let through.
judge(missing, _Outcome, _Delivered) ->
    #{outcome => missing, verdict => {violation, no_expectation, "the sink lost track"}};
judge({Kind, Body}, Outcome, Delivered) ->
    Expect = expectation(Kind, Body),
    Name = case {Outcome, Delivered} of
               {closed, _} -> closed;
               {alive, []} -> dropped;
               {alive, _} -> delivered
           end,
    #{outcome => Name, verdict => verdict(Expect, Outcome, Delivered, short_bin(Body))}.

expectation(1, Body) ->
    try binary_to_term(Body, [used]) of
        {{Dest, Msg}, Used} when Used =:= byte_size(Body) ->
            case Dest =:= ?FUZZ_SINK orelse Dest =:= self() of
                true -> {deliver, Msg};
                false when is_atom(Dest); is_pid(Dest) -> drop;
                false -> close
            end;
        {_, Used} when Used =:= byte_size(Body) -> close;
        {_, _} -> invalid
    catch
        error:badarg -> invalid
    end;
expectation(_Kind, _Body) ->
    close.

verdict({deliver, Msg}, alive, [Got]) ->
    case Got =:= Msg andalso term_to_binary(Got) =:= term_to_binary(Msg) of
        true -> ok;
        false -> {violation, delivered_wrong_term,
                  fmt("binary_to_term/1 gives ~W, teleport delivered ~W", [Msg, 8, Got, 8])}
    end;
verdict({deliver, _}, closed, []) ->
    {allowed, refused_valid};
verdict(drop, closed, []) ->
    {allowed, refused_valid};
verdict(drop, alive, []) ->
    ok;
verdict(close, closed, []) ->
    ok;
verdict(invalid, closed, []) ->
    ok;
verdict({deliver, Msg}, alive, []) ->
    {violation, not_delivered, fmt("a valid frame for the sink was dropped: ~W", [Msg, 8])};
verdict(close, alive, []) ->
    {violation, not_closed, "a frame that is not {pid() | atom(), Msg} was let through"};
verdict(invalid, alive, Delivered) ->
    {violation, accepted_invalid,
     fmt("binary_to_term/1 refuses this body, yet the connection survived it; delivered: ~W",
         [Delivered, 8])};
verdict(Expect, Outcome, Delivered) ->
    {violation, unexpected_delivery,
     fmt("expected ~W; connection ~p; delivered ~W", [Expect, 6, Outcome, Delivered, 8])}.

%% Adds the body (short) to the verdict's report.
verdict(Expect, Outcome, Delivered, Body) ->
    case verdict(Expect, Outcome, Delivered) of
        ok -> ok;
        {allowed, Why} -> {allowed, Why, Body};
        {violation, What, Detail} -> {violation, What, fmt("~ts; body ~w", [Detail, Body])}
    end.

%%--------------------------------------------------------------------
%% Mutations

%% Valid send bodies to start from: {Sink, Msg} in three encodings
%% (minor_version 0 writes FLOAT_EXT, 2 writes every atom as UTF-8).
fuzz_bases(Ctx, #{node := F}) ->
    Msgs = [hello,
            {a, [1, 2, 3], <<"hello">>, #{k => v, 1 => 2}, 'café', '日本', 1 bsl 100, 3.5,
             self(), make_ref(), "str", [a | b], {}, <<1:3>>},
            lists:seq(1, 40),
            maps:from_list([{I, I} || I <- lists:seq(1, 40)]),
            maps:from_list([{{k, I}, [I]} || I <- lists:seq(1, 40)]),
            #{a => 1, "b" => [2], {c} => #{d => e}},
            list_to_tuple(lists:seq(1, 300)),
            fun(X) -> X + 1 end,
            make_closure({captured, [1, 2]}),
            fun lists:map/2,
            [[[[[x]]]]],
            -(1 bsl 300), 1.0e300, -0.0,
            rand_bin(100),
            binary:part(rand_bin(300), 5, 200),
            <<"bits", 3:5>>,
            hd(erlang:ports()),
            maps:get(remote_ref, Ctx),
            maps:get(remote_pid, Ctx),
            {F, [1.5, "x" | tail]},
            lists:duplicate(300, $x)],
    [term_to_binary({?FUZZ_SINK, M}, Opts)
     || M <- Msgs, Opts <- [[], [{minor_version, 0}], [{minor_version, 2}]]].

mutation(Fuzz) ->
    Kind = weighted([{flip, 22}, {truncate, 10}, {extend, 8}, {huge_length, 8},
                     {huge_length_at_tag, 10}, {deep_markers, 4}, {deep_valid, 1},
                     {list_ffffffff, 3}, {map_duplicate_keys, 4}, {unknown_tag, 5},
                     {atom_cache_ref, 3}, {compressed, 3}, {not_a_2_tuple, 3},
                     {bad_dest, 4}, {random_atoms, 4}, {frame_header, 2},
                     {call_kind, 1}, {huge_frame_hangup, 1}, {valid, 5}]),
    {Kind, mutate(Kind, Fuzz)}.

mutate(flip, Fuzz) ->
    Body = some_body(Fuzz),
    {send, lists:foldl(fun(_, B) -> set_byte(B, pos(B), rand:uniform(256) - 1) end,
                       Body, lists:seq(1, rand:uniform(4)))};
mutate(truncate, Fuzz) ->
    Body = some_body(Fuzz),
    {send, binary:part(Body, 0, rand:uniform(byte_size(Body)) - 1)};
mutate(extend, Fuzz) ->
    {send, <<(some_body(Fuzz))/binary, (rand:bytes(rand:uniform(16)))/binary>>};
mutate(huge_length, Fuzz) ->
    Body = some_body(Fuzz),
    {send, overwrite(Body, pos(Body), pick([<<255, 255, 255, 255>>, <<127, 255, 255, 255>>,
                                             <<0, 255, 255, 255>>, <<255, 255>>, <<255>>]))};
mutate(huge_length_at_tag, Fuzz) ->
    Body = some_body(Fuzz),
    case tag_positions(Body) of
        [] ->
            {send, Body};
        Positions ->
            P = pick(Positions),
            Huge = case binary:at(Body, P) of
                       T when T =:= 104; T =:= 115; T =:= 119; T =:= 110 -> <<255>>;
                       T when T =:= 100; T =:= 107; T =:= 118 -> <<255, 255>>;
                       _ -> pick([<<255, 255, 255, 255>>, <<0, 16, 0, 0>>, <<1, 0, 0, 0>>])
                   end,
            {send, overwrite(Body, P + 1, Huge)}
    end;
mutate(deep_markers, _Fuzz) ->
    Marker = pick([<<104, 1>>, <<105, 0, 0, 0, 1>>, <<108, 0, 0, 0, 1>>,
                   <<116, 0, 0, 0, 1, 97, 1>>, <<104, 2, 97, 0>>]),
    Depth = pick([1, 10, 1000, 100000, rand:uniform(200000)]),
    {send, <<131, 104, 2, (enc(?FUZZ_SINK))/binary,
             (binary:copy(Marker, Depth))/binary>>};
mutate(deep_valid, _Fuzz) ->
    Depth = rand:uniform(50000),
    {send, <<131, 104, 2, (enc(?FUZZ_SINK))/binary,
             (binary:copy(<<108, 0, 0, 0, 1>>, Depth))/binary, 106,
             (binary:copy(<<106>>, Depth))/binary>>};
mutate(list_ffffffff, Fuzz) ->
    Rest = pick([<<>>, <<97, 1, 106>>, rand:bytes(rand:uniform(64)),
                 binary:part(some_body(Fuzz), 1, 10)]),
    {send, <<131, 104, 2, (enc(?FUZZ_SINK))/binary, 108, 255, 255, 255, 255, Rest/binary>>};
mutate(map_duplicate_keys, _Fuzz) ->
    %% Small (flatmap) and large (over 32 pairs: a hashmap) maps with a repeated key.
    Pairs0 = [{K, K} || K <- lists:seq(1, pick([2, 5, 32, 33, 40, 64]))],
    Dup = rand:uniform(length(Pairs0)),
    Pairs = case rand:uniform(3) of
                1 -> [{0, V} || {_, V} <- Pairs0];                    % every key the same
                _ -> Pairs0 ++ [{Dup, duplicate}]
            end,
    {send, <<131, 104, 2, (enc(?FUZZ_SINK))/binary, (map_ext(Pairs))/binary>>};
mutate(unknown_tag, Fuzz) ->
    Unknown = pick([0, 1, 42, 69, 71, 72, 73, 74, 75, 76, 78, 79, 81, 83, 84, 85, 86, 87,
                    91, 92, 117, 121, 122, 200, 255]),
    Body = some_body(Fuzz),
    case rand:uniform(2) of
        1 ->
            {send, <<131, 104, 2, (enc(?FUZZ_SINK))/binary, Unknown,
                     (rand:bytes(rand:uniform(8) - 1))/binary>>};
        2 ->
            case tag_positions(Body) of
                [] -> {send, Body};
                Ps -> {send, set_byte(Body, pick(Ps), Unknown)}
            end
    end;
mutate(atom_cache_ref, _Fuzz) ->
    {send, pick([<<131, 104, 2, 82, 0, 100, 0, 1, $x>>,
                 <<131, 104, 2, (enc(?FUZZ_SINK))/binary, 82, (rand:uniform(256) - 1)>>,
                 <<131, 82, 0>>,
                 <<131, 104, 2, (enc(?FUZZ_SINK))/binary, 104, 2, 82, 1, 82, 2>>])};
mutate(compressed, _Fuzz) ->
    %% Compressed bodies: the whole frame (binary_to_term takes it; teleport's
    %% decoder need not), a nested compressed term (never valid), a corrupted one.
    Msg = {compress_me, lists:duplicate(200, repeated), binary:copy(<<"abc">>, 500)},
    Top = term_to_binary({?FUZZ_SINK, Msg}, [compressed]),
    <<131, Nested/binary>> = term_to_binary(Msg, [compressed]),
    case rand:uniform(3) of
        1 -> {send, Top};
        2 -> {send, <<131, 104, 2, (enc(?FUZZ_SINK))/binary, Nested/binary>>};
        3 -> {send, set_byte(Top, 6 + rand:uniform(byte_size(Top) - 7), rand:uniform(256) - 1)}
    end;
mutate(not_a_2_tuple, _Fuzz) ->
    {send, term_to_binary(pick([{?FUZZ_SINK}, {?FUZZ_SINK, a, b}, [?FUZZ_SINK, msg], 42,
                                ?FUZZ_SINK, #{?FUZZ_SINK => msg}, {}, <<"sink">>]))};
mutate(bad_dest, #{sink_pid := SinkPid, dead_pid := DeadPid, node := F}) ->
    Dest = pick([SinkPid, self(), DeadPid, 42, make_ref(), {?FUZZ_SINK, F}, "sink", 1.5,
                 [?FUZZ_SINK], <<"decoder_fuzz_sink">>]),
    {send, term_to_binary({Dest, {bad_dest_msg, rand:uniform(1000)}})};
mutate(random_atoms, _Fuzz) ->
    Atoms = [random_atom(pick([ascii, latin1, unicode])) || _ <- lists:seq(1, rand:uniform(5))],
    Dest = case rand:uniform(3) of
               1 -> list_to_atom("fz_" ++ atom_to_list(random_atom(pick([latin1, unicode]))));
               _ -> ?FUZZ_SINK
           end,
    Body = term_to_binary({Dest, {atoms, Atoms}}, pick([[], [{minor_version, 2}]])),
    case rand:uniform(2) of
        1 -> {send, Body};
        %% Flip a byte inside the message's atoms: new (or invalid UTF-8) names.
        2 -> {send, set_byte(Body, byte_size(Body) - rand:uniform(min(8, byte_size(Body) - 1)),
                             rand:uniform(256) - 1)}
    end;
mutate(frame_header, _Fuzz) ->
    pick([<<0:32, 1>>,                                  % empty body
          <<5:32, (pick([0, 3, 4, 9, 200, 255])), "hello">>,  % unknown kind
          <<16#FFFFFFFF:32, 1>>]);                      % over max_frame_bytes
mutate(call_kind, Fuzz) ->
    %% Call frames that are not {Dest, Call, Request}: never reach a relay.
    {call, pick([some_body(Fuzz), term_to_binary({?FUZZ_SINK, msg}), term_to_binary(42)])};
mutate(huge_frame_hangup, _Fuzz) ->
    {hangup, [<<(256 * ?MiB):32, 1>>, rand:bytes(1024)]};
mutate(valid, Fuzz) ->
    {send, some_body(Fuzz)}.

%% A valid body: one of the fixed bases, or a fresh random term.
some_body(#{bases := Bases, ctx := Ctx}) ->
    case rand:uniform(10) of
        N when N =< 6 -> pick(Bases);
        _ -> term_to_binary({?FUZZ_SINK, gen(Ctx, rand:uniform(4) - 1)},
                            pick([[], [{minor_version, 2}]]))
    end.

%% Positions (past the version byte) of bytes that may be tags with a length after them.
tag_positions(Body) ->
    Tags = [77, 100, 104, 105, 107, 108, 109, 110, 111, 112, 115, 116, 118, 119],
    [P || P <- lists:seq(1, byte_size(Body) - 1), lists:member(binary:at(Body, P), Tags)].

pos(Body) when byte_size(Body) > 1 ->
    case rand:uniform(20) of
        1 -> 0;
        _ -> rand:uniform(byte_size(Body) - 1)
    end;
pos(_Body) ->
    0.

set_byte(Body, P, Byte) when P < byte_size(Body) ->
    <<Head:P/binary, _, Tail/binary>> = Body,
    <<Head/binary, Byte, Tail/binary>>;
set_byte(Body, _P, _Byte) ->
    Body.

overwrite(Body, P, New) when P >= byte_size(Body) ->
    <<Body/binary, New/binary>>;
overwrite(Body, P, New) ->
    Len = min(byte_size(New), byte_size(Body) - P),
    <<Head:P/binary, _:Len/binary, Tail/binary>> = Body,
    <<Head/binary, New/binary, Tail/binary>>.

%% A term's encoding without the version byte.
enc(Term) ->
    <<131, Bytes/binary>> = term_to_binary(Term),
    Bytes.

map_ext(Pairs) ->
    <<116, (length(Pairs)):32, << <<(enc(K))/binary, (enc(V))/binary>> || {K, V} <- Pairs >>/binary>>.

%%--------------------------------------------------------------------
%% Connecting the raw client

%% Connects and authenticates as ?RAW_NODE, sending what the target's protocol
%% expects first (see raw_protocol/2).
raw_connect(#{node := F, address := Address} = Fuzz) ->
    teleport_raw_client:connect(Address, F, erlang:get_cookie(),
                                #{client_node => ?RAW_NODE, timeout => 10000,
                                  announce => announce(maps:get(announce, Fuzz, none))}).

%% Since commit 32b7735 every connection starts with a "pool epoch" frame
%% (kind 3, 16 bytes: u64 incarnation, u64 epoch) before any send or call
%% frame; before it, frames followed the handshake directly. Find out once
%% which of the two the target speaks, so the suite tests the decoder either way.
raw_protocol(Target, Sink) ->
    raw_protocol(Target, Sink, none).

%% Wrap: what the sink needs around a message to forward it ({Secret, pass}).
raw_protocol(#{node := F} = Target, Sink, Wrap) ->
    Try = fun(Mode) ->
                  case raw_connect(Target#{announce => Mode}) of
                      {ok, Socket} ->
                          Tag = make_ref(),
                          Probe = case Wrap of
                                      none -> {raw_protocol, Tag};
                                      {Secret, pass} -> {Secret, pass, {raw_protocol, Tag}}
                                  end,
                          _ = teleport_raw_client:send_term(Socket, Sink, Probe),
                          Result = receive
                                       {from_sink, F, {raw_protocol, Tag}} -> ok;
                                       {tcp_closed, Socket} -> closed
                                   after 10000 -> timeout
                                   end,
                          teleport_raw_client:close(Socket),
                          Result;
                      {error, Reason} ->
                          {error, Reason}
                  end
          end,
    case Try(pool_epoch) of
        ok ->
            pool_epoch;
        First ->
            case Try(none) of
                ok ->
                    ct:pal("~p takes frames right after the handshake (no pool epoch)", [F]),
                    none;
                Second ->
                    ct:fail({raw_client_not_delivered, F, First, Second})
            end
    end.

announce(none) ->
    [];
announce(pool_epoch) ->
    %% One incarnation per test process, a growing epoch: each connection is a
    %% newer "pool" than the last (whose connection is closed by then anyway).
    Incarnation = case get(decoder_ct_incarnation) of
                      undefined ->
                          I = erlang:phash2(make_ref()) + 1,
                          put(decoder_ct_incarnation, I),
                          I;
                      I ->
                          I
                  end,
    teleport_raw_client:pool_epoch(Incarnation, erlang:unique_integer([positive, monotonic])).

%% @private Runs on a peer: its memory after a full GC, its RSS and atom count.
peer_vitals() ->
    _ = [erlang:garbage_collect(P) || P <- erlang:processes()],
    Rss = case file:read_file("/proc/self/status") of
              {ok, Status} ->
                  case re:run(Status, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, list}]) of
                      {match, [Kb]} -> list_to_integer(Kb) * 1024;
                      nomatch -> 0
                  end;
              _ ->
                  0
          end,
    #{memory_total => erlang:memory(total), rss => Rss,
      atom_count => erlang:system_info(atom_count)}.

%%====================================================================
%% duplicate_map_keys_rejected
%%====================================================================

%% binary_to_term/1 refuses a MAP_EXT that repeats a key. teleport's decoder
%% must too, whatever the map's size.
duplicate_map_keys_rejected(Config) ->
    A = ?config(node_a, Config),
    Checker = erpc:call(A, erlang, spawn, [?MODULE, map_checker, [self()]], ?RPC_TIMEOUT),
    track_proc(Checker),
    true = erpc:call(A, erlang, register, [decoder_map_checker, Checker], ?RPC_TIMEOUT),
    Address = teleport_test_peer:connectable(erpc:call(A, teleport, listen_address, [],
                                                       ?RPC_TIMEOUT)),
    Target0 = #{node => A, address => Address},
    Target = Target0#{announce => raw_protocol_checker(Target0)},
    Cases = [{small_one_duplicate, [{1, a}, {2, b}, {1, c}]},
             {pairs_33_one_duplicate, [{K, K} || K <- lists:seq(1, 32)] ++ [{1, dup}]},
             {pairs_33_same_key, [{0, K} || K <- lists:seq(1, 33)]},
             {pairs_40_one_duplicate, [{K, K} || K <- lists:seq(1, 40)] ++ [{7, dup}]}],
    Results = [begin
                   {ok, Socket} = raw_connect(Target),
                   ?assertError(badarg, binary_to_term(<<131, (map_ext(Pairs))/binary>>)),
                   Body = <<131, 104, 2, (enc(decoder_map_checker))/binary, 104, 2,
                            (enc(Label))/binary, (map_ext(Pairs))/binary>>,
                   ok = teleport_raw_client:send_frame(Socket, send, Body),
                   Result = receive
                                {map_check, Label, Facts} -> {delivered, Facts};
                                {tcp_closed, Socket} -> closed
                            after 10000 -> neither
                            end,
                   teleport_raw_client:close(Socket),
                   ct:pal("~p (~b pairs): ~p", [Label, length(Pairs), Result]),
                   {Label, Result}
               end || {Label, Pairs} <- Cases],
    Checker ! stop,
    ?assertEqual([{Label, closed} || {Label, _} <- Cases], Results).

%% For the raw client's protocol check: a checker forwarding to the collector.
raw_protocol_checker(#{node := Node} = Target) ->
    Sink = decoder_protocol_sink,
    {ok, SinkPid} = teleport_test_peer:start_sink(Node, Sink, {?COLLECTOR, node()}),
    track_proc(SinkPid),
    Mode = raw_protocol(Target, Sink),
    exit(SinkPid, kill),
    Mode.

%% @private Runs on a peer: for each `{Label, Map}' it gets, reports facts
%% that hold for every well-formed map.
map_checker(Parent) ->
    receive
        stop ->
            ok;
        {Label, Map} when is_map(Map) ->
            Rebuilt = maps:from_list(maps:to_list(Map)),
            Parent ! {map_check, Label, #{size => map_size(Map),
                                          equal_to_itself_rebuilt => Map =:= Rebuilt,
                                          same_encoding_rebuilt =>
                                              term_to_binary(Map) =:= term_to_binary(Rebuilt)}},
            map_checker(Parent);
        {Label, Other} ->
            Parent ! {map_check, Label, #{not_a_map => Other}},
            map_checker(Parent)
    end.

%%====================================================================
%% malformed_call_frames
%%====================================================================

%% A call frame is {Dest, {Caller, Ref, Timeout}, Request}. Ones whose fields
%% teleport:gs_call would never send (an integer Dest, a negative Timeout, a
%% Caller that is not a pid) must cost at most their connection: the node's
%% teleport (relays, runtime, listener) must stay as it was.
malformed_call_frames(_Config) ->
    {ok, Peer, G} = teleport_test_peer:start(teleport_test_peer:unique_name("decoder_g")),
    put(decoder_ct_peers, [Peer | get_list(decoder_ct_peers)]),
    {ok, _} = erpc:call(G, teleport_test_server, start, [?SERVER], ?RPC_TIMEOUT),
    {ok, _} = teleport_test_peer:start_sink(G, ?FUZZ_SINK, {?COLLECTOR, node()}),
    Address = teleport_test_peer:connectable(erpc:call(G, teleport, listen_address, [],
                                                       ?RPC_TIMEOUT)),
    Target0 = #{node => G, address => Address},
    Target = Target0#{announce => raw_protocol(Target0, ?FUZZ_SINK)},
    Before = teleport_processes(G),
    Frames = [{integer_dest, {42, {self(), make_ref(), 5000}, req}},
              {negative_timeout, {?SERVER, {self(), make_ref(), -1}, {echo, x}}},
              {caller_not_a_pid, {?SERVER, {not_a_pid, make_ref(), 5000}, {echo, x}}},
              {integer_dest, {42, {self(), make_ref(), 5000}, req}},
              {negative_timeout, {?SERVER, {self(), make_ref(), -1}, {echo, x}}},
              {caller_not_a_pid, {?SERVER, {not_a_pid, make_ref(), 5000}, {echo, x}}}],
    Log = [begin
               %% Each on a connection of its own, to where G listens now.
               Addr = try teleport_test_peer:connectable(
                            erpc:call(G, teleport, listen_address, [], ?RPC_TIMEOUT))
                      catch _:_ -> Address
                      end,
               Sent = case raw_connect(Target#{address => Addr}) of
                          {ok, Socket} ->
                              ok = teleport_raw_client:send_frame(Socket, call,
                                                                  term_to_binary(Body)),
                              timer:sleep(300),
                              teleport_raw_client:close(Socket),
                              sent;
                          {error, Reason} ->
                              {cannot_connect, Reason}
                      end,
               Now = teleport_processes(G),
               ct:pal("~p: ~p; G's teleport now ~p", [Label, Sent, Now]),
               {Label, Sent, Now}
           end || {Label, Body} <- Frames],
    After = teleport_processes(G),
    Call = try teleport:gs_call({?SERVER, G}, {echo, still_there}, 10000) catch C:R -> {C, R} end,
    ct:pal("before ~p~nafter ~p~ngs_call afterwards: ~p", [Before, After, Call]),
    Changed = [{Label, Now} || {Label, _, Now} <- Log, Now =/= Before],
    ?assertEqual([], Changed),
    ?assertEqual(still_there, Call).

%% What a restart would change: the pids of teleport's processes and the listener.
teleport_processes(Node) ->
    try
        erpc:call(Node, ?MODULE, teleport_state, [], ?RPC_TIMEOUT)
    catch
        Class:Reason -> {rpc_failed, Class, Reason}
    end.

%% @private Runs on a peer: teleport's registered processes and its listener.
teleport_state() ->
    Names = [teleport_sup, teleport_runtime, teleport_connector | teleport_call_relay:names()],
    {[{N, whereis(N)} || N <- Names], try teleport:listen_address() catch C:R -> {C, R} end}.

%%====================================================================
%% The term generator
%%====================================================================

%% Pids, refs and ports of this node and of both peers, and funs.
context(Config) ->
    A = ?config(node_a, Config),
    B = ?config(node_b, Config),
    %% Named functions only over erpc: a fun breaks as soon as the suite is
    %% recompiled while it runs (peers load the newer file).
    {PidsA, RefsA, PortsA} = erpc:call(A, ?MODULE, peer_context, [], ?RPC_TIMEOUT),
    {PidsB, RefsB, PortsB} = erpc:call(B, ?MODULE, peer_context, [], ?RPC_TIMEOUT),
    Dead = spawn(fun() -> ok end),
    Alias = alias(),
    true = unalias(Alias),
    Pids = [self(), whereis(init), Dead | PidsA ++ PidsB],
    Refs = [make_ref(), Alias | RefsA ++ RefsB],
    Ports = lists:sublist(erlang:ports(), 2) ++ PortsA ++ PortsB,
    N = 7,
    Funs = [fun(X) -> X + N end, fun() -> ok end, fun lists:reverse/1, fun erlang:element/2,
            fun ?MODULE:size_reporter/1],
    #{pids => Pids, refs => Refs, ports => Ports, funs => Funs,
      remote_pid => hd(PidsB), remote_ref => hd(RefsB),
      pool => rand_bin(?MiB)}.

%% @private Runs on a peer: some of its pids, refs (one an alias) and ports.
peer_context() ->
    {[whereis(init), self(), whereis(code_server)], [make_ref(), alias()],
     lists:sublist(erlang:ports(), 2)}.

%% Terms every run has, whatever the seed.
fixed_terms(Ctx) ->
    Pool = maps:get(pool, Ctx),
    Bin80K = big_bin(Ctx, 80 * ?KiB),
    Bin200K = big_bin(Ctx, 200 * ?KiB),
    ['café', '日本', 'héllo wörld', '', list_to_atom(lists:duplicate(255, $a)),
     list_to_atom(lists:duplicate(255, $é)), list_to_atom(lists:duplicate(255, 16#65E5)),
     1 bsl 300, -(1 bsl 300), (1 bsl 300) - 1, 0.0, -0.0, 5.0e-324, 1.7976931348623157e308,
     %% Over 64 KiB, the binary over a quarter of the frame: a sub-binary of it.
     {over_quarter, Bin80K},
     %% Over 64 KiB, but 70 KiB is under a quarter of ~300 KiB: copied; the
     %% 230 KiB one is over it: referenced.
     {under_and_over_quarter, big_bin(Ctx, 70 * ?KiB), big_bin(Ctx, 230 * ?KiB)},
     {six_under_quarter, [big_bin(Ctx, 20 * ?KiB) || _ <- lists:seq(1, 6)]},
     {sub_binary_of_big, binary:part(Bin200K, 1, 90000)},
     {sub_binaries, binary:part(Pool, 3, 65), binary:part(Pool, 1000, 10), <<>>},
     {bits, <<1:1>>, <<255, 7:3>>, binary:part(Pool, 5, 100)},
     list_to_tuple(lists:seq(1, 300)),
     maps:from_list([{{k, I}, [I]} || I <- lists:seq(1, 40)]),
     #{#{a => 1} => [#{}], [1, 2] => {x}, <<"k">> => 'café', 1.5 => -0.0},
     [1, 2 | 3], [a | <<"b">>], "plain string", "日本語", lists:duplicate(70000, $z),
     [alias | make_ref()], maps:get(funs, Ctx),
     make_closure({captured, maps:get(pids, Ctx), maps:get(refs, Ctx), maps:get(ports, Ctx)})].

gen_top(Ctx) ->
    case rand:uniform(100) of
        %% Over 64 KiB: alone (over a quarter: referenced), four together
        %% (each under a quarter: copied), or with other terms.
        1 -> {big_alone, big_bin(Ctx)};
        2 -> {big_four, [big_bin(Ctx) || _ <- lists:seq(1, 4)]};
        3 -> {big_with_terms, big_bin(Ctx), gen(Ctx, 3)};
        _ -> gen(Ctx, rand:uniform(6) - 1)
    end.

gen(Ctx, 0) ->
    leaf(Ctx);
gen(Ctx, Depth) ->
    D = Depth - 1,
    case rand:uniform(16) of
        N when N =< 6 -> leaf(Ctx);
        7 -> [gen(Ctx, D) || _ <- width(Depth)];
        8 -> improper(Ctx, D);
        9 -> list_to_tuple([gen(Ctx, D) || _ <- width(Depth)]);
        10 -> small_map(Ctx, D);
        11 -> small_map(Ctx, D);
        12 when Depth =< 2 -> large_map(Ctx);
        12 -> small_map(Ctx, D);
        13 -> make_closure(gen(Ctx, D));
        14 -> big_tuple(Ctx);
        15 -> chain(Ctx);
        16 -> {gen(Ctx, D), gen(Ctx, D)}
    end.

width(Depth) when Depth >= 4 -> lists:seq(1, rand:uniform(6) - 1);
width(_Depth) -> lists:seq(1, rand:uniform(4) - 1).

leaf(Ctx) ->
    case rand:uniform(17) of
        1 -> atom();
        2 -> atom();
        3 -> rand:uniform(256) - 1;
        4 -> int();
        5 -> bignum();
        6 -> float();
        7 -> rand:bytes(rand:uniform(201) - 1);
        8 -> sub_bin(Ctx);
        9 -> bits();
        10 -> string();
        11 -> unicode_string();
        12 -> pick(maps:get(pids, Ctx));
        13 -> pick(maps:get(refs, Ctx));
        14 -> pick(maps:get(ports, Ctx));
        15 -> pick(maps:get(funs, Ctx));
        16 -> pick([[], {}, #{}, <<>>, true, false, undefined]);
        17 -> rand:bytes(rand:uniform(200))
    end.

fixed_atoms() ->
    case get(decoder_ct_fixed_atoms) of
        undefined ->
            Atoms = [a, ok, 'café', '日本', 'héllo', '', 'with space', 'Ünïcödé', '🙂', 'ÿ', 'a@b',
                     list_to_atom(lists:duplicate(255, $x))],
            put(decoder_ct_fixed_atoms, Atoms),
            Atoms;
        Atoms ->
            Atoms
    end.

atom() ->
    case rand:uniform(4) of
        1 -> pick(fixed_atoms());
        2 -> random_atom(ascii);
        3 -> random_atom(latin1);
        4 -> random_atom(unicode)
    end.

random_atom(Kind) ->
    list_to_atom([char(Kind) || _ <- lists:seq(1, rand:uniform(12) - 1)]).

char(ascii) -> $\s + rand:uniform(95) - 1;
char(latin1) -> pick([$a + rand:uniform(26) - 1, 16#A0 + rand:uniform(96) - 1]);
char(unicode) ->
    pick([$a + rand:uniform(26) - 1, 16#C0 + rand:uniform(64) - 1, 16#3040 + rand:uniform(96) - 1,
          16#4E00 + rand:uniform(512) - 1, 16#1F600 + rand:uniform(64) - 1]).

int() ->
    pick([rand:uniform(1 bsl 31) - (1 bsl 30),
          -rand:uniform(1 bsl 27),
          rand:uniform(1 bsl 59),
          -rand:uniform(1 bsl 59),
          pick([-(1 bsl 31), (1 bsl 31) - 1, 1 bsl 31, -(1 bsl 31) - 1, (1 bsl 59) - 1,
                1 bsl 59, -(1 bsl 59), -(1 bsl 59) - 1, (1 bsl 64) - 1, 1 bsl 64, 256, -129])]).

bignum() ->
    Magnitude = case rand:uniform(10) of
                    1 -> 1 bsl 300;
                    _ -> rand:uniform(1 bsl (59 + rand:uniform(241)))
                end,
    pick([Magnitude, -Magnitude]).

float() ->
    case rand:uniform(5) of
        1 -> pick([0.0, -0.0, 1.0, -1.0, 0.1, 5.0e-324, -5.0e-324, 2.2250738585072014e-308,
                   1.7976931348623157e308, -1.7976931348623157e308, math:pi()]);
        2 -> rand:uniform_real();
        3 -> (rand:uniform() - 0.5) * math:pow(10, rand:uniform(600) - 300);
        _ ->
            case <<(rand:uniform(1 bsl 64) - 1):64>> of
                <<F:64/float>> -> F;
                _ -> 1.5                                % NaN or infinity: not Erlang floats
            end
    end.

sub_bin(Ctx) ->
    Pool = maps:get(pool, Ctx),
    Len = rand:uniform(300) - 1,
    binary:part(Pool, rand:uniform(byte_size(Pool) - Len) - 1, Len).

bits() ->
    Bytes = rand:bytes(rand:uniform(20) - 1),
    Bits = rand:uniform(7),
    <<Bytes/binary, (rand:uniform(128) - 1):Bits>>.

string() ->
    [rand:uniform(256) - 1 || _ <- lists:seq(1, rand:uniform(61) - 1)].

unicode_string() ->
    [char(unicode) || _ <- lists:seq(1, rand:uniform(30))].

improper(Ctx, D) ->
    Tail = pick([atom(), int(), float(), rand:bytes(rand:uniform(10)), {}, #{},
                 make_closure(x)]),
    lists:foldr(fun(X, Acc) -> [X | Acc] end, Tail, [gen(Ctx, D) || _ <- lists:seq(0, rand:uniform(5))]).

small_map(Ctx, D) ->
    maps:from_list([{key(Ctx), gen(Ctx, D)} || _ <- lists:seq(1, rand:uniform(9) - 1)]).

%% Over 32 keys, some compound. Each key holds its index, so none repeat.
large_map(Ctx) ->
    maps:from_list([{pick([I, {I, leaf(Ctx)}, [I | atom()], <<I:32, (rand:bytes(3))/binary>>,
                           #{I => leaf(Ctx)}, I + 0.5]),
                     leaf(Ctx)}
                    || I <- lists:seq(1, 32 + rand:uniform(40))]).

key(Ctx) ->
    case rand:uniform(5) of
        1 -> {leaf(Ctx), leaf(Ctx)};
        2 -> [leaf(Ctx), leaf(Ctx)];
        3 -> #{leaf(Ctx) => leaf(Ctx)};
        _ -> leaf(Ctx)
    end.

big_tuple(Ctx) ->
    case rand:uniform(8) of
        1 -> list_to_tuple([leaf(Ctx) || _ <- lists:seq(1, 255 + rand:uniform(200))]);
        _ -> list_to_tuple([leaf(Ctx) || _ <- lists:seq(1, rand:uniform(20))])
    end.

%% A short chain of one-element lists or tuples.
chain(Ctx) ->
    Wrap = pick([fun(X) -> [X] end, fun(X) -> {X} end, fun(X) -> #{k => X} end]),
    lists:foldl(fun(_, Acc) -> Wrap(Acc) end, leaf(Ctx), lists:seq(1, rand:uniform(50))).

make_closure(Captured) ->
    case erlang:phash2(Captured, 2) of
        0 -> fun(X) -> {X, Captured} end;
        1 -> fun() -> Captured end
    end.

big_bin(Ctx) ->
    big_bin(Ctx, 65 * ?KiB + rand:uniform(35 * ?KiB)).

%% A binary of its own (a copy, not a sub-binary of the pool) of random bytes.
big_bin(Ctx, Len) ->
    Pool = maps:get(pool, Ctx),
    binary:copy(binary:part(Pool, rand:uniform(byte_size(Pool) - Len) - 1, Len)).

%%====================================================================
%% Helpers
%%====================================================================

start_peer(Prefix) ->
    teleport_test_peer:start(teleport_test_peer:unique_name(Prefix)).

rand_bin(Len) ->
    rand:bytes(Len).

pick(List) ->
    lists:nth(rand:uniform(length(List)), List).

weighted(Choices) ->
    Total = lists:sum([W || {_, W} <- Choices]),
    weighted(rand:uniform(Total), Choices).

weighted(R, [{Choice, W} | _]) when R =< W -> Choice;
weighted(R, [{_, W} | Rest]) -> weighted(R - W, Rest).

count_by(Keys) ->
    lists:sort(maps:to_list(lists:foldl(fun(K, M) -> maps:update_with(K, fun(C) -> C + 1 end, 1, M) end,
                                        #{}, Keys))).

short_bin(Bin) when byte_size(Bin) > 400 ->
    <<(binary:part(Bin, 0, 400))/binary, "...">>;
short_bin(Bin) ->
    Bin.

fmt(Format, Args) ->
    lists:flatten(io_lib:format(Format, Args)).

track_proc(Pid) ->
    put(decoder_ct_remote_procs, [Pid | get_list(decoder_ct_remote_procs)]).

get_list(Key) ->
    case get(Key) of
        undefined -> [];
        List -> List
    end.

now_ms() ->
    erlang:monotonic_time(millisecond).

flush() ->
    receive _ -> flush() after 0 -> ok end.

%%% @doc teleport's send-side encoder (native/teleport_nif/src/encoder.rs), through
%%% `teleport_nif:encode/1' and `encode_measured/1', against `term_to_binary/1'.
%%%
%%% Byte identity is with the running VM's `term_to_binary/1': OTP 25 writes
%%% Latin-1 atoms as ATOM_EXT, OTP 26 and later every atom as SMALL_ATOM_UTF8_EXT
%%% (ATOM_UTF8_EXT past 255 bytes), and teleport writes what the VM it runs in
%%% writes.
%%%
%%% <ul>
%%% <li>`probe': what the encoder found out about this VM
%%%     (`teleport_nif:encoder_info/0'), printed: on a 64-bit VM it reads the
%%%     VM's tag bits (its probe of them passed), and its atom form is this
%%%     release's (checked against `term_to_binary/1' here, and against the
%%%     release number). On the peers: tag reading `off' by setting, and
%%%     `probe_failed' where the probe is made to see a changed layout. Also
%%%     whether the decoder builds maps over 32 keys key by key (on a VM with
%%%     erlang/otp GH-8208, such as OTP 25.2) or at once.</li>
%%% <li>`atom_forms': atoms in every length class, in this release's bytes
%%%     (written out per release); teleport's decoder reads each atom in all four
%%%     forms (ATOM_EXT, SMALL_ATOM_EXT and the UTF-8 pair) whatever the
%%%     release, as peers of other releases send them.</li>
%%% <li>`every_term_type': the term types the encoder tells apart are exactly
%%%     those this release's erl_nif.h names (a release that adds one fails
%%%     here), and a term of every type the release can make, OTP 29's native
%%%     records included (the NIF API has no type for them: they must reach the
%%%     VM's own encoder, never `enif_term_type', which aborts on them), encodes
%%%     byte-identical to `term_to_binary/1', with and without the tag reading,
%%%     and crosses teleport `=:='.</li>
%%% <li>`random_terms_match_term_to_binary': ~4,000 terms from decoder_SUITE's
%%%     seeded generator (every type, nested): each encodes to an iolist of
%%%     binaries whose concatenation is byte-identical to `term_to_binary/1'
%%%     and decodes back `=:='. Terms holding a map over 32 keys (whose order
%%%     the format leaves open) need only decode back; how many are identical
%%%     anyway is printed, as is how many encoded inline and how many went to
%%%     a dirty scheduler.</li>
%%% <li>`random_terms_without_tags': the same on a peer started with
%%%     `TELEPORT_ENCODER_TAGS=off', where the encoder uses the NIF API alone.</li>
%%% <li>`random_terms_changed_layout': the same on a peer whose encoder probe
%%%     is shown a changed tag layout (`TELEPORT_ENCODER_TAGS=simulate_changed_layout'):
%%%     the probe fails and the NIF-API-only fallback encodes every term.</li>
%%% <li>`deep_nesting': a list nested 1,000,000 deep, tuples and maps
%%%     100,000 deep.</li>
%%% <li>`long_lists': 1,000,000 small tuples, integers, atoms.</li>
%%% <li>`improper_lists_and_strings': improper lists (gen_server's
%%%     `[alias | Ref]' tag among them) and the STRING_EXT boundaries.</li>
%%% <li>`large_binaries_are_referenced': binaries over 2 KiB come back as the
%%%     original binaries (refc or sub-binary, `binary:referenced_byte_size/1'
%%%     unchanged), a binary being appended to is safe, and encoding the same
%%%     10 MiB binary 100 times does not grow `erlang:memory(binary)' by
%%%     anything like 100 x 10 MiB.</li>
%%% <li>`scheduling': small terms encode inline, large ones (and funs) on a
%%%     dirty scheduler, and the work count grows with the term.</li>
%%% <li>`sends_arrive': all of the above (and maps of 200 to 100,000 keys) sent with teleport:send to an echo on
%%%     a peer, which sends them back with teleport: each arrives `=:='.</li>
%%% </ul>
%%% The seed is printed; ENCODER_SUITE_SEED="A,B,C" replays it.
-module(encoder_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([probe/1, atom_forms/1, every_term_type/1, random_terms_changed_layout/1]).
-export([random_terms_match_term_to_binary/1, random_terms_without_tags/1, deep_nesting/1,
         long_lists/1, improper_lists_and_strings/1, large_binaries_are_referenced/1,
         scheduling/1, sends_arrive/1]).
%% Run on the peers.
-export([check_terms/1, tags_setting/0, encoder_info/0]).

-define(RANDOM_TERMS, 4000).
-define(RPC_TIMEOUT, 120000).
-define(MSG_TIMEOUT, 120000).
-define(MiB, 1048576).

suite() ->
    [{timetrap, {minutes, 10}}].

all() ->
    [probe, atom_forms, every_term_type, random_terms_match_term_to_binary, random_terms_without_tags,
     random_terms_changed_layout, deep_nesting, long_lists,
     improper_lists_and_strings, large_binaries_are_referenced, scheduling, sends_arrive].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("encoder_ct") of
        ok -> start_suite(Config);
        {fail, _} = Fail -> Fail
    end.

start_suite(Config) ->
    {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name("encoder_a")),
    {ok, PlainPeer, PlainNode} =
        teleport_test_peer:start(teleport_test_peer:unique_name("encoder_api"),
                                 ["-env", "TELEPORT_ENCODER_TAGS", "off"]),
    {ok, ChangedPeer, ChangedNode} =
        teleport_test_peer:start(teleport_test_peer:unique_name("encoder_changed"),
                                 ["-env", "TELEPORT_ENCODER_TAGS", "simulate_changed_layout"]),
    true = unlink(Peer),
    true = unlink(PlainPeer),
    true = unlink(ChangedPeer),
    Seed = teleport_test_peer:seed("ENCODER_SUITE_SEED"),
    ct:pal("encoder_SUITE seed ~p (replay: ENCODER_SUITE_SEED=\"~b,~b,~b\")",
           [Seed | tuple_to_list(Seed)]),
    [{seed, Seed}, {peer, Peer}, {node, Node}, {plain_peer, PlainPeer}, {plain_node, PlainNode},
     {changed_peer, ChangedPeer}, {changed_node, ChangedNode}
     | Config].

end_per_suite(Config) ->
    _ = [teleport_test_peer:stop(?config(Key, Config)) || Key <- [peer, plain_peer, changed_peer]],
    teleport_test_peer:stop_local_teleport().

init_per_testcase(_Case, Config) ->
    _ = rand:seed(exsss, ?config(seed, Config)),
    Config.

end_per_testcase(_Case, _Config) ->
    ok.

%%====================================================================
%% Cases
%%====================================================================

probe(Config) ->
    Release = list_to_integer(erlang:system_info(otp_release)),
    Info = teleport_nif:encoder_info(),
    Plain = erpc:call(?config(plain_node, Config), ?MODULE, encoder_info, [], ?RPC_TIMEOUT),
    Changed = erpc:call(?config(changed_node, Config), ?MODULE, encoder_info, [], ?RPC_TIMEOUT),
    ct:pal("OTP ~b (~s): encoder ~p; with TELEPORT_ENCODER_TAGS=off ~p; "
           "with a changed layout simulated ~p",
           [Release, erlang:system_info(system_version) -- "\n", Info, Plain, Changed]),
    ?assertEqual(erlang:system_info(wordsize) * 8, maps:get(word_bits, Info)),
    %% The tag reading is for 64-bit VMs; on one, the probe must have passed (if a
    %% release changed the layout, this is where it shows: fallback, and this fails).
    ?assertEqual(case maps:get(word_bits, Info) of 64 -> on; _ -> probe_failed end,
                 maps:get(tags, Info)),
    ?assertEqual(off, maps:get(tags, Plain)),
    ?assertEqual(probe_failed, maps:get(tags, Changed)),
    %% The atom form: this VM's, as term_to_binary/1 shows it, and as the release says.
    Vm = case term_to_binary('café') of
             <<131, 100, 0, 4, "caf", 233>> -> latin1;
             <<131, 119, 5, "caf", 195, 169>> -> utf8;
             _ -> vm
         end,
    ?assertEqual(Vm, maps:get(atoms, Info)),
    ?assertEqual([Vm], lists:usort([maps:get(atoms, I) || I <- [Plain, Changed]])),
    ?assertEqual(if Release >= 26 -> utf8; true -> latin1 end, Vm),
    %% The decoder's workaround for erlang/otp GH-8208 (fixed in erts 13.2.2.14,
    %% 14.2.5.8 and 15.2.3, from 13.1): on where the VM needs it.
    Erts = [list_to_integer(P) || P <- string:lexemes(erlang:system_info(version), ".")],
    Affected = (Erts >= [13, 1] andalso Erts < [13, 2, 2, 14])
        orelse (Erts >= [14] andalso Erts < [14, 2, 5, 8])
        orelse (Erts >= [15] andalso Erts < [15, 2, 3]),
    ?assertEqual(if Affected -> scheduler; true -> reader end, maps:get(large_maps, Info)).

atom_forms(_Config) ->
    Release = list_to_integer(erlang:system_info(otp_release)),
    Long = list_to_atom(lists:duplicate(255, $a)),
    LongLatin1 = list_to_atom(lists:duplicate(128, 233)),
    Atoms = [abc, '', 'café', Long, LongLatin1, 'ünïcödé', '日本', true, undefined],
    %% This release's bytes, written out (not taken from term_to_binary/1).
    Expected = fun(A) -> expected_atom(Release, A) end,
    [?assertEqual({A, Expected(A)}, {A, iolist_to_binary(teleport_nif:encode(A))}) || A <- Atoms],
    [?assertEqual({A, term_to_binary(A)}, {A, Expected(A)}) || A <- Atoms],
    %% Inside terms, and from the per-scheduler cache (the same atoms twice).
    T = {Atoms, #{Long => 'café'}, [abc | '日本'], Atoms},
    ?assert(identical(teleport_nif:encode(T), T)),
    ?assert(identical(teleport_nif:encode(T), T)),
    %% Every form any release writes decodes to the same atom here.
    [begin
         Forms = all_forms(A),
         [?assertEqual({A, Form, A}, {A, Form, teleport_nif:decode(Form)}) || Form <- Forms],
         [?assertEqual({A, Form, A}, {A, Form, binary_to_term(Form)}) || Form <- Forms]
     end || A <- Atoms],
    ok.

%% How OTP `Release' writes atom `A' with term_to_binary/1.
expected_atom(Release, A) ->
    Chars = atom_to_list(A),
    Utf8 = unicode:characters_to_binary(Chars),
    Latin1 = lists:all(fun(C) -> C =< 255 end, Chars),
    if
        Release < 26, Latin1 ->
            <<131, 100, (length(Chars)):16, (list_to_binary(Chars))/binary>>;
        byte_size(Utf8) =< 255 ->
            <<131, 119, (byte_size(Utf8)):8, Utf8/binary>>;
        true ->
            <<131, 118, (byte_size(Utf8)):16, Utf8/binary>>
    end.

%% `A' in every atom form of the format that can hold it.
all_forms(A) ->
    Chars = atom_to_list(A),
    Utf8 = unicode:characters_to_binary(Chars),
    Latin1 = [<<131, 100, (length(Chars)):16, (list_to_binary(Chars))/binary>>
              || lists:all(fun(C) -> C =< 255 end, Chars)]
        ++ [<<131, 115, (length(Chars)):8, (list_to_binary(Chars))/binary>>
            || lists:all(fun(C) -> C =< 255 end, Chars), length(Chars) =< 255],
    Latin1 ++ [<<131, 118, (byte_size(Utf8)):16, Utf8/binary>>]
        ++ [<<131, 119, (byte_size(Utf8)):8, Utf8/binary>> || byte_size(Utf8) =< 255].

random_terms_match_term_to_binary(Config) ->
    Terms = random_terms(Config, ?RANDOM_TERMS),
    report(check_terms(Terms)).

every_term_type(Config) ->
    Release = list_to_integer(erlang:system_info(otp_release)),
    Known = lists:sort(maps:get(term_types, teleport_nif:encoder_info())),
    Header = filename:join([code:root_dir(), "usr", "include", "erl_nif.h"]),
    {ok, Text} = file:read_file(Header),
    {match, Names} = re:run(Text, "ERL_NIF_TERM_TYPE_([A-Z]+) *=",
                            [global, {capture, all_but_first, list}]),
    Named = lists:usort([list_to_atom(string:lowercase(Name)) || [Name] <- Names]),
    ct:pal("OTP ~b: erl_nif.h names ~p; the encoder tells apart ~p", [Release, Named, Known]),
    ?assertEqual(Named, Known),
    Examples = teleport_test_terms:every_type(),
    Types = lists:usort([Type || {Type, _} <- Examples]),
    %% The NIF API's types, plus native records exactly where the release has them.
    ?assertEqual(lists:sort(Known ++ [native_record || Release >= 29]), Types),
    Terms = [T || {_, T} <- Examples],
    [?assert(identical(teleport_nif:encode(T), T), {Type, T}) || {Type, T} <- Examples],
    report(erpc:call(?config(plain_node, Config), ?MODULE, check_terms, [Terms], ?RPC_TIMEOUT)),
    {ok, Echo} = teleport_test_peer:start_echo(?config(node, Config), self()),
    [begin
         Tag = make_ref(),
         ok = teleport:send(Echo, {Tag, T}),
         receive
             {teleport_ct_echo, Echo, {Tag, Got}} -> ?assert(Got =:= T, {Type, T});
             {teleport_ct_echo_error, Echo, Error} -> ct:fail({echo_error, Type, Error})
         after ?MSG_TIMEOUT ->
             ct:fail({not_echoed, Type, T})
         end
     end || {Type, T} <- Examples],
    ok.

random_terms_without_tags(Config) ->
    Node = ?config(plain_node, Config),
    ?assertEqual("off", erpc:call(Node, ?MODULE, tags_setting, [], ?RPC_TIMEOUT)),
    Terms = random_terms(Config, ?RANDOM_TERMS div 2),
    report(erpc:call(Node, ?MODULE, check_terms, [Terms], ?RPC_TIMEOUT)).

random_terms_changed_layout(Config) ->
    Node = ?config(changed_node, Config),
    ?assertMatch(#{tags := probe_failed}, erpc:call(Node, ?MODULE, encoder_info, [], ?RPC_TIMEOUT)),
    Terms = random_terms(Config, ?RANDOM_TERMS div 4),
    report(erpc:call(Node, ?MODULE, check_terms, [Terms], ?RPC_TIMEOUT)).

deep_nesting(_Config) ->
    Deep = fun(Wrap, N) -> lists:foldl(fun(_, Acc) -> Wrap(Acc) end, [], lists:seq(1, N)) end,
    Terms = [{list_1000000_deep, Deep(fun(X) -> [X] end, 1000000)},
             {tuple_100000_deep, Deep(fun(X) -> {X} end, 100000)},
             {map_100000_deep, Deep(fun(X) -> #{k => X} end, 100000)},
             {improper_head_100000_deep, Deep(fun(X) -> [X | tail] end, 100000)},
             {mixed_300000_deep, Deep(fun(X) -> {a, [1, X], #{1 => 2}} end, 300000)}],
    [begin
         {Io, _Work, How} = teleport_nif:encode_measured(T),
         %% Never print these terms: formatting them is what would hang.
         ?assert(identical(Io, T), Label),
         ?assertEqual(dirty, How, Label)
     end || {Label, T} <- Terms],
    ok.

long_lists(_Config) ->
    N = 1000000,
    Atoms = [a, b, 'café', ok, undefined],
    Terms = [{tuples, [{I, I} || I <- lists:seq(1, N)]},
             {integers, lists:seq(-N div 2, N div 2)},
             {atoms, [lists:nth(I rem 5 + 1, Atoms) || I <- lists:seq(1, N)]},
             {floats_and_big, [{float(I), I bsl 62} || I <- lists:seq(1, N div 10)]},
             {map_of_100000, maps:from_list([{I, {I}} || I <- lists:seq(1, 100000)])}],
    [?assert(identical(teleport_nif:encode(T), T), Label) || {Label, T} <- Terms],
    ok.

improper_lists_and_strings(_Config) ->
    Long = lists:foldr(fun(X, Acc) -> [X | Acc] end, {tail}, lists:seq(1, 100000)),
    Improper = [[1 | 2], [a, b | c], [alias | make_ref()], [[] | []], [{x} | {y}],
                [1, 2 | <<"bin">>], [<<1:1>> | self()], [#{} | #{a => 1}], ["ab" | "cd"],
                [$a, $b | $c], [1 | 1.5], [x | fun() -> ok end], Long],
    Strings = [lists:duplicate(N, $a) || N <- [1, 255, 256, 65534, 65535, 65536, 70000]]
        ++ [[0, 1, 255], "abc" ++ [256], [-1, 1], "abc" ++ [{}], lists:duplicate(65535, 0) ++ [300],
            [[$a] | "b"], "", "plain"],
    [?assert(identical(teleport_nif:encode(T), T), T) || T <- Improper ++ Strings],
    %% gen_server's call tag is an improper list: it must come back whole.
    Tag = [alias | make_ref()],
    ?assert(binary_to_term(iolist_to_binary(teleport_nif:encode({self(), Tag}))) =:= {self(), Tag}).

large_binaries_are_referenced(_Config) ->
    Bin = crypto:strong_rand_bytes(?MiB),
    Sub = binary:part(Bin, 1000, 100000),
    %% Just over the copy limit (teleport_nif's encoder.rs COPY_MAX), and at it.
    Small = binary:copy(<<7>>, 2049),
    Heap = binary:copy(<<8>>, 2048),
    <<_:3, Unaligned:100/binary, _/bits>> = Bin,
    Terms = [{Bin}, {a, Sub, b}, [Small, Heap], Unaligned, #{k => Bin, s => Sub}],
    [?assert(identical(teleport_nif:encode(T), T)) || T <- Terms],
    %% Each large one comes back as itself: the same bytes, not a copy.
    Io = teleport_nif:encode({Bin, Sub, Small, Heap}),
    ?assert(lists:all(fun is_binary/1, Io)),
    ?assertEqual(?MiB, referenced_size(Io, Bin)),
    ?assertEqual(?MiB, referenced_size(Io, Sub)),
    ?assertEqual(2049, referenced_size(Io, Small)),
    ?assertEqual(not_an_element, referenced_size(Io, Heap)),
    %% A binary being appended to (writable) is encoded as it is now; the appends
    %% that follow leave the encoding alone.
    Growing0 = <<(crypto:strong_rand_bytes(3000))/binary, "x">>,
    Growing1 = <<Growing0/binary, (crypto:strong_rand_bytes(3000))/binary>>,
    Encoded = teleport_nif:encode({Growing1}),
    Growing2 = <<Growing1/binary, (crypto:strong_rand_bytes(100000))/binary>>,
    ?assert(identical(Encoded, {Growing1})),
    ?assertEqual(byte_size(Growing1) + 100000, byte_size(Growing2)),
    %% The same 10 MiB binary in 100 encodings held at once: no copies.
    Big = crypto:strong_rand_bytes(10 * ?MiB),
    erlang:garbage_collect(),
    Before = erlang:memory(binary),
    Held = [teleport_nif:encode({I, Big}) || I <- lists:seq(1, 100)],
    Grown = erlang:memory(binary) - Before,
    ct:pal("100 encodings of one 10 MiB binary: binary memory +~.1f MiB", [Grown / ?MiB]),
    ?assert(Grown < 20 * ?MiB, Grown),
    ?assertEqual(100, length([H || H <- Held, iolist_size(H) > 10 * ?MiB])).

scheduling(_Config) ->
    Small = {msg, self(), make_ref(), <<0:480>>},
    {SmallIo, SmallWork, inline} = teleport_nif:encode_measured(Small),
    ?assert(identical(SmallIo, Small)),
    ?assert(SmallWork > 0),
    %% Funs (their captured terms are of unknown size) go dirty, whatever their size.
    Fun = fun() -> Small end,
    {FunIo, _, dirty} = teleport_nif:encode_measured(Fun),
    ?assert(identical(FunIo, Fun)),
    Works = [begin
                 T = [{I, I} || I <- lists:seq(1, N)],
                 {Io, W, How} = teleport_nif:encode_measured(T),
                 ?assert(identical(Io, T)),
                 {N, W, How}
             end || N <- [10, 100, 1000, 100000]],
    %% Over the budget in the middle of a map (its iterator open): started over, dirty.
    Maps = [#{I => [I], {k, I} => #{x => I}} || I <- lists:seq(1, 20000)],
    {MapsIo, _, dirty} = teleport_nif:encode_measured(Maps),
    ?assert(identical(MapsIo, Maps)),
    ct:pal("work for lists of N small tuples: ~p", [Works]),
    [{10, W10, inline}, {100, W100, inline}, {1000, W1000, inline}, {100000, _, dirty}] = Works,
    ?assert(W10 < W100 andalso W100 < W1000).

sends_arrive(Config) ->
    Node = ?config(node, Config),
    {ok, Echo} = teleport_test_peer:start_echo(Node, self()),
    Bin = crypto:strong_rand_bytes(20 * ?MiB),
    Deep = lists:foldl(fun(_, Acc) -> [Acc] end, [], lists:seq(1, 1000000)),
    Fixed = [{deep, Deep},
             {tuples, [{I, I} || I <- lists:seq(1, 1000000)]},
             {improper, [alias | make_ref()]},
             {improper_long, lists:foldr(fun(X, Acc) -> [X | Acc] end, x, lists:seq(1, 50000))},
             {string, lists:duplicate(65535, $s)},
             {big_binary, Bin},
             {sub_binary, binary:part(Bin, 7, 5 * ?MiB)},
             {map_with_both, #{list => [{I, I} || I <- lists:seq(1, 100000)], bin => Bin}},
             %% Maps over 128 keys are made by the receiver's I/O thread: on a VM with
             %% erlang/otp GH-8208 (OTP 25.2) that crashes unless built key by key.
             {map_of_200, maps:from_list([{{k, I}, I} || I <- lists:seq(1, 200)])},
             {map_of_100000, maps:from_list([{I, <<I:32>>} || I <- lists:seq(1, 100000)])},
             {maps_in_list, [maps:from_list([{I, J} || I <- lists:seq(1, 300)]) || J <- [1, 2, 3]]}],
    Random = [{random, T} || T <- random_terms(Config, 300)],
    [begin
         Tag = make_ref(),
         ok = teleport:send(Echo, {Tag, Term}),
         receive
             {teleport_ct_echo, Echo, {Tag, Got}} -> ?assert(Got =:= Term, Label);
             {teleport_ct_echo_error, Echo, Error} -> ct:fail({echo_error, Label, Error})
         after ?MSG_TIMEOUT ->
             ct:fail({no_echo, Label})
         end
     end || {Label, Term} <- Fixed ++ Random],
    exit(Echo, kill),
    ok.

%%====================================================================
%% Helpers
%%====================================================================

%% Fixed and random terms from decoder_SUITE's generator, with pids, refs and
%% ports of this node and of the peer.
random_terms(Config, N) ->
    {Pids, Refs, Ports} = erpc:call(?config(node, Config), decoder_SUITE, peer_context, [],
                                    ?RPC_TIMEOUT),
    Dead = spawn(fun() -> ok end),
    Captured = 7,
    Ctx = #{pids => [self(), whereis(init), Dead | Pids],
            refs => [make_ref(), alias() | Refs],
            ports => lists:sublist(erlang:ports(), 2) ++ Ports,
            funs => [fun(X) -> X + Captured end, fun() -> ok end, fun lists:reverse/1,
                     fun ?MODULE:check_terms/1],
            pool => crypto:strong_rand_bytes(?MiB)},
    decoder_SUITE:fixed_terms(Ctx) ++ [decoder_SUITE:gen_top(Ctx) || _ <- lists:seq(1, N)].

%% @private Runs on a peer.
tags_setting() ->
    os:getenv("TELEPORT_ENCODER_TAGS").

%% @private Runs on a peer.
encoder_info() ->
    teleport_nif:encoder_info().

%% @private Checks every term (here or on a peer); returns counts and failures.
check_terms(Terms) ->
    lists:foldl(fun check_term/2,
                #{identical => 0, large_map_identical => 0, large_map_roundtrip => 0,
                  inline => 0, dirty => 0, failures => []},
                Terms).

check_term(T, Acc) ->
    {Io, _Work, How} = teleport_nif:encode_measured(T),
    Acc1 = bump(How, Acc),
    Bin = iolist_to_binary(Io),
    Back = try binary_to_term(Bin) catch C:R -> {C, R} end,
    case {lists:all(fun is_binary/1, Io), Bin =:= term_to_binary(T), Back =:= T, has_large_map(T)} of
        {true, true, true, false} -> bump(identical, Acc1);
        {true, true, true, true} -> bump(large_map_identical, Acc1);
        {true, false, true, true} -> bump(large_map_roundtrip, Acc1);
        Outcome -> Acc1#{failures := [{Outcome, T} | maps:get(failures, Acc1)]}
    end.

bump(Key, Acc) ->
    maps:update_with(Key, fun(C) -> C + 1 end, Acc).

report(#{failures := Failures} = Counts) ->
    ct:pal("~p", [maps:remove(failures, Counts#{failed => length(Failures)})]),
    [ct:pal("failed ~p:~n~p", [Outcome, T]) || {Outcome, T} <- lists:sublist(Failures, 5)],
    ?assertEqual([], Failures),
    ?assert(maps:get(identical, Counts) > 0),
    ?assert(maps:get(inline, Counts) > 0 andalso maps:get(dirty, Counts) > 0).

%% Whether the term holds a map of over 32 keys (bounded depth: generated terms).
has_large_map(M) when is_map(M) ->
    map_size(M) > 32 orelse lists:any(fun has_large_map/1, maps:keys(M) ++ maps:values(M));
has_large_map(T) when is_tuple(T) -> lists:any(fun has_large_map/1, tuple_to_list(T));
has_large_map([H | T]) -> has_large_map(H) orelse has_large_map(T);
has_large_map(F) when is_function(F) ->
    {env, Env} = erlang:fun_info(F, env),
    lists:any(fun has_large_map/1, Env);
has_large_map(_) -> false.

identical(Io, T) ->
    Bin = iolist_to_binary(Io),
    lists:all(fun is_binary/1, Io) andalso Bin =:= term_to_binary(T) andalso binary_to_term(Bin) =:= T.

%% The referenced size of the iolist element that is `Bin', if any.
referenced_size(Io, Bin) ->
    case [E || E <- Io, E =:= Bin] of
        [E | _] -> binary:referenced_byte_size(E);
        [] -> not_an_element
    end.

%%% @doc A sweep of terms between real nodes: every term crosses teleport
%%% (`teleport:send({Name, Node}, Term)') both ways between two peer nodes A
%%% and B that run teleport, and must arrive `=:=' (floats also bit for bit, so
%%% that -0.0 is told from 0.0 on releases where `=:=' does not). The test
%%% runner's node only directs: it never sends or receives over teleport, so a
%%% receiver that dies takes nothing but a peer with it.
%%%
%%% One step = one term, one direction:
%%% <ol>
%%% <li>a fresh "checker" process is registered as `term_sweep_sink' on the
%%%     receiver. It builds the expected term itself (deterministic terms: the
%%%     same builder runs on both nodes, so nothing large crosses distributed
%%%     Erlang) or gets it from the sender over distributed Erlang (pids, refs,
%%%     ports, funs: terms that only the sender can make);</li>
%%% <li>the sender (through erpc) builds the term and calls
%%%     `teleport:send({term_sweep_sink, Receiver}, {Seq, Term})', which must
%%%     return `ok' (or `{error, too_large}' where that is the point);</li>
%%% <li>the checker compares what arrived with `=:=' and reports the verdict
%%%     (a description of the first difference, not the terms) to the test
%%%     process over distributed Erlang;</li>
%%% <li>both nodes must still answer `erpc:call(Node, erlang, node, [])'. The
%%%     test process monitors both nodes during the step: a node that goes down
%%%     fails the step (`receiver_died' with the term's label) and is replaced
%%%     by a fresh peer, so the remaining steps still run.</li>
%%% </ol>
%%% Every failing step is printed with its label (the term, its size), the
%%% direction and the frame body's size (`erlang:external_size/2' of
%%% `{Name, {Seq, Term}}' with minor version 1: teleport's encoder writes the
%%% same bytes, give or take atoms inside pids, ports and refs on releases
%%% whose `term_to_binary' writes UTF-8 atoms); a case fails at its end with
%%% the list of failed steps. Passing steps go to the case's log, with the
%%% binaries the decoder made sub-binaries of their frame (information, not
%%% asserted). Groups: `maps', `sequences'
%%% (tuples, lists, strings, improper lists, deep nesting), `binaries' (every
%%% size rule of the encoder and the decoder, bitstrings, sub-binaries, 100 MiB),
%%% `scalars' (integers, bignums, floats, atoms), `identifiers' (pids, refs,
%%% ports, funs, a mix of everything), `records' (OTP 29's native records, which
%%% the NIF API has no type for: the VM encodes and decodes them, whole) and
%%% `frame_limit' (peers with
%%% `max_frame_bytes' 4 MiB). One summary line per case and per group.
%%%
%%% Size rules the steps straddle (see native/teleport_nif/src):
%%% <ul>
%%% <li>encoder.rs: binaries over `COPY_MAX' (2048) are referenced, not copied;
%%%     maps over `FLATMAP_MAX' (32) are walked tail first (hash maps);
%%%     `INLINE_BUDGET' (25,000 units) then a dirty scheduler; STRING_EXT up to
%%%     65,535 elements; bitstrings, bignums, funs, pids, ports, refs and
%%%     non-Latin-1 atoms through `enif_term_to_binary'.</li>
%%% <li>deliver.rs: bodies of at least `OWN_BUFFER_MIN' (65,536 bytes) are read
%%%     into a binary of their own; smaller ones into a reused buffer.</li>
%%% <li>decode.rs: in an own-buffer body, a binary over `HEAP_BINARY_MAX' (64)
%%%     and over a quarter of the body (`len / 4', integer division) becomes a
%%%     sub-binary of it; every other binary is copied. Maps are made with
%%%     `enif_make_map_from_arrays'; the atom cache holds 4,096 atoms.</li>
%%% <li>Frame sizes are body sizes (the 5-byte header excluded); a body over
%%%     `max_frame_bytes' is refused by the sender (`{error, too_large}') and,
%%%     at the header, by a receiver with a smaller limit.</li>
%%% </ul>
%%% Not covered: maps of 10^6 atom keys (beyond the default atom table of
%%% 1,048,576 atoms; atom keys stop at 10^5).
%%%
%%% Run time on a 2-core machine: ~30-45 s for ~520 steps; the 10^6-element
%%% maps dominate (1-2 s per step and direction: the term is built on both
%%% nodes, encoded, decoded and compared). On OTP 25 before the fix for
%%% `enif_make_map_from_arrays' off a scheduler, every map of over 128 keys
%%% (and a fun whose environment holds one) kills the receiving node: those
%%% steps fail as `receiver_died' and each costs a peer restart.
-module(term_sweep_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0,
         init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2,
         init_per_testcase/2, end_per_testcase/2]).

-export([map_sizes_integer_keys/1, map_key_kinds/1, maps_nested/1,
         tuples/1, lists/1, strings/1, improper_lists/1, deep_nesting/1,
         binary_sizes/1, binary_frame_rules/1, sub_binaries/1, bitstrings/1, binary_100mib/1,
         integers/1, bignums/1, floats/1, atoms/1,
         pids/1, refs/1, ports/1, funs/1, mixed/1, native_records/1,
         max_frame_bytes/1]).

%% Run on the peers.
-export([checker_start/3, checker_init/3, sender_run/4, build/3, port_term/0, results_holder/1]).

-define(SINK, term_sweep_sink).
-define(RESULTS, term_sweep_results).
-define(LIMIT, (4 * 1024 * 1024)).
%% Liveness bounds only (no timing is asserted): a step whose message neither
%% arrives nor takes a node down within this long fails as not_delivered.
-define(STEP_TIMEOUT, 120000).
-define(RPC_TIMEOUT, 120000).
-define(ALIVE_TIMEOUT, 15000).

%%====================================================================
%% Common Test callbacks
%%====================================================================

suite() ->
    [{timetrap, {minutes, 10}}].

all() ->
    [{group, maps}, {group, maps_on_scheduler}, {group, sequences}, {group, binaries},
     {group, scalars}, {group, identifiers}, {group, records}, {group, frame_limit}].

groups() ->
    [{maps, [], [map_sizes_integer_keys, map_key_kinds, maps_nested]},
     %% The same with every hash map and fun decoded on a dirty scheduler, the
     %% path teleport takes by default only on VMs that cannot build those off
     %% one (decode_on_scheduler): so both paths run on every release.
     {maps_on_scheduler, [], [map_sizes_integer_keys, maps_nested, funs, mixed]},
     {sequences, [], [tuples, lists, strings, improper_lists, deep_nesting]},
     {binaries, [], [binary_sizes, binary_frame_rules, sub_binaries, bitstrings, binary_100mib]},
     {scalars, [], [integers, bignums, floats, atoms]},
     {identifiers, [], [pids, refs, ports, funs, mixed]},
     {records, [], [native_records]},
     {frame_limit, [], [max_frame_bytes]}].

init_per_suite(Config) ->
    %% Other test runs on this machine may hold ensure_distributed/0's fixed name.
    _ = case node() of
            nonode@nohost ->
                Name = list_to_atom(teleport_test_peer:unique_name("term_sweep") ++ "@127.0.0.1"),
                net_kernel:start(Name, #{name_domain => longnames});
            _ ->
                ok
        end,
    case teleport_test_peer:ensure_distributed() of
        ok ->
            %% The results of every case, for the per-group summaries: a table
            %% owned by a process of its own (CT's callbacks run in processes
            %% that come and go).
            Holder = spawn(?MODULE, results_holder, [self()]),
            receive {Holder, ready} -> ok end,
            [{results_holder, Holder} | Config];
        {fail, _} = Fail ->
            Fail
    end.

end_per_suite(Config) ->
    ?config(results_holder, Config) ! stop,
    ok.

results_holder(Parent) ->
    ?RESULTS = ets:new(?RESULTS, [named_table, public, bag]),
    Parent ! {self(), ready},
    receive stop -> ok end.

init_per_group(maps_on_scheduler, Config) ->
    [{peer_env, #{decode_on_scheduler => always}} | Config];
init_per_group(_Group, Config) ->
    Config.

end_per_group(Group, _Config) ->
    Rows = ets:lookup(?RESULTS, Group),
    Steps = lists:sum([S || {_, _, S, _, _} <- Rows]),
    Failed = lists:append([F || {_, _, _, F, _} <- Rows]),
    Ms = lists:sum([T || {_, _, _, _, T} <- Rows]),
    report("SUMMARY group ~p: ~b cases, ~b steps, ~b passed, ~b failed, ~b ms~s",
           [Group, length(Rows), Steps, Steps - length(Failed), length(Failed), Ms,
            case Failed of
                [] -> "";
                _ -> "; failed: " ++ string:join([Label ++ " " ++ dir_text(Dir)
                                                   || {Label, Dir, _, _} <- Failed], ", ")
            end]),
    ok.

init_per_testcase(Case, Config) ->
    %% A peer whose node dies (a crash in the receiver is what this suite looks
    %% for) must not take this process with it: the peers stay linked (they halt
    %% if this process dies, e.g. at a timetrap) and their exits are messages.
    process_flag(trap_exit, true),
    put(sweep_peers, []),
    put(sweep_results, []),
    Base = proplists:get_value(peer_env, Config, #{}),
    Env = case Case of
              max_frame_bytes -> #{a => Base#{max_frame_bytes => ?LIMIT},
                                   b => Base#{max_frame_bytes => ?LIMIT},
                                   c => Base};
              _ -> #{a => Base, b => Base}
          end,
    put(sweep_env, Env),
    put(sweep_nodes, #{}),
    _ = [start_role(Role) || Role <- lists:sort(maps:keys(Env))],
    [{sweep_case, Case} | Config].

end_per_testcase(_Case, _Config) ->
    _ = [teleport_test_peer:stop(Peer) || Peer <- get_list(sweep_peers)],
    ok.

%%====================================================================
%% maps
%%====================================================================

-define(MAP_SIZES, [0, 1, 32, 33, 64, 128, 129, 1000, 10000, 100000, 1000000]).

map_sizes_integer_keys(Config) ->
    sweep(Config, [step(fmt("map of ~s integer keys", [count(N)]), {det, map, {int, N}})
                   || N <- ?MAP_SIZES]).

map_key_kinds(Config) ->
    %% 10^6 atom keys would overflow the default atom table (1,048,576).
    Kinds = [{atom, [0, 1, 32, 33, 64, 1000, 10000, 100000]},
             {bin, [0, 1, 32, 33, 64, 1000, 10000, 100000, 1000000]},
             {tuple, [0, 1, 32, 33, 64, 1000, 10000, 100000, 1000000]},
             {map, [0, 1, 32, 33, 64, 1000, 10000, 100000, 1000000]}],
    sweep(Config, [step(fmt("map of ~s ~p keys", [count(N), Kind]), {det, map, {Kind, N}})
                   || {Kind, Sizes} <- Kinds, N <- Sizes]).

maps_nested(Config) ->
    sweep(Config,
          [step("list of 100 maps of 40 integer keys", {det, list_of_maps, {100, 40}}),
           step("list of 100 maps of 20 integer keys", {det, list_of_maps, {100, 20}}),
           step("33-key map whose values are 33-key maps", {det, map_of_maps, {33, 33}}),
           step("32-key map whose values are 32-key maps", {det, map_of_maps, {32, 32}}),
           step("1000-key map with a 100-key map as one key", {det, map_key_in_map, {1000, 100}}),
           step("20-key map with a 100-key map as one key", {det, map_key_in_map, {20, 100}}),
           step("40-key map whose keys are 40-key maps", {det, maps_as_keys, {40, 40}}),
           step("tuple {1000-key map, 33-key map}", {det, maps_in_tuple, {1000, 33}}),
           step("10^4-deep chain of 1-key maps", {det, deep_map, 10000})]).

%%====================================================================
%% sequences
%%====================================================================

-define(SEQ_SIZES, [0, 1, 255, 256, 65535, 65536, 1000000]).

tuples(Config) ->
    sweep(Config, [step(fmt("tuple of ~s integers", [count(N)]), {det, tuple, N})
                   || N <- ?SEQ_SIZES] ++
                  [step("tuple of 256 binaries of 3000 bytes", {det, tuple_of_bins, {256, 3000}})]).

lists(Config) ->
    %% Integers over 255: never a STRING_EXT.
    sweep(Config, [step(fmt("list of ~s integers >255", [count(N)]), {det, list, N})
                   || N <- ?SEQ_SIZES] ++
                  [step(fmt("list of ~s mixed terms", [count(N)]), {det, mixed_list, N})
                   || N <- [65536, 1000000]]).

strings(Config) ->
    %% STRING_EXT up to 65,535 bytes, LIST_EXT from 65,536.
    sweep(Config, [step(fmt("string (list of bytes) of ~s", [count(N)]), {det, string, N})
                   || N <- ?SEQ_SIZES ++ [65534]] ++
                  [step("string of 65535 bytes + 1 element 256", {det, string_then, {65535, 256}}),
                   step("string of 100 bytes + 1 element -1", {det, string_then, {100, -1}})]).

improper_lists(Config) ->
    sweep(Config, [step("[1 | 2]", {value, [1 | 2]}),
                   step("[a, b | c]", {value, [a, b | c]}),
                   step("[$a, $b | $c] (bytes, improper)", {value, [$a, $b | $c]}),
                   step("[1, 2 | <<\"tail\">>]", {value, [1, 2 | <<"tail">>]}),
                   step("[x | 3000-byte binary]", {det, improper, {1, bin3000}}),
                   step("improper list of 65535 bytes, tail 0", {det, improper, {65535, byte}}),
                   step("improper list of 10^5 integers, tail atom", {det, improper, {100000, atom}}),
                   step("improper list of 10^6 integers, tail map", {det, improper, {1000000, map}})]).

deep_nesting(Config) ->
    D = 100000,
    sweep(Config, [step(fmt("~s-deep nested lists", [count(D)]), {det, deep_list, D}),
                   step(fmt("~s-deep nested tuples", [count(D)]), {det, deep_tuple, D}),
                   step(fmt("~s-deep nested 1-key maps", [count(D)]), {det, deep_map, D}),
                   step(fmt("~s-deep list/tuple/map alternation", [count(D)]), {det, deep_mixed, D}),
                   step(fmt("~s-deep nesting through improper tails", [count(D)]), {det, deep_tail, D})]).

%%====================================================================
%% binaries
%%====================================================================

binary_sizes(Config) ->
    %% 64/65: heap/refc binary (VM). 2048/2049: the encoder's COPY_MAX. All in
    %% small bodies (the reused buffer, every binary copied by the decoder).
    sweep(Config,
          [step(fmt("binary of ~b bytes", [N]), {det, bin, N})
           || N <- [0, 1, 64, 65, 2047, 2048, 2049, 16384, 65000]] ++
          [step(fmt("binary of ~b bytes in a 1 MiB body", [N]), {det, framed, {1 bsl 20, {bin, N}}})
           || N <- [0, 64, 65, 2048, 2049]] ++
          [step("list of 1000 binaries of 2049 bytes", {det, bin_list, {1000, 2049}}),
           step("list of 1000 binaries of 65 bytes", {det, bin_list, {1000, 65}})]).

binary_frame_rules(Config) ->
    %% Bodies of 65,535 / 65,536 / 65,537 bytes (OWN_BUFFER_MIN), each nearly one
    %% binary; then a binary at exactly a quarter of its own-buffer body and one
    %% byte over (the decoder's sub-binary rule), at 64 KiB and at 1 MiB.
    Own = [step(fmt("body of ~b bytes: one binary", [F]), {det, framed, {F, {bin, 0}}})
           || F <- [65535, 65536, 65537]],
    Quarter = [step(fmt("body of ~b bytes: binary of ~b (quarter~s) + padding", [F, Q, Sign]),
                    {det, framed, {F, {bin, Q}}})
               || F <- [65536, 1 bsl 20],
                  {Q, Sign} <- [{F div 4 - 1, " - 1"}, {F div 4, ""}, {F div 4 + 1, " + 1"}]],
    Small = [step("body of 65535 bytes: 65-byte binary + padding", {det, framed, {65535, {bin, 65}}}),
             step("body of 65536 bytes: 65-byte binary + padding", {det, framed, {65536, {bin, 65}}}),
             step("body of 200 bytes: 65-byte binary (over a quarter, small body)",
                  {det, framed, {200, {bin, 65}}})],
    sweep(Config, Own ++ Quarter ++ Small).

sub_binaries(Config) ->
    Parts = [{0, 64}, {1, 65}, {7, 2048}, {7, 2049}, {3, 100000}, {(1 bsl 20) - 5000, 5000}],
    sweep(Config,
          [step(fmt("binary:part(1 MiB binary, ~b, ~b)", [Off, Len]), {det, part, {1 bsl 20, Off, Len}})
           || {Off, Len} <- Parts] ++
          [step("1 MiB binary with 6 parts of it in one message", {det, parts_with_whole, {1 bsl 20, Parts}}),
           step("binary grown by appending (writable), 100 KiB", {det, appended, 100000}),
           step("match context rest: <<_:8, Rest/binary>> of 1 MiB", {det, rest, 1 bsl 20})]).

bitstrings(Config) ->
    sweep(Config,
          [step(fmt("bitstring of ~b bytes + ~b bits", [N, K]), {det, bits, {N, K}})
           || N <- [0, 1, 64, 2049, 100000], K <- lists:seq(1, 7)] ++
          [step("bitstring at bit offset 3 of a 1 MiB binary, 8005 bits", {det, bitpart, {1 bsl 20, 3, 8005}}),
           step("binary at bit offset 3 of a 1 MiB binary, 100000 bytes", {det, bitpart, {1 bsl 20, 3, 800000}})]).

binary_100mib(Config) ->
    sweep(Config, [step("binary of 100 MiB", {det, bin, 100 bsl 20})]).

%%====================================================================
%% records
%%====================================================================

native_records(Config) ->
    Release = list_to_integer(erlang:system_info(otp_release)),
    case teleport_test_terms:native_records() of
        false ->
            %% Nothing to send: a release that makes them must run the steps.
            ?assert(Release < 29),
            {comment, "no native records before OTP 29"};
        true ->
            sweep(Config,
                  [step("empty native record", {det, record, empty}),
                   step("exported record of 3 fields", {det, record, point}),
                   step("record of 1000 fields", {det, record, {fields, 1000}}),
                   step("record holding a 10 MiB binary", {det, record, {binary, 10 bsl 20}}),
                   step("{record, 20 MiB binary beside it}", {det, record, {beside, 20 bsl 20}}),
                   step("list of 10^4 records (over the I/O thread's step limit)",
                        {det, record, {list, 10000}}),
                   step("records nested 10^5 deep", {det, record, {deep, 100000}}),
                   step("records as keys and values of a 100-key map", {det, record, {map, 100}}),
                   step("record holding a pid, a ref and a fun", {ctx, record_of_identifiers})])
    end.

%%====================================================================
%% scalars
%%====================================================================

integers(Config) ->
    Ints = [0, 1, -1, 255, 256, -256, (1 bsl 27) - 1, 1 bsl 27, -(1 bsl 27) - 1,
            (1 bsl 31) - 1, 1 bsl 31, -(1 bsl 31), -(1 bsl 31) - 1,
            (1 bsl 59) - 1, 1 bsl 59, -(1 bsl 59), -(1 bsl 59) - 1,
            (1 bsl 63) - 1, 1 bsl 63, -(1 bsl 63), -(1 bsl 63) - 1,
            (1 bsl 64) - 1, 1 bsl 64, -(1 bsl 64)],
    sweep(Config, [step(fmt("integer ~b", [I]), {value, I}) || I <- Ints] ++
                  [step("list of those integers", {value, Ints})]).

bignums(Config) ->
    sweep(Config,
          [step("bignum 10^30", {value, pow10(30)}),
           step("bignum -10^30", {value, -pow10(30)}),
           step("bignum 2^2040-1 (255 bytes: SMALL_BIG_EXT)", {value, (1 bsl 2040) - 1}),
           step("bignum 2^2040 (256 bytes: LARGE_BIG_EXT)", {value, 1 bsl 2040}),
           step("bignum -(2^2040)", {value, -(1 bsl 2040)}),
           step("bignum of 10,001 digits", {det, bignum, 10000}),
           step("bignum of -10,001 digits", {det, bignum, -10000}),
           step("list of 1000 bignums of ~100 digits", {det, bignums, {1000, 100}})]).

floats(Config) ->
    <<NegZero/float>> = <<1:1, 0:63>>,
    Floats = [{"0.0", 0.0}, {"-0.0", NegZero}, {"1.0", 1.0}, {"-1.5", -1.5},
              {"1.0e308", 1.0e308}, {"-1.0e308", -1.0e308},
              {"max 1.7976931348623157e308", 1.7976931348623157e308},
              {"min normal 2.2250738585072014e-308", 2.2250738585072014e-308},
              {"5.0e-324 (smallest subnormal)", 5.0e-324},
              {"pi", math:pi()}],
    sweep(Config, [step("float " ++ Label, {value, F}) || {Label, F} <- Floats] ++
                  [step("list of those floats", {value, [F || {_, F} <- Floats]})]).

atoms(Config) ->
    Long = list_to_atom(lists:duplicate(255, $a)),
    LongLatin1 = list_to_atom(lists:duplicate(255, $é)),
    LongUtf8 = list_to_atom(lists:duplicate(255, 16#3BB)),
    LongEmoji = list_to_atom(lists:duplicate(255, 16#1F600)),
    sweep(Config,
          [step("atom hello", {value, hello}),
           step("atom ''", {value, ''}),
           step("atom 'héllo' (Latin-1)", {value, 'héllo'}),
           step("atom 'λ' (UTF-8)", {value, binary_to_atom(<<16#3BB/utf8>>, utf8)}),
           step("atom of 255 ASCII characters", {value, Long}),
           step("atom of 255 x 'é' (Latin-1)", {value, LongLatin1}),
           step("atom of 255 x 'λ' (510 bytes UTF-8)", {value, LongUtf8}),
           step("atom of 255 x U+1F600 (1020 bytes UTF-8)", {value, LongEmoji}),
           step("true, false, undefined", {value, {true, false, undefined}}),
           step("list of 5000 distinct atoms (over the decoder's atom cache)", {det, atoms, 5000}),
           step("map of 100 atom keys, 'λ'-prefixed", {det, utf8_atom_map, 100})]).

%%====================================================================
%% identifiers
%%====================================================================

pids(Config) ->
    sweep(Config, [step("pid of the sender (local to it)", {ctx, sender_pid}),
                   step("registered pid of the sender (teleport_sup)", {ctx, sender_registered_pid}),
                   step("pid of the receiver (local to it)", {ctx, receiver_pid}),
                   step("pid of a third node (the test runner)", {ctx, third_pid}),
                   step("pid of a dead process of the sender", {ctx, dead_pid}),
                   step("list of all pid forms", {ctx, all_pids})]).

refs(Config) ->
    sweep(Config, [step("make_ref() of the sender", {ctx, sender_ref}),
                   step("alias() of the sender", {ctx, sender_alias}),
                   step("ref of the receiver", {ctx, receiver_ref}),
                   step("ref of a third node", {ctx, third_ref}),
                   step("alias of a third node", {ctx, third_alias}),
                   step("list of all ref forms", {ctx, all_refs})]).

ports(Config) ->
    sweep(Config, [step("port of the sender (cat, closed after)", {ctx, sender_port}),
                   step("port of the receiver (closed)", {ctx, receiver_port}),
                   step("port of a third node (cat, closed after)", {ctx, third_port}),
                   step("list of all port forms", {ctx, all_ports})]).

funs(Config) ->
    sweep(Config, [step("fun lists:reverse/1", {ctx, external_fun}),
                   step("local fun, no free variables", {ctx, {local_fun, none}}),
                   step("local fun, free variables: integer and binary", {ctx, {local_fun, small}}),
                   step("local fun, free variable: map of 100 keys", {ctx, {local_fun, {map, 100}}}),
                   step("local fun, free variable: map of 1000 keys", {ctx, {local_fun, {map, 1000}}}),
                   step("local fun, free variable: 3000-byte binary", {ctx, {local_fun, {bin, 3000}}}),
                   step("list of 1000 local funs", {ctx, fun_list})]).

mixed(Config) ->
    sweep(Config, [step("mix of every kind, maps up to 40 keys", {ctx, {mix, 40}}),
                   step("mix of every kind with a 1000-key map", {ctx, {mix, 1000}}),
                   step("list of 100 mixes, maps up to 40 keys", {ctx, {mixes, 100, 40}})]).

%%====================================================================
%% frame_limit
%%====================================================================

%% A and B run with max_frame_bytes 4 MiB; C with the default (512 MiB).
max_frame_bytes(Config) ->
    Bin = fun(F) -> {det, framed, {F, {bin, 0}}} end,
    Terms = fun(F) -> {det, framed, {F, {tuples, 100000}}} end,
    Small = {value, {small, message}},
    sweep(Config,
          [step("body of 4 MiB - 1 (binary)", Bin(?LIMIT - 1)),
           step("body of 4 MiB (binary), = max_frame_bytes", Bin(?LIMIT)),
           step("body of 4 MiB + 1 (binary): too_large", Bin(?LIMIT + 1), #{expect => too_large}),
           step("small message after too_large", Small),
           step("body of 4 MiB (10^5 tuples + padding)", Terms(?LIMIT)),
           step("body of 4 MiB + 1 (10^5 tuples + padding): too_large", Terms(?LIMIT + 1),
                #{expect => too_large}),
           step("small message after too_large", Small),
           %% C's own limit lets the frame go: A refuses it at the header,
           %% closes the connection, stays up; C's next message gets through.
           step("body of 4 MiB + 1 from a 512 MiB node to a 4 MiB node: refused by the receiver",
                Bin(?LIMIT + 1), #{expect => refused_by_receiver, dirs => [{c, a}]}),
           step("small message after the refused frame", Small, #{dirs => [{c, a}]}),
           step("body of 4 MiB from a 512 MiB node to a 4 MiB node", Bin(?LIMIT), #{dirs => [{c, a}]})]).

%%====================================================================
%% The sweep
%%====================================================================

step(Label, Spec) ->
    step(Label, Spec, #{}).

step(Label, Spec, Opts) ->
    maps:merge(#{label => lists:flatten(Label), spec => Spec, expect => delivered,
                 dirs => [{a, b}, {b, a}]}, Opts).

%% Runs every step in each of its directions; a step that fails does not stop
%% the others. Fails the case at the end with every failed step.
sweep(Config, Steps) ->
    {Case, Group} = case_and_group(Config),
    T0 = now_ms(),
    put(sweep_results, []),
    _ = [run_step(Step, Dir) || #{dirs := Dirs} = Step <- Steps, Dir <- Dirs],
    check_still_alive(),
    Ms = now_ms() - T0,
    Results = lists:reverse(get(sweep_results)),
    Failed = [R || {_, _, Verdict, _} = R <- Results, Verdict =/= ok],
    {SlowLabel, SlowDir, SlowMs} =
        lists:foldl(fun({L, D, _, #{ms := T}}, {_, _, Max}) when T > Max -> {L, D, T};
                       (_, Acc) -> Acc
                    end, {"", none, -1}, Results),
    ets:insert(?RESULTS, {Group, Case, length(Results), Failed, Ms}),
    report("SUMMARY case ~p: ~b steps (~b terms x directions), ~b passed, ~b failed, ~b ms; "
           "slowest: ~s ~s (~b ms)",
           [Case, length(Results), length(Steps), length(Results) - length(Failed),
            length(Failed), Ms, SlowLabel, dir_text(SlowDir), SlowMs]),
    case Failed of
        [] ->
            ok;
        _ ->
            ct:fail({failed_steps, length(Failed),
                     [{Label, dir_text(Dir), Verdict, Info} || {Label, Dir, Verdict, Info} <- Failed]})
    end.

%% One term, one direction: {Label, {From, To}, Verdict, #{ms, frame_bytes}}.
run_step(#{label := Label, spec := Spec, expect := Expect}, {From, To} = Dir) ->
    check_still_alive(),
    SNode = node_of(From),
    RNode = node_of(To),
    Seq = erlang:unique_integer([positive]),
    true = erlang:monitor_node(SNode, true),
    true = erlang:monitor_node(RNode, true),
    T0 = now_ms(),
    {Verdict0, Info} = try_step(Spec, Expect, Seq, SNode, RNode),
    Ms = now_ms() - T0,
    %% Whatever the verdict, both nodes must still be up.
    Verdict = case {alive(SNode), alive(RNode), Verdict0} of
                  {_, false, ok} -> receiver_died_after_delivery;
                  {_, false, _} -> receiver_died;
                  {false, true, _} -> sender_died;
                  {true, true, V} -> V
              end,
    _ = erlang:monitor_node(SNode, false),
    _ = erlang:monitor_node(RNode, false),
    flush_nodedowns(),
    _ = [restart_role(Role) || {Role, Node} <- [{From, SNode}, {To, RNode}], not alive(Node)],
    Result = {Label, Dir, Verdict, Info#{ms => Ms}},
    case Verdict of
        ok -> ct:log("ok   ~s ~s ~p", [Label, dir_text(Dir), Info#{ms => Ms}]);
        _ -> log("FAIL ~s ~s: ~0p ~0p", [Label, dir_text(Dir), Verdict, Info#{ms => Ms}])
    end,
    put(sweep_results, [Result | get(sweep_results)]),
    Result.

try_step(Spec, Expect, Seq, SNode, RNode) ->
    try
        {ok, Checker} = erpc:call(RNode, ?MODULE, checker_start, [self(), Seq, Spec], ?RPC_TIMEOUT),
        Ctx = case Spec of
                  {ctx, _} -> context(RNode, Checker);
                  _ -> #{}
              end,
        {Sent, FrameBytes} = erpc:call(SNode, ?MODULE, sender_run, [RNode, Seq, Spec, Ctx],
                                       ?RPC_TIMEOUT),
        _ = close_context(Ctx),
        Info0 = #{frame_bytes => FrameBytes, send => Sent},
        erase(sweep_referenced),
        Verdict =
            case {Expect, Sent} of
                {delivered, ok} ->
                    await_verdict(Seq, SNode, RNode, Checker);
                {too_large, {error, too_large}} ->
                    exit(Checker, kill),
                    ok;
                {refused_by_receiver, ok} ->
                    await_refusal(Seq, SNode, RNode, Checker);
                _ ->
                    exit(Checker, kill),
                    {unexpected_send_result, Sent, expected, Expect}
            end,
        Info = case get(sweep_referenced) of
                   undefined -> Info0;
                   Referenced -> Info0#{decoded_as => Referenced}
               end,
        {Verdict, Info}
    catch
        %% Never the whole reason: it may hold a term of a million elements.
        Class:Reason ->
            {{step_crashed, Class, brief(Reason)}, #{}}
    end.

await_verdict(Seq, SNode, RNode, Checker) ->
    receive
        {sweep_result, Seq, Verdict, []} -> Verdict;
        {sweep_result, Seq, Verdict, Referenced} -> put(sweep_referenced, Referenced), Verdict;
        {nodedown, RNode} -> receiver_died;
        {nodedown, SNode} -> exit(Checker, kill), sender_died
    after ?STEP_TIMEOUT ->
            exit(Checker, kill),
            not_delivered
    end.

%% The sender's pool to the receiver must close (the receiver refused the
%% header) and nothing may arrive.
await_refusal(Seq, SNode, RNode, Checker) ->
    Closed = teleport_test_peer:wait_until(
               fun() ->
                       Stats = erpc:call(SNode, teleport, stats, [RNode], ?RPC_TIMEOUT),
                       maps:get(disconnects, Stats, 0) >= 1
               end, ?STEP_TIMEOUT),
    exit(Checker, kill),
    receive
        {sweep_result, Seq, Verdict, _} -> {delivered_over_receiver_limit, Verdict}
    after 0 ->
            case Closed of
                true -> ok;
                false -> sender_pool_not_closed
            end
    end.

%% Terms only the test runner can give: its own pid, ref, alias and port (a
%% third node for both peers), and a ref and a (closed) port of the receiver.
context(RNode, Checker) ->
    Alias = alias(),
    true = unalias(Alias),
    Port = open_port({spawn, "cat"}, []),
    #{receiver_pid => Checker,
      receiver_ref => erpc:call(RNode, erlang, make_ref, [], ?RPC_TIMEOUT),
      receiver_port => erpc:call(RNode, ?MODULE, port_term, [], ?RPC_TIMEOUT),
      third_pid => self(),
      third_ref => make_ref(),
      third_alias => Alias,
      third_port => Port}.

close_context(#{third_port := Port}) ->
    close_port(Port);
close_context(#{}) ->
    ok.

%% Closed already is fine.
close_port(Port) ->
    try port_close(Port) catch error:badarg -> true end.

%% Runs on a peer: the id of a port of this node, closed.
port_term() ->
    Port = open_port({spawn, "cat"}, []),
    true = port_close(Port),
    Port.

%% A node that died after its last step (not seen by that step's check) fails that step too.
check_still_alive() ->
    Dead = [Role || {Role, Node} <- maps:to_list(get(sweep_nodes)), not alive(Node)],
    case Dead of
        [] ->
            ok;
        _ ->
            %% Charged to the last step.
            case get(sweep_results) of
                [{Label, Dir, Verdict, Info} | Earlier] ->
                    log("FAIL ~s ~s: ~p died after the step", [Label, dir_text(Dir), Dead]),
                    put(sweep_results, [{Label, Dir, {died_later, Dead, Verdict}, Info} | Earlier]);
                [] ->
                    log("~p died before the first step", [Dead])
            end,
            _ = [restart_role(Role) || Role <- Dead],
            ok
    end.

%%--------------------------------------------------------------------
%% On the receiver: the checker

checker_start(Origin, Seq, Spec) ->
    case whereis(?SINK) of
        undefined -> ok;
        Old -> unregister(?SINK), exit(Old, kill)
    end,
    Pid = spawn(?MODULE, checker_init, [Origin, Seq, Spec]),
    true = register(?SINK, Pid),
    {ok, Pid}.

checker_init(Origin, Seq, Spec) ->
    Expected = case Spec of
                   {ctx, _} -> receive {expect, Seq, E} -> E end;
                   _ -> build(Spec, Seq, #{})
               end,
    receive
        {Seq, Got} ->
            Verdict = try same(Got, Expected) of
                          true -> ok;
                          false -> {mismatch, diff(Got, Expected, [], 0)}
                      catch
                          Class:Reason -> {checker_crashed, Class, brief(Reason)}
                      end,
            Origin ! {sweep_result, Seq, Verdict, referenced(Got)}
    end.

%% For the binaries at the top of what arrived (the term, or the elements of
%% a tuple or list of up to 8): binary:referenced_byte_size/1 when it is
%% larger than the binary, i.e. the decoder made a sub-binary of the frame.
%% Information for the log, not asserted.
referenced(T) when is_binary(T) ->
    [{byte_size(T), sub_binary_of, binary:referenced_byte_size(T)}
     || binary:referenced_byte_size(T) > byte_size(T)];
referenced(T) when is_tuple(T), tuple_size(T) =< 8 ->
    lists:append([referenced(X) || X <- tuple_to_list(T), is_binary(X)]);
referenced(_) ->
    [].

same(Got, Expected) ->
    Got =:= Expected andalso float_bits(Got) =:= float_bits(Expected).

%% =:= does not tell -0.0 from 0.0 on every release: compare the bits too.
float_bits(F) when is_float(F) -> <<F/float>>;
float_bits([F | T]) when is_float(F) -> [<<F/float>> | float_bits(T)];
float_bits([_ | T]) -> float_bits(T);
float_bits(_) -> [].

%% Where Got first differs from Expected (bounded: never the terms themselves).
%% Path: tuple positions, {key, K}, {nth, N} in lists, {tail_after, N}.
diff(G, E, Path, Depth) when Depth > 200 ->
    {differs_below, compress(Path), shape(G), shape(E)};
diff(G, E, Path, Depth) when is_tuple(G), is_tuple(E), tuple_size(G) =:= tuple_size(E) ->
    first_diff([{I, element(I, G), element(I, E)} || I <- lists:seq(1, tuple_size(G))],
               G, E, Path, Depth);
diff(G, E, Path, Depth) when is_map(G), is_map(E), map_size(G) =:= map_size(E) ->
    case lists:sort(maps:keys(G)) =:= lists:sort(maps:keys(E)) of
        true -> first_diff([{{key, shape(K)}, maps:get(K, G), V} || {K, V} <- maps:to_list(E)],
                           G, E, Path, Depth);
        false -> {keys_differ, compress(Path), length(maps:keys(E) -- maps:keys(G)), missing}
    end;
diff([_ | _] = G, [_ | _] = E, Path, Depth) ->
    diff_list(G, E, 1, Path, Depth);
diff(G, E, Path, _Depth) ->
    {differs_at, compress(Path), got, shape(G), expected, shape(E)}.

diff_list([G | GT], [E | ET], N, Path, Depth) ->
    case same(G, E) of
        false -> diff(G, E, [{nth, N} | Path], Depth + 1);
        true -> diff_list(GT, ET, N + 1, Path, Depth)
    end;
diff_list(G, E, N, Path, Depth) ->
    diff(G, E, [{tail_after, N - 1} | Path], Depth + 1).

%% The path from the top, runs of one step as {Step, times, N}.
compress(Path) ->
    lists:foldl(fun(X, [{X, times, N} | Acc]) -> [{X, times, N + 1} | Acc];
                   (X, [X, X | Acc]) -> [{X, times, 3} | Acc];
                   (X, Acc) -> [X | Acc]
                end, [], Path).

first_diff(Pairs, G, E, Path, Depth) ->
    case [{I, X, Y} || {I, X, Y} <- Pairs, not same(X, Y)] of
        [{I, X, Y} | _] -> diff(X, Y, [I | Path], Depth + 1);
        [] -> {differs_at, compress(Path), got, shape(G), expected, shape(E)}
    end.

%% A short description of a term, bounded whatever the term.
shape(T) when is_map(T) -> {map, map_size(T)};
shape(T) when is_tuple(T) -> {tuple, tuple_size(T)};
shape(T) when is_binary(T) -> {binary, byte_size(T), binary:part(T, 0, min(8, byte_size(T)))};
shape(T) when is_bitstring(T), bit_size(T) =< 128 -> brief(T);
shape(T) when is_bitstring(T) -> {bitstring, bit_size(T)};
shape(T) when is_list(T) ->
    try length(T) of
        N -> {list, N, brief(T)}
    catch
        error:badarg -> {improper_list, brief(T)}
    end;
shape(T) when is_integer(T), abs(T) > 1 bsl 64 -> {bignum, byte_size(integer_to_binary(T)), digits};
shape(T) -> brief(T).

%% A term as text, cut at a small depth.
brief(T) ->
    lists:flatten(io_lib:format("~0P", [T, 8])).

%%--------------------------------------------------------------------
%% On the sender

%% Builds the term and sends it; the expected term goes first over distributed
%% Erlang when only the sender can make it. Returns {SendResult, FrameBytes}.
sender_run(RNode, Seq, Spec, Ctx) ->
    Term = build(Spec, Seq, Ctx),
    case Spec of
        {ctx, _} -> {?SINK, RNode} ! {expect, Seq, Term};
        _ -> ok
    end,
    Frame = {?SINK, {Seq, Term}},
    %% What teleport's encoder writes (atoms as ATOM_EXT when Latin-1, as
    %% term_to_binary minor version 1 does on every release).
    FrameBytes = erlang:external_size(Frame, [{minor_version, 1}]),
    Sent = teleport:send({?SINK, RNode}, {Seq, Term}),
    %% The ports this step opened here (ctx terms only) are closed once sent.
    _ = case Spec of
            {ctx, _} -> [close_port(P) || P <- erlang:ports(), lists:member(P, ports_in(Term, 3))];
            _ -> []
        end,
    {Sent, FrameBytes}.

%% The ports in a ctx term, a few levels down (where ctx/2 puts them).
ports_in(T, _) when is_port(T) -> [T];
ports_in(_, 0) -> [];
ports_in(T, D) when is_list(T) -> lists:append([ports_in(X, D - 1) || X <- T]);
ports_in(T, D) when is_map(T) -> lists:append([ports_in(X, D - 1) || X <- maps:values(T)]);
ports_in(_, _) -> [].

%%--------------------------------------------------------------------
%% Terms. build/3 runs on the sender, and for all but {ctx, _} on the
%% receiver too: the same spec gives the same term on both.

build({value, T}, _Seq, _Ctx) ->
    T;
build({det, Name, Args}, Seq, _Ctx) ->
    det(Name, Args, Seq);
build({ctx, Name}, _Seq, Ctx) ->
    ctx(Name, Ctx).

det(record, empty, _) ->
    teleport_test_terms:record(sweep, empty, []);
det(record, point, _) ->
    teleport_test_terms:record(sweep, point, true, [{x, 1}, {y, -2.5}, {tag, <<"a">>}]);
det(record, {fields, N}, _) ->
    teleport_test_terms:record(sweep, wide, [{key(atom, I), I} || I <- lists:seq(1, N)]);
det(record, {binary, Size}, _) ->
    teleport_test_terms:record(sweep, blob, [{id, 1}, {payload, bytes(Size, 1)}]);
det(record, {beside, Size}, Seq) ->
    {det(record, point, Seq), bytes(Size, 2)};
det(record, {list, N}, _) ->
    [teleport_test_terms:record(sweep, item, [{n, I}, {half, I div 2}]) || I <- lists:seq(1, N)];
det(record, {deep, N}, _) ->
    teleport_test_terms:nested_records(N);
det(record, {map, N}, _) ->
    maps:from_list([{teleport_test_terms:record(sweep, k, [{i, I}]),
                     teleport_test_terms:record(sweep, v, [{i, I}])} || I <- lists:seq(1, N)]);
det(map, {Kind, N}, _) ->
    maps:from_list([{key(Kind, I), I} || I <- lists:seq(1, N)]);
det(list_of_maps, {Count, Keys}, _) ->
    [maps:from_list([{I, I * J} || I <- lists:seq(1, Keys)]) || J <- lists:seq(1, Count)];
det(map_of_maps, {Outer, Inner}, _) ->
    maps:from_list([{J, maps:from_list([{I, J} || I <- lists:seq(1, Inner)])}
                    || J <- lists:seq(1, Outer)]);
det(map_key_in_map, {N, KeySize}, _) ->
    Key = maps:from_list([{key(atom, I), I} || I <- lists:seq(1, KeySize)]),
    (maps:from_list([{I, I} || I <- lists:seq(1, N)]))#{Key => map_key};
det(maps_as_keys, {N, KeySize}, _) ->
    maps:from_list([{maps:from_list([{I, J} || I <- lists:seq(1, KeySize)]), J}
                    || J <- lists:seq(1, N)]);
det(maps_in_tuple, {A, B}, Seq) ->
    {det(map, {int, A}, Seq), det(map, {bin, B}, Seq)};
det(tuple, N, _) ->
    list_to_tuple(lists:seq(1, N));
det(tuple_of_bins, {N, Size}, _) ->
    list_to_tuple([bytes(Size, I) || I <- lists:seq(1, N)]);
det(list, N, _) ->
    lists:seq(256, 255 + N);
det(mixed_list, N, _) ->
    [case I rem 5 of
         0 -> I;
         1 -> {I};
         2 -> <<I:32>>;
         3 -> [I];
         4 -> -I * 1000000007
     end || I <- lists:seq(1, N)];
det(string, N, _) ->
    [I band 255 || I <- lists:seq(1, N)];
det(string_then, {N, Last}, Seq) ->
    det(string, N, Seq) ++ [Last];
det(improper, {1, bin3000}, _) ->
    [x | bytes(3000, 0)];
det(improper, {N, Tail}, Seq) ->
    T = case Tail of
            byte -> 0;
            atom -> tail;
            map -> #{tail => true}
        end,
    improper_list(det(string, N, Seq), T);
det(deep_list, D, _) ->
    nest(D, fun(X) -> [X] end);
det(deep_tuple, D, _) ->
    nest(D, fun(X) -> {X} end);
det(deep_map, D, _) ->
    nest(D, fun(X) -> #{k => X} end);
det(deep_mixed, D, _) ->
    lists:foldl(fun(I, Acc) ->
                        case I rem 3 of
                            0 -> [Acc, I];
                            1 -> {I, Acc};
                            2 -> #{I => Acc}
                        end
                end, leaf, lists:seq(1, D));
det(deep_tail, D, _) ->
    lists:foldl(fun(I, Acc) -> [I | {Acc}] end, leaf, lists:seq(1, D));
det(bin, N, _) ->
    bytes(N, 0);
det(bin_list, {Count, Size}, _) ->
    [bytes(Size, I) || I <- lists:seq(1, Count)];
det(framed, {Body, Inner}, Seq) ->
    framed(Body, det(element(1, Inner), element(2, Inner), Seq), Seq);
det(tuples, N, _) ->
    [{I, I band 255} || I <- lists:seq(1, N)];
det(part, {Total, Off, Len}, _) ->
    binary:part(bytes(Total, 0), Off, Len);
det(parts_with_whole, {Total, Parts}, _) ->
    Whole = bytes(Total, 0),
    {Whole, [binary:part(Whole, Off, Len) || {Off, Len} <- Parts]};
det(appended, N, _) ->
    Chunk = bytes(1000, 7),
    Bin = lists:foldl(fun(_, Acc) -> <<Acc/binary, Chunk/binary>> end, <<>>,
                      lists:seq(1, N div 1000)),
    <<Bin/binary, (bytes(N rem 1000, 3))/binary>>;
det(rest, N, _) ->
    <<_:8, Rest/binary>> = bytes(N, 0),
    Rest;
det(bits, {N, K}, _) ->
    <<(bytes(N, K))/binary, (K * 37):K>>;
det(bitpart, {Total, BitOff, Bits}, _) ->
    <<_:BitOff, Part:Bits/bitstring, _/bitstring>> = bytes(Total, 0),
    Part;
det(bignum, Digits, _) when Digits > 0 ->
    pow10(Digits) + 123456789;
det(bignum, Digits, Seq) ->
    -det(bignum, -Digits, Seq);
det(bignums, {Count, Digits}, _) ->
    [(pow10(Digits) + I) * (1 - 2 * (I band 1)) || I <- lists:seq(1, Count)];
det(atoms, N, _) ->
    [list_to_atom("term_sweep_atom_" ++ integer_to_list(I)) || I <- lists:seq(1, N)];
det(utf8_atom_map, N, _) ->
    maps:from_list([{binary_to_atom(<<16#3BB/utf8, (integer_to_binary(I))/binary>>, utf8), I}
                    || I <- lists:seq(1, N)]).

key(int, I) -> I;
key(atom, I) -> list_to_atom("k" ++ integer_to_list(I));
key(bin, I) -> integer_to_binary(I);
key(tuple, I) -> {I, k};
key(map, I) -> #{k => I}.

nest(D, Wrap) ->
    lists:foldl(fun(_, Acc) -> Wrap(Acc) end, leaf, lists:seq(1, D)).

improper_list(List, Tail) ->
    lists:foldr(fun(X, Acc) -> [X | Acc] end, Tail, List).

%% {Inner, Padding} whose frame body (as teleport's encoder writes it, for this
%% step's Seq) is exactly Body bytes.
framed(Body, Inner, Seq) ->
    Overhead = frame_bytes(Seq, {Inner, <<>>}),
    Pad = Body - Overhead,
    true = Pad >= 0,
    Term = {Inner, bytes(Pad, 1)},
    Body = frame_bytes(Seq, Term),
    Term.

frame_bytes(Seq, Term) ->
    iolist_size(teleport_nif:encode({?SINK, {Seq, Term}})).

%% N bytes of a pattern of prime length (so a shifted copy differs), a fresh
%% binary: on the heap up to 64 bytes, refc above.
bytes(N, Salt) ->
    Pattern = << <<((I * 7 + Salt) band 255)>> || I <- lists:seq(0, 250) >>,
    Whole = binary:copy(Pattern, N div 251 + 1),
    binary:copy(binary:part(Whole, 0, N)).

pow10(N) ->
    binary_to_integer(iolist_to_binary(["1", lists:duplicate(N, $0)])).

ctx(sender_pid, _) -> self();
ctx(sender_registered_pid, _) -> whereis(teleport_sup);
ctx(receiver_pid, #{receiver_pid := P}) -> P;
ctx(third_pid, #{third_pid := P}) -> P;
ctx(dead_pid, _) ->
    {Pid, Mref} = spawn_monitor(fun() -> ok end),
    receive {'DOWN', Mref, process, Pid, _} -> Pid end;
ctx(all_pids, Ctx) ->
    [ctx(K, Ctx) || K <- [sender_pid, sender_registered_pid, receiver_pid, third_pid, dead_pid]];
ctx(sender_ref, _) -> make_ref();
ctx(sender_alias, _) ->
    Alias = alias(),
    true = unalias(Alias),
    Alias;
ctx(receiver_ref, #{receiver_ref := R}) -> R;
ctx(third_ref, #{third_ref := R}) -> R;
ctx(third_alias, #{third_alias := R}) -> R;
ctx(all_refs, Ctx) ->
    [ctx(K, Ctx) || K <- [sender_ref, sender_alias, receiver_ref, third_ref, third_alias]];
ctx(sender_port, _) -> open_port({spawn, "cat"}, []);
ctx(receiver_port, #{receiver_port := P}) -> P;
ctx(third_port, #{third_port := P}) -> P;
ctx(all_ports, Ctx) ->
    [ctx(K, Ctx) || K <- [sender_port, receiver_port, third_port]];
ctx(record_of_identifiers, Ctx) ->
    teleport_test_terms:record(sweep, ids, [{pid, ctx(sender_pid, Ctx)}, {ref, ctx(sender_ref, Ctx)},
                                            {'fun', ctx({local_fun, small}, Ctx)}]);
ctx(external_fun, _) -> fun lists:reverse/1;
ctx({local_fun, none}, _) -> fun(X) -> X + 1 end;
ctx({local_fun, small}, _) ->
    {N, B} = {7, <<"free">>},
    fun(X) -> {X + N, B} end;
ctx({local_fun, {map, Size}}, _) ->
    M = maps:from_list([{I, I} || I <- lists:seq(1, Size)]),
    N = 7,
    fun(X) -> X + N + map_size(M) end;
ctx({local_fun, {bin, Size}}, _) ->
    B = bytes(Size, 5),
    fun(X) -> {X, byte_size(B)} end;
ctx(fun_list, _) ->
    [fun(X) -> X + I end || I <- lists:seq(1, 1000)];
ctx({mix, MapKeys}, Ctx) ->
    <<NegZero/float>> = <<1:1, 0:63>>,
    M = maps:from_list([{I, I} || I <- lists:seq(1, MapKeys)]),
    #{pids => ctx(all_pids, Ctx),
      refs => ctx(all_refs, Ctx),
      ports => ctx(all_ports, Ctx),
      funs => [ctx(external_fun, Ctx), ctx({local_fun, {map, 10}}, Ctx)],
      ints => [0, 255, 256, (1 bsl 31) - 1, -(1 bsl 31) - 1, 1 bsl 64, -pow10(200)],
      floats => [0.0, NegZero, 5.0e-324, math:pi()],
      atoms => ['', 'héllo', binary_to_atom(<<16#3BB/utf8>>, utf8)],
      bins => [<<>>, bytes(64, 1), bytes(65, 2), bytes(2049, 3), bytes(70000, 4)],
      bits => [<<1:1>>, <<(bytes(3000, 9))/binary, 5:3>>],
      lists => {"string", [1, 2 | 3], lists:seq(1, 300)},
      tuple => list_to_tuple(lists:seq(1, 300)),
      map => M,
      nested => nest(1000, fun(X) -> [{X}] end),
      {key, tuple} => #{#{k => v} => [#{}]}};
ctx({mixes, Count, MapKeys}, Ctx) ->
    [ctx({mix, MapKeys}, Ctx) || _ <- lists:seq(1, Count)].

%%--------------------------------------------------------------------
%% Peers (per test case, linked to the test case's process)

start_role(Role) ->
    Env = maps:get(Role, get(sweep_env)),
    Name = teleport_test_peer:unique_name("sweep_" ++ atom_to_list(Role)),
    {ok, Peer, Node} = teleport_test_peer:start(Name, [], Env),
    put(sweep_peers, [Peer | get_list(sweep_peers)]),
    put(sweep_nodes, (get(sweep_nodes))#{Role => Node}),
    Node.

restart_role(Role) ->
    Node = start_role(Role),
    ct:log("restarted ~p as ~p", [Role, Node]),
    Node.

node_of(Role) ->
    maps:get(Role, get(sweep_nodes)).

alive(Node) ->
    try erpc:call(Node, erlang, node, [], ?ALIVE_TIMEOUT) of
        Node -> true;
        _ -> false
    catch
        _:_ -> false
    end.

flush_nodedowns() ->
    receive
        {nodedown, _} -> flush_nodedowns();
        {'EXIT', _, _} -> flush_nodedowns()
    after 0 ->
            ok
    end.

%%--------------------------------------------------------------------
%% Small helpers

case_and_group(Config) ->
    Group = case ?config(tc_group_properties, Config) of
                undefined -> none;
                Props -> proplists:get_value(name, Props)
            end,
    {?config(sweep_case, Config), Group}.

dir_text({From, To}) -> atom_to_list(From) ++ "->" ++ atom_to_list(To);
dir_text(none) -> "".

count(1000000) -> "10^6";
count(100000) -> "10^5";
count(10000) -> "10^4";
count(N) -> integer_to_list(N).

%% Summaries: ct:pal, and to the console of whoever runs the suite (rebar3
%% shows ct:pal output of failed cases only).
report(Format, Args) ->
    ct:pal(Format, Args),
    io:format(user, Format ++ "~n", Args).

%% Failed steps: the case's log and the console.
log(Format, Args) ->
    ct:log(Format, Args),
    io:format(user, Format ++ "~n", Args).

fmt(Format, Args) ->
    lists:flatten(io_lib:format(Format, Args)).

now_ms() ->
    erlang:monotonic_time(millisecond).

get_list(Key) ->
    case get(Key) of
        undefined -> [];
        L -> L
    end.

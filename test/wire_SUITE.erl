%% @doc The wire encoding: what can be asserted without timing it, and the
%% measurements behind BENCHMARKS.md (figures printed, never asserted):
%% <ul>
%% <li>`long_schedule': while one process sends a map holding a list of
%%     1,000,000 small tuples and a 200 MiB binary, `erlang:system_monitor'
%%     with `{long_schedule, 5}' runs on the sending and the receiving node;
%%     every report is printed.</li>
%% <li>`burst_memory': the same 10 MiB binary sent 100 times in a burst: the
%%     sender's `erlang:memory(binary)' peak over its baseline, and after. The
%%     frames reference the binary, so the peak stays under a quarter of what
%%     copies would take (asserted).</li>
%% <li>`codec_micro': teleport's Rust encoder (`teleport_nif:encode/1', which
%%     also copies its buffer into binaries for the result: the send path does
%%     not) against `term_to_iovec/1' and `term_to_binary/1', and its Rust
%%     decoder (`teleport_nif:decode/1') against `binary_to_term/1', on four
%%     terms.</li>
%% <li>`inline_budget': for eleven kinds of terms, the largest the encoder
%%     still does inline, its work count and encode time: the measurement
%%     behind the inline budget (encoder.rs).</li>
%% </ul>
%% `decoder_matches_binary_to_term' checks the decoder against the VM's.
%% Group `short' (in the test command) runs the cases that assert something, at a
%% small scale; `full' is the benchmark, every case:
%% `rebar3 ct --suite test/wire_SUITE --group full'.
-module(wire_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, init_per_suite/1, end_per_suite/1, init_per_group/2, end_per_group/2]).
-export([long_schedule/1, burst_memory/1, codec_micro/1, inline_budget/1,
         decoder_matches_binary_to_term/1]).
-export([sink/1, monitor_loop/1]).

all() -> [{group, short}].

groups() ->
    Asserting = [burst_memory, decoder_matches_binary_to_term],
    [{short, [], Asserting},
     {full, [], [long_schedule, codec_micro, inline_budget | Asserting]}].

init_per_suite(Config) ->
    case teleport_test_peer:ensure_distributed() of
        ok ->
            {ok, _} = application:ensure_all_started(teleport),
            {ok, Peer, Node} = teleport_test_peer:start(teleport_test_peer:unique_name("wire"), [], #{}),
            %% init_per_suite's process exits when it returns; the peer must outlive it.
            true = unlink(Peer),
            [{peer, Peer}, {node, Node} | Config];
        {fail, _} = Fail ->
            Fail
    end.

end_per_suite(Config) ->
    teleport_test_peer:stop(?config(peer, Config)),
    ok.

init_per_group(short, Config) ->
    [{scale, #{tuples => 10000, big_bin => 2 bsl 20, burst_bin => 1 bsl 20, burst => 20,
               micro_tuples => 10000, micro_map => 1000, micro_bin => 1 bsl 20, reps => 3}}
     | Config];
init_per_group(full, Config) ->
    [{scale, #{tuples => 1000000, big_bin => 200 bsl 20, burst_bin => 10 bsl 20, burst => 100,
               micro_tuples => 1000000, micro_map => 100000, micro_bin => 10 bsl 20, reps => 10}}
     | Config].

end_per_group(_, _Config) ->
    ok.

report(Format, Args) ->
    ct:pal(Format, Args),
    io:format(user, Format ++ "~n", Args).

%% A process on the peer that reports the size of what it got, over disterl.
sink(Parent) ->
    receive
        stop -> ok;
        Msg -> Parent ! {sunk, true, summary(Msg)}, sink(Parent)
    end.

%% Cheap on purpose: walking a million-element list here would itself be a long schedule.
summary(#{count := N, bin := B}) -> {N, byte_size(B)};
summary(B) when is_binary(B) -> byte_size(B);
summary(_) -> other.

%%--------------------------------------------------------------------

long_schedule(Config) ->
    #{tuples := N, big_bin := BinBytes} = ?config(scale, Config),
    Node = ?config(node, Config),
    Sink = erpc:call(Node, erlang, spawn, [?MODULE, sink, [self()]]),
    ok = teleport:send(Sink, warm_up),
    receive {sunk, _, other} -> ok after 30000 -> ct:fail(no_warm_up) end,
    Msg = #{count => N, list => [{I, I} || I <- lists:seq(1, N)],
            bin => crypto:strong_rand_bytes(BinBytes)},
    Local = spawn(?MODULE, monitor_loop, [[]]),
    Remote = erpc:call(Node, erlang, spawn, [?MODULE, monitor_loop, [[]]]),
    erlang:system_monitor(Local, [{long_schedule, 5}]),
    erpc:call(Node, erlang, system_monitor, [Remote, [{long_schedule, 5}]]),
    Sender = spawn_link(fun() -> ok = teleport:send(Sink, Msg) end),
    T0 = erlang:monotonic_time(millisecond),
    receive {sunk, true, Got} -> ?assertEqual({N, BinBytes}, Got) after 300000 -> ct:fail(not_delivered) end,
    Ms = erlang:monotonic_time(millisecond) - T0,
    erlang:system_monitor(undefined),
    erpc:call(Node, erlang, system_monitor, [undefined]),
    LocalEvents = events(Local),
    RemoteEvents = events(Remote),
    Sink ! stop,
    %% Only the sending process and teleport's own processes are teleport's doing;
    %% the test process and the sink are listed too, for the record.
    Teleport = [E || {Pid, _, _} = E <- LocalEvents ++ RemoteEvents, teleport_process(Pid, Sender)],
    report("long_schedule: map of ~b tuples + ~b byte binary delivered in ~b ms; "
           "long_schedule >5 ms reports from teleport (the sending process or teleport's own): ~b; "
           "from other processes: sender node ~b, receiver node ~b",
           [N, BinBytes, Ms, length(Teleport), length(LocalEvents) - length(Teleport),
            length(RemoteEvents)]),
    [report("  sender node: ~p", [E]) || E <- LocalEvents],
    [report("  receiver node: ~p", [E]) || E <- RemoteEvents],
    _ = Sender,
    ok.

teleport_process(Pid, Sender) when Pid =:= Sender -> true;
teleport_process(Pid, _Sender) ->
    case try erpc:call(node(Pid), erlang, process_info, [Pid, registered_name]) catch _:_ -> false end of
        {registered_name, Name} -> lists:prefix("teleport", atom_to_list(Name));
        _ -> false
    end.

monitor_loop(Acc) ->
    receive
        {monitor, Pid, long_schedule, Info} ->
            Where = try erlang:process_info(Pid, [registered_name, initial_call]) catch C:R -> {C, R} end,
            monitor_loop([{Pid, Where, Info} | Acc]);
        {dump, To} ->
            To ! {events, self(), lists:reverse(Acc)}
    end.

events(Monitor) ->
    Monitor ! {dump, self()},
    receive {events, Monitor, Events} -> Events after 10000 -> [] end.

%%--------------------------------------------------------------------

burst_memory(Config) ->
    #{burst_bin := Bytes, burst := Count} = ?config(scale, Config),
    Node = ?config(node, Config),
    Sink = erpc:call(Node, erlang, spawn, [?MODULE, sink, [self()]]),
    ok = teleport:send(Sink, warm_up),
    receive {sunk, _, other} -> ok after 30000 -> ct:fail(no_warm_up) end,
    Bin = crypto:strong_rand_bytes(Bytes),
    erlang:garbage_collect(),
    Baseline = erlang:memory(binary),
    Self = self(),
    Sampler = spawn_link(fun() -> sample(Self, Baseline) end),
    [ok = teleport:send(Sink, Bin) || _ <- lists:seq(1, Count)],
    [receive {sunk, true, Bytes} -> ok after 120000 -> ct:fail({missing, I}) end
     || I <- lists:seq(1, Count)],
    Sampler ! {stop, self()},
    Peak = receive {peak, P} -> P end,
    erlang:garbage_collect(),
    timer:sleep(200),
    After = erlang:memory(binary),
    Sink ! stop,
    report("burst_memory: ~b x the same ~b byte binary: sender binary memory baseline ~.1f MiB, "
           "peak +~.1f MiB, after +~.1f MiB",
           [Count, Bytes, Baseline / 1048576, (Peak - Baseline) / 1048576,
            (After - Baseline) / 1048576]),
    %% Copies of the binary in the queued frames would take Count x Bytes.
    ?assert(Peak - Baseline < Count * Bytes div 4,
            {binary_memory_grew, Peak - Baseline, Count * Bytes}),
    ok.

sample(Parent, Peak) ->
    receive
        {stop, Parent} -> Parent ! {peak, max(Peak, erlang:memory(binary))}
    after 1 ->
        sample(Parent, max(Peak, erlang:memory(binary)))
    end.

%%--------------------------------------------------------------------

codec_terms(#{micro_tuples := N, micro_map := M, micro_bin := B}) ->
    [{"100-byte message", {msg, self(), make_ref(), <<0:(8 * 60)>>}},
     {io_lib:format("~b byte binary", [B]), crypto:strong_rand_bytes(B)},
     {io_lib:format("list of ~b small tuples", [N]), [{I, I} || I <- lists:seq(1, N)]},
     {io_lib:format("map of ~b entries", [M]), maps:from_list([{I, I} || I <- lists:seq(1, M)])}].

codec_micro(Config) ->
    Scale = ?config(scale, Config),
    Reps = maps:get(reps, Scale),
    report("~-28s ~13s ~14s ~16s ~14s ~16s", ["term", "term_to_iovec", "term_to_binary",
                                              "teleport encode", "binary_to_term",
                                              "teleport decode"]),
    [begin
         Encoded = term_to_binary(Term),
         ?assert(iolist_to_binary(teleport_nif:encode(Term)) =:= Encoded),
         Decoded = teleport_nif:decode(Encoded),
         ?assert(Decoded =:= Term),
         Iov = time_us(fun() -> erlang:term_to_iovec(Term) end, Reps),
         Bin = time_us(fun() -> term_to_binary(Term) end, Reps),
         Enc = time_us(fun() -> teleport_nif:encode(Term) end, Reps),
         B2T = time_us(fun() -> binary_to_term(Encoded) end, Reps),
         Dec = time_us(fun() -> teleport_nif:decode(Encoded) end, Reps),
         report("~-28s ~11.1fus ~12.1fus ~9.1fus (~.2fx) ~12.1fus ~9.1fus (~.2fx)",
                [Label, Iov, Bin, Enc, Enc / max(Bin, 0.001), B2T, Dec, Dec / max(B2T, 0.001)])
     end || {Label, Term} <- codec_terms(Scale)],
    ok.

%% For kinds of terms, the largest that the encoder still does inline (on the
%% caller's scheduler), its work count and how long encode/1 takes on it: the
%% figures behind encoder.rs's INLINE_BUDGET. Only reported.
inline_budget(Config) ->
    Reps = maps:get(reps, ?config(scale, Config)),
    Pid = self(),
    Ref = binary:copy(<<1>>, 1000),
    Kinds = [{"small tuples {I, I}", fun(N) -> [{I, I} || I <- lists:seq(1, N)] end},
             {"integers", fun(N) -> lists:seq(1000, 1000 + N) end},
             {"floats", fun(N) -> [float(I) || I <- lists:seq(1, N)] end},
             {"atoms (cache misses)",
              fun(N) -> [list_to_atom("wire_budget_" ++ integer_to_list(I)) || I <- lists:seq(1, N)] end},
             {"64-byte binaries", fun(N) -> [binary:copy(<<I:512>>) || I <- lists:seq(1, N)] end},
             {"referenced binaries", fun(N) -> lists:duplicate(N, Ref) end},
             {"pids", fun(N) -> lists:duplicate(N, Pid) end},
             {"refs", fun(N) -> [make_ref() || _ <- lists:seq(1, N)] end},
             {"string", fun(N) -> lists:duplicate(N, $a) end},
             {"map, atom keys",
              fun(N) -> maps:from_list([{list_to_atom("k" ++ integer_to_list(I)), I}
                                        || I <- lists:seq(1, N)]) end},
             {"nested [[...]]", fun(N) -> lists:foldl(fun(_, A) -> [A] end, [], lists:seq(1, N)) end}],
    report("~-24s ~7s ~7s ~10s ~9s", ["largest inline term", "n", "work", "encode/1", "per unit"]),
    [begin
         N = largest_inline(Make, 1, 100000),
         Term = Make(N),
         {_, Work, inline} = teleport_nif:encode_measured(Term),
         Us = time_us(fun() -> teleport_nif:encode(Term) end, Reps),
         report("~-24s ~7b ~7b ~8.1fus ~7.1fns", [Label, N, Work, Us, Us * 1000 / Work])
     end || {Label, Make} <- Kinds],
    ok.

largest_inline(_Make, Lo, Hi) when Lo >= Hi - 1 ->
    Lo;
largest_inline(Make, Lo, Hi) ->
    Mid = (Lo + Hi) div 2,
    case teleport_nif:encode_measured(Make(Mid)) of
        {_, _, inline} -> largest_inline(Make, Mid, Hi);
        {_, _, dirty} -> largest_inline(Make, Lo, Mid)
    end.

%% Median of Reps runs, each in a fresh process so garbage does not pile up.
time_us(Fun, Reps) ->
    Times = [begin
                 Self = self(),
                 Pid = spawn_link(fun() ->
                                          T0 = erlang:monotonic_time(nanosecond),
                                          _ = Fun(),
                                          Self ! {took, self(), erlang:monotonic_time(nanosecond) - T0}
                                  end),
                 receive {took, Pid, T} -> T / 1000 end
             end || _ <- lists:seq(1, Reps)],
    lists:nth((Reps + 1) div 2, lists:sort(Times)).

%% The decoder against binary_to_term on the codec terms and a fixed corpus.
decoder_matches_binary_to_term(Config) ->
    Scale = ?config(scale, Config),
    Corpus = [T || {_, T} <- codec_terms(Scale)] ++
        [[], {}, #{}, <<>>, <<1:1>>, [a | b], 'héllo', '日本語', 1 bsl 200, -(1 bsl 64), 1.0e300,
         -0.5, "string", [[[[deep]]]], fun lists:map/2, fun(X) -> X end, make_ref(), self(),
         hd(erlang:ports()), list_to_tuple(lists:seq(1, 300)),
         maps:from_list([{{k, I}, I} || I <- lists:seq(1, 40)]),
         binary:part(crypto:strong_rand_bytes(200000), 10, 150000)],
    [?assertEqual({ok, T}, {ok, teleport_nif:decode(term_to_binary(T))}) || T <- Corpus],
    %% Garbage is an error, never a crash.
    [?assertMatch({error, _}, teleport_nif:decode(B))
     || B <- [<<>>, <<131>>, <<130, 97, 1>>, <<131, 108, 255, 255, 255, 255>>,
              <<131, 116, 0, 0, 0, 2, 97, 1, 97, 1, 97, 1, 97, 2>>, <<131, 200>>,
              <<131, 97, 1, 97, 2>>]],
    ok.

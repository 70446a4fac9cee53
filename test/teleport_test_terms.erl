%%% @doc Terms of every type the running release can make, for the encoder,
%%% decoder and sweep suites. Native records (OTP 29 and later) are made from
%%% their external format with `binary_to_term/1', so this module compiles on
%%% every supported release, and a release makes them exactly when its VM
%%% decodes them.
-module(teleport_test_terms).

-export([native_records/0, record/3, record/4, nested_records/1, every_type/0]).

%% @doc Whether this release has native records.
-spec native_records() -> boolean().
native_records() ->
    try record(teleport_test_terms, probe, [{a, 1}]) of
        _ -> true
    catch
        error:badarg -> false
    end.

%% @doc The native record `#Module:Name{Field = Value, ...}' (not exported), made
%% by this VM's decoder; raises `badarg' on a release without native records.
-spec record(atom(), atom(), [{atom(), term()}]) -> term().
record(Module, Name, Fields) ->
    record(Module, Name, false, Fields).

-spec record(atom(), atom(), boolean(), [{atom(), term()}]) -> term().
record(Module, Name, Exported, Fields) ->
    %% RECORD_EXT (67): [u32 fields][u8 exported], module, name, the field names,
    %% the values.
    Bytes = [131, 67, <<(length(Fields)):32>>, case Exported of true -> 1; false -> 0 end,
             inner(Module), inner(Name), [inner(K) || {K, _} <- Fields],
             [inner(V) || {_, V} <- Fields]],
    binary_to_term(iolist_to_binary(Bytes)).

%% @doc `#sweep:node{i = N, next = #sweep:node{i = N - 1, ... next = nil}}', `N'
%% deep, made in one pass (record/3 at each level would encode the levels below
%% again and again).
-spec nested_records(pos_integer()) -> term().
nested_records(N) ->
    Head = [67, <<2:32>>, 0, inner(sweep), inner(node), inner(i), inner(next)],
    binary_to_term(iolist_to_binary([131, [[Head, inner(I)] || I <- lists:seq(N, 1, -1)],
                                     inner(nil)])).

inner(Term) ->
    <<131, Inner/binary>> = term_to_binary(Term),
    Inner.

%% @doc `{Type, Example}' for every type of term this release can make, types
%% named as erl_nif.h's `ERL_NIF_TERM_TYPE_*' name them (lower case), plus
%% `native_record' where the release has them; several examples per type.
-spec every_type() -> [{atom(), term()}].
every_type() ->
    Fun = fun(X) -> {X, self()} end,
    [{atom, ok}, {atom, 'café'}, {atom, '日本'},
     {bitstring, <<1:3>>}, {bitstring, <<0:8193>>}, {bitstring, <<"abc">>},
     {bitstring, binary:copy(<<7>>, 100000)},
     {float, 1.5}, {float, -0.0},
     {'fun', Fun}, {'fun', fun lists:reverse/1},
     {integer, 7}, {integer, 1 bsl 59}, {integer, -(1 bsl 64)}, {integer, 1 bsl 300},
     {list, []}, {list, [1, 2, 3]}, {list, "string"}, {list, [a | b]},
     {map, #{}}, {map, #{a => 1, {b} => [c]}},
     {pid, self()}, {port, hd(erlang:ports())}, {reference, make_ref()},
     {tuple, {}}, {tuple, {a, <<"b">>, [c]}}]
        ++ case native_records() of
               true ->
                   [{native_record, record(m, empty, [])},
                    {native_record, record(m, pt, true, [{x, 1}, {y, 2.5}, {tag, <<"a">>}])},
                    {native_record, record(m, big, [{payload, binary:copy(<<1>>, 100000)}])},
                    {native_record, record(m, nested, [{inner, record(m, pt, [{x, [Fun]}])},
                                                       {map, #{k => record(m, e, [])}}])}];
               false ->
                   []
           end.

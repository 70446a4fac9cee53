%% @private
%% @doc How teleport_rpc's arguments and results travel.
%%
%% Structure-heavy ones (over `?STRUCTURED_TERMS' subterms: lists of maps,
%% long lists of tuples) travel as `{?PACKED, Bin}', `Bin' from
%% `term_to_binary/1': teleport's encoder and decoder take many small terms
%% several times slower than `term_to_binary'/`binary_to_term' (1.1 MB of small
%% maps echoed by a call: 45-68 ms as terms, 15 ms packed), and a binary crosses
%% the relay, keeper and worker without being copied. Binary-heavy terms keep
%% teleport's own path, where large binaries are never copied.
%%
%% Compressed ones (over the compression's threshold) are
%% `{?PACKED, term_to_binary(Term, [{compressed, Level}])}'. The other side
%% reads the size the term will have once inflated from the external format's
%% header (tag 80, then that size in 4 bytes) and refuses one over
%% `max_frame_bytes' before `binary_to_term' allocates anything for it, so a
%% small frame cannot make a node allocate gigabytes (a decompression bomb).
%% Refusals are counted per peer (`refused_compressed' in teleport:stats/1).
-module(teleport_rpc_codec).

-export([compression/2, valid/1, pack/2, unpack/2]).
-export_type([compression/0]).

-define(PACKED, '$teleport_z').
%% Subterms past which a term travels packed.
-define(STRUCTURED_TERMS, 1024).
%% The external format: version 131, and tag 80 for a compressed term.
-define(VERSION, 131).
-define(COMPRESSED_TAG, 80).

-type compression() :: off | {1..9, non_neg_integer()}.
%% `off', or `{Level, Threshold}': terms whose external size is over `Threshold'
%% bytes are compressed at zlib level `Level'.

%% @doc The compression for a request to `Node': the call's own option if it
%% has one (`default' if not), else the `rpc_compression' setting (see
%% teleport_config).
-spec compression(node(), compression() | default) -> compression().
compression(Node, default) ->
    case teleport_config:get(rpc_compression) of
        #{Node := Compression} -> Compression;
        #{default := Compression} -> Compression;
        #{} -> off;
        Compression -> Compression
    end;
compression(_Node, Compression) ->
    Compression.

%% @doc Whether `Compression' is a {@link compression()}.
-spec valid(term()) -> boolean().
valid(off) ->
    true;
valid({Level, Threshold}) ->
    is_integer(Level) andalso Level >= 1 andalso Level =< 9
        andalso is_integer(Threshold) andalso Threshold >= 0;
valid(_) ->
    false.

%% @doc `Term' as it travels: compressed if it is over the compression's
%% threshold, else packed if it is structure-heavy, else as it is.
-spec pack(term(), compression()) -> term().
pack(Term, {Level, Threshold}) ->
    case erlang:external_size(Term) > Threshold of
        true -> {?PACKED, term_to_binary(Term, [{compressed, Level}])};
        false -> pack(Term, off)
    end;
pack(Term, off) ->
    case terms_left(Term, ?STRUCTURED_TERMS) < 0 of
        true -> {?PACKED, term_to_binary(Term)};
        false -> Term
    end.

%% `Budget' less the subterms of `Term', counted until it is below 0 (so the
%% walk, and its depth, is bounded by the budget whatever the term).
terms_left(_Term, Budget) when Budget < 0 ->
    Budget;
terms_left([Head | Tail], Budget) ->
    terms_left(Tail, terms_left(Head, Budget - 1));
terms_left(Tuple, Budget) when is_tuple(Tuple) ->
    elements_left(Tuple, tuple_size(Tuple), Budget - 1);
terms_left(Map, Budget) when is_map(Map) ->
    entries_left(maps:next(maps:iterator(Map)), Budget - 1);
terms_left(_Term, Budget) ->
    Budget - 1.

elements_left(_Tuple, 0, Budget) -> Budget;
elements_left(_Tuple, _I, Budget) when Budget < 0 -> Budget;
elements_left(Tuple, I, Budget) -> elements_left(Tuple, I - 1, terms_left(element(I, Tuple), Budget)).

entries_left(none, Budget) -> Budget;
entries_left(_Next, Budget) when Budget < 0 -> Budget;
entries_left({Key, Value, Next}, Budget) ->
    entries_left(maps:next(Next), terms_left(Value, terms_left(Key, Budget))).

%% @doc The term `pack/2' was given. A compressed term that would inflate to
%% more than this node's `max_frame_bytes' is refused unread (`too_large'), and
%% one whose bytes are not a term (`badarg'); both are counted against `Peer'.
-spec unpack(term(), node()) -> {ok, term()} | {error, too_large | badarg}.
unpack({?PACKED, Bin}, Peer) when is_binary(Bin) ->
    Limit = teleport_config:get(max_frame_bytes),
    case Bin of
        <<?VERSION, ?COMPRESSED_TAG, Size:32, _/binary>> when Size > Limit ->
            refused(Peer, too_large);
        _ ->
            %% Under the limit, or not compressed (packed only, or kept
            %% uncompressed by term_to_binary when zlib would not make it
            %% smaller): its size is the frame's, which max_frame_bytes bounded.
            try binary_to_term(Bin) of
                Term -> {ok, Term}
            catch
                error:badarg -> refused(Peer, badarg)
            end
    end;
unpack(Term, _Peer) ->
    {ok, Term}.

refused(Peer, Why) ->
    teleport_relay_sup:count(refused_compressed, Peer),
    {error, Why}.

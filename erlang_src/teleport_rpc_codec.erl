%% @private
%% @doc teleport_rpc's compression: arguments and results over a size threshold
%% travel as `{?COMPRESSED, Bin}', `Bin' from `term_to_binary(Term, [{compressed,
%% Level}])'; the other side reads the size the term will have once inflated from
%% the external format's header (tag 80, then that size in 4 bytes) and refuses
%% one over `max_frame_bytes' before `binary_to_term' allocates anything for it,
%% so a small frame cannot make a node allocate gigabytes (a decompression bomb).
%% Refusals are counted per peer (`refused_compressed' in teleport:stats/1).
-module(teleport_rpc_codec).

-export([compression/2, pack/2, unpack/3]).
-export_type([compression/0]).

-define(COMPRESSED, '$teleport_z').
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

%% @doc `Term', or `Term' compressed if it is over the threshold.
-spec pack(term(), compression()) -> term().
pack(Term, off) ->
    Term;
pack(Term, {Level, Threshold}) ->
    case erlang:external_size(Term) > Threshold of
        true -> {?COMPRESSED, term_to_binary(Term, [{compressed, Level}])};
        false -> Term
    end.

%% @doc The term `pack/2' was given. A compressed term that would inflate to
%% more than `max_frame_bytes' is refused unread (`too_large'), and one whose
%% bytes are not a term (`badarg'); both are counted against `Peer'.
-spec unpack(term(), node(), integer()) -> {ok, term()} | {error, too_large | badarg}.
unpack({?COMPRESSED, Bin}, Peer, Limit) when is_binary(Bin) ->
    case Bin of
        <<?VERSION, ?COMPRESSED_TAG, Size:32, _/binary>> when Size > Limit ->
            refused(Peer, too_large);
        _ ->
            %% Under the limit, or not compressed after all (term_to_binary keeps
            %% a term uncompressed when zlib would not make it smaller): its size
            %% is the frame's, which max_frame_bytes bounded already.
            try binary_to_term(Bin) of
                Term -> {ok, Term}
            catch
                error:badarg -> refused(Peer, badarg)
            end
    end;
unpack(Term, _Peer, _Limit) ->
    {ok, Term}.

refused(Peer, Why) ->
    teleport_relay_sup:count(refused_compressed, Peer),
    {error, Why}.

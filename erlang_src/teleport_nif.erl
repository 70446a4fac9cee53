%% @private
%% @doc The NIF stubs. The Rust side (native/teleport_nif) replaces them at load.
-module(teleport_nif).

-export([start/1, stop/0, listen_address/0, open_pool/5, send/5, close_pool/1, peers/0, stats/0]).
-export([encode/1, encode_measured/1, encoder_info/0, decode/1, listener_stats/0]).
-export([deliver_frame/2, pool_generation/1, over_limit/2, debug_drop_events/1]).
-export([pool_token/1, confirm_pool/2, test_hooks/0]).

-on_load(load/0).

load() ->
    erlang:load_nif(filename:join(priv_dir(), "libteleport_nif"), 0).

priv_dir() ->
    case code:priv_dir(teleport) of
        {error, bad_name} ->
            %% Not loaded as an application (e.g. a bare -pa): priv sits beside ebin.
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        Dir ->
            Dir
    end.

-spec start(map()) -> {ok, {inet:ip_address(), inet:port_number()}} | {error, term()}.
start(_Opts) -> erlang:nif_error(nif_not_loaded).

-spec stop() -> ok.
stop() -> erlang:nif_error(nif_not_loaded).

-spec listen_address() -> {ok, {inet:ip_address(), inet:port_number()}} | {error, not_started}.
listen_address() -> erlang:nif_error(nif_not_loaded).

-spec open_pool(node(), inet:ip_address(), inet:port_number(), pos_integer(), pid()) ->
    ok | opening | not_started.
open_pool(_Node, _Ip, _Port, _Size, _Notify) -> erlang:nif_error(nif_not_loaded).

%% @doc Encodes `Msg' (in Rust, byte-identical to term_to_binary/1 where that is
%% deterministic; large binaries by reference) and queues it to `Node'.
-spec send(node(), send | call, non_neg_integer(), boolean(), term()) ->
    ok | suspend | not_connected | too_large | unsupported_by_peer | busy.
send(_Node, _Kind, _Key, _NoSuspend, _Msg) -> erlang:nif_error(nif_not_loaded).

-spec close_pool(node()) -> ok.
close_pool(_Node) -> erlang:nif_error(nif_not_loaded).

-spec peers() -> [node()].
peers() -> erlang:nif_error(nif_not_loaded).

-spec stats() -> #{node() => teleport:peer_stats()}.
stats() -> erlang:nif_error(nif_not_loaded).

%% @doc teleport's send-side encoder (tests, benchmarks): an iolist whose
%% iolist_to_binary/1 is the external term; binaries over 2 KiB appear as
%% the original binaries, not copies.
-spec encode(term()) -> [binary()].
encode(_Term) -> erlang:nif_error(nif_not_loaded).

%% @doc encode/1, and how: the work units counted and whether it ran inline (on
%% the calling scheduler) or on a dirty scheduler (tests, budget calibration). Only
%% in the NIF teleport's own tests build (cargo feature `test-hooks'); elsewhere it
%% raises `nif_not_loaded'.
-spec encode_measured(term()) -> {[binary()], non_neg_integer(), inline | dirty}.
encode_measured(_Term) -> erlang:nif_error(nif_not_loaded).

%% @doc What the encoder found out about this VM (tests, logs): whether it reads
%% the VM's tag bits (`on'; `off' when TELEPORT_ENCODER_TAGS=off; `probe_failed'
%% when its probe found another layout, and the NIF API alone is used) and the
%% form this VM's term_to_binary/1 gives atoms (`latin1' on OTP 25, `utf8' on
%% OTP 26 and later; `vm': another, each atom then encoded by the VM).
-spec encoder_info() -> #{tags := on | off | probe_failed, atoms := latin1 | utf8 | vm,
                          word_bits := pos_integer()}.
encoder_info() -> erlang:nif_error(nif_not_loaded).

%% @doc teleport's receive-side decoder on a binary from term_to_binary/1 (tests, benchmarks).
-spec decode(binary()) -> term() | {error, binary()}.
decode(_Bin) -> erlang:nif_error(nif_not_loaded).

-spec listener_stats() -> #{atom() => non_neg_integer()}.
listener_stats() -> erlang:nif_error(nif_not_loaded).

%% @doc Decodes and delivers a frame an I/O thread handed over (teleport_decoder).
-spec deliver_frame(reference(), binary()) -> ok.
deliver_frame(_Ticket, _Frame) -> erlang:nif_error(nif_not_loaded).

%% @doc `{Runtime, Opened, Closed}': this runtime's number and how often the pool
%% to `Node' opened and closed in it; `none' without a runtime. A frame queued
%% while the runtime and `Closed' stayed the same was not lost with its connection.
-spec pool_generation(node()) -> {pos_integer(), non_neg_integer(), non_neg_integer()} | none.
pool_generation(_Node) -> erlang:nif_error(nif_not_loaded).

%% @doc Whether the connection `Key' picks towards `Node' is over its queue limit.
-spec over_limit(node(), non_neg_integer()) -> boolean().
over_limit(_Node, _Key) -> erlang:nif_error(nif_not_loaded).

%% @doc The token our pool to `Node' announces on its connections (dialing or up),
%% or `none': a peer asks, over distributed Erlang, before a new pool of ours may
%% replace a live one there.
-spec pool_token(node()) -> binary() | none.
pool_token(_Node) -> erlang:nif_error(nif_not_loaded).

%% @doc Answers a `{teleport_confirm_pool, Peer, Token, Ticket}' (teleport_runtime).
-spec confirm_pool(reference(), boolean()) -> ok.
confirm_pool(_Ticket, _Confirmed) -> erlang:nif_error(nif_not_loaded).

%% @doc Whether this NIF was built with the cargo feature `test-hooks' (teleport's own
%% tests): only such a build takes `decode_on_scheduler => always' (teleport_config).
-spec test_hooks() -> boolean().
test_hooks() -> erlang:nif_error(nif_not_loaded).

%% @doc Test-only fault injection: the event pump loses its next `Count' messages.
%% Only in the NIF teleport's own tests build (cargo feature `test-hooks');
%% elsewhere it raises `nif_not_loaded'.
-spec debug_drop_events(non_neg_integer()) -> ok.
debug_drop_events(_Count) -> erlang:nif_error(nif_not_loaded).

%%% @doc The client side of teleport's connection protocol, in plain Erlang
%%% (gen_tcp and crypto), for tests that must put exact bytes on the wire:
%%% what a buggy or hostile peer that knows the cookie could send.
%%%
%%% The handshake (native/teleport_net/src/handshake.rs), protocol 2: every
%%% message is `[u16 BE length][u8 tag][body]', the length counting tag + body:
%%% <ol>
%%% <li>HELLO (client): tag 1, `[1][nonce_c:32][u8 len][client node][u8 len][server node]',
%%%     nonce_c starting with `"teleprt"' and the client's protocol version</li>
%%% <li>CHALLENGE (server): tag 2, `[version 2][nonce_s:32][capabilities:6]'</li>
%%% <li>CLIENT_PROOF (client): tag 3, `[HMAC-SHA256(Cookie, transcript("client"))][capabilities:6]'</li>
%%% <li>SERVER_PROOF (server): tag 4, `HMAC-SHA256(Cookie, transcript("server"))'</li>
%%% </ol>
%%% with `transcript(Role) = "teleport-v2 " ++ Role ++ [version] ++ nonce_c ++ nonce_s ++
%%% [len, client node] ++ [len, server node] ++ client capabilities ++ server
%%% capabilities ++ [0]' (the last byte: no TLS session value), capabilities
%%% being `[u16 OTP release][u32 flags]'. With `protocol => 1' the client speaks
%%% protocol 1 (teleport before versions: no mark, `[1][nonce_s]' challenge,
%%% `"teleport-v1 "' transcript), to see how a node of protocol 2 refuses it.
%%% After it, frames
%%% (native/teleport_net/src/framing.rs): `[u32 BE body length][u8 kind]' +
%%% body; kind 1 (send) carries `term_to_binary({Dest, Msg})', kind 2 (call)
%%% `term_to_binary({Dest, {Caller, Ref, Timeout}, Request})'.
%%%
%%% Since commit 32b7735 the first frame on every connection must be a pool
%%% epoch frame, kind 3 with a 16-byte body `[u64 incarnation][u64 epoch]'
%%% (see native/teleport_net/src/inbound.rs): pass `pool_epoch/2' as the
%%% `announce' option of `connect/4'.
%%%
%%% Connections are one-way: the server never sends anything after its
%%% proof, so after `connect' the socket only ever reports that it closed.
-module(teleport_raw_client).

-export([connect/3, connect/4, close/1,
         frame/2, pool_epoch/2, send_frame/3, send_bytes/2, send_term/3,
         await_closed/2]).

-define(HELLO_VERSION, 1).
-define(PROTOCOL, 2).
-define(MARK, "teleprt").
%% [u16 OTP release][u32 flags]: an OTP 25 node's.
-define(CAPABILITIES, <<25:16, 0:32>>).
-define(TAG_HELLO, 1).
-define(TAG_CHALLENGE, 2).
-define(TAG_CLIENT_PROOF, 3).
-define(TAG_SERVER_PROOF, 4).
-define(KIND_SEND, 1).
-define(KIND_CALL, 2).
-define(KIND_POOL_EPOCH, 3).

-type address() :: {inet:ip_address(), inet:port_number()}.
-type opts() :: #{client_node => atom() | binary(),
                  timeout => timeout(),
                  %% Socket mode after the handshake (default `true': the
                  %% owner gets `{tcp_closed, Socket}' when the server closes).
                  active => boolean() | once,
                  %% Bytes written right after the handshake, before anything
                  %% else (e.g. a frame a newer protocol expects first).
                  announce => iodata(),
                  %% The protocol version to speak (default 2; 1: as teleport
                  %% did before the wire had versions).
                  protocol => 1 | 2}.
-type kind() :: send | call | byte().
-export_type([address/0, opts/0, kind/0]).

%% @equiv connect(Address, ServerNode, Cookie, #{})
-spec connect(address(), node(), atom() | binary()) -> {ok, gen_tcp:socket()} | {error, term()}.
connect(Address, ServerNode, Cookie) ->
    connect(Address, ServerNode, Cookie, #{}).

%% @doc Connects to a teleport listener and authenticates as
%% `client_node' (default `teleport_raw_client@127.0.0.1') with `Cookie'.
%% Returns the socket once the server's proof has been verified.
-spec connect(address(), node(), atom() | binary(), opts()) ->
    {ok, gen_tcp:socket()} | {error, term()}.
connect({Ip, Port}, ServerNode, Cookie, Opts) ->
    Timeout = maps:get(timeout, Opts, 5000),
    ClientNode = maps:get(client_node, Opts, 'teleport_raw_client@127.0.0.1'),
    case gen_tcp:connect(Ip, Port, [binary, {packet, 2}, {active, false}, {nodelay, true}],
                         Timeout) of
        {ok, Socket} ->
            try handshake(maps:get(protocol, Opts, ?PROTOCOL), Socket, cookie(Cookie),
                          name(ClientNode), atom_to_binary(ServerNode), Timeout) of
                ok ->
                    ok = inet:setopts(Socket, [{packet, raw}]),
                    ok = gen_tcp:send(Socket, maps:get(announce, Opts, [])),
                    ok = inet:setopts(Socket, [{active, maps:get(active, Opts, true)}]),
                    {ok, Socket};
                {error, _} = Error ->
                    _ = gen_tcp:close(Socket),
                    Error
            catch
                Class:Reason ->
                    _ = gen_tcp:close(Socket),
                    {error, {Class, Reason}}
            end;
        {error, _} = Error ->
            Error
    end.

-spec close(gen_tcp:socket()) -> ok.
close(Socket) ->
    _ = gen_tcp:close(Socket),
    ok.

%% @doc A frame: header + body, as iodata.
-spec frame(kind(), iodata()) -> iodata().
frame(Kind, Body) ->
    [<<(iolist_size(Body)):32, (kind(Kind))>>, Body].

%% @doc The pool epoch frame a connection starts with: which pool of which
%% runtime of the client node it belongs to. A token other than the one the
%% server knows for the client node (a higher epoch, another incarnation)
%% is a newer pool: the server closes that node's older inbound connections.
-spec pool_epoch(non_neg_integer(), non_neg_integer()) -> iodata().
pool_epoch(Incarnation, Epoch) ->
    frame(?KIND_POOL_EPOCH, <<Incarnation:64, Epoch:64>>).

-spec send_frame(gen_tcp:socket(), kind(), iodata()) -> ok | {error, term()}.
send_frame(Socket, Kind, Body) ->
    gen_tcp:send(Socket, frame(Kind, Body)).

%% @doc Raw bytes, headers included (for broken headers).
-spec send_bytes(gen_tcp:socket(), iodata()) -> ok | {error, term()}.
send_bytes(Socket, Bytes) ->
    gen_tcp:send(Socket, Bytes).

%% @doc A well-formed send frame: `Msg' for `Dest' (a local pid or a
%% registered name on the server's node).
-spec send_term(gen_tcp:socket(), pid() | atom(), term()) -> ok | {error, term()}.
send_term(Socket, Dest, Msg) ->
    send_frame(Socket, send, term_to_binary({Dest, Msg})).

%% @doc For an active socket: waits until the server has closed it.
-spec await_closed(gen_tcp:socket(), timeout()) -> closed | timeout.
await_closed(Socket, Timeout) ->
    receive
        {tcp_closed, Socket} -> closed;
        {tcp_error, Socket, _} -> closed
    after Timeout ->
        timeout
    end.

%%--------------------------------------------------------------------

handshake(Protocol, Socket, Cookie, Client, Server, Timeout) ->
    Random = crypto:strong_rand_bytes(32),
    NonceC = case Protocol of
                 1 -> Random;
                 _ -> <<?MARK, Protocol, (binary:part(Random, 8, 24))/binary>>
             end,
    Hello = <<?TAG_HELLO, ?HELLO_VERSION, NonceC/binary, (byte_size(Client)), Client/binary,
              (byte_size(Server)), Server/binary>>,
    ok = gen_tcp:send(Socket, Hello),
    Names = <<(byte_size(Client)), Client/binary, (byte_size(Server)), Server/binary>>,
    case {Protocol, gen_tcp:recv(Socket, 0, Timeout)} of
        {1, {ok, <<?TAG_CHALLENGE, 1, NonceS:32/binary>>}} ->
            Transcript = fun(Role) ->
                                 <<"teleport-v1 ", Role/binary, NonceC/binary, NonceS/binary,
                                   Names/binary>>
                         end,
            prove(Socket, Cookie, Transcript, <<>>, Timeout);
        {2, {ok, <<?TAG_CHALLENGE, 2, NonceS:32/binary, ServerCaps:6/binary>>}} ->
            Transcript = fun(Role) ->
                                 <<"teleport-v2 ", Role/binary, 2, NonceC/binary, NonceS/binary,
                                   Names/binary, ?CAPABILITIES/binary, ServerCaps/binary, 0>>
                         end,
            prove(Socket, Cookie, Transcript, ?CAPABILITIES, Timeout);
        {_, {ok, Other}} ->
            {error, {bad_challenge, Other}};
        {_, {error, Reason}} ->
            {error, {no_challenge, Reason}}
    end.

prove(Socket, Cookie, Transcript, Capabilities, Timeout) ->
    ok = gen_tcp:send(Socket, <<?TAG_CLIENT_PROOF,
                                (crypto:mac(hmac, sha256, Cookie, Transcript(<<"client">>)))/binary,
                                Capabilities/binary>>),
    Expected = crypto:mac(hmac, sha256, Cookie, Transcript(<<"server">>)),
    case gen_tcp:recv(Socket, 0, Timeout) of
        {ok, <<?TAG_SERVER_PROOF, Expected:32/binary>>} -> ok;
        {ok, Other} -> {error, {bad_server_proof, Other}};
        {error, Reason} -> {error, {no_server_proof, Reason}}
    end.

%% A name given as a binary makes no atom.
name(Name) when is_atom(Name) -> atom_to_binary(Name);
name(Name) when is_binary(Name) -> Name.

cookie(Cookie) when is_atom(Cookie) -> atom_to_binary(Cookie);
cookie(Cookie) when is_binary(Cookie) -> Cookie.

kind(send) -> ?KIND_SEND;
kind(call) -> ?KIND_CALL;
kind(Byte) when is_integer(Byte), Byte >= 0, Byte =< 255 -> Byte.

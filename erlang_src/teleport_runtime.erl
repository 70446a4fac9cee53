%% @private
%% @doc Owns the Rust runtime's lifetime: starts the listener in init, stops it
%% (closing every connection and joining every thread) in terminate. Also
%% logs what the Rust side reports and closes a peer's pool on nodedown.
-module(teleport_runtime).
-behaviour(gen_server).

-export([start_link/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").

-include("teleport_call.hrl").

-define(META, #{domain => [teleport]}).

start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

init([]) ->
    process_flag(trap_exit, true),
    Config = teleport_config:get(),
    Opts = maps:with([listen_ip, listen_port, max_frame_bytes, send_queue_bytes, sndbuf,
                      connect_timeout, handshake_timeout, max_pending_handshakes,
                      max_pending_handshakes_per_ip, io_thread_priority,
                      reader_busy_wait_us], Config),
    %% The NIF takes 0 for no limit.
    MaxFailures = case maps:get(max_handshake_failures_per_ip, Config) of
                      infinity -> 0;
                      N -> N
                  end,
    case teleport_nif:start(Opts#{max_handshake_failures_per_ip => MaxFailures,
                                  io_threads => teleport_config:io_threads(
                                                  maps:get(io_threads, Config)),
                                  local_node => atom_to_binary(node()),
                                  cookie => atom_to_binary(erlang:get_cookie()),
                                  tls => nif_tls(maps:get(tls, Config)),
                                  event_pid => self(),
                                  call_relays => teleport_call_relay:names(),
                                  decoders => teleport_decoder:names(),
                                  decode_on_scheduler => maps:get(decode_on_scheduler, Config)}) of
        {ok, Addr} ->
            ok = net_kernel:monitor_nodes(true),
            ?LOG_INFO(#{what => listening, address => Addr}, ?META),
            %% undeliverable: per peer, the total of the last undeliverable event.
            {ok, #{address => Addr, undeliverable => #{}}};
        {error, Reason} ->
            %% Bad TLS files among others: application:start/1 returns the error.
            ?LOG_ERROR(#{what => listen_failed, reason => Reason}, ?META),
            {stop, {listen_failed, Reason}}
    end.

%% The NIF's form of the `tls' setting: paths and suites as binaries.
nif_tls(disabled) ->
    disabled;
nif_tls(#{certfile := Cert, keyfile := Key, cacertfile := CA, verify := Verify,
          server_name_check := NameCheck, client_name_check := ClientCheck,
          ciphers := Ciphers}) ->
    #{certfile => unicode:characters_to_binary(Cert),
      keyfile => unicode:characters_to_binary(Key),
      cacertfile => unicode:characters_to_binary(CA),
      verify_peer => Verify =:= verify_peer,
      server_name_check => NameCheck,
      client_name_check => ClientCheck,
      ciphers => [unicode:characters_to_binary(C) || C <- Ciphers]}.

handle_call(_Request, _From, State) ->
    {reply, {error, unsupported}, State}.

handle_cast(_Request, State) ->
    {noreply, State}.

handle_info({teleport_event, Event}, State) ->
    log_event(Event),
    {noreply, telemetry_event(Event, State)};
handle_info({teleport_call_undeliverable, {?FORWARD, Ref, Msg}, _}, State)
  when is_reference(Ref) ->
    %% A large RPC outcome for a caller here, and no relay to pass it on.
    erlang:send(Ref, Msg),
    {noreply, State};
handle_info({teleport_call_undeliverable, {?PROBE, Call}, _Slot}, State) ->
    %% A `{Node, Key}' RPC call's probe (its call tuple rides in the destination).
    handle_info({teleport_call_undeliverable, ?PROBE, Call}, State);
handle_info({teleport_call_undeliverable, {?RPC, Call}, _Slot}, State) ->
    handle_info({teleport_call_undeliverable, ?RPC, Call}, State);
handle_info({teleport_call_undeliverable, ?PROBE, {_Caller, Ref, _Timeout}}, State)
  when is_reference(Ref) ->
    %% A probe no relay could take: no relay holds a keeper for the call either.
    erlang:send(Ref, {'$teleport_unknown', Ref}),
    {noreply, State};
handle_info({teleport_call_undeliverable, _Dest, {_Caller, Ref, _Timeout}}, State)
  when is_reference(Ref) ->
    %% A call arrived while no relay could take it: its caller would wait for a
    %% keeper that never starts. Over disterl, to its alias (see teleport_call).
    erlang:send(Ref, {'$teleport_down', Ref, undefined, {teleport, no_call_relay}}),
    {noreply, State};
handle_info({teleport_call_undeliverable, _Dest, _Malformed}, State) ->
    {noreply, State};
handle_info({teleport_confirm_pool, Peer, Token, Ticket}, State) ->
    %% A connection claiming to be Peer announces a pool other than Peer's live one:
    %% only Peer may replace it, so Peer is asked over distributed Erlang (where it
    %% is the node of that name). Not in this process: the answer may take a while.
    Timeout = teleport_config:get(handshake_timeout),
    _ = spawn(fun() -> teleport_nif:confirm_pool(Ticket, pool_confirmed(Peer, Token, Timeout)) end),
    {noreply, State};
handle_info({nodedown, Node}, State) ->
    %% Calls watch their server over distributed Erlang: without it, the pool is no use.
    teleport_nif:close_pool(Node),
    {noreply, State};
handle_info({nodeup, _Node}, State) ->
    {noreply, State};
handle_info(Other, State) ->
    ?LOG_DEBUG(#{what => unexpected_message, message => Other}, ?META),
    {noreply, State}.

pool_confirmed(Peer, Token, Timeout) ->
    Confirmed = try erpc:call(Peer, teleport_nif, pool_token, [node()], Timeout) of
                    Token -> true;
                    _ -> false
                catch
                    _:_ -> false
                end,
    _ = Confirmed orelse ?LOG_NOTICE(#{what => pool_not_confirmed, peer => Peer,
                                       text => "a connection announced a pool of this node "
                                               "that the node did not open"}, ?META),
    Confirmed.

terminate(_Reason, _State) ->
    teleport_nif:stop().

%% Telemetry events (docs/telemetry.md) for what the Rust side reports.
telemetry_event({pool_up, Node, Connections}, State) ->
    teleport_telemetry:execute([teleport, pool, opened], #{connections => Connections},
                               #{node => Node}),
    State;
telemetry_event({pool_down, Node, Reason, Dropped}, State) ->
    teleport_telemetry:execute([teleport, pool, closed], #{dropped_messages => Dropped},
                               #{node => Node, reason => Reason}),
    Dropped > 0 andalso
        teleport_telemetry:execute([teleport, frame, dropped], #{count => Dropped},
                                   #{node => Node, direction => out, reason => Reason}),
    State;
telemetry_event({handshake_failed, Remote, Reason, Detail, Unreported}, State) ->
    teleport_telemetry:execute([teleport, handshake, refused], #{count => 1 + Unreported},
                               #{direction => inbound, remote => Remote, reason => Reason,
                                 detail => Detail}),
    State;
telemetry_event({undeliverable, Node, Reason, Total}, #{undeliverable := Seen} = State) ->
    %% The NIF reports at most once a second per connection, with the peer's total.
    Count = Total - maps:get(Node, Seen, 0),
    Count > 0 andalso
        teleport_telemetry:execute([teleport, frame, dropped], #{count => Count},
                                   #{node => Node, direction => in, reason => Reason}),
    State#{undeliverable := Seen#{Node => max(Total, maps:get(Node, Seen, 0))}};
telemetry_event(_Other, State) ->
    State.

log_event({pool_up, Node, Connections}) ->
    ?LOG_INFO(#{what => pool_up, peer => Node, connections => Connections}, ?META);
log_event({pool_down, Node, Reason, 0}) ->
    ?LOG_INFO(#{what => pool_down, peer => Node, reason => Reason}, ?META);
log_event({pool_down, Node, Reason, Dropped}) ->
    ?LOG_WARNING(#{what => pool_down, peer => Node, reason => Reason,
                   dropped_messages => Dropped}, ?META);
log_event({inbound_up, Node}) ->
    ?LOG_DEBUG(#{what => inbound_up, peer => Node}, ?META);
log_event({inbound_down, Node, Reason}) ->
    ?LOG_DEBUG(#{what => inbound_down, peer => Node, reason => Reason}, ?META);
log_event({handshake_failed, Remote, Reason, Detail, Unreported}) ->
    %% At most one per source address per 10 s; `unreported': that source's
    %% failures since the last line (every one is in listener_stats/0).
    ?LOG_NOTICE(maps:merge(#{what => handshake_failed, remote => Remote, reason => Reason,
                             unreported_since_last => Unreported},
                           case Detail of
                               <<>> -> #{};
                               _ -> #{detail => Detail}
                           end), ?META);
log_event({undeliverable, Node, Reason, Total}) ->
    ?LOG_DEBUG(#{what => undeliverable, peer => Node, reason => Reason, total => Total}, ?META);
log_event({accept_failed, Reason, Count}) ->
    %% The listener pauses and retries by itself; the NIF sends this at most once a second.
    ?LOG_WARNING(#{what => accept_failed, reason => Reason, failures => Count}, ?META);
log_event({panic, Thread, Message}) ->
    ?LOG_ERROR(#{what => rust_thread_panicked, thread => Thread, message => Message}, ?META);
log_event(Other) ->
    ?LOG_DEBUG(#{what => unknown_event, event => Other}, ?META).

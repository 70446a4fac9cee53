%%% @doc A TCP relay that behaves like a slow link, for hol_SUITE's slow_link case:
%%% each direction passes at most `mbps' MB/s and delays what it passes by
%%% `delay_ms', with a bounded queue (`?QUEUE_BYTES', like a switch's buffer)
%%% past which it stops reading, so TCP's flow control reaches the sender.
%%% Connections accepted on its port (127.0.0.1, any free port) are relayed to
%%% 127.0.0.1:Target, each direction by one process.
-module(hol_relay).

-export([start/2, port/1, stop/1]).
-export([init/3, pump/5]).

%% Bytes a direction holds before it stops reading: 2 ms at 1 Gbit/s.
-define(QUEUE_BYTES, 256 * 1024).
%% Most bytes passed as one piece (the pacing's grain).
-define(PIECE_BYTES, 16 * 1024).

-spec start(inet:port_number(), #{mbps := pos_integer(), delay_ms := non_neg_integer()}) -> pid().
start(Target, Link) ->
    Parent = self(),
    Pid = spawn(?MODULE, init, [Parent, Target, Link]),
    receive {relay_listening, Pid} -> Pid end.

-spec port(pid()) -> inet:port_number().
port(Relay) ->
    Relay ! {port, self()},
    receive {relay_port, Relay, Port} -> Port end.

-spec stop(pid()) -> ok.
stop(Relay) ->
    Ref = monitor(process, Relay),
    exit(Relay, shutdown),
    receive {'DOWN', Ref, process, Relay, _} -> ok end.

%% @private
init(Parent, Target, Link) ->
    process_flag(trap_exit, true),
    {ok, Listen} = gen_tcp:listen(0, [binary, {ip, {127, 0, 0, 1}}, {active, false},
                                      {reuseaddr, true}, {nodelay, true}, {backlog, 64}]),
    {ok, Port} = inet:port(Listen),
    Self = self(),
    Acceptor = spawn_link(fun() -> accept(Self, Listen, Target, Link) end),
    Parent ! {relay_listening, self()},
    loop(Listen, Port, Acceptor).

loop(Listen, Port, Acceptor) ->
    receive
        {port, From} ->
            From ! {relay_port, self(), Port},
            loop(Listen, Port, Acceptor);
        {'EXIT', _, shutdown} ->
            gen_tcp:close(Listen),
            exit(shutdown);
        {'EXIT', _, _} ->
            loop(Listen, Port, Acceptor)
    end.

accept(Owner, Listen, Target, Link) ->
    case gen_tcp:accept(Listen) of
        {ok, In} ->
            {ok, Out} = gen_tcp:connect({127, 0, 0, 1}, Target,
                                        [binary, {active, false}, {nodelay, true}]),
            Rate = maps:get(mbps, Link) * 1000000,
            Delay = maps:get(delay_ms, Link),
            A = spawn_link(?MODULE, pump, [In, Out, Rate, Delay, Owner]),
            B = spawn_link(?MODULE, pump, [Out, In, Rate, Delay, Owner]),
            ok = gen_tcp:controlling_process(In, A),
            ok = gen_tcp:controlling_process(Out, B),
            A ! go,
            B ! go,
            accept(Owner, Listen, Target, Link);
        {error, _} ->
            ok
    end.

%% @private One direction: reads `From', writes `To' as the link would deliver.
pump(From, To, Rate, Delay, _Owner) ->
    receive go -> ok end,
    ok = inet:setopts(From, [{active, once}]),
    pump_loop(From, To, Rate, Delay, queue:new(), 0, now_us(), true).

%% Queue: {DeliverAtUs, Bin}; LinkFree: when the link has sent all queued so far.
pump_loop(From, To, Rate, Delay, Q, Queued, LinkFree, Reading) ->
    Timeout = case queue:peek(Q) of
                  empty -> infinity;
                  {value, {At, _}} -> max(0, (At - now_us() + 999) div 1000)
              end,
    receive
        {tcp, From, Data} ->
            {Q1, Free1} = enqueue(Data, Q, LinkFree, Rate, Delay),
            Queued1 = Queued + byte_size(Data),
            Read = Queued1 < ?QUEUE_BYTES,
            _ = Read andalso inet:setopts(From, [{active, once}]),
            pump_loop(From, To, Rate, Delay, Q1, Queued1, Free1, Read);
        {tcp_closed, From} ->
            drain(To, Q),
            gen_tcp:close(To);
        {tcp_error, From, _} ->
            gen_tcp:close(To)
    after Timeout ->
            {Q1, Sent} = deliver(To, Q, now_us(), 0),
            Queued1 = Queued - Sent,
            Read = Reading orelse Queued1 < ?QUEUE_BYTES,
            _ = (Read andalso not Reading) andalso inet:setopts(From, [{active, once}]),
            pump_loop(From, To, Rate, Delay, Q1, Queued1, LinkFree, Read)
    end.

%% Cuts `Data' into pieces, each leaving the link when the one before it has, at
%% the link's rate, and arriving `Delay' ms later.
enqueue(<<>>, Q, Free, _Rate, _Delay) ->
    {Q, Free};
enqueue(Data, Q, Free, Rate, Delay) ->
    Size = min(byte_size(Data), ?PIECE_BYTES),
    <<Piece:Size/binary, Rest/binary>> = Data,
    Start = max(now_us(), Free),
    Sent = Start + (Size * 1000000) div Rate,
    enqueue(Rest, queue:in({Sent + Delay * 1000, Piece}, Q), Sent, Rate, Delay).

deliver(To, Q, Now, Sent) ->
    case queue:peek(Q) of
        {value, {At, Piece}} when At =< Now ->
            case gen_tcp:send(To, Piece) of
                ok -> deliver(To, queue:drop(Q), Now, Sent + byte_size(Piece));
                {error, _} -> exit(normal)
            end;
        _ ->
            {Q, Sent}
    end.

drain(To, Q) ->
    [_ = gen_tcp:send(To, Piece) || {_, Piece} <- queue:to_list(Q)],
    ok.

now_us() ->
    erlang:monotonic_time(microsecond).

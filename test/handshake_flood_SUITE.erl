%%% @doc Handshake flood benchmark (issue 22.5): small calls to a node at a fixed
%%% rate while one source opens connections to its listener as fast as it can. A
%%% benchmark, not a test: it prints figures and asserts only that the work
%%% completed (every call answered, the flood made connections).
%%%
%%% Three peer nodes on this host: the target T (an echo gen_server), the caller P
%%% (its pool to T is up before anything is timed) and the flooder F (a VM of its
%%% own, every thread at nice 19: an attacker runs on its own hosts, so F gets only
%%% the CPU time the others leave). P calls T with `teleport:gs_call/3',
%%% CALLS calls per window, one every INTERVAL_MS, open loop (each call is its own
%%% process, started at its time whatever the others do, so a stall shows in
%%% every call it delays; each is timed from its start to its reply). Conditions, each run ROUNDS times, interleaved:
%%% <ul>
%%% <li>`idle': no flood;</li>
%%% <li>`flood': CLIENTS processes on F, each bound to 127.0.0.2 (one source other
%%%     than P's 127.0.0.1), loop: connect to T's listener, send the recorded first
%%%     message, wait for T's answer or its close, close (RST). Plain text: a
%%%     HELLO, answered with a CHALLENGE. TLS: a ClientHello recorded once from
%%%     OTP's ssl client, offering one key exchange group (TLS_GROUP), and replayed:
%%%     T does a server handshake flight for each (key exchange and signature), or
%%%     asks for another group (HelloRetryRequest) if it does not take that one.</li>
%%% </ul>
%%% Printed per window: p50, p99 and max of the calls (us), how many connections
%%% the flood made per second and how many T answered, T's CPU by thread group
%%% (`teleport-io': the I/O threads that serve established connections;
%%% `teleport-hs': the handshake thread, where one exists; the whole VM), and T's
%%% listener counters over the window. Then per condition: the p99 of every round
%%% (the spread), the median and the worst.
%%%
%%% Cases: `plain' and `tls' (TLS on every node; certificates made with openssl,
%%% skipped without it).
%%%
%%% Environment (defaults in brackets; the `short' group, in all/0, runs a few
%%% calls to keep the suite from rotting; `full' is the benchmark):
%%% FLOOD_ROUNDS [full 3], FLOOD_CALLS [full 600], FLOOD_INTERVAL_MS [5],
%%% FLOOD_CLIENTS [16], FLOOD_TLS_GROUP [x25519; secp384r1: the group rustls 0.23.48
%%% puts first, ~0.8 ms per key exchange with ring on the project's machine against
%%% ~0.07 ms], and teleport settings of T and P FLOOD_MAX_HANDSHAKE_FAILURES_PER_IP
%%% (`infinity': no throttle, the handshake thread alone), FLOOD_IO_THREADS. TELEPORT_PEER_EBIN: run the peers on another build of
%%% teleport (scripts/build_old_main.sh's), for before/after figures.
%%%
%%%     scripts/with_epmd.sh rebar3 ct --suite test/handshake_flood_SUITE --group full
-module(handshake_flood_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([plain/1, tls/1]).
%% Run on the peers.
-export([calls/3, flood_start/4, flood_stop/1, flood_client/5]).

-define(SERVER, flood_echo).
-define(FLOOD_SOURCE, {127, 0, 0, 2}).
-define(RPC_TIMEOUT, 600000).
-define(CALL_TIMEOUT, 30000).
%% The flood runs this long before the calls start.
-define(RAMP_MS, 300).

suite() ->
    [{timetrap, {minutes, 30}}].

all() ->
    [{group, short}].

groups() ->
    [{short, [], [plain, tls]},
     {full, [], [plain, tls]}].

init_per_suite(Config) ->
    teleport_test_peer:init_per_suite(Config).

end_per_suite(_Config) ->
    ok.

init_per_group(short, Config) ->
    [{params, params(#{rounds => 1, calls => 60})} | Config];
init_per_group(full, Config) ->
    [{params, params(#{rounds => 3, calls => 600})} | Config].

end_per_group(_, _Config) ->
    ok.

params(Group) ->
    Defaults = maps:merge(#{interval_ms => 5, clients => 16, tls_group => "x25519"}, Group),
    maps:map(fun(Key, Default) ->
                     case os:getenv("FLOOD_" ++ string:uppercase(atom_to_list(Key))) of
                         false -> Default;
                         "" -> Default;
                         Value when is_integer(Default) -> list_to_integer(Value);
                         Value -> Value
                     end
             end, Defaults).

%% teleport settings of T and P from the environment.
app_env() ->
    teleport_test_peer:app_env_from_os("FLOOD", [max_handshake_failures_per_ip, io_threads]).

%%====================================================================
%% Cases
%%====================================================================

plain(Config) ->
    run(Config, plain, app_env()).

tls(Config) ->
    case os:find_executable("openssl") of
        false ->
            {skip, "the openssl command makes the test certificates"};
        _ ->
            Dir = filename:join(?config(priv_dir, Config), "certs"),
            run(Config, tls, (app_env())#{tls => teleport_test_peer:tls_env(Dir)})
    end.

run(Config, Kind, Env) ->
    %% A case run alone (--case, no group): the short group's sizes.
    P = proplists:get_value(params, Config, params(#{rounds => 1, calls => 60})),
    {ok, PeerT, T} = teleport_test_peer:start(teleport_test_peer:unique_name("flood_t"), [], Env),
    try
        {ok, PeerP, Caller} = teleport_test_peer:start(teleport_test_peer:unique_name("flood_p"),
                                                       [], Env),
        {ok, PeerF, F} = teleport_test_peer:start(teleport_test_peer:unique_name("flood_f")),
        try
            %% An attacker's processes run on its own hosts: here the flooder takes only
            %% the CPU time nothing else wants.
            ok = renice(erpc:call(F, os, getpid, [])),
            {ok, _} = erpc:call(T, teleport_test_server, start, [?SERVER]),
            ok = erpc:call(Caller, teleport, connect, [T]),
            Listen = erpc:call(T, teleport, listen_address, []),
            Address = teleport_test_peer:connectable(Listen),
            Group = list_to_atom(maps:get(tls_group, P)),
            First = first_message(Kind, T, Group),
            ct:pal("~p flood: ~b clients from ~p, replaying ~b bytes (TLS key exchange ~p); T ~p, "
                   "peers' teleport: ~s",
                   [Kind, maps:get(clients, P), ?FLOOD_SOURCE, byte_size(First), Group, T,
                    peer_build()]),
            Conditions = [idle, flood],
            Results = [{Cond, R, window(Cond, #{t => T, caller => Caller, f => F,
                                                 address => Address, first => First}, P)}
                       || R <- lists:seq(1, maps:get(rounds, P)), Cond <- Conditions],
            report(Kind, P, Conditions, Results)
        after
            teleport_test_peer:stop(PeerF),
            teleport_test_peer:stop(PeerP)
        end
    after
        teleport_test_peer:stop(PeerT)
    end.

%% Every thread of OS process `OsPid' at nice 19 (nice is per thread on Linux).
renice(OsPid) ->
    Tids = [filename:basename(D) || D <- filelib:wildcard("/proc/" ++ OsPid ++ "/task/*")],
    _ = os:cmd("renice -n 19 -p " ++ lists:join(" ", Tids)),
    ok.

peer_build() ->
    case os:getenv("TELEPORT_PEER_EBIN") of
        false -> "this build";
        "" -> "this build";
        Ebin -> Ebin
    end.

%% The bytes a client sends first. Plain text: a HELLO naming T (from a node that
%% does not exist). TLS: a ClientHello of OTP's ssl client offering one key exchange
%% group, `Group', caught by a listener that answers nothing: the same bytes whatever
%% build of teleport the peers run.
first_message(plain, T, _Group) ->
    Client = <<"flooder@127.0.0.2">>,
    Server = atom_to_binary(T),
    Nonce = <<"teleprt", 2, (crypto:strong_rand_bytes(24))/binary>>,
    Hello = <<1, 1, Nonce/binary, (byte_size(Client)), Client/binary,
              (byte_size(Server)), Server/binary>>,
    <<(byte_size(Hello)):16, Hello/binary>>;
first_message(tls, _T, Group) ->
    {ok, _} = application:ensure_all_started(ssl),
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(L),
    Dialer = spawn(fun() ->
                           ssl:connect({127, 0, 0, 1}, Port,
                                       [{versions, ['tlsv1.3']}, {verify, verify_none},
                                        {supported_groups, [Group]}], 10000)
                   end),
    try
        {ok, S} = gen_tcp:accept(L, 10000),
        %% One TLS record: [type 22][version:16][length:16] and the body.
        {ok, <<22, _:16, Len:16>> = Header} = gen_tcp:recv(S, 5, 10000),
        {ok, Body} = gen_tcp:recv(S, Len, 10000),
        ok = gen_tcp:close(S),
        <<Header/binary, Body/binary>>
    after
        exit(Dialer, kill),
        gen_tcp:close(L)
    end.

%%====================================================================
%% One window
%%====================================================================

window(Cond, #{t := T, caller := Caller, f := F, address := Address, first := First}, P) ->
    #{calls := Calls, interval_ms := Interval, clients := Clients} = P,
    OsPid = erpc:call(T, os, getpid, []),
    Before = erpc:call(T, teleport, listener_stats, []),
    Cpu0 = cpu(OsPid),
    Flood = case Cond of
                idle -> none;
                flood -> erpc:call(F, ?MODULE, flood_start, [Address, First, ?FLOOD_SOURCE, Clients])
            end,
    timer:sleep(?RAMP_MS),
    T0 = erlang:monotonic_time(microsecond),
    Latencies = erpc:call(Caller, ?MODULE, calls, [T, Calls, Interval], ?RPC_TIMEOUT),
    Micros = erlang:monotonic_time(microsecond) - T0,
    Cpu1 = cpu(OsPid),
    Counts = case Flood of
                 none -> #{};
                 _ -> erpc:call(F, ?MODULE, flood_stop, [Flood])
             end,
    After = erpc:call(T, teleport, listener_stats, []),
    ?assertEqual(Calls, length(Latencies)),
    Listener = maps:map(fun(K, V) -> V - maps:get(K, Before, 0) end,
                        maps:with([handshake_failures, throttled_handshakes], After)),
    #{latencies => Latencies, counts => Counts, micros => Micros + ?RAMP_MS * 1000,
      cpu => cpu_share(Cpu0, Cpu1, Micros), listener => Listener}.

%% On the caller: `Calls' calls to T's echo server, one every `Interval' ms, each in
%% its own process; returns their round trips in us, sorted.
-spec calls(node(), pos_integer(), pos_integer()) -> [non_neg_integer()].
calls(T, Calls, Interval) ->
    Self = self(),
    Origin = erlang:monotonic_time(microsecond) + 1000,
    lists:foreach(
      fun(I) ->
              At = Origin + I * Interval * 1000,
              Wait = At - erlang:monotonic_time(microsecond),
              _ = Wait > 0 andalso timer:sleep((Wait + 999) div 1000),
              spawn(fun() ->
                            Started = erlang:monotonic_time(microsecond),
                            ping = teleport:gs_call({?SERVER, T}, {echo, ping}, ?CALL_TIMEOUT),
                            Self ! {latency, erlang:monotonic_time(microsecond) - Started}
                    end)
      end, lists:seq(0, Calls - 1)),
    lists:sort([receive {latency, Us} -> Us after ?CALL_TIMEOUT -> error(call_lost) end
                || _ <- lists:seq(1, Calls)]).

%%====================================================================
%% The flood (on F)
%%====================================================================

%% Starts `Clients' flooding processes; returns a handle for flood_stop/1.
-spec flood_start({inet:ip_address(), inet:port_number()}, binary(), inet:ip_address(),
                  pos_integer()) -> {atomics:atomics_ref(), [pid()], integer()}.
flood_start(Address, First, Source, Clients) ->
    %% made, answered, refused (closed unanswered), connect errors; 5: stop.
    Counters = atomics:new(5, []),
    Pids = [spawn(?MODULE, flood_client, [Address, First, Source, Counters, self()])
            || _ <- lists:seq(1, Clients)],
    {Counters, Pids, erlang:monotonic_time(microsecond)}.

-spec flood_stop({atomics:atomics_ref(), [pid()], integer()}) -> map().
flood_stop({Counters, Pids, T0}) ->
    atomics:put(Counters, 5, 1),
    Refs = [monitor(process, Pid) || Pid <- Pids],
    [receive {'DOWN', Ref, process, _, _} -> ok after 10000 -> error(flood_client_stuck) end
     || Ref <- Refs],
    Seconds = (erlang:monotonic_time(microsecond) - T0) / 1.0e6,
    [Made, Answered, Refused, Errors] = [atomics:get(Counters, I) || I <- [1, 2, 3, 4]],
    #{made => Made, answered => Answered, refused => Refused, connect_errors => Errors,
      seconds => Seconds}.

%% @private
flood_client({Ip, Port} = Address, First, Source, Counters, Owner) ->
    case atomics:get(Counters, 5) of
        1 ->
            ok;
        0 ->
            Opts = [binary, {active, false}, {ip, Source}, {linger, {true, 0}}, {nodelay, true}],
            case gen_tcp:connect(Ip, Port, Opts, 5000) of
                {ok, S} ->
                    atomics:add(Counters, 1, 1),
                    Outcome = case gen_tcp:send(S, First) of
                                  ok -> gen_tcp:recv(S, 0, 5000);
                                  Error -> Error
                              end,
                    case Outcome of
                        {ok, _} -> atomics:add(Counters, 2, 1);
                        {error, _} -> atomics:add(Counters, 3, 1)
                    end,
                    gen_tcp:close(S);
                {error, _} ->
                    atomics:add(Counters, 4, 1),
                    timer:sleep(1)
            end,
            flood_client(Address, First, Source, Counters, Owner)
    end.

%%====================================================================
%% CPU of T's threads
%%====================================================================

%% Clock ticks of user + system time per thread group of OS process `OsPid'.
cpu(OsPid) ->
    Tasks = filelib:wildcard("/proc/" ++ OsPid ++ "/task/*/stat"),
    lists:foldl(fun(Path, Acc) ->
                        case file:read_file(Path) of
                            {ok, Stat} ->
                                {Name, Ticks} = name_and_ticks(binary_to_list(Stat)),
                                maps:update_with(group(Name), fun(T) -> T + Ticks end, Ticks,
                                                 Acc#{vm => maps:get(vm, Acc, 0) + Ticks});
                            {error, _} ->
                                Acc
                        end
                end, #{}, Tasks).

name_and_ticks(Stat) ->
    [Head, Tail] = string:split(Stat, ")", trailing),
    [_, Name] = string:split(Head, "("),
    %% Tail starts at field 3; utime and stime are fields 14 and 15.
    Fields = string:lexemes(Tail, " "),
    {Name, list_to_integer(lists:nth(12, Fields)) + list_to_integer(lists:nth(13, Fields))}.

group("teleport-io" ++ _) -> io;
group("teleport-hs" ++ _) -> hs;
group(_) -> other.

%% Percent of one core per group over `Micros'.
cpu_share(Cpu0, Cpu1, Micros) ->
    Hz = 100,
    maps:from_list([{G, 100 * (maps:get(G, Cpu1, 0) - maps:get(G, Cpu0, 0)) / Hz / (Micros / 1.0e6)}
                    || G <- [io, hs, vm]]).

%%====================================================================
%% Report
%%====================================================================

report(Kind, P, Conditions, Results) ->
    lists:foreach(
      fun({Cond, Round, #{latencies := L, counts := C, micros := Micros, cpu := Cpu,
                          listener := Listener}}) ->
              Flood = case C of
                          #{made := Made, answered := Ans, refused := Ref, seconds := S} ->
                              io_lib:format("; flood ~b conn/s (answered ~b/s, refused ~b/s, "
                                            "connect errors ~b)",
                                            [round(Made / S), round(Ans / S), round(Ref / S),
                                             maps:get(connect_errors, C)]);
                          #{} ->
                              ""
                      end,
              line("flood ~p ~p round ~b: p50 ~b us, p99 ~b us, max ~b us~s; T's CPU: io ~.1f%, "
                   "hs ~.1f%, VM ~.1f%; listener over ~b ms: ~0p",
                   [Kind, Cond, Round, percentile(L, 50), percentile(L, 99), lists:last(L), Flood,
                    maps:get(io, Cpu), maps:get(hs, Cpu), maps:get(vm, Cpu), Micros div 1000,
                    Listener])
      end, Results),
    lists:foreach(
      fun(Cond) ->
              P99s = [percentile(L, 99) || {C, _, #{latencies := L}} <- Results, C =:= Cond],
              Sorted = lists:sort(P99s),
              line("bench handshake_flood ~p ~p calls=~b interval_ms=~b clients=~b: "
                   "p99 per round ~w us, median ~b us, worst ~b us",
                   [Kind, Cond, maps:get(calls, P), maps:get(interval_ms, P),
                    maps:get(clients, P), P99s, percentile(Sorted, 50), lists:last(Sorted)])
      end, Conditions).

line(Format, Args) ->
    Line = lists:flatten(io_lib:format(Format, Args)),
    ct:pal("~s", [Line]),
    io:format(user, "~s~n", [Line]).

%% The nearest-rank percentile of a sorted, non-empty list.
percentile(Sorted, Pct) ->
    lists:nth(max(1, (Pct * length(Sorted) + 99) div 100), Sorted).

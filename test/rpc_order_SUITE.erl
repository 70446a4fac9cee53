%%% @doc teleport_rpc's `{Node, Key}' destinations: requests to one key run
%%% on the node one at a time, in the order sent (casts and calls, sync and
%%% async, from one process or several through one key); different keys run
%%% side by side; a key held by a request that never ends holds only that key;
%%% and nothing waits forever when the relay holding a key's queue dies.
%%%
%%% Each request appends to a log on B (an ets table: one atomic counter per
%%% key gives each append its place), after a random pause of up to a few ms,
%%% so that requests run side by side would finish out of order.
-module(rpc_order_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([casts_in_order/1, calls_and_casts_in_order/1, requests_in_order/1,
         keys_side_by_side/1, held_key/1, relays_killed/1, unkeyed_not_ordered/1]).
%% Run on B.
-export([start_log/0, log_owner/0, append/3, appended/1, hold/1, relay_of/1, relay_name/1]).

-define(LOG, rpc_order_log).

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [casts_in_order, calls_and_casts_in_order, requests_in_order, keys_side_by_side,
     held_key, relays_killed, unkeyed_not_ordered].

init_per_suite(Config) ->
    case teleport_test_peer:start_local_teleport("rpc_order") of
        ok -> Config;
        {skip, _} = Skip -> Skip
    end.

end_per_suite(_Config) ->
    teleport_test_peer:stop_local_teleport().

init_per_testcase(Case, Config) ->
    {ok, Peer, B} = teleport_test_peer:start(teleport_test_peer:unique_name(atom_to_list(Case))),
    ok = erpc:call(B, ?MODULE, start_log, []),
    [{peer, Peer}, {b, B} | Config].

end_per_testcase(_Case, Config) ->
    teleport_test_peer:stop(?config(peer, Config)).

%%====================================================================
%% Cases
%%====================================================================

%% 4 keys x 500 casts from one process, interleaved: each key's in order.
casts_in_order(Config) ->
    B = ?config(b, Config),
    Keys = [k1, k2, {k, 3}, <<"k4">>],
    N = 500,
    [ok = teleport_rpc:cast({B, K}, ?MODULE, append, [K, I, 3]) || I <- lists:seq(1, N), K <- Keys],
    [?assertEqual(lists:seq(1, N), wait_appended(B, K, N)) || K <- Keys].

%% Casts, then a call, to one key: the call runs after every cast before it.
calls_and_casts_in_order(Config) ->
    B = ?config(b, Config),
    [ok = teleport_rpc:cast({B, k}, ?MODULE, append, [k, I, 5]) || I <- lists:seq(1, 50)],
    ?assertEqual(lists:seq(1, 51), teleport_rpc:call({B, k}, ?MODULE, append, [k, 51, 0])),
    [ok = teleport_rpc:cast({B, k}, ?MODULE, append, [k, I, 5]) || I <- lists:seq(52, 60)],
    ?assertEqual(lists:seq(1, 61), teleport_rpc:call({B, k}, ?MODULE, append, [k, 61, 0], 10000)).

%% send_request, cast, multicall and call through one key from one process, and
%% several processes each through its own key at once.
requests_in_order(Config) ->
    B = ?config(b, Config),
    R1 = teleport_rpc:send_request({B, k}, ?MODULE, append, [k, 1, 5]),
    ok = teleport_rpc:cast({B, k}, ?MODULE, append, [k, 2, 5]),
    R3 = teleport_rpc:send_request({B, k}, ?MODULE, append, [k, 3, 5], r3, teleport_rpc:reqids_new()),
    [{ok, _}] = teleport_rpc:multicall([{B, k}], ?MODULE, append, [k, 4, 5]),
    ok = teleport_rpc:multicast([{B, k}], ?MODULE, append, [k, 5, 5]),
    ?assertEqual([1, 2, 3, 4, 5, 6], teleport_rpc:call({B, k}, ?MODULE, append, [k, 6, 0])),
    ?assertEqual([1], teleport_rpc:receive_response(R1, 5000)),
    ?assertMatch({[1, 2, 3], r3, _}, teleport_rpc:receive_response(R3, 5000, true)),
    Self = self(),
    Pids = [spawn_link(fun() ->
                               Key = {proc, P},
                               [teleport_rpc:cast({B, Key}, ?MODULE, append, [Key, I, 2])
                                || I <- lists:seq(1, 100)],
                               Self ! {done, self(), teleport_rpc:call({B, Key}, ?MODULE, append,
                                                                       [Key, 101, 0])}
                       end) || P <- lists:seq(1, 8)],
    [receive {done, Pid, Got} -> ?assertEqual(lists:seq(1, 101), Got)
     after 30000 -> ct:fail(no_result)
     end || Pid <- Pids].

%% A key held by a request that waits keeps other keys free: a call to
%% another key completes while the first is held (it would wait forever if
%% keys shared a queue).
keys_side_by_side(Config) ->
    B = ?config(b, Config),
    Held = teleport_rpc:send_request({B, slow}, ?MODULE, hold, [held]),
    wait_held(B, held),
    ?assertEqual([1], teleport_rpc:call({B, other}, ?MODULE, append, [other, 1, 0], 10000)),
    ?assertEqual(B, teleport_rpc:call(B, erlang, node, [], 10000)),
    release(B, held),
    ?assertEqual(released, teleport_rpc:receive_response(Held, 10000)).

%% Requests behind a held one on its key wait for it: a call times out, casts
%% queue; once released, they all run, in order.
held_key(Config) ->
    B = ?config(b, Config),
    Held = teleport_rpc:send_request({B, k}, ?MODULE, hold, [held]),
    wait_held(B, held),
    [ok = teleport_rpc:cast({B, k}, ?MODULE, append, [k, I, 0]) || I <- lists:seq(1, 5)],
    ?assertEqual({error, {erpc, timeout}},
                 outcome(fun() -> teleport_rpc:call({B, k}, ?MODULE, append, [k, 6, 0], 300) end)),
    ?assertEqual([], erpc:call(B, ?MODULE, appended, [k])),
    release(B, held),
    ?assertEqual(released, teleport_rpc:receive_response(Held, 10000)),
    %% The timed-out call still ran, in its place (as with erpc, a call that
    %% timed out may run).
    ?assertEqual(lists:seq(1, 7), teleport_rpc:call({B, k}, ?MODULE, append, [k, 7, 0], 10000)).

%% The relays on B die (killed) while one key is held with requests queued
%% behind it: every wait still ends (the queued call's worker runs once its
%% relay is gone; casts the killed relay held are lost with it, as a killed
%% process's messages are), and the key serves new requests.
relays_killed(Config) ->
    B = ?config(b, Config),
    Held = teleport_rpc:send_request({B, k}, ?MODULE, hold, [held]),
    wait_held(B, held),
    Queued = teleport_rpc:send_request({B, k}, ?MODULE, append, [k, queued, 0]),
    ok = teleport_rpc:cast({B, k}, ?MODULE, append, [k, cast, 0]),
    Relay = erpc:call(B, ?MODULE, relay_of, [k]),
    true = teleport_test_peer:wait_until(
             fun() -> erpc:call(B, erlang, process_info, [Relay, message_queue_len])
                          =:= {message_queue_len, 0} end, 10000),
    timer:sleep(200),
    erpc:call(B, erlang, exit, [Relay, kill]),
    %% The queued call ran (its worker saw the relay go) or was lost with the
    %% relay: an outcome either way, and soon.
    QueuedOutcome = outcome(fun() -> teleport_rpc:receive_response(Queued, 20000) end),
    ct:pal("queued call after its relay was killed: ~p", [QueuedOutcome]),
    ?assertMatch({ok, [queued]}, QueuedOutcome),
    release(B, held),
    ?assertEqual(released, teleport_rpc:receive_response(Held, 10000)),
    true = teleport_test_peer:wait_until(
             fun() -> is_pid(erpc:call(B, erlang, whereis, [erpc:call(B, ?MODULE, relay_name, [k])])) end,
             10000),
    ?assertMatch([queued | _], teleport_rpc:call({B, k}, ?MODULE, append, [k, after_restart, 0], 10000)).

%% Without a key the same casts are not kept in order (shown, not asserted: it
%% is a property of the machine's scheduling), so that the cases above could
%% fail.
unkeyed_not_ordered(Config) ->
    B = ?config(b, Config),
    N = 500,
    [ok = teleport_rpc:cast(B, ?MODULE, append, [nokey, I, 3]) || I <- lists:seq(1, N)],
    Got = wait_appended(B, nokey, N),
    ?assertEqual(lists:seq(1, N), lists:sort(Got)),
    ct:pal("unkeyed casts: ~b of ~b ran out of the order sent",
           [length([x || {X, Y} <- lists:zip(Got, lists:seq(1, N)), X =/= Y]), N]).

%%====================================================================
%% Helpers
%%====================================================================

wait_appended(B, Key, N) ->
    true = teleport_test_peer:wait_until(
             fun() -> length(erpc:call(B, ?MODULE, appended, [Key])) >= N end, 60000),
    erpc:call(B, ?MODULE, appended, [Key]).

wait_held(B, Name) ->
    true = teleport_test_peer:wait_until(
             fun() -> is_pid(erpc:call(B, erlang, whereis, [Name])) end, 10000).

release(B, Name) ->
    erpc:call(B, erlang, send, [Name, release]).

outcome(Fun) ->
    try {ok, Fun()}
    catch Class:Reason -> {Class, Reason}
    end.

%%% On B

start_log() ->
    Self = self(),
    Owner = spawn(?MODULE, log_owner, []),
    Owner ! {ready, Self},
    receive {Owner, ready} -> ok after 5000 -> error(no_log) end.

log_owner() ->
    ?LOG = ets:new(?LOG, [named_table, public, ordered_set]),
    receive {ready, From} -> From ! {self(), ready} end,
    receive stop -> ok end.

%% Appends `Value' to `Key''s log after a random pause of up to `MaxMs' ms;
%% returns the key's log as it is then.
append(Key, Value, MaxMs) ->
    _ = MaxMs > 0 andalso timer:sleep(rand:uniform(MaxMs + 1) - 1),
    Seq = ets:update_counter(?LOG, {seq, Key}, 1, {{seq, Key}, 0}),
    true = ets:insert(?LOG, {{entry, Key, Seq}, Value}),
    appended(Key).

appended(Key) ->
    [V || [V] <- ets:match(?LOG, {{entry, Key, '_'}, '$1'})].

%% Registers as `Name' and waits for `release'.
hold(Name) ->
    true = register(Name, self()),
    receive release -> released end.

%% The relay `{Node, Key}' requests for `Key' reach: the NIF hashes the slot
%% `{'$teleport_key', Key}' over the relays' names.
relay_of(Key) ->
    whereis(relay_name(Key)).

relay_name(Key) ->
    Names = teleport_call_relay:names(),
    lists:nth(erlang:phash2({'$teleport_key', Key}) rem length(Names) + 1, Names).

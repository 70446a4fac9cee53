%%% @doc A cluster of two Erlang/OTP releases, as a rolling upgrade makes one: this
%%% node (the release running the tests) and a peer node running another release's
%%% `erl', named by the environment variable `TELEPORT_PEER_ERL' (an executable that
%%% takes erl's arguments and has that release's build of teleport and of these test
%%% modules in its code path; `scripts/otp_matrix.sh' writes one per release, running
%%% that release's erl in its root file system, on the same loopback and epmd). Without
%%% the variable the suite is skipped.
%%%
%%% <ul>
%%% <li>`releases': prints both releases and both encoders' findings
%%%     (`teleport_nif:encoder_info/0'); the atom forms differ where one release is
%%%     25 and the other 26 or later.</li>
%%% <li>`terms_here_to_peer_and_back': every term type (atoms Latin-1 and UTF-8,
%%%     short and 255 characters, pids, refs, aliases, ports, funs local and
%%%     external, bignums, floats, small and large maps, binaries small, large and
%%%     sub, bitstrings, improper lists, strings, deep nesting) plus ~1,000 random
%%%     terms, made here, sent with teleport to an echo on the peer, which sends
%%%     each back with teleport: every one arrives `=:='.</li>
%%% <li>`terms_peer_to_here_and_back': the same made on the peer (its pids, refs,
%%%     ports, funs and its release's encoding), sent to an echo here and back.
%%%     The peer also returns its terms over disterl: what arrives here by each
%%%     way is `=:='.</li>
%%% <li>`large_maps_both_ways': maps of 1,000 to 100,000 keys, both ways.</li>
%%% <li>`gs_call_both_ways': `teleport:gs_call/3' from here to a gen_server on the
%%%     peer and from the peer to one here, with replies of every kind above.</li>
%%% <li>`native_records_by_release': where one side is OTP 29 or later (native
%%%     records) and the other older, a record sent to the older one, alone or deep
%%%     in a message, is refused by the sender with `{error, unsupported_by_peer}'
%%%     (the older VM could not build it), and the connection carries the next
%%%     message; as a gs_call request it exits with that reason.</li>
%%% </ul>
-module(mixed_release_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1]).
-export([releases/1, terms_here_to_peer_and_back/1, terms_peer_to_here_and_back/1,
         large_maps_both_ways/1, gs_call_both_ways/1, native_records_by_release/1]).
%% Run on the peer (compiled by its release).
-export([release_info/0, terms/2, round_trip/3, watch_origin/1,
         peer_round_trip/3, peer_send/2, peer_maps_round_trip/1, peer_calls/2,
         peer_records_to/2]).

-define(RPC_TIMEOUT, 120000).
-define(MSG_TIMEOUT, 120000).
-define(RANDOM_TERMS, 1000).
-define(SERVER, teleport_mixed_server).
-define(MiB, 1048576).

suite() ->
    [{timetrap, {minutes, 10}}].

all() ->
    [releases, terms_here_to_peer_and_back, terms_peer_to_here_and_back,
     large_maps_both_ways, gs_call_both_ways, native_records_by_release].

init_per_suite(Config) ->
    case os:getenv("TELEPORT_PEER_ERL") of
        Unset when Unset =:= false; Unset =:= "" ->
            {skip, "TELEPORT_PEER_ERL is not set: it names another Erlang/OTP release's erl "
                   "to start the peer with (scripts/otp_matrix.sh sets it)"};
        Erl ->
            case teleport_test_peer:start_local_teleport("mixed_ct") of
                ok -> start_suite(Erl, Config);
                {fail, _} = Fail -> Fail
            end
    end.

native_records_by_release(Config) ->
    Node = ?config(node, Config),
    Here = teleport_test_terms:native_records(),
    There = erpc:call(Node, teleport_test_terms, native_records, [], ?RPC_TIMEOUT),
    ct:pal("native records: here ~p, on the peer ~p", [Here, There]),
    {ok, Sink} = teleport_rel_remote:spawn_sink(mixed_record_sink, self()),
    try records_by_release(Node, Here, There)
    after exit(Sink, kill)
    end.

records_by_release(Node, Here, There) ->
    case {Here, There} of
        {false, true} ->
            Results = erpc:call(Node, ?MODULE, peer_records_to, [node(), mixed_record_sink],
                                ?RPC_TIMEOUT),
            ?assertEqual([{error, unsupported_by_peer}, {error, unsupported_by_peer},
                          ok, call_refused], Results),
            %% Only the plain message arrived.
            receive {rel_sink, _, Got} -> ct:pal("arrived: ~p", [Got]) after 10000 -> ct:fail(nothing_arrived) end,
            receive {rel_sink, _, More} -> ct:fail({arrived_too, More}) after 500 -> ok end;
        {Same, Same} ->
            %% Nothing to refuse between these two releases.
            {comment, "both releases alike"};
        {true, false} ->
            ct:fail(run_the_newer_release_as_the_peer)
    end.

%% On the peer: a record alone and deep in a message to `Name' on `Node', then a
%% plain message, then a gs_call with a record in its request.
-spec peer_records_to(node(), atom()) -> list().
peer_records_to(Node, Name) ->
    Record = teleport_test_terms:record(mixed, pt, [{x, 1}]),
    Alone = teleport:send({Name, Node}, Record),
    Deep = teleport:send({Name, Node}, {a, [#{k => [Record]}]}),
    Plain = teleport:send({Name, Node}, plain_after_records),
    Call = try teleport:gs_call({?SERVER, Node}, {echo, Record}, 10000) of
               _ -> call_answered
           catch
               exit:{unsupported_by_peer, _} -> call_refused
           end,
    [Alone, Deep, Plain, Call].

start_suite(Erl, Config) ->
    {ok, Peer, Node} = start_peer(Erl, teleport_test_peer:unique_name("mixed_peer")),
    try
        {ok, _} = erpc:call(Node, application, ensure_all_started, [teleport], ?RPC_TIMEOUT),
        {ok, _} = erpc:call(Node, teleport_test_server, start, [?SERVER], ?RPC_TIMEOUT),
        {ok, _} = teleport_test_server:start(?SERVER)
    catch
        Class:Reason:Stack ->
            stop_peer(Peer),
            erlang:raise(Class, Reason, Stack)
    end,
    Seed = teleport_test_peer:seed("MIXED_RELEASE_SUITE_SEED"),
    ct:pal("mixed_release_SUITE seed ~p (replay: MIXED_RELEASE_SUITE_SEED=\"~b,~b,~b\")",
           [Seed | tuple_to_list(Seed)]),
    [{peer, Peer}, {node, Node}, {seed, Seed} | Config].

end_per_suite(Config) ->
    stop_peer(?config(peer, Config)),
    _ = [gen_server:stop(Pid) || Pid <- [whereis(?SERVER)], is_pid(Pid)],
    teleport_test_peer:stop_local_teleport().

%% The peer is started without the `peer' module: its protocol between origin and
%% peer differs between releases (a 29 peer's `{starting, Node}' is unknown to 25's).
%% A process of its own owns the port (it outlives init_per_suite's) and prints what
%% the node writes.
start_peer(Erl, Name) ->
    Node = list_to_atom(Name ++ "@127.0.0.1"),
    Args = ["-name", atom_to_list(Node), "-setcookie", atom_to_list(erlang:get_cookie()),
            "-start_epmd", "false", "-noshell", "-noinput"],
    Parent = self(),
    Owner = spawn(fun() ->
                          Port = open_port({spawn_executable, Erl},
                                           [{args, Args}, exit_status, stderr_to_stdout,
                                            {line, 1024}]),
                          {os_pid, OsPid} = erlang:port_info(Port, os_pid),
                          Parent ! {peer_port, self(), OsPid},
                          peer_owner(Port, OsPid, Node)
                  end),
    OsPid = receive {peer_port, Owner, P} -> P end,
    Up = teleport_test_peer:wait_until(fun() -> net_adm:ping(Node) =:= pong end, 120000),
    case Up of
        true ->
            %% If this node dies without stopping it, the peer halts itself.
            _ = erpc:call(Node, erlang, spawn, [?MODULE, watch_origin, [node()]], ?RPC_TIMEOUT),
            ct:pal("peer ~s is up (OS pid ~b, ~s)", [Node, OsPid, Erl]),
            {ok, Owner, Node};
        false ->
            stop_peer(Owner),
            ct:fail({peer_not_up, Node, Erl})
    end.

peer_owner(Port, OsPid, Node) ->
    receive
        {Port, {data, {_, Line}}} ->
            ct:log("~s: ~s", [Node, Line]),
            peer_owner(Port, OsPid, Node);
        {Port, {exit_status, Status}} ->
            ct:log("~s exited with status ~b", [Node, Status]);
        {stop, From} ->
            %% halt/0 does not return: the call ends with the connection.
            _ = spawn(fun() -> catch_all(fun() -> erpc:call(Node, erlang, halt, [], 5000) end) end),
            receive
                {Port, {exit_status, _}} -> ok
            after 10000 ->
                ct:pal("~s (OS pid ~b) did not halt: killing it", [Node, OsPid]),
                _ = os:cmd("kill -KILL " ++ integer_to_list(OsPid)),
                catch_all(fun() -> port_close(Port) end)
            end,
            From ! {stopped, self()}
    end.

stop_peer(Owner) ->
    Ref = monitor(process, Owner),
    Owner ! {stop, self()},
    receive
        {stopped, Owner} -> demonitor(Ref, [flush]), ok;
        {'DOWN', Ref, process, Owner, _} -> ok
    after 20000 -> ok
    end.

catch_all(F) ->
    try F() catch _:_ -> ok end.

%%====================================================================
%% Cases
%%====================================================================

releases(Config) ->
    Node = ?config(node, Config),
    Here = release_info(),
    There = erpc:call(Node, ?MODULE, release_info, [], ?RPC_TIMEOUT),
    ct:pal("here:    ~p~npeer ~s: ~p", [Here, Node, There]),
    #{otp := HereOtp, encoder := #{atoms := HereAtoms}} = Here,
    #{otp := ThereOtp, encoder := #{atoms := ThereAtoms}} = There,
    case os:getenv("TELEPORT_PEER_RELEASE") of
        false -> ok;
        Expected -> ?assertEqual(list_to_integer(Expected), ThereOtp)
    end,
    %% Each writes atoms as its own term_to_binary/1 does.
    ?assertEqual(atoms_of(HereOtp), HereAtoms),
    ?assertEqual(atoms_of(ThereOtp), ThereAtoms),
    [?assertMatch(#{tags := on}, E) || #{encoder := E} <- [Here, There]],
    ok.

terms_here_to_peer_and_back(Config) ->
    Node = ?config(node, Config),
    Terms = terms(erpc:call(Node, decoder_SUITE, peer_context, [], ?RPC_TIMEOUT),
                  ?config(seed, Config)),
    {ok, Echo} = teleport_test_peer:start_echo(Node, self()),
    try
        ?assertEqual({ok, length(Terms)}, round_trip(Echo, Terms, ?MSG_TIMEOUT))
    after
        exit(Echo, kill)
    end.

terms_peer_to_here_and_back(Config) ->
    Node = ?config(node, Config),
    %% The peer makes its terms (with pids, refs and ports of both nodes), sends them
    %% to an echo here and checks what comes back; it returns them over disterl too.
    {Result, Terms} = erpc:call(Node, ?MODULE, peer_round_trip,
                                [node(), decoder_SUITE:peer_context(), ?config(seed, Config)],
                                ?RPC_TIMEOUT),
    ?assertEqual({ok, length(Terms)}, Result),
    %% The same terms sent here by the peer with teleport: each =:= what disterl brought.
    {ok, Sent} = erpc:call(Node, ?MODULE, peer_send, [self(), Terms], ?RPC_TIMEOUT),
    ?assertEqual(length(Terms), Sent),
    ?assertEqual(length(Terms), received_equal(Terms)).

large_maps_both_ways(Config) ->
    Node = ?config(node, Config),
    Maps = [maps:from_list([{K, {K, <<I:32>>}} || {I, K} <- keys(N)]) || N <- [1000, 10000, 100000]],
    {ok, Echo} = teleport_test_peer:start_echo(Node, self()),
    try
        ?assertEqual({ok, 3}, round_trip(Echo, Maps, ?MSG_TIMEOUT))
    after
        exit(Echo, kill)
    end,
    ?assertEqual({ok, 2}, erpc:call(Node, ?MODULE, peer_maps_round_trip, [node()], ?RPC_TIMEOUT)).

gs_call_both_ways(Config) ->
    Node = ?config(node, Config),
    Ctx = erpc:call(Node, decoder_SUITE, peer_context, [], ?RPC_TIMEOUT),
    Replies = lists:sublist(terms(Ctx, ?config(seed, Config)), 200),
    %% Here -> a gen_server on the peer: the request goes there, the reply comes back.
    [?assert(teleport:gs_call({?SERVER, Node}, {echo, T}, ?MSG_TIMEOUT) =:= T) || T <- Replies],
    ?assertEqual(Node, teleport:gs_call({?SERVER, Node}, whoami, ?MSG_TIMEOUT)),
    %% The peer -> the gen_server here.
    ?assertEqual({ok, node(), length(Replies)},
                 erpc:call(Node, ?MODULE, peer_calls, [node(), Replies], ?RPC_TIMEOUT)),
    %% Errors cross too.
    ?assertExit({noproc, _}, teleport:gs_call({nobody_here, Node}, x, 5000)),
    ok.

%%====================================================================
%% Run on the peer (its release's build of this module)
%%====================================================================

%% @private Halts this node when `Origin' goes down.
watch_origin(Origin) ->
    true = erlang:monitor_node(Origin, true),
    receive {nodedown, Origin} -> erlang:halt() end.

%% @private Makes terms here, sends them to an echo on `Origin' and back.
peer_round_trip(Origin, Ctx, Seed) ->
    Terms = terms(Ctx, Seed),
    {ok, Echo} = erpc:call(Origin, teleport_test_peer, echo_spawn, [self()], ?RPC_TIMEOUT),
    try
        {round_trip(Echo, Terms, ?MSG_TIMEOUT), Terms}
    after
        erpc:call(Origin, erlang, exit, [Echo, kill], ?RPC_TIMEOUT)
    end.

%% @private Sends `Terms' to `To' with teleport, numbered.
peer_send(To, Terms) ->
    _ = [ok = teleport:send(To, {mixed_term, I, T}) || {I, T} <- numbered(Terms)],
    {ok, length(Terms)}.

%% @private Large maps made here, to an echo on `Origin' and back.
peer_maps_round_trip(Origin) ->
    Maps = [maps:from_list([{K, [I]} || {I, K} <- keys(N)]) || N <- [1000, 100000]],
    {ok, Echo} = erpc:call(Origin, teleport_test_peer, echo_spawn, [self()], ?RPC_TIMEOUT),
    try
        round_trip(Echo, Maps, ?MSG_TIMEOUT)
    after
        erpc:call(Origin, erlang, exit, [Echo, kill], ?RPC_TIMEOUT)
    end.

%% @private teleport:gs_call/3 to the gen_server on `Origin' with each term, checking
%% each reply.
peer_calls(Origin, Replies) ->
    Bad = [T || T <- Replies,
                not (teleport:gs_call({?SERVER, Origin}, {echo, T}, ?MSG_TIMEOUT) =:= T)],
    case Bad of
        [] -> {ok, teleport:gs_call({?SERVER, Origin}, whoami, ?MSG_TIMEOUT), length(Replies)};
        _ -> {bad_replies, length(Bad), hd(Bad)}
    end.

%%====================================================================
%% Run on either node
%%====================================================================

%% @private
release_info() ->
    #{otp => list_to_integer(erlang:system_info(otp_release)),
      version => erlang:system_info(system_version) -- "\n",
      encoder => teleport_nif:encoder_info(),
      atom_bytes => term_to_binary('café')}.

%% @private Every term type, with the pids, refs and ports of `Ctx' (the other node's
%% `decoder_SUITE:peer_context/0') and of this node, and random terms from `Seed'.
terms({Pids, Refs, Ports}, Seed) ->
    _ = rand:seed(exsss, Seed),
    Captured = {self(), 7},
    Ctx = #{pids => [self(), whereis(init), spawn(fun() -> ok end) | Pids],
            refs => [make_ref(), alias() | Refs],
            ports => lists:sublist(erlang:ports(), 2) ++ Ports,
            funs => [fun(X) -> {X, Captured} end, fun() -> ok end, fun lists:reverse/1,
                     fun ?MODULE:terms/2],
            pool => crypto:strong_rand_bytes(?MiB)},
    Bin = crypto:strong_rand_bytes(3 * ?MiB),
    <<_:3, Bits:1001/bits, _/bits>> = Bin,
    Fixed = [abc, '', 'café', 'ÿ', '日本語', 'ünïcödé', list_to_atom(lists:duplicate(255, $a)),
             list_to_atom(lists:duplicate(255, 233)), list_to_atom(lists:duplicate(255, 12354)),
             {self(), make_ref(), alias(), hd(erlang:ports())},
             1 bsl 64, -(1 bsl 64), 1 bsl 1000, -(1 bsl 4000) + 1, 255, 256, -1, 1 bsl 59,
             1.5, -0.0, 0.0, 1.0e308, 5.0e-324,
             #{}, #{a => 1, 'é' => 2, '日' => 3, 1 => x, <<"k">> => [v]},
             maps:from_list([{{k, I}, I} || I <- lists:seq(1, 40)]),
             <<>>, <<"small">>, Bin, binary:part(Bin, 10, ?MiB), Bits, <<1:1>>,
             [1 | 2], [a, b | c], [alias | make_ref()], "string", lists:duplicate(70000, $x),
             [{}, {{}}, [[]]], lists:foldl(fun(_, A) -> [A] end, [], lists:seq(1, 10000))],
    Fixed ++ decoder_SUITE:fixed_terms(Ctx)
        ++ [decoder_SUITE:gen_top(Ctx) || _ <- lists:seq(1, ?RANDOM_TERMS)].

%% @private Sends every term to `Echo' with teleport and checks that each comes back
%% `=:='; `{ok, Count}' or the first failure.
round_trip(Echo, Terms, Timeout) ->
    Tags = [begin
                Tag = make_ref(),
                ok = teleport:send(Echo, {Tag, T}),
                {Tag, T}
            end || T <- Terms],
    check_echoes(Echo, Tags, Timeout, 0).

check_echoes(_Echo, [], _Timeout, N) ->
    {ok, N};
check_echoes(Echo, [{Tag, T} | Rest], Timeout, N) ->
    receive
        {teleport_ct_echo, Echo, {Tag, Got}} when Got =:= T ->
            check_echoes(Echo, Rest, Timeout, N + 1);
        {teleport_ct_echo, Echo, {Tag, Got}} ->
            {differs, N, T, Got};
        {teleport_ct_echo_error, Echo, Error} ->
            {echo_error, N, Error}
    after Timeout ->
        {timeout, N, T}
    end.

%%====================================================================
%% Helpers
%%====================================================================

atoms_of(Otp) when Otp >= 26 -> utf8;
atoms_of(_) -> latin1.

keys(N) ->
    [{I, case I rem 3 of
             0 -> I;
             1 -> {k, I};
             2 -> integer_to_binary(I)
         end} || I <- lists:seq(1, N)].

numbered(Terms) ->
    lists:zip(lists:seq(1, length(Terms)), Terms).

%% How many of the numbered terms that arrive are =:= `Terms'.
received_equal(Terms) ->
    length([ok || {I, T} <- numbered(Terms),
                  receive {mixed_term, I, Got} -> Got =:= T after ?MSG_TIMEOUT -> false end]).

-module(teleport_route_tests).
-include_lib("eunit/include/eunit.hrl").

%% Destinations resolve like erlang:send/2 does: local ones stay local,
%% remote ones name what the peer must look up, anything else is badarg.

local_destinations_test() ->
    ?assertEqual(local, teleport:route(self())),
    ?assertEqual(local, teleport:route(some_name)),
    ?assertEqual(local, teleport:route({some_name, node()})).

remote_destinations_test() ->
    ?assertEqual({remote, 'b@127.0.0.1', srv}, teleport:route({srv, 'b@127.0.0.1'})),
    RemotePid = binary_to_term(remote_pid_ext('b@127.0.0.1')),
    ?assertEqual({remote, 'b@127.0.0.1', RemotePid}, teleport:route(RemotePid)).

bad_destinations_test_() ->
    [?_assertEqual(badarg, teleport:route(D))
     || D <- ["name", {a, "node"}, {"a", b}, {a, b, c}, 42, make_ref(), [a]]].

send_badarg_test_() ->
    [?_assertError(badarg, teleport:send(D, hi)) || D <- ["name", {1, 2}, {a, "n"}]] ++
    [?_assertError(badarg, teleport:send(surely_not_registered_name, hi))].

local_send_delivers_test() ->
    ok = teleport:send(self(), ping),
    ?assertEqual(ping, receive M -> M after 1000 -> timeout end),
    register(teleport_route_tests_proc, self()),
    try
        ok = teleport:send(teleport_route_tests_proc, pong),
        ?assertEqual(pong, receive M2 -> M2 after 1000 -> timeout end)
    after
        unregister(teleport_route_tests_proc)
    end.

%% A pid of another node, built in the external format (NEW_PID_EXT).
remote_pid_ext(Node) ->
    NodeBin = atom_to_binary(Node),
    <<131, 88, 119, (byte_size(NodeBin)), NodeBin/binary, 1:32, 0:32, 1:32>>.

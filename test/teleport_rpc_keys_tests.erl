%% The per-key queues of `{Node, Key}' requests (teleport_rpc_keys).
-module(teleport_rpc_keys_tests).
-include_lib("eunit/include/eunit.hrl").

%% Each key's requests come out in the order pushed; the head is the one to
%% run; a request taken out of the middle is skipped; keys do not mix.
order_per_key_test() ->
    [A1, A2, A3, B1] = [make_ref() || _ <- [1, 2, 3, 4]],
    K0 = teleport_rpc_keys:new(),
    {true, K1} = teleport_rpc_keys:push(a, A1, call, K0),
    {false, K2} = teleport_rpc_keys:push(a, A2, {cast, 2}, K1),
    {false, K3} = teleport_rpc_keys:push(a, A3, {cast, 3}, K2),
    {true, K4} = teleport_rpc_keys:push(b, B1, {cast, b}, K3),
    ?assert(teleport_rpc_keys:is_head(A1, K4)),
    ?assertNot(teleport_rpc_keys:is_head(A2, K4)),
    ?assert(teleport_rpc_keys:is_head(B1, K4)),
    ?assertEqual([{a, [{A1, call}, {A2, {cast, 2}}, {A3, {cast, 3}}]}, {b, [{B1, {cast, b}}]}],
                 lists:sort(teleport_rpc_keys:fold(fun(K, Rs, Acc) -> [{K, Rs} | Acc] end, [], K4))),
    %% Out of the middle: no new head.
    {{cast, 2}, none, K5} = teleport_rpc_keys:remove(A2, K4),
    ?assertNot(teleport_rpc_keys:member(A2, K5)),
    %% The head ends: the next is the head.
    {call, {A3, {cast, 3}}, K6} = teleport_rpc_keys:remove(A1, K5),
    ?assert(teleport_rpc_keys:is_head(A3, K6)),
    %% Removing what is not there changes nothing.
    ?assertEqual({none, none, K6}, teleport_rpc_keys:remove(A1, K6)),
    {{cast, 3}, none, K7} = teleport_rpc_keys:remove(A3, K6),
    {{cast, b}, none, K8} = teleport_rpc_keys:remove(B1, K7),
    ?assertEqual(teleport_rpc_keys:new(), K8),
    %% A key emptied starts afresh.
    {true, _} = teleport_rpc_keys:push(a, make_ref(), call, K8).

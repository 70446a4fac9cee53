%%% @doc gen_rpc beside teleport_rpc in tests and benchmarks: finds (or builds,
%%% with scripts/build_gen_rpc.sh) gen_rpc and snabbkaffe from unmodified
%%% sources, gives peers the code path to them, and starts gen_rpc on a set of
%%% nodes, each listening on a port of its own that every node is told of.
-module(teleport_test_gen_rpc).

-export([available/0, code_path_args/0, start/1]).

%% @doc `{ok, [EbinDir]}' when gen_rpc's build is there (TELEPORT_GEN_RPC_DIR, else
%% _build/peers of this checkout, built now if the sources are beside it), with
%% those directories in this node's code path; else `{skip, Why}'.
-spec available() -> {ok, [string()]} | {skip, string()}.
available() ->
    Dir = case os:getenv("TELEPORT_GEN_RPC_DIR") of
              Given when is_list(Given), Given =/= "" -> Given;
              _ -> build()
          end,
    Apps = ["gen_rpc", "snabbkaffe"],
    Ebins = [filename:join([Dir, App, "ebin"]) || App <- Apps],
    case lists:all(fun(App) -> filelib:is_regular(filename:join([Dir, App, "ebin", App ++ ".app"]))
                   end, Apps) of
        true ->
            ok = code:add_pathsa(Ebins),
            {ok, Ebins};
        false ->
            {skip, "gen_rpc is not built (scripts/build_gen_rpc.sh needs its sources in "
                   "../shared/peers, or TELEPORT_GEN_RPC_DIR)"}
    end.

%% The checkout holding this build (the part of teleport's path before
%% "/_build/"), whose script builds gen_rpc; its output directory.
build() ->
    Beam = code:which(teleport),
    case string:split(Beam, "/_build/") of
        [Root, _] ->
            Script = filename:join([Root, "scripts", "build_gen_rpc.sh"]),
            Out = os:cmd(Script ++ " 2>/dev/null"),
            case string:trim(lists:last(["" | string:lexemes(Out, "\n")])) of
                "" -> filename:join([Root, "_build", "peers"]);
                Path -> Path
            end;
        _ ->
            "_build/peers"
    end.

%% @doc `["-pa" | Ebins]' for peers that run gen_rpc (after available/0).
-spec code_path_args() -> [string()].
code_path_args() ->
    case available() of
        {ok, Ebins} -> ["-pa" | Ebins];
        {skip, _} -> []
    end.

%% @doc Starts gen_rpc on every node (this one may be among them), each on a
%% free port, every node told every port.
-spec start([node()]) -> ok.
start(Nodes) ->
    Ports = maps:from_list([{Node, free_port()} || Node <- Nodes]),
    lists:foreach(
      fun(Node) ->
              Call = fun(M, F, A) -> erpc:call(Node, M, F, A, 60000) end,
              _ = Call(application, load, [gen_rpc]),
              ok = Call(application, set_env, [gen_rpc, tcp_server_port, maps:get(Node, Ports)]),
              %% Loopback only.
              ok = Call(application, set_env, [gen_rpc, socket_ip, {127, 0, 0, 1}]),
              ok = Call(application, set_env, [gen_rpc, client_config_per_node, {internal, Ports}]),
              {ok, _} = Call(application, ensure_all_started, [gen_rpc])
      end, Nodes).

free_port() ->
    {ok, Socket} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(Socket),
    ok = gen_tcp:close(Socket),
    Port.

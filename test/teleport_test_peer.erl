%%% @doc Test helpers shared by teleport's Common Test suites: start and stop
%%% peer nodes (on 127.0.0.1, long names) with teleport running in them, make
%%% the test runner's node distributed, and tiny processes that run on the
%%% peers (a "sink" that forwards what it receives back to the origin over
%%% distributed Erlang, and an "echo" that sends everything back with teleport).
%%%
%%% Peers see the same code as the origin: every code path directory that
%%% contains "_build" (teleport's ebin, the compiled test modules) plus the
%%% directory this module was loaded from.
%%%
%%% `start/1,2,3' link the peer to the caller (like `peer:start_link/1'): if the
%%% caller dies, the peer node is halted. A caller that must outlive the peer's
%%% starter (a CT `init_per_suite' process exits when it returns) should
%%% `unlink(Peer)' and call `stop/1' itself.
-module(teleport_test_peer).

-export([start/1, start/2, start/3,
         start_isolated/2, start_isolated/3,
         stop/1,
         ensure_distributed/0, init_per_suite/1,
         start_local_teleport/1, start_local_teleport/2,
         stop_local_teleport/0, stop_local_teleport/1, seed/1,
         code_path_args/0, app_env_from_os/2,
         make_ca/2, make_node_tls/3, tls_env/1,
         unique_name/1,
         connectable/1]).
%% Processes that run on peers.
-export([wait_until/2, thread_policies/0, thread_sleeps/1]).
-export([start_sink/3, sink_spawn/2, sink_loop/1,
         start_echo/2, echo_spawn/1, echo_loop/1]).

-define(BOOT_TIMEOUT, 60000).
-define(RPC_TIMEOUT, 60000).

-type app_env() :: #{atom() => term()}.
-export_type([app_env/0]).

%%--------------------------------------------------------------------
%% Peers

%% @equiv start(Name, [], #{})
-spec start(atom() | string()) -> {ok, pid(), node()} | {error, term()}.
start(Name) ->
    start(Name, [], #{}).

%% @equiv start(Name, ExtraArgs, #{})
-spec start(atom() | string(), [string()]) -> {ok, pid(), node()} | {error, term()}.
start(Name, ExtraArgs) ->
    start(Name, ExtraArgs, #{}).

%% @doc Starts a peer node `Name@127.0.0.1' (long names) linked to the caller,
%% with our cookie and code paths, sets `AppEnv' in the `teleport' application
%% environment and starts teleport in it. On any failure the peer is stopped
%% and `{error, Reason}' returned.
-spec start(atom() | string(), [string()], app_env()) ->
    {ok, pid(), node()} | {error, term()}.
start(Name, ExtraArgs, AppEnv) when is_list(ExtraArgs), is_map(AppEnv) ->
    Args = ["-setcookie", atom_to_list(erlang:get_cookie()),
            %% epmd must already run (the origin is distributed): never start one.
            "-start_epmd", "false"]
        ++ code_path_args() ++ ExtraArgs,
    Opts = #{name => Name, host => "127.0.0.1", longnames => true,
             args => Args, wait_boot => ?BOOT_TIMEOUT},
    start_with_teleport(Name, Opts, AppEnv,
                        fun(_Peer, Node) ->
                                fun(M, F, A) -> erpc:call(Node, M, F, A, ?RPC_TIMEOUT) end
                        end).

%% @equiv start_isolated(Name, Cookie, #{})
-spec start_isolated(atom() | string(), atom() | string()) ->
    {ok, pid(), node()} | {error, term()}.
start_isolated(Name, Cookie) ->
    start_isolated(Name, Cookie, #{}).

%% @doc Starts a peer whose cookie is `Cookie' (normally different from ours),
%% controlled over its standard I/O instead of distributed Erlang, so that
%% `peer:call/4,5' reaches it although distributed Erlang between us cannot.
%% Starts teleport in it with `AppEnv'.
-spec start_isolated(atom() | string(), atom() | string(), app_env()) ->
    {ok, pid(), node()} | {error, term()}.
start_isolated(Name, Cookie, AppEnv) when is_map(AppEnv) ->
    Args = ["-setcookie", cookie_string(Cookie), "-start_epmd", "false"] ++ code_path_args(),
    Opts = #{name => Name, host => "127.0.0.1", longnames => true,
             connection => standard_io, args => Args, wait_boot => ?BOOT_TIMEOUT},
    start_with_teleport(Name, Opts, AppEnv,
                        fun(Peer, _Node) ->
                                fun(M, F, A) -> peer:call(Peer, M, F, A, ?RPC_TIMEOUT) end
                        end).

%% Starts the peer, then teleport in it through the call function `Caller'
%% makes for it; stops the peer again if teleport does not start.
start_with_teleport(Name, Opts, AppEnv, Caller) ->
    case try peer:start_link(Opts) catch C:R -> {C, R} end of
        {ok, Peer, Node} ->
            case setup_teleport(Caller(Peer, Node), AppEnv) of
                ok ->
                    {ok, Peer, Node};
                {error, Reason} ->
                    ok = stop(Peer),
                    {error, {teleport_start_failed, Node, Reason}}
            end;
        Other ->
            {error, {peer_start_failed, Name, Other}}
    end.

%% @doc Stops the peer (halting its node). Never fails, even if it is gone.
-spec stop(pid()) -> ok.
stop(Peer) when is_pid(Peer) ->
    try peer:stop(Peer) of
        _ -> ok
    catch
        _:_ -> ok
    end.

%% @doc The whole init_per_suite of a suite that needs no more than a distributed
%% node: without one the suite fails, never skips (a run without epmd must not pass
%% having run nothing).
-spec init_per_suite(list()) -> list() | {fail, term()}.
init_per_suite(Config) ->
    case ensure_distributed() of
        ok -> Config;
        {fail, _} = Fail -> Fail
    end.

%% @doc Makes this node distributed with long names if it is not already.
%% Does not start epmd: whoever runs the tests provides it (scripts/with_epmd.sh).
%% Returns `{fail, Reason}' when that is impossible, so that a suite's
%% init_per_suite can return it as is: a run without epmd fails, rather than
%% passing having run nothing.
-spec ensure_distributed() -> ok | {fail, term()}.
ensure_distributed() ->
    case node() of
        nonode@nohost ->
            %% Unique: test runs of other checkouts (or chroots) may share this epmd.
            Name = list_to_atom(unique_name("teleport_ct") ++ "@127.0.0.1"),
            case net_kernel:start(Name, #{name_domain => longnames}) of
                {ok, _} ->
                    ok;
                {error, {already_started, _}} ->
                    ok;
                {error, Reason} ->
                    {fail, {not_distributed,
                            "could not make this node distributed as " ++ atom_to_list(Name)
                            ++ " (is epmd running? scripts/with_epmd.sh starts one)",
                            Reason}}
            end;
        Node ->
            case net_kernel:longnames() of
                true ->
                    ok;
                _ ->
                    {fail, {not_longnames, Node,
                            "peers run as name@127.0.0.1 with long names: start the test "
                            "node with -name, or not distributed at all"}}
            end
    end.

%% @doc Makes this node distributed (as `Prefix<unique>@127.0.0.1' if it is not
%% yet: other test runs on the machine share its epmd) and (re)starts teleport in
%% it, listening on 127.0.0.1.
-spec start_local_teleport(string()) -> ok | {fail, term()}.
start_local_teleport(Prefix) ->
    start_local_teleport(Prefix, #{}).

%% @doc As start_local_teleport/1, with `AppEnv' set (persistently) before the start.
-spec start_local_teleport(string(), app_env()) -> ok | {fail, term()}.
start_local_teleport(Prefix, AppEnv) ->
    _ = case node() of
            nonode@nohost ->
                Name = list_to_atom(unique_name(Prefix) ++ "@127.0.0.1"),
                net_kernel:start(Name, #{name_domain => longnames});
            _ ->
                ok
        end,
    case ensure_distributed() of
        ok ->
            _ = application:stop(teleport),
            case application:load(teleport) of
                ok -> ok;
                {error, {already_loaded, teleport}} -> ok
            end,
            [ok = application:set_env(teleport, Key, Value, [{persistent, true}])
             || {Key, Value} <- maps:to_list(AppEnv#{listen_ip => {127, 0, 0, 1}})],
            {ok, _} = application:ensure_all_started(teleport),
            ok;
        {fail, _} = Fail ->
            Fail
    end.

%% @doc Undoes start_local_teleport/1 (the node stays distributed).
-spec stop_local_teleport() -> ok.
stop_local_teleport() ->
    stop_local_teleport(#{}).

%% @doc Undoes start_local_teleport/2 given the same `AppEnv'.
-spec stop_local_teleport(app_env()) -> ok.
stop_local_teleport(AppEnv) ->
    _ = application:stop(teleport),
    _ = [application:unset_env(teleport, Key, [{persistent, true}])
         || Key <- [listen_ip | maps:keys(AppEnv)]],
    ok.

%% @doc A seed for `rand:seed/2': from the environment variable `Var' ("A,B,C") to
%% replay a run, else a fresh one.
-spec seed(string()) -> {integer(), integer(), integer()}.
seed(Var) ->
    case os:getenv(Var) of
        false ->
            {erlang:phash2(make_ref()), erlang:unique_integer([positive]),
             erlang:system_time(microsecond) rem 1000000007};
        Text ->
            [S1, S2, S3] = [list_to_integer(string:trim(S)) || S <- string:lexemes(Text, ",")],
            {S1, S2, S3}
    end.

%% @doc teleport settings for benchmark peers from environment variables: for each
%% key, `Prefix_KEY' (`"BENCH"', pool_size: BENCH_POOL_SIZE), an integer if
%% it is one, else an atom (`tls': `on' makes certificates, see tls_env/1). Unset
%% variables are left out.
-spec app_env_from_os(string(), [atom()]) -> app_env().
app_env_from_os(Prefix, Keys) ->
    maps:from_list([{Key, env_value(Key, Value)}
                    || Key <- Keys,
                       Value <- [os:getenv(Prefix ++ "_" ++ string:uppercase(atom_to_list(Key)))],
                       Value =/= false, Value =/= ""]).

%% `Prefix_TLS=on': the certificates in $TELEPORT_BENCH_TLS_DIR (ca.pem, node.pem,
%% node.key: scripts/bench_tls.sh makes them), else ones made once per OS process in
%% a cache directory (every node of a run shares them: each reads them as it starts).
env_value(tls, "on") ->
    Dir = case os:getenv("TELEPORT_BENCH_TLS_DIR") of
              Given when is_list(Given), Given =/= "" -> Given;
              _ -> filename:join(filename:basedir(user_cache, "teleport_test_tls"), os:getpid())
          end,
    case filelib:is_regular(filename:join(Dir, "node.pem")) of
        true ->
            #{certfile => filename:join(Dir, "node.pem"), keyfile => filename:join(Dir, "node.key"),
              cacertfile => filename:join(Dir, "ca.pem")};
        false ->
            tls_env(Dir)
    end;
env_value(tls, "off") ->
    disabled;
env_value(_Key, Value) ->
    env_value(Value).

env_value(Value) ->
    try list_to_integer(Value)
    catch error:badarg -> list_to_atom(Value)
    end.

%%--------------------------------------------------------------------
%% TLS (the `tls' setting): certificates made with the openssl command.

%% @doc A `tls' setting for test nodes, made in `Dir' (created if missing): a CA and
%% one certificate for 127.0.0.1 (the host of every test node) that all nodes share.
%% For benchmarks over TLS, give the origin and the peers `#{tls => tls_env(Dir)}';
%% `app_env_from_os(Prefix, [tls | _])' does so when `Prefix_TLS' is `on'.
%% Raises if openssl is missing or fails.
-spec tls_env(file:filename()) -> #{certfile := string(), keyfile := string(),
                                    cacertfile := string()}.
tls_env(Dir) ->
    make_node_tls(Dir, make_ca(Dir, "ca"), "node").

%% @doc A CA's key and self-signed certificate (P-256), as `{KeyFile, CertFile}'.
-spec make_ca(file:filename(), string()) -> {string(), string()}.
make_ca(Dir, Name) ->
    ok = filelib:ensure_path(Dir),
    Key = filename:join(Dir, Name ++ ".key"),
    Cert = filename:join(Dir, Name ++ ".pem"),
    openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "30", "-subj", "/CN=teleport test " ++ Name,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", Key, "-out", Cert]),
    {Key, Cert}.

%% @doc A node certificate for 127.0.0.1 and localhost signed by the CA, and the
%% `tls' setting that uses it (and trusts that CA).
-spec make_node_tls(file:filename(), {string(), string()}, string()) ->
    #{certfile := string(), keyfile := string(), cacertfile := string()}.
make_node_tls(Dir, {CaKey, CaCert}, Name) ->
    Key = filename:join(Dir, Name ++ ".key"),
    Csr = filename:join(Dir, Name ++ ".csr"),
    Cert = filename:join(Dir, Name ++ ".pem"),
    Ext = filename:join(Dir, Name ++ ".ext"),
    ok = file:write_file(Ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                              "basicConstraints=CA:FALSE\n"
                              "keyUsage=critical,digitalSignature\n"
                              "extendedKeyUsage=serverAuth,clientAuth\n"),
    openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", "/CN=" ++ Name, "-keyout", Key, "-out", Csr]),
    openssl(["x509", "-req", "-in", Csr, "-CA", CaCert, "-CAkey", CaKey,
             "-CAcreateserial", "-days", "30", "-extfile", Ext, "-out", Cert]),
    #{certfile => Cert, keyfile => Key, cacertfile => CaCert}.

openssl(Args) ->
    Openssl = case os:find_executable("openssl") of
                  false -> erlang:error({openssl_missing, "install openssl to make test certificates"});
                  Path -> Path
              end,
    Port = open_port({spawn_executable, Openssl},
                     [{args, Args}, exit_status, stderr_to_stdout, binary]),
    case collect_port(Port, <<>>) of
        {0, _} -> ok;
        {Status, Output} -> erlang:error({openssl_failed, Args, Status, Output})
    end.

collect_port(Port, Acc) ->
    receive
        {Port, {data, Data}} -> collect_port(Port, <<Acc/binary, Data/binary>>);
        {Port, {exit_status, Status}} -> {Status, Acc}
    after 60000 ->
            erlang:error({openssl, timeout})
    end.

%% @doc `["-pa" | Dirs]': the code paths a peer needs to see our code.
-spec code_path_args() -> [string()].
code_path_args() ->
    Build = [Dir || Dir <- code:get_path(), string:find(Dir, "_build") =/= nomatch],
    Own = [filename:dirname(code:which(?MODULE))],
    Teleport = case code:which(teleport) of
                   Path when is_list(Path) -> [filename:dirname(Path)];
                   _ -> []
               end,
    %% TELEPORT_PEER_EBIN: peers run another build of teleport (benchmarks
    %% against an earlier commit, scripts/build_old_main.sh).
    case os:getenv("TELEPORT_PEER_EBIN") of
        Other when is_list(Other), Other =/= "" ->
            ["-pa" | dedup([Other | (Build ++ Own) -- Teleport])];
        _ ->
            ["-pa" | dedup(Build ++ Teleport ++ Own)]
    end.

%% @doc A node name (without host) that no other run or test uses.
-spec unique_name(string()) -> string().
unique_name(Prefix) ->
    peer:random_name(Prefix).

%% @doc A listen address something on this host can connect to: a listener
%% bound to every interface is reached on the loopback address.
-spec connectable({inet:ip_address(), inet:port_number()}) ->
    {inet:ip_address(), inet:port_number()}.
connectable({{0, 0, 0, 0}, Port}) -> {{127, 0, 0, 1}, Port};
connectable({{0, 0, 0, 0, 0, 0, 0, 0}, Port}) -> {{0, 0, 0, 0, 0, 0, 0, 1}, Port};
connectable({Ip, Port}) -> {Ip, Port}.

%%--------------------------------------------------------------------
%% Sink: a process registered as Name on Node that forwards every message M it
%% receives as {from_sink, node(), M} to Forward (a pid or {Name, Node} on the
%% origin) with a plain send, over distributed Erlang, never over teleport.

%% @doc Starts a sink on `Node'. Returns its pid.
-spec start_sink(node(), atom(), pid() | {atom(), node()}) -> {ok, pid()} | {error, term()}.
start_sink(Node, Name, Forward) ->
    erpc:call(Node, ?MODULE, sink_spawn, [Name, Forward], ?RPC_TIMEOUT).

%% @private Runs on the peer, in an erpc process: the sink is not linked to it.
sink_spawn(Name, Forward) ->
    Pid = spawn(?MODULE, sink_loop, [Forward]),
    try register(Name, Pid) of
        true -> {ok, Pid}
    catch
        error:badarg ->
            exit(Pid, kill),
            {error, {already_registered, Name, whereis(Name)}}
    end.

%% @private
sink_loop(Forward) ->
    receive
        Msg ->
            erlang:send(Forward, {from_sink, node(), Msg}),
            sink_loop(Forward)
    end.

%%--------------------------------------------------------------------
%% Echo: a process on Node that sends every message M back to ReplyTo with
%% teleport:send(ReplyTo, {teleport_ct_echo, self(), M}). If teleport refuses,
%% it reports {teleport_ct_echo_error, self(), M, Error} over distributed Erlang.

%% @doc Starts an echo on `Node' replying to `ReplyTo'. Returns its pid.
-spec start_echo(node(), pid()) -> {ok, pid()}.
start_echo(Node, ReplyTo) ->
    erpc:call(Node, ?MODULE, echo_spawn, [ReplyTo], ?RPC_TIMEOUT).

%% @private
echo_spawn(ReplyTo) ->
    {ok, spawn(?MODULE, echo_loop, [ReplyTo])}.

%% @private
echo_loop(ReplyTo) ->
    receive
        Msg ->
            case try teleport:send(ReplyTo, {teleport_ct_echo, self(), Msg}) catch C:R -> {C, R} end of
                ok -> ok;
                Error -> ReplyTo ! {teleport_ct_echo_error, self(), Error}
            end,
            echo_loop(ReplyTo)
    end.

%%--------------------------------------------------------------------
%% Internal

%% Call is fun(M, F, A) running M:F(A) on the peer.
setup_teleport(Call, AppEnv) ->
    try
        case Call(application, load, [teleport]) of
            ok -> ok;
            {error, {already_loaded, teleport}} -> ok
        end,
        _ = [ok = Call(application, set_env, [teleport, Key, Value, [{persistent, true}]])
             || {Key, Value} <- maps:to_list(AppEnv)],
        {ok, _} = Call(application, ensure_all_started, [teleport]),
        ok
    catch
        Class:Reason ->
            {error, {Class, Reason}}
    end.

cookie_string(Cookie) when is_atom(Cookie) -> atom_to_list(Cookie);
cookie_string(Cookie) when is_list(Cookie) -> Cookie.

dedup(List) ->
    dedup(List, #{}).

dedup([], _Seen) ->
    [];
dedup([X | Rest], Seen) ->
    case Seen of
        #{X := _} -> dedup(Rest, Seen);
        #{} -> [X | dedup(Rest, Seen#{X => true})]
    end.

%% @doc The scheduling policy of every thread of this OS process, by thread name
%% (Linux: /proc/self/task/*/stat): `{Name, Policy}', Policy 0 = SCHED_OTHER,
%% 5 = SCHED_IDLE.
-spec thread_policies() -> [{string(), non_neg_integer()}].
thread_policies() ->
    per_thread("stat", fun thread_policy/1).

thread_policy(Stat) ->
    %% "tid (name) state ..." : the name may hold spaces, so split at the last ')'.
    [Head, Tail] = string:split(binary_to_list(Stat), ")", trailing),
    [_, Name] = string:split(Head, "("),
    %% Field 41 is the policy; Tail starts at field 3.
    {Name, list_to_integer(lists:nth(41 - 2, string:lexemes(Tail, " ")))}.

%% @doc How many times this VM's threads named `Prefix...' have slept (voluntary
%% context switches: blocked in the kernel, not preempted or yielding), summed.
-spec thread_sleeps(string()) -> non_neg_integer().
thread_sleeps(Prefix) ->
    lists:sum([Sleeps || {Name, Sleeps} <- per_thread("status", fun name_and_sleeps/1),
                         lists:prefix(Prefix, Name)]).

name_and_sleeps(Status) ->
    Fields = [list_to_tuple(string:split(Line, ":\t"))
              || Line <- string:lexemes(binary_to_list(Status), "\n")],
    Name = proplists:get_value("Name", Fields),
    {Name, list_to_integer(proplists:get_value("voluntary_ctxt_switches", Fields))}.

%% `Parse' applied to `/proc/self/task/<tid>/File' of each of this VM's threads; a
%% thread that ended meanwhile is left out.
per_thread(File, Parse) ->
    [Parse(Text) || Path <- filelib:wildcard("/proc/self/task/*/" ++ File),
                    {ok, Text} <- [file:read_file(Path)]].

%% @doc Polls `Fun' every 50 ms until it returns true (true) or `Timeout' ms pass (false).
-spec wait_until(fun(() -> boolean()), non_neg_integer()) -> boolean().
wait_until(Fun, Timeout) ->
    wait_until_loop(Fun, erlang:monotonic_time(millisecond) + Timeout).

wait_until_loop(Fun, Deadline) ->
    case Fun() of
        true ->
            true;
        false ->
            case Deadline - erlang:monotonic_time(millisecond) of
                Left when Left =< 0 -> false;
                _ -> timer:sleep(50), wait_until_loop(Fun, Deadline)
            end
    end.

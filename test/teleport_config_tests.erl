-module(teleport_config_tests).
-include_lib("eunit/include/eunit.hrl").

with_env(Key, Value, Fun) ->
    application:load(teleport),
    Old = application:get_env(teleport, Key),
    application:set_env(teleport, Key, Value),
    try Fun()
    after
        case Old of
            {ok, V} -> application:set_env(teleport, Key, V);
            undefined -> application:unset_env(teleport, Key)
        end
    end.

defaults_are_valid_test() ->
    Config = teleport_config:get(),
    ?assertEqual(2, maps:get(pool_size, Config)),
    ?assertEqual(auto, maps:get(io_threads, Config)),
    ?assertEqual({0, 0, 0, 0}, maps:get(listen_ip, Config)),
    ?assertEqual(0, maps:get(listen_port, Config)),
    ?assert(maps:get(max_frame_bytes, Config) >= 1024),
    ?assertEqual(lists:sort(maps:keys(teleport_config:defaults())), lists:sort(maps:keys(Config))).

per_ip_handshake_cap_test() ->
    check_setting(max_pending_handshakes_per_ip, 8, 2, 0).

handshake_failures_per_ip_test() ->
    check_setting(max_handshake_failures_per_ip, 100, 5, 0),
    check_setting(max_handshake_failures_per_ip, 100, infinity, -1),
    check_setting(max_handshake_failures_per_ip, 100, 1, 1 bsl 32).

io_threads_test() ->
    check_setting(io_threads, auto, 3, 0),
    Auto = teleport_config:io_threads(auto),
    ?assert(Auto >= 1 andalso Auto =< 16),
    ?assertEqual(max(1, erlang:system_info(schedulers_online) div 4), Auto),
    ?assertEqual(5, teleport_config:io_threads(5)).

sndbuf_test() ->
    check_setting(sndbuf, auto, kernel, 1024),
    check_setting(sndbuf, auto, 65536, 65535),
    check_setting(sndbuf, auto, 262144, big).

%% A removed setting left in an environment is ignored, like any key teleport_config
%% does not define.
removed_setting_test() ->
    with_env(io_chunk_bytes, 65536,
             fun() -> ?assertNot(maps:is_key(io_chunk_bytes, teleport_config:get())) end).

io_thread_priority_test() ->
    check_setting(io_thread_priority, normal, idle, low).

%% `always' only where the NIF has the test hooks: teleport's test profile builds it
%% with them, any other build without.
decode_on_scheduler_test() ->
    check_setting(decode_on_scheduler, auto, auto, sometimes),
    case teleport_nif:test_hooks() of
        true -> ?assertEqual(always, teleport_config:validate(decode_on_scheduler, always));
        false -> ?assertError({invalid_config, decode_on_scheduler, always},
                              teleport_config:validate(decode_on_scheduler, always))
    end.

reader_busy_wait_test() ->
    check_setting(reader_busy_wait_us, 100, 0, -1),
    with_env(reader_busy_wait_us, 20000,
             fun() -> ?assertError({invalid_config, reader_busy_wait_us, 20000}, teleport_config:get()) end).

%% `Key' defaults to `Default', takes `Good' from the environment and refuses `Bad'.
check_setting(Key, Default, Good, Bad) ->
    ?assertEqual(Default, maps:get(Key, teleport_config:get())),
    with_env(Key, Good, fun() -> ?assertEqual(Good, teleport_config:get(Key)) end),
    with_env(Key, Bad, fun() -> ?assertError({invalid_config, Key, Bad}, teleport_config:get()) end).

env_overrides_default_test() ->
    with_env(pool_size, 7, fun() -> ?assertEqual(7, teleport_config:get(pool_size)) end),
    with_env(listen_ip, {127, 0, 0, 2},
             fun() -> ?assertEqual({127, 0, 0, 2}, teleport_config:get(listen_ip)) end).

invalid_values_raise_test_() ->
    Bad = [{pool_size, 0}, {pool_size, many}, {listen_ip, {300, 0, 0, 1}}, {listen_ip, "127.0.0.1"},
           {listen_port, 70000}, {max_frame_bytes, 10}, {max_frame_bytes, 1 bsl 33},
           {send_queue_bytes, -1}, {connect_timeout, infinity}, {handshake_timeout, 0},
           {peer_addresses, #{a@b => {{127, 0, 0, 1}, 0}}}, {peer_addresses, [x]},
           {max_pending_handshakes, 0}, {max_pending_handshakes_per_ip, 0},
           {max_pending_handshakes_per_ip, -1}, {max_pending_handshakes_per_ip, 2.0},
           {max_pending_handshakes_per_ip, infinity}, {io_threads, 0}, {io_threads, many},
           {io_threads, 1000}, {sndbuf, 0}, {sndbuf, 1 bsl 31}, {sndbuf, infinity}],
    [?_assertError({invalid_config, Key, _}, teleport_config:validate(Key, Value))
     || {Key, Value} <- Bad].

valid_values_pass_test_() ->
    Good = [{pool_size, 1}, {listen_ip, {0, 0, 0, 0, 0, 0, 0, 1}}, {listen_port, 65535},
            {max_frame_bytes, 16#FFFFFFFF}, {peer_addresses, #{'a@h' => {{127, 0, 0, 1}, 4000}}},
            {max_pending_handshakes_per_ip, 1}, {max_pending_handshakes_per_ip, 1000}],
    [?_assertEqual(Value, teleport_config:validate(Key, Value)) || {Key, Value} <- Good].

tls_test() ->
    ?assertEqual(disabled, maps:get(tls, teleport_config:get())),
    Files = #{certfile => "n.pem", keyfile => <<"n.key">>, cacertfile => "ca.pem"},
    %% Defaults filled in; suites kept as strings.
    ?assertEqual(Files#{verify => verify_peer, server_name_check => true, client_name_check => true,
                        ciphers => ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                                    "TLS_CHACHA20_POLY1305_SHA256"]},
                 teleport_config:validate(tls, Files)),
    ?assertMatch(#{verify := verify_none, server_name_check := false,
                   ciphers := ["TLS_AES_128_GCM_SHA256"]},
                 teleport_config:validate(tls, Files#{verify => verify_none,
                                                      server_name_check => false,
                                                      ciphers => [<<"TLS_AES_128_GCM_SHA256">>]})),
    Bad = [enabled, #{}, maps:remove(cacertfile, Files), Files#{certfile => ""},
           Files#{keyfile => 42}, Files#{verify => sometimes}, Files#{server_name_check => yes},
           Files#{client_name_check => sometimes},
           Files#{ciphers => []}, Files#{ciphers => ["TLS_RSA_WITH_RC4_128_MD5"]},
           Files#{ciphers => "TLS_AES_128_GCM_SHA256"}, Files#{versions => ['tlsv1.3']}],
    [?assertError({invalid_config, tls, _}, teleport_config:validate(tls, B)) || B <- Bad].

rpc_modules_test() ->
    check_setting(rpc_modules, all, {only, [lists, maps]}, {only, lists}),
    check_setting(rpc_modules, all, {except, [os]}, {except, ["os"]}),
    check_setting(rpc_modules, all, {only, []}, none).

rpc_compression_test() ->
    check_setting(rpc_compression, off, {6, 1024}, {0, 1024}),
    check_setting(rpc_compression, off, #{'a@h' => {1, 0}, default => off}, {6, -1}),
    with_env(rpc_compression, #{'a@h' => {10, 0}},
             fun() -> ?assertError({invalid_config, rpc_compression, {10, 0}}, teleport_config:get()) end),
    with_env(rpc_compression, #{"a@h" => off},
             fun() -> ?assertError({invalid_config, rpc_compression, "a@h"}, teleport_config:get()) end).

%% The settings are defined once, in teleport_config (names, validation, defaults,
%% and the meaning in its module doc); README.md's settings tables and the module
%% doc's table are checked against that definition here, so neither can drift.

readme_settings_match_defaults_test() ->
    check_documented("README.md", readme_rows(read_doc("README.md"))).

module_doc_settings_match_defaults_test() ->
    check_documented("teleport_config.erl", module_doc_rows(read_doc(source()))).

%% Every documented setting exists with the documented default, and every setting
%% teleport_config accepts is documented exactly once.
check_documented(Where, Rows) ->
    Defaults = teleport_config:defaults(),
    ?assertNotEqual([], Rows),
    Names = [Name || {Name, _} <- Rows],
    ?assertEqual({Where, []}, {Where, Names -- lists:usort(Names)}),
    ?assertEqual({Where, lists:sort(maps:keys(Defaults))}, {Where, lists:sort(Names)}),
    [?assertEqual({Where, Name, maps:get(Name, Defaults)}, {Where, Name, Default})
     || {Name, Default} <- Rows].

source() ->
    proplists:get_value(source, teleport_config:module_info(compile)).

%% A file of the project, found from where teleport_config was compiled.
read_doc("README.md") ->
    Root = filename:dirname(filename:dirname(source())),
    read_doc(filename:join(Root, "README.md"));
read_doc(Path) ->
    {ok, Bin} = file:read_file(Path),
    [unicode:characters_to_list(L) || L <- string:split(Bin, "\n", all)].

%% Rows of every table in README.md whose header is `| setting | default | meaning |'.
readme_rows(Lines) ->
    readme_rows(Lines, false, []).

readme_rows([], _, Acc) ->
    lists:reverse(Acc);
readme_rows([Line | Lines], InTable, Acc) ->
    case cells(Line) of
        ["setting", "default" | _] -> readme_rows(Lines, true, Acc);
        ["---" ++ _ | _] when InTable -> readme_rows(Lines, true, Acc);
        [Name, Default | _] when InTable ->
            readme_rows(Lines, true, [{setting_name(Name), default_value(Default)} | Acc]);
        _ -> readme_rows(Lines, false, Acc)
    end.

cells("|" ++ Rest) ->
    [string:trim(C) || C <- lists:droplast(string:split(Rest, "|", all))];
cells(_) ->
    [].

%% Rows of the module doc's table: `%% <tr><td>`key'</td><td>Type</td><td>Default</td>...'.
module_doc_rows(Lines) ->
    [begin
         [Name, _Type, Default | _] = string:split(Row, "</td><td>", all),
         {setting_name(Name), default_value(Default)}
     end
     || "%% <tr><td>" ++ Row <- Lines].

setting_name(Text) ->
    list_to_atom(strip_quotes(Text)).

%% A default as the docs write it: an Erlang term in quotes, or a number with a unit.
default_value(Text0) ->
    Text = strip_quotes(Text0),
    case string:split(Text, " ") of
        [N, "MiB"] -> list_to_integer(N) * 1024 * 1024;
        [N, "KiB"] -> list_to_integer(N) * 1024;
        [N, "ms"] -> list_to_integer(N);
        _ ->
            {ok, Tokens, _} = erl_scan:string(Text ++ "."),
            {ok, Term} = erl_parse:parse_term(Tokens),
            Term
    end.

%% `x` (Markdown) or `x' (EDoc) to x.
strip_quotes([$` | Rest]) -> string:trim(Rest, trailing, "`'");
strip_quotes(Text) -> Text.

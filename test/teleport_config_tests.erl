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

io_chunk_test() ->
    check_setting(io_chunk_bytes, infinity, 262144, 100).

io_thread_priority_test() ->
    check_setting(io_thread_priority, normal, idle, low).

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

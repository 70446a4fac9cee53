%% @private
%% @doc Starts teleport, or refuses to: teleport authenticates peers with the
%% node's cookie, so a node that is not distributed (its cookie is `nocookie')
%% or that runs with the cookie `nocookie' would accept any connection that
%% names that cookie. `application:start(teleport)' then returns
%% `{error, {not_distributed, _}}' or `{error, {nocookie, _}}' and nothing
%% listens. teleport does not start by itself when distribution starts later
%% (`net_kernel:start/2'): start it after that.
-module(teleport_app).
-behaviour(application).

-export([start/2, stop/1]).

-include_lib("kernel/include/logger.hrl").

start(_Type, _Args) ->
    case safe_to_start() of
        ok ->
            ok = teleport_log:add_default_handler_filter(),
            %% Loaded (its atoms made) now rather than at the first event, which a
            %% peer's failed handshake may cause; and telemetry looked for once.
            _ = teleport_telemetry:enabled(),
            teleport_sup:start_link();
        {error, Reason} = Error ->
            ?LOG_ERROR(#{what => refusing_to_start, reason => Reason,
                         text => refusal_text(Reason)}, #{domain => [teleport]}),
            Error
    end.

stop(_State) ->
    teleport_log:remove_default_handler_filter().

safe_to_start() ->
    case {erlang:is_alive(), erlang:get_cookie()} of
        {false, _} -> {error, not_distributed};
        {true, nocookie} -> {error, nocookie};
        {true, _} -> ok
    end.

refusal_text(not_distributed) ->
    "teleport needs a distributed node: start it with -name or -sname (or net_kernel:start/2) "
    "before teleport";
refusal_text(nocookie) ->
    "teleport authenticates peers with the node's cookie, and this node's is nocookie: "
    "set a secret cookie (-setcookie, or ~/.erlang.cookie)".

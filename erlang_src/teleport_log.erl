%% @private
%% @doc teleport's logging: every event carries `domain => [teleport]' (filter
%% on it), and teleport makes OTP's default handler show them.
%%
%% That handler, as OTP ships it, logs events of the `[otp]' domain and events
%% without a domain, and stops all others (`filter_default => stop'): teleport's
%% warnings would never be seen on a node whose logging nobody configured. So
%% while teleport runs, the default handler has one more filter, `teleport',
%% which lets the `[teleport]' domain through. Remove it with
%% `logger:remove_handler_filter(default, teleport)' to silence teleport there;
%% set its level with `logger:set_application_level(teleport, Level)'.
-module(teleport_log).

-export([add_default_handler_filter/0, remove_default_handler_filter/0, bounded/1]).

-define(FILTER, teleport).
%% Characters of a peer's term one log event may hold.
-define(TERM_CHARS, 400).

%% @doc Lets teleport's events through OTP's default handler, if there is one.
-spec add_default_handler_filter() -> ok.
add_default_handler_filter() ->
    Filter = {fun logger_filters:domain/2, {log, sub, [teleport]}},
    case logger:add_handler_filter(default, ?FILTER, Filter) of
        ok -> ok;
        %% No default handler (a release that removed it), or already there.
        {error, _} -> ok
    end.

%% @doc Undoes {@link add_default_handler_filter/0}.
-spec remove_default_handler_filter() -> ok.
remove_default_handler_filter() ->
    _ = logger:remove_handler_filter(default, ?FILTER),
    ok.

%% @doc A peer's term as text of bounded size (depth-limited, then cut): one log
%% event never holds a whole large term.
-spec bounded(term()) -> unicode:chardata().
bounded(Term) ->
    Text = io_lib:format("~0tP", [Term, 12]),
    case string:length(Text) > ?TERM_CHARS of
        true -> [string:slice(Text, 0, ?TERM_CHARS), "..."];
        false -> Text
    end.

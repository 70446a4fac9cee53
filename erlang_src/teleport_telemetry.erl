%% @doc teleport's telemetry events (docs/telemetry.md lists them), emitted through the
%% `telemetry' library where it runs and at no cost where it does not.
%%
%% teleport does not depend on telemetry, not even as an optional application
%% (rebar3's dialyzer before 3.20 fails on a missing one, in every project using
%% teleport), and calls it only once it runs. Until then every event looks again
%% (two BIF calls, no code path search), so telemetry started before or after
%% teleport, at boot or later (a shell, a test), gets the events from then on;
%% once seen, the answer is kept in a persistent term.
%%
%% Measurements are in native time units, as telemetry's own spans.
-module(teleport_telemetry).

-export([execute/3, span/3, enabled/0]).

-export_type([event_name/0]).

-type event_name() :: [atom(), ...].

-define(ENABLED, {?MODULE, enabled}).

%% @doc `telemetry:execute/3' where telemetry runs; `ok' and nothing else where not.
-spec execute(event_name(), #{atom() => number()}, map()) -> ok.
execute(EventName, Measurements, Metadata) ->
    case enabled() of
        true -> (telemetry()):execute(EventName, Measurements, Metadata);
        false -> ok
    end.

%% @doc `telemetry:span/3' where telemetry runs (`Prefix ++ [start]', then
%% `[stop]' or `[exception]'); where not, only `SpanFunction''s result.
%% `SpanFunction' returns `{Result, StopMetadata}' or `{Result,
%% ExtraMeasurements, StopMetadata}'. Compute costly metadata only when
%% {@link enabled/0} says so.
-spec span(event_name(), map(),
           fun(() -> {Result, map()} | {Result, #{atom() => number()}, map()})) -> Result.
span(Prefix, StartMetadata, SpanFunction) ->
    case enabled() of
        true ->
            (telemetry()):span(Prefix, StartMetadata, SpanFunction);
        false ->
            case SpanFunction() of
                {Result, _StopMetadata} -> Result;
                {Result, _ExtraMeasurements, _StopMetadata} -> Result
            end
    end.

%% @doc Whether telemetry runs on this node (its module loaded, its handler table
%% up): only then can a handler be attached, and events are passed on.
-spec enabled() -> boolean().
enabled() ->
    persistent_term:get(?ENABLED, false) orelse detect().

detect() ->
    case erlang:module_loaded(telemetry)
        andalso is_pid(whereis(telemetry_handler_table)) of
        true ->
            %% Set once, never replaced: no global GC.
            persistent_term:put(?ENABLED, true),
            true;
        false ->
            false
    end.

%% Named through a function: telemetry may be absent when teleport is built, and
%% xref and dialyzer would report its functions unknown.
telemetry() ->
    telemetry.

%% Shared by the two ends of the gs_call protocol (teleport_call, teleport_reply_relay).

%% The destination of a caller's probe frame: a relay answers it instead of
%% starting a keeper.
-define(PROBE, '$teleport_probe').

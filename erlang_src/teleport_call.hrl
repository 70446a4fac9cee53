%% Shared by the two ends of the gs_call protocol (teleport_call, teleport_call_relay).

%% The destination of a caller's probe frame: a relay answers it instead of
%% starting a keeper.
-define(PROBE, '$teleport_probe').
%% The destination of a large RPC outcome sent to the caller's node: the relay
%% that takes it sends it on to the caller's alias, so a late one is dropped.
-define(FORWARD, '$teleport_forward').
%% teleport_rpc's call frames (see teleport_rpc_exec): an RPC call, and a cast.
-define(RPC, '$teleport_rpc').
-define(CAST, '$teleport_cast').
%% A call frame's routing slot for `{Node, Key}' requests: the NIF picks the relay
%% by hashing it, so one key's requests reach one relay, in order.
-define(KEY, '$teleport_key').

%% A keeper (or an RPC runner, through its relay) whose call has not ended by then
%% tells the caller it exists.
-define(ANNOUNCE_AFTER_MS, 100).

%% @private
%% @doc Decodes, on a dirty scheduler, the frames an I/O thread may not build
%% itself (a map of over 32 keys on a VM that cannot build one off a scheduler;
%% see native/teleport_nif/src/decode.rs), and delivers them from there.
%%
%% The connection waits for each such frame (so its order holds); the
%% wait ends even if this process dies, because the ticket it holds is then freed.
%% Frames still waiting here when teleport stops are not delivered: they are
%% logged (`undelivered_at_stop'), as the runtime that would count them is gone.
-module(teleport_decoder).
-behaviour(gen_server).

-export([start_link/1, names/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").

%% @doc One per dirty CPU scheduler: frames from several connections decode at once.
-spec names() -> [atom()].
names() ->
    [list_to_atom("teleport_decoder_" ++ integer_to_list(I))
     || I <- lists:seq(1, erlang:system_info(dirty_cpu_schedulers))].

-spec start_link(atom()) -> {ok, pid()} | {error, term()}.
start_link(Name) ->
    gen_server:start_link({local, Name}, ?MODULE, [], []).

-spec init([]) -> {ok, no_state}.
init([]) ->
    %% So that a shutdown runs terminate/2, which reports what it leaves behind.
    process_flag(trap_exit, true),
    {ok, no_state}.

-spec handle_call(term(), gen_server:from(), no_state) -> {reply, {error, unsupported}, no_state}.
handle_call(_Request, _From, State) ->
    {reply, {error, unsupported}, State}.

-spec handle_cast(term(), no_state) -> {noreply, no_state}.
handle_cast(_Request, State) ->
    {noreply, State}.

-spec handle_info(term(), no_state) -> {noreply, no_state}.
handle_info({'$teleport_decode', Ticket, Frame}, State) ->
    ok = teleport_nif:deliver_frame(Ticket, Frame),
    {noreply, State};
handle_info(Other, State) ->
    ?LOG_DEBUG(#{what => unexpected_message, message => Other}, #{domain => [teleport]}),
    {noreply, State}.

-spec terminate(term(), no_state) -> ok.
terminate(Reason, _State) ->
    {messages, Queued} = erlang:process_info(self(), messages),
    case length([Ticket || {'$teleport_decode', Ticket, _} <- Queued]) of
        0 ->
            ok;
        Frames ->
            ?LOG_WARNING(#{what => undelivered_at_stop, messages => Frames, reason => Reason},
                         #{domain => [teleport]})
    end.

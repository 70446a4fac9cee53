%% @private
%% @doc A relay's queues of `{Node, Key}' requests (teleport_rpc), one FIFO per
%% key: the head of a key's queue is the request running (or about to); the
%% others wait for it. Pure data: the relay starts what becomes a head.
-module(teleport_rpc_keys).

-export([new/0, push/4, remove/2, is_head/2, member/2, fold/3]).
-export_type([keys/0]).

-opaque keys() :: #{queues := #{term() => queue:queue(id())},
                    entries := #{id() => {term(), term()}}}.
-type id() :: reference().

-spec new() -> keys().
new() ->
    #{queues => #{}, entries => #{}}.

%% @doc Queues request `Id' (with `Entry', what the relay needs to start it)
%% behind `Key''s others; `true' when it is the head (nothing to wait for).
-spec push(term(), id(), term(), keys()) -> {boolean(), keys()}.
push(Key, Id, Entry, #{queues := Queues, entries := Entries} = Keys) ->
    Entries1 = Entries#{Id => {Key, Entry}},
    case Queues of
        #{Key := Queue} ->
            {false, Keys#{queues := Queues#{Key := queue:in(Id, Queue)}, entries := Entries1}};
        #{} ->
            {true, Keys#{queues := Queues#{Key => queue:from_list([Id])}, entries := Entries1}}
    end.

%% @doc Takes `Id' out (it ended, or will never run): returns its entry
%% (`none' if it was not queued: no change), and `{Id2, Entry2}', its key's new
%% head, if `Id' was the head and another waits (else `none').
-spec remove(id(), keys()) -> {none | term(), none | {id(), term()}, keys()}.
remove(Id, #{queues := Queues, entries := Entries} = Keys) ->
    case maps:take(Id, Entries) of
        error ->
            {none, none, Keys};
        {{Key, Entry}, Entries1} ->
            Queue = maps:get(Key, Queues),
            case queue:out(Queue) of
                {{value, Id}, Rest} ->
                    case queue:peek(Rest) of
                        empty ->
                            {Entry, none,
                             Keys#{queues := maps:remove(Key, Queues), entries := Entries1}};
                        {value, Next} ->
                            {_, NextEntry} = maps:get(Next, Entries1),
                            {Entry, {Next, NextEntry},
                             Keys#{queues := Queues#{Key := Rest}, entries := Entries1}}
                    end;
                _ ->
                    {Entry, none, Keys#{queues := Queues#{Key := queue:delete(Id, Queue)},
                                        entries := Entries1}}
            end
    end.

%% @doc Whether `Id' heads its key's queue.
-spec is_head(id(), keys()) -> boolean().
is_head(Id, #{queues := Queues, entries := Entries}) ->
    case Entries of
        #{Id := {Key, _}} -> queue:peek(maps:get(Key, Queues)) =:= {value, Id};
        #{} -> false
    end.

%% @doc Whether `Id' is queued (head or not).
-spec member(id(), keys()) -> boolean().
member(Id, #{entries := Entries}) ->
    is_map_key(Id, Entries).

%% @doc Folds `Fun(Key, [{Id, Entry}], Acc)' over the keys, each key's requests
%% in their order.
-spec fold(fun((term(), [{id(), term()}], Acc) -> Acc), Acc, keys()) -> Acc.
fold(Fun, Acc0, #{queues := Queues, entries := Entries}) ->
    maps:fold(fun(Key, Queue, Acc) ->
                      Fun(Key, [{Id, element(2, maps:get(Id, Entries))} || Id <- queue:to_list(Queue)],
                          Acc)
              end, Acc0, Queues).

# teleport's own checks of teleport_pubsub, beside phoenix_pubsub's suites (which would
# also pass if every broadcast went over distributed Erlang): that teleport carries the
# broadcasts, in order per sender, that a node without teleport still gets them, and that
# nodes on the default adapter and on teleport's reach each other under one PubSub name.
defmodule Teleport.PubSubAdapterTest do
  # Alone: the stats it reads must not move with other tests' broadcasts.
  use Phoenix.PubSub.NodeCase, async: false

  alias Phoenix.PubSub

  @pubsub Phoenix.PubSubTest
  @node1 :"node1@127.0.0.1"
  @node2 :"node2@127.0.0.1"
  @node5 :"node5@127.0.0.1"

  setup_all do
    # One more node for the cases that stop teleport on it or run the default adapter.
    [{:ok, @node5}] = Phoenix.PubSub.Cluster.spawn([{@node5, adapter: :teleport_pubsub}])
    :ok
  end

  setup config do
    {:ok, topic: Atom.to_string(config.test)}
  end

  defp messages_out(node), do: :teleport.stats(node).messages_out

  defp receive_in_order(node, expected) do
    for n <- expected do
      assert_receive {^node, {:seq, ^n, _}}, 5_000
    end
  end

  test "broadcasts and direct broadcasts travel over teleport, in order per sender",
       %{topic: topic} do
    spy_on_pubsub(@node1, @pubsub, self(), topic)
    spy_on_pubsub(@node2, @pubsub, self(), topic)
    # Bodies over 64 KiB go in chunks, with smaller frames between them.
    payload = fn n -> if rem(n, 10) == 0, do: :binary.copy(<<n>>, 200_000), else: n end
    before = {messages_out(@node1), messages_out(@node2)}

    for n <- 1..100, do: :ok = PubSub.broadcast(@pubsub, topic, {:seq, n, payload.(n)})
    for n <- 101..110, do: :ok = PubSub.direct_broadcast(@node1, @pubsub, topic, {:seq, n, payload.(n)})

    receive_in_order(@node1, 1..110)
    receive_in_order(@node2, 1..100)
    refute_received {@node2, {:seq, 101, _}}
    {out1, out2} = before
    assert messages_out(@node1) >= out1 + 110
    assert messages_out(@node2) >= out2 + 100
  end

  test "a node where teleport does not run gets broadcasts over distributed Erlang",
       %{topic: topic} do
    spy_on_pubsub(@node5, @pubsub, self(), topic)
    :ok = :rpc.call(@node5, :application, :stop, [:teleport])
    wait_until(fn -> @node5 not in :teleport.nodes() end)
    out = messages_out(@node5)

    :ok = PubSub.broadcast(@pubsub, topic, {:seq, 1, :over_disterl})
    :ok = PubSub.direct_broadcast(@node5, @pubsub, topic, {:seq, 2, :over_disterl})
    receive_in_order(@node5, 1..2)
    assert messages_out(@node5) == out

    # Back on teleport once it runs there again (after the connector's backoff).
    {:ok, _} = :rpc.call(@node5, :application, :ensure_all_started, [:teleport])

    wait_until(fn ->
      before = messages_out(@node5)
      :ok = PubSub.broadcast(@pubsub, topic, {:seq, 3, :probe})
      assert_receive {@node5, {:seq, 3, :probe}}, 5_000
      messages_out(@node5) > before
    end)
  end

  test "nodes on the default adapter and on teleport's reach each other", %{topic: topic} do
    name = Teleport.MixedPubSub
    {:ok, _} = Supervisor.start_link([{PubSub, name: name, adapter: :teleport_pubsub}], strategy: :one_for_one)

    {:ok, _} =
      :rpc.block_call(@node5, Supervisor, :start_link, [
        [{PubSub, name: name, adapter: Phoenix.PubSub.PG2}],
        [strategy: :one_for_one]
      ])

    :ok = PubSub.subscribe(name, topic)
    spy_on_pubsub(@node5, name, self(), topic)
    # pg spreads membership asynchronously: wait until each side sees the other.
    group = Module.concat(name, "Adapter")
    wait_until(fn -> length(:pg.get_members(Phoenix.PubSub, group)) == 2 end)

    :ok = PubSub.broadcast(name, topic, {:seq, 1, :to_default_adapter})
    assert_receive {@node5, {:seq, 1, :to_default_adapter}}, 5_000
    broadcast_from_node(@node5, name, topic, {:seq, 2, :from_default_adapter})
    assert_receive {:seq, 2, :from_default_adapter}, 5_000
  end

  # Retries `check` (which may also assert) for up to 15 s.
  defp wait_until(check, deadline \\ System.monotonic_time(:millisecond) + 15_000) do
    ok =
      try do
        check.()
      rescue
        e in ExUnit.AssertionError ->
          if System.monotonic_time(:millisecond) > deadline, do: reraise(e, __STACKTRACE__)
          false
      end

    cond do
      ok -> :ok
      System.monotonic_time(:millisecond) > deadline -> flunk("condition not met within 15 s")
      true -> Process.sleep(100); wait_until(check, deadline)
    end
  end
end

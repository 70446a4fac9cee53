# teleport's test_helper.exs for phoenix_pubsub v2.2.0's own suites (scripts/pubsub_test.sh
# puts it in a scratch copy of phoenix_pubsub in place of the one there). It is that file
# with teleport's adapter wherever the original starts a PubSub, and teleport started
# first: teleport runs on distributed nodes only, so distribution starts here rather than
# in Phoenix.PubSub.Cluster.spawn/1 (which then finds it running), and every node the
# cluster starts starts teleport too (it starts every application loaded here).
Logger.configure(level: :info)
Application.put_env(:phoenix_pubsub, :test_adapter, {:teleport_pubsub, []})
exclude = Keyword.get(ExUnit.configuration(), :exclude, [])

# scripts/pubsub_test.sh names teleport's build; the cluster's nodes get this code path.
true = Code.prepend_path(Path.join(System.fetch_env!("TELEPORT_LIB"), "ebin"))
{:ok, _} = :net_kernel.start([:"primary@127.0.0.1"])
{:ok, _} = Application.ensure_all_started(:teleport)

Supervisor.start_link(
  [{Phoenix.PubSub, name: Phoenix.PubSubTest, pool_size: 4, adapter: :teleport_pubsub}],
  strategy: :one_for_one
)

unless :clustered in exclude do
  Phoenix.PubSub.Cluster.spawn([
    {:"node1@127.0.0.1", adapter: :teleport_pubsub},
    {:"node2@127.0.0.1", adapter: :teleport_pubsub},
    {:"node3@127.0.0.1", pool_size: 4, broadcast_pool_size: 1, adapter: :teleport_pubsub},
    {:"node4@127.0.0.1", pool_size: 1, adapter: :teleport_pubsub}
  ])
end

ExUnit.start()

# Benchmark: Phoenix.PubSub broadcasts from one node to 4 others, with the default adapter
# (Phoenix.PubSub.PG2, over distributed Erlang) and teleport's (teleport_pubsub) in the
# same run, on the same nodes. Run by scripts/bench_pubsub.sh. Prints figures; never fails
# on them.
#
# Per adapter and run:
#   throughput  N broadcasts back-to-back from one process, until every node has all of
#               them: broadcasts/s and MiB/s delivered (4 copies each).
#   single      one broadcast at a time at a fixed rate: the time until the last of the 4
#               nodes has it (send to arrival, clocks of one host), p50/p99/max.
#   beside bulk small broadcasts (100 bytes) at a fixed rate from one process, while
#               another broadcasts 1 MiB messages back-to-back, then paced (one every
#               20 ms, the same load for both adapters): the small ones' time to reach
#               all 4 nodes, p50/p99/max, and the bulk broadcasts made meanwhile.
# The summary gives each figure's range over the runs (min-max: the spread, and the
# worst run at one end).
{:module, _, receiver_bin, _} = defmodule Bench.Receiver do
  # Loaded on every node (compiled here).

  # A PubSub that outlives the call starting it.
  def start_pubsub(name, adapter) do
    {:ok, sup} =
      Supervisor.start_link([{Phoenix.PubSub, name: name, adapter: adapter}], strategy: :one_for_one)

    Process.unlink(sup)
    :ok
  end

  # A process that counts what arrives on a topic, and the latency of each
  # {:b, seq, sent_us, payload} (os clock: the same on every node of one host).
  def start(pubsub, topic) do
    parent = self()

    pid =
      spawn(fn ->
        :ok = Phoenix.PubSub.subscribe(pubsub, topic)
        send(parent, {:subscribed, self()})
        loop(0, [], nil)
      end)

    receive do
      {:subscribed, ^pid} -> pid
    end
  end

  defp loop(count, lats, notify) do
    receive do
      {:b, seq, sent, _payload} ->
        lat = :os.system_time(:microsecond) - sent
        count = count + 1

        notify =
          case notify do
            {pid, ref, ^count} -> send(pid, {ref, :done}); nil
            other -> other
          end

        loop(count, [{seq, lat} | lats], notify)

      # Tell `pid` once `n` have arrived in all.
      {:notify, pid, ref, n} when count >= n ->
        send(pid, {ref, :done})
        loop(count, lats, nil)

      {:notify, pid, ref, n} ->
        loop(count, lats, {pid, ref, n})

      {:report, pid, ref} ->
        send(pid, {ref, count, lats})
        loop(0, [], nil)
    end
  end
end

defmodule Bench do
  @nodes for n <- 1..4, do: :"bench#{n}@127.0.0.1"
  @kib :binary.copy(<<7>>, 1024)
  @mib :binary.copy(<<7>>, 1024 * 1024)

  def nodes, do: @nodes

  # `receiver` is Bench.Receiver's object code (compiled here, loaded on the nodes).
  def start_nodes(receiver) do
    {:ok, _} = :net_kernel.start([:"bench@127.0.0.1"])
    true = Code.prepend_path(Path.join(System.fetch_env!("TELEPORT_LIB"), "ebin"))
    {:ok, _} = Application.ensure_all_started(:teleport)
    paths = Enum.flat_map(:code.get_path(), fn p -> [~c"-pa", p] end)

    for node <- @nodes do
      [name, _] = node |> Atom.to_string() |> String.split("@")

      {:ok, _peer, ^node} =
        :peer.start(%{
          name: String.to_atom(name),
          host: ~c"127.0.0.1",
          longnames: true,
          args: [~c"-setcookie", Atom.to_charlist(:erlang.get_cookie()) | paths]
        })

      {:module, _} = :erpc.call(node, :code, :load_binary, [Bench.Receiver, ~c"bench.exs", receiver])
      {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:phoenix_pubsub])
      {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:teleport])
    end

    for node <- [node() | @nodes], {name, adapter} <- pubsubs() do
      :ok = :erpc.call(node, Bench.Receiver, :start_pubsub, [name, adapter])
    end

    # Every node sees every other's workers in both PubSubs before anything is measured.
    wait_members()
  end

  def pubsubs, do: [{Bench.PG2, Phoenix.PubSub.PG2}, {Bench.Teleport, :teleport_pubsub}]

  defp wait_members do
    ok =
      Enum.all?(pubsubs(), fn {name, _} ->
        length(:pg.get_members(Phoenix.PubSub, Module.concat(name, "Adapter"))) == 5
      end)

    unless ok do
      Process.sleep(50)
      wait_members()
    end
  end

  # Receivers on topic on every node; returns their pids.
  def receivers(pubsub, topic) do
    for node <- @nodes, do: :erpc.call(node, Bench.Receiver, :start, [pubsub, topic])
  end

  def reports(receivers) do
    for r <- receivers do
      ref = make_ref()
      send(r, {:report, self(), ref})

      receive do
        {^ref, count, lats} -> {count, lats}
      end
    end
  end

  def await_all(receivers, n, timeout \\ 120_000) do
    refs =
      for r <- receivers do
        ref = make_ref()
        send(r, {:notify, self(), ref, n})
        ref
      end

    for ref <- refs do
      receive do
        {^ref, :done} -> :ok
      after
        timeout -> raise "not all #{n} broadcasts arrived within #{timeout} ms"
      end
    end
  end

  def throughput(pubsub, topic, payload, n) do
    rs = receivers(pubsub, topic)
    t0 = System.monotonic_time(:microsecond)

    for i <- 1..n do
      :ok = Phoenix.PubSub.broadcast(pubsub, topic, {:b, i, :os.system_time(:microsecond), payload})
    end

    await_all(rs, n)
    secs = (System.monotonic_time(:microsecond) - t0) / 1.0e6
    _ = reports(rs)
    %{per_s: n / secs, mib_s: 4 * n * byte_size(payload) / secs / 1_048_576}
  end

  # Broadcasts `n` messages at `period_us`, from one process; the time each took to reach
  # the last of the 4 nodes, in microseconds.
  def fixed_rate(pubsub, topic, payload, n, period_us) do
    rs = receivers(pubsub, topic)
    start = System.monotonic_time(:microsecond)

    for i <- 1..n do
      wait_until(start + i * period_us)
      :ok = Phoenix.PubSub.broadcast(pubsub, topic, {:b, i, :os.system_time(:microsecond), payload})
    end

    await_all(rs, n)
    rs |> reports() |> all_nodes_latency()
  end

  # Small broadcasts at a fixed rate while another process broadcasts 1 MiB messages,
  # back-to-back (bulk_period_us 0) or one every bulk_period_us.
  def beside_bulk(pubsub, n, period_us, bulk_period_us) do
    bulk_rs = receivers(pubsub, "bulk")
    parent = self()

    bulk =
      spawn_link(fn ->
        bulk_loop(pubsub, 0, parent, System.monotonic_time(:microsecond), bulk_period_us)
      end)

    lats = fixed_rate(pubsub, "small", "small" <> :binary.copy(<<0>>, 95), n, period_us)
    send(bulk, :stop)

    sent =
      receive do
        {:bulk_sent, count} -> count
      end

    await_all(bulk_rs, sent)
    _ = reports(bulk_rs)
    {lats, sent}
  end

  defp bulk_loop(pubsub, i, parent, start, period) do
    receive do
      :stop -> send(parent, {:bulk_sent, i})
    after
      0 ->
        wait_until(start + i * period)
        :ok = Phoenix.PubSub.broadcast(pubsub, "bulk", {:b, i, :os.system_time(:microsecond), @mib})
        bulk_loop(pubsub, i + 1, parent, start, period)
    end
  end

  defp wait_until(t) do
    left = t - System.monotonic_time(:microsecond)
    if left > 1000, do: Process.sleep(div(left, 1000))
  end

  # Per broadcast: the latest arrival over the 4 nodes.
  defp all_nodes_latency(reports) do
    reports
    |> Enum.flat_map(fn {_count, lats} -> lats end)
    |> Enum.group_by(fn {seq, _} -> seq end, fn {_, lat} -> lat end)
    |> Enum.map(fn {_seq, lats} -> Enum.max(lats) end)
    |> Enum.sort()
  end

  def pct(sorted, p), do: Enum.at(sorted, min(length(sorted) - 1, trunc(p * length(sorted))))

  def kib, do: @kib
  def mib, do: @mib
end

runs = String.to_integer(System.get_env("PUBSUB_BENCH_RUNS", "3"))
Bench.start_nodes(receiver_bin)
IO.puts("bench_pubsub: 1 origin + 4 nodes on 127.0.0.1, teleport pool_size #{:teleport_config.get(:pool_size)}, PubSub pool_size 1")
{load, 0} = System.cmd("uptime", [])
IO.puts("before: #{String.trim(load)}")

fmt_lat = fn l ->
  "p50 #{Float.round(Bench.pct(l, 0.5) / 1000, 2)} ms, p99 #{Float.round(Bench.pct(l, 0.99) / 1000, 2)} ms, max #{Float.round(List.last(l) / 1000, 2)} ms"
end

results =
  for run <- 1..runs, {name, _} <- (if rem(run, 2) == 1, do: Bench.pubsubs(), else: Enum.reverse(Bench.pubsubs())) do
    t_kib = Bench.throughput(name, "thr_kib", Bench.kib(), 20_000)
    t_mib = Bench.throughput(name, "thr_mib", Bench.mib(), 100)
    s_kib = Bench.fixed_rate(name, "one_kib", Bench.kib(), 300, 10_000)
    s_mib = Bench.fixed_rate(name, "one_mib", Bench.mib(), 60, 50_000)
    idle = Bench.fixed_rate(name, "small_idle", "small", 400, 5_000)
    {bulk, bulk_sent} = Bench.beside_bulk(name, 400, 5_000, 0)
    {paced, paced_sent} = Bench.beside_bulk(name, 400, 5_000, 20_000)

    IO.puts("""
    run #{run} #{inspect(name)}:
      1 KiB x 20000 back-to-back: #{round(t_kib.per_s)} broadcasts/s (#{Float.round(t_kib.mib_s, 1)} MiB/s delivered)
      1 MiB x 100 back-to-back:   #{Float.round(t_mib.per_s, 1)} broadcasts/s (#{round(t_mib.mib_s)} MiB/s delivered)
      one 1 KiB broadcast, all 4 nodes (every 10 ms): #{fmt_lat.(s_kib)}
      one 1 MiB broadcast, all 4 nodes (every 50 ms): #{fmt_lat.(s_mib)}
      small broadcast, idle (every 5 ms):             #{fmt_lat.(idle)}
      small broadcast beside 1 MiB bulk (every 5 ms): #{fmt_lat.(bulk)}; bulk broadcasts meanwhile: #{bulk_sent}
      same, bulk paced at one per 20 ms:              #{fmt_lat.(paced)}; bulk broadcasts meanwhile: #{paced_sent}
    """)

    {name,
     %{kib_per_s: t_kib.per_s, mib_per_s: t_mib.per_s,
       one_kib_p50: Bench.pct(s_kib, 0.5), one_mib_p50: Bench.pct(s_mib, 0.5),
       idle_p99: Bench.pct(idle, 0.99), bulk_p50: Bench.pct(bulk, 0.5),
       bulk_p99: Bench.pct(bulk, 0.99), bulk_max: List.last(bulk), bulk_sent: bulk_sent,
       paced_p50: Bench.pct(paced, 0.5), paced_p99: Bench.pct(paced, 0.99), paced_max: List.last(paced)}}
  end

{load, 0} = System.cmd("uptime", [])
IO.puts("after: #{String.trim(load)}\n\nSummary over #{runs} runs (min-max; latencies in ms):")

for {name, _} <- Bench.pubsubs() do
  rs = for {^name, r} <- results, do: r

  range = fn key, scale ->
    vals = Enum.map(rs, &Map.fetch!(&1, key))
    "#{Float.round(Enum.min(vals) / scale, 2)}-#{Float.round(Enum.max(vals) / scale, 2)}"
  end

  IO.puts("""
  #{inspect(name)}:
    1 KiB broadcasts/s #{range.(:kib_per_s, 1)}; 1 MiB broadcasts/s #{range.(:mib_per_s, 1)}
    one broadcast to all 4, p50: 1 KiB #{range.(:one_kib_p50, 1000)}, 1 MiB #{range.(:one_mib_p50, 1000)}
    small idle p99 #{range.(:idle_p99, 1000)}; beside back-to-back bulk: p50 #{range.(:bulk_p50, 1000)}, p99 #{range.(:bulk_p99, 1000)}, max #{range.(:bulk_max, 1000)}; bulk broadcasts in the window #{range.(:bulk_sent, 1)}
    beside bulk paced at 50/s: p50 #{range.(:paced_p50, 1000)}, p99 #{range.(:paced_p99, 1000)}, max #{range.(:paced_max, 1000)}
  """)
end

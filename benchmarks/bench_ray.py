"""``llamarocm.ray.map`` on a Ray cluster simulated on this machine, against ``Model.map``.

    python benchmarks/bench_ray.py [--model PATH] [--server PATH] [--items N]
                                   [--tokens N] [--repeat N] [--replica-niceness N]
                                   [--output FILE]

A Ray cluster on loopback (``ray.cluster_utils.Cluster``: a head without GPUs and two
worker nodes with two fake GPUs each, for the three replicas), then the same batch of ``--items`` greedy prompts
of ``--tokens`` tokens run four ways, in rotating order, ``--repeat`` times: **local**
(``Model.map`` in this process), **1 replica** and **2 replicas** (a
:class:`llamarocm.ray.ReplicaPool` each, started once), and **1 replica, checkpoint**
(the one-replica pool's map with ``checkpoint=`` a new file each round, so every item
runs and is written). Every server has the same load options (2 slots, 256 tokens of
context each). Reported: start-up times, each way's wall time (min / median / max), the
per-item overhead of one replica over local (the median, over the rounds, of one
replica's wall time less local's in the same round, divided by the item count: pairing
cancels slow drifts of the machine's load) against its 5 ms target, the checkpoint's
per-item cost paired the same way, the round trip of one bare actor call, and whether
the texts matched.

Every server runs on this machine's CPU cores: two replicas share the cores one
replica or the local server has to itself, so on a small machine this shows what Ray
costs, not the speed-up separate GPUs would give. The replicas' servers inherit the
niceness of Ray's workers, 15; ``--replica-niceness 0`` runs them at the local
server's (through the replicas' ``runtime_env``). Writes benchmarks/results/ray.json
unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

# Before Ray is imported: every Ray address on 127.0.0.1, and no usage report.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import llamarocm  # noqa: E402
import llamarocm.ray  # noqa: E402
from llamarocm import bench  # noqa: E402  (its statistics and columns, as llamarocm bench reports)
from llamarocm.bench.command import script_parser  # noqa: E402
from llamarocm.bench.common import loadavg, machine_facts, rotation  # noqa: E402
from llamarocm.bench.report import write_result  # noqa: E402

LOAD: Dict[str, Any] = {"parallel": 2, "context_length": 256}
WAYS = ("local", "1 replica", "1 replica, checkpoint", "2 replicas")
#: Ray's cost per item over a local map, at most (milliseconds).
OVERHEAD_TARGET_MS = 5.0


def _timed(fn: Callable[[], List[llamarocm.BatchResult]]) -> Dict[str, Any]:
    start = time.perf_counter()
    results = fn()
    wall = time.perf_counter() - start
    assert all(r.ok for r in results), [r for r in results if not r.ok][:1]
    return {"wall_s": wall, "texts": [r.text for r in results]}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Start the cluster, the local model and the pools, measure in rotation, and return the result."""
    model_path = args.model or bench.default_model()
    prompts = [f"{s}, {s + 1}, {s + 2}," for s in range(10, 10 + 10 * args.items, 10)]
    settings = {"max_tokens": args.tokens, "temperature": 0.0, "top_k": 1}
    ray_options = {}
    if args.replica_niceness is not None:
        # What each replica's worker, and so its server, runs at (read by the worker).
        ray_options["runtime_env"] = {"env_vars": {"RAY_worker_niceness": str(args.replica_niceness)}}
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    startup = {"cluster_s": time.perf_counter() - started}
    try:
        start = time.perf_counter()
        local = llamarocm.load_model(model_path, server_path=args.server, **LOAD)
        startup["local_load_s"] = time.perf_counter() - start
        pools = {}
        for name, count in (("1 replica", 1), ("2 replicas", 2)):
            start = time.perf_counter()
            pools[name] = llamarocm.ray.ReplicaPool(
                model_path, replicas=count, server_path=args.server, ray_options=ray_options, **LOAD)
            replicas = pools[name].describe()  # waits until every replica is ready
            niceness = {info["niceness"] for info in replicas}
            startup[f"{name}_ready_s"] = time.perf_counter() - start
        try:
            files = tempfile.TemporaryDirectory(prefix="bench-ray-")
            fresh = iter(range(1_000_000))

            def durable() -> List[llamarocm.BatchResult]:
                path = os.path.join(files.name, f"results-{next(fresh)}.jsonl")  # new: every item runs
                return pools["1 replica"].map(prompts, checkpoint=path, **settings)

            ways: Dict[str, Callable[[], List[llamarocm.BatchResult]]] = {
                "local": lambda: local.map(prompts, **settings),
                "1 replica": lambda: pools["1 replica"].map(prompts, **settings),
                "1 replica, checkpoint": durable,
                "2 replicas": lambda: pools["2 replicas"].map(prompts, **settings),
            }
            for fn in ways.values():
                fn()  # warm-up: first-request allocations, Ray's worker threads
            actor = pools["1 replica"].actors[0]
            round_trips = bench.time_ms(lambda: ray.get(actor.describe.remote()), 200)
            runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in WAYS}
            for i in range(args.repeat):
                for name in rotation(WAYS, i):
                    runs[name].append(_timed(ways[name]))
                    print(f"  {name}: {runs[name][-1]['wall_s']:.2f} s", file=sys.stderr)
            files.cleanup()
        finally:
            for pool in pools.values():
                pool.close()
            binary = local.server.binary
            local.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    reference = runs["local"][0]["texts"]
    result: Dict[str, Any] = {"ways": {}}
    for name in WAYS:
        result["ways"][name] = {
            "wall_s": bench.stats([r["wall_s"] for r in runs[name]], 3),
            "same_texts_as_local": all(r["texts"] == reference for r in runs[name]),
        }
    median = {name: result["ways"][name]["wall_s"]["median"] for name in WAYS}
    result["overhead_ms_per_item"] = _paired(runs["1 replica"], runs["local"], len(prompts))
    result["overhead_target_ms"] = OVERHEAD_TARGET_MS
    result["overhead_target_met"] = result["overhead_ms_per_item"]["median"] <= OVERHEAD_TARGET_MS
    result["checkpoint_ms_per_item"] = _paired(runs["1 replica, checkpoint"], runs["1 replica"], len(prompts))
    result["two_vs_one_replica"] = round(median["2 replicas"] / median["1 replica"], 3)
    result["actor_round_trip_ms"] = bench.stats(round_trips, 3)
    result["startup_s"] = {k: round(v, 3) for k, v in startup.items()}
    result["replica_niceness"] = sorted(niceness)
    result["environment"] = machine_facts(model_path, ray=ray.__version__, llama_server=binary.path,
                                          llama_server_source=binary.source, load_average=loadavg())
    result["options"] = {"items": args.items, "tokens": args.tokens, "repeat": args.repeat, **LOAD}
    return result


def _paired(runs: List[Dict[str, Any]], baseline: List[Dict[str, Any]], items: int) -> Dict[str, Any]:
    """Per item, what ``runs`` took over ``baseline`` in the same round (milliseconds)."""
    stats: Dict[str, Any] = bench.stats(
        [(run["wall_s"] - base["wall_s"]) * 1000 / items for run, base in zip(runs, baseline, strict=True)], 2)
    return stats


def print_table(result: Dict[str, Any]) -> None:
    items = result["options"]["items"]
    header = ("way", f"{items} items, wall (median, min-max)", "per item", "same texts")
    rows = []
    for name, way in result["ways"].items():
        w = way["wall_s"]
        rows.append((name, f"{w['median']:.2f} s ({w['min']:.2f}-{w['max']:.2f})",
                     f"{w['median'] * 1000 / items:.1f} ms", "yes" if way["same_texts_as_local"] else "NO"))
    bench.print_columns(header, rows)
    overhead, trip = result["overhead_ms_per_item"], result["actor_round_trip_ms"]
    durable = result["checkpoint_ms_per_item"]
    met = "met" if result["overhead_target_met"] else "NOT met"
    print(f"one replica over local: {overhead['median']:+.2f} ms per item ({overhead['min']:+.2f} to "
          f"{overhead['max']:+.2f}; target <= {result['overhead_target_ms']:.0f} ms: {met}); "
          f"one actor call: {trip['median']:.2f} ms")
    print(f"checkpoint on one replica: {durable['median']:+.2f} ms per item ({durable['min']:+.2f} to "
          f"{durable['max']:+.2f}); two replicas / one: {result['two_vs_one_replica']:.2f}x "
          f"(every server shares this machine's {result['environment']['cpus']} cores: Ray's overhead, "
          "not a speed-up)")
    print(f"start-up: {result['startup_s']}; the replicas' servers ran at niceness {result['replica_niceness']}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON, and return it as a dict."""
    parser = script_parser(__doc__.split("\n")[0], str(HERE / "results" / "ray.json"))
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--replica-niceness", type=int, metavar="N",
                        help="the replicas' niceness (default: that of Ray's workers, 15)")
    args = parser.parse_args(argv)
    if args.items < 1 or args.tokens < 1 or args.repeat < 1:
        parser.error("--items, --tokens and --repeat must be at least 1")
    result = run(args)
    print_table(result)
    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()

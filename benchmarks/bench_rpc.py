"""A model split over llama.cpp RPC workers against the same model run locally.

    python benchmarks/bench_rpc.py [--model PATH] [--server PATH] [--rpc-server PATH]
                                   [--worker-threads N] [--tokens N] [--repeat N] [--output FILE]

Three servers on the same GGUF file, all loaded at once and measured in turn, in
rotating order, ``--repeat`` times: **local** (``--no-repack``: RPC never repacks
weights, so this is the same arithmetic, and the same greedy tokens), **one worker**
and **two workers** (``ggml-rpc-server`` on loopback, started by :class:`RpcWorker`).
Each run generates ``--tokens`` greedy tokens past the end of text. Reported: load
time, the generation's wall time and decode tok/s (min / median / max), how much of the
model each worker holds, and whether the greedy tokens matched the local run's.

Loopback moves tensors between processes on one machine: what this measures is the
protocol's own cost (serialising activations each layer boundary, one round trip per
split per token), not a network's. Writes benchmarks/results/rpc.json unless
``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import llamarocm  # noqa: E402
from llamarocm import bench  # noqa: E402  (its statistics and columns, as llamarocm bench reports)
from llamarocm.bench.command import script_parser  # noqa: E402
from llamarocm.bench.common import loadavg, machine_facts, rotation  # noqa: E402
from llamarocm.bench.report import write_result  # noqa: E402

PROMPT = "Once upon a time"
CONFIGS = ("local", "1 worker", "2 workers")


def _generate(model: llamarocm.Model, tokens: int) -> Dict[str, Any]:
    start = time.perf_counter()
    with model.generate(PROMPT, max_tokens=tokens, temperature=0.0, seed=1, extra={"ignore_eos": True}) as stream:
        ids = [token.id for token in stream]
    wall = time.perf_counter() - start
    metrics = stream.metrics
    assert metrics is not None and len(ids) == tokens, (len(ids), stream.finish_reason)
    return {"ids": ids, "wall_s": wall, "decode_tok_s": metrics.decode_tokens_per_second or 0.0}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Load the three servers, measure them in rotation, and return the result."""
    model_path = args.model or bench.default_model()
    common = {"context_length": 512, "server_path": args.server}
    with ExitStack() as stack:
        # A worker serves one llama-server at a time: three, for two servers loaded at once.
        workers = [
            stack.enter_context(llamarocm.RpcWorker(server_path=args.rpc_server, threads=args.worker_threads))
            for _ in range(3)
        ]
        loads: Dict[str, float] = {}
        models: Dict[str, llamarocm.Model] = {}
        for name, kwargs in (
            ("local", {"extra_args": ["--no-repack"]}),
            ("1 worker", {"rpc": workers[:1]}),
            ("2 workers", {"rpc": workers[1:]}),
        ):
            start = time.perf_counter()
            models[name] = stack.enter_context(llamarocm.load_model(model_path, **common, **kwargs))
            loads[name] = time.perf_counter() - start
            _generate(models[name], 8)  # warm-up: first-request allocations
        runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in CONFIGS}
        for i in range(args.repeat):
            for name in rotation(CONFIGS, i):
                runs[name].append(_generate(models[name], args.tokens))
                print(f"  {name}: {runs[name][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
        reference = runs["local"][0]["ids"]
        configs = {}
        for name in CONFIGS:
            configs[name] = {
                "load_s": round(loads[name], 3),
                "wall_s": bench.stats([r["wall_s"] for r in runs[name]], 3),
                "decode_tok_s": bench.stats([r["decode_tok_s"] for r in runs[name]], 2),
                "same_tokens_as_local": all(r["ids"] == reference for r in runs[name]),
                "rpc_placement_mib": models[name].rpc_placement,
            }
        binary = models["local"].server.binary
    local = configs["local"]["wall_s"]["median"]
    for name in CONFIGS:
        configs[name]["wall_vs_local"] = round(configs[name]["wall_s"]["median"] / local, 3)
    return {
        "environment": machine_facts(model_path, llama_server=binary.path, llama_server_source=binary.source,
                                     load_average=loadavg()),
        "options": {"tokens": args.tokens, "repeat": args.repeat, "prompt": PROMPT, "context_length": 512,
                    "worker_threads": args.worker_threads},
        "configs": configs,
    }


def print_table(result: Dict[str, Any]) -> None:
    header = ("server", "load", "128-token wall (median, min-max)", "decode tok/s", "vs local", "same tokens",
              "weights on workers")
    rows = []
    for name, c in result["configs"].items():
        w, d = c["wall_s"], c["decode_tok_s"]
        placed = ", ".join(f"{mib:.0f} MiB" for mib in c["rpc_placement_mib"].values()) or "-"
        rows.append((name, f"{c['load_s']:.2f} s", f"{w['median']:.2f} s ({w['min']:.2f}-{w['max']:.2f})",
                     f"{d['median']:.1f}", f"{c['wall_vs_local']:.2f}x", "yes" if c["same_tokens_as_local"] else "NO",
                     placed))
    bench.print_columns(header, rows)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON, and return it as a dict."""
    parser = script_parser(__doc__.split("\n")[0], str(HERE / "results" / "rpc.json"))
    parser.add_argument("--rpc-server", help="ggml-rpc-server binary (default: searched)")
    parser.add_argument("--worker-threads", type=int, help="each worker's CPU threads (default: the worker's own)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeat < 1:
        parser.error("--tokens and --repeat must be at least 1")
    result = run(args)
    print_table(result)
    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()

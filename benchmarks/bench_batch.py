"""Batches: ``Model.map`` against a hand-written raw client, and the durable map
(``checkpoint=``) against the in-memory one.

    python benchmarks/bench_batch.py [--model PATH] [--server PATH] [--prompts N] [--max-tokens N]
                                     [--parallel LIST] [--repeat N] [--resume-lines N] [--quick]
                                     [--output FILE]

Three figures, measured side by side in one run, in rotating order, ``--repeat`` times:

* **map against raw**, for each ``parallel=`` in ``--parallel`` (one server each):
  ``model.map(prompts)`` against the best raw client we can write, a
  ``ThreadPoolExecutor`` with one thread per slot, each streaming from ``/completion``
  with ``http.client`` (``llamarocm.bench.baselines.RawTarget``) the very JSON body
  ``map`` sends. Reported: tokens per second of the whole batch, and their ratio.
* **durable against in-memory**, on the largest server, in the same rotation:
  ``map(prompts, checkpoint=FILE)`` into a new file each time (a line written per
  item, fsync once a second) against the in-memory ``map(prompts)`` of the same
  repetition.
* **resume**: opening a checkpoint of ``--resume-lines`` lines and finding which of as
  many items are done (reading, parsing, hashing every prompt): what a rerun of a
  large batch costs before its first request. No server.

Every request is greedy and ignores end-of-text, so every side generates the same
number of tokens, ``--max-tokens`` per prompt (4 by default: short answers, so that
what each item costs besides its tokens, the client's share included, weighs most);
the prompts share a prefix that the slots keep cached. Prints a table and writes JSON
to benchmarks/results/batch.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import llamarocm  # noqa: E402
from llamarocm import bench  # noqa: E402  (its statistics, columns and JSON, as llamarocm bench reports)
from llamarocm.batch import BatchItem, read_back  # noqa: E402
from llamarocm.bench.baselines import RawTarget  # noqa: E402
from llamarocm.bench.command import script_parser  # noqa: E402
from llamarocm.bench.common import PROMPT, loadavg, log, machine_facts, rotation  # noqa: E402
from llamarocm.bench.report import finish_run  # noqa: E402
from llamarocm.checkpoint import Checkpoint, Record  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "batch.json"
# What RawTarget sends (llamarocm.bench.common.request_body), as map() keyword arguments.
GREEDY: Dict[str, Any] = {"temperature": 0.0, "extra": {"ignore_eos": True}}


def prompts(count: int) -> List[str]:
    return [f"{PROMPT} {i}" for i in range(count)]


def _timed(fn: Callable[[], int]) -> Dict[str, float]:
    """Seconds ``fn`` took and the tokens it says it received, as tokens per second,
    and the CPU seconds this process (the client: the server is another) spent on it."""
    cpu, start = time.process_time(), time.perf_counter()
    tokens = fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "cpu": time.process_time() - cpu}


def _ours(model: llamarocm.Model, batch: List[str], max_tokens: int, checkpoint: Optional[str] = None) -> int:
    results = model.map(batch, max_tokens=max_tokens, checkpoint=checkpoint, **GREEDY)
    failed = [r for r in results if not r.ok]
    assert not failed, failed[0]
    return sum(r.metrics.generated_tokens for r in results if r.metrics is not None)


def _raw(target: RawTarget, batch: List[str], max_tokens: int, slots: int) -> int:
    # One thread per slot, created per batch as map() creates its pool.
    with ThreadPoolExecutor(max_workers=slots) as pool:
        return sum(timed.tokens for timed in pool.map(lambda prompt: target.stream(prompt, max_tokens), batch))


def _summary(ours: List[Dict[str, float]], base: List[Dict[str, float]]) -> Dict[str, Any]:
    """Statistics of both sides' tok/s, the ratio of medians and the paired ratios."""
    ours_rate, base_rate = [r["tok_s"] for r in ours], [r["tok_s"] for r in base]
    return {
        "ours_tok_s": bench.stats(ours_rate, 2),
        "baseline_tok_s": bench.stats(base_rate, 2),
        "ratio_of_medians": round(statistics.median(ours_rate) / statistics.median(base_rate), 4),
        "ratio": bench.stats([o / b for o, b in zip(ours_rate, base_rate, strict=True)], 4),
        # Steadier than the rates on a busy machine: what each client itself costs.
        "ours_cpu_seconds": bench.stats([r["cpu"] for r in ours], 3),
        "baseline_cpu_seconds": bench.stats([r["cpu"] for r in base], 3),
        "same_tokens": {r["tokens"] for r in ours} == {r["tokens"] for r in base},
        "tokens": ours[0]["tokens"],
    }


def on_one_server(args: argparse.Namespace, model_path: str, slots: int, durable: bool) -> Dict[str, Any]:
    """One server with ``slots`` slots: map against raw and, with ``durable``, the
    durable map too, in rotating order; the figures of that server."""
    batch = prompts(args.prompts)
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as folder, llamarocm.load_model(
        model_path, parallel=slots, context_length=512, server_path=args.server
    ) as model:
        target = RawTarget(model)
        runners: Dict[str, Callable[[int], int]] = {
            "map": lambda i: _ours(model, batch, args.max_tokens),
            "raw": lambda i: _raw(target, batch, args.max_tokens, slots),
        }
        if durable:
            # A new file each time: every item runs and is written.
            runners["durable"] = lambda i: _ours(model, batch, args.max_tokens, os.path.join(folder, f"{i}.jsonl"))
        # Warm-up: the prefix into every slot's cache, first-request allocations, imports.
        warm = batch[: 2 * slots]
        _ours(model, warm, args.max_tokens)
        _raw(target, warm, args.max_tokens, slots)
        if durable:
            _ours(model, warm, args.max_tokens, os.path.join(folder, "warm-up.jsonl"))
        runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in runners}
        names = list(runners)
        for i in range(args.repeat):
            for name in rotation(names, i):
                runs[name].append(_timed(functools.partial(runners[name], i)))
            log(f"  parallel={slots}: " + ", ".join(f"{n} {runs[n][-1]['tok_s']:.1f} tok/s" for n in names))
    load = {"start": load_before, "end": loadavg()}
    figures = {"map_vs_raw": {"parallel": slots, **_summary(runs["map"], runs["raw"]), "load_average": load}}
    if durable:
        figures["durable_vs_memory"] = {
            "parallel": slots, **_summary(runs["durable"], runs["map"]), "load_average": load
        }
    return figures


def resume_cost(lines: int, repeat: int) -> Dict[str, Any]:
    """Seconds to open a checkpoint of ``lines`` finished items and to find them all done."""
    options = {"max_tokens": 16}  # one mapping for all, as map() and llamarocm batch share it
    items = [BatchItem(f"{PROMPT} {i}", options, i) for i in range(lines)]
    metrics = {"prompt_tokens": 30, "generated_tokens": 16, "time_to_first_token": 0.05,
               "total_duration": 0.5, "prefill_tokens_per_second": 600.0, "decode_tokens_per_second": 35.0}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "results.jsonl")
        with Checkpoint(path) as file:
            digests = read_back(items, file).digests
        with open(path, "wb") as out:
            out.writelines(Record(i, i, d, " a text of about forty characters, as here", "length", metrics, None).line()
                           for i, d in enumerate(digests))
        size = os.path.getsize(path)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            with Checkpoint(path) as file:
                assert read_back(items, file).pending == 0
            samples.append(time.perf_counter() - start)
    return {"lines": lines, "file_mb": round(size / 1e6, 1), "seconds": bench.stats(samples, 3)}


def _rows(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for point in result["map_vs_raw"]:
        rows.append([f"map / raw, parallel={point['parallel']}", f"{point['ours_tok_s']['median']:.1f} tok/s",
                     f"{point['baseline_tok_s']['median']:.1f} tok/s", f"{point['ratio']['median']:.3f}x",
                     ">= 0.98x", "yes" if point["ratio"]["median"] >= 0.98 else "NO"])
    for point in result["map_vs_raw"]:
        rows.append([f"client CPU per batch, parallel={point['parallel']}",
                     f"{point['ours_cpu_seconds']['median']:.2f} s", f"{point['baseline_cpu_seconds']['median']:.2f} s",
                     "-", "-", "-"])
    d = result["durable_vs_memory"]
    rows.append([f"durable / in-memory map, parallel={d['parallel']}", f"{d['ours_tok_s']['median']:.1f} tok/s",
                 f"{d['baseline_tok_s']['median']:.1f} tok/s", f"{d['ratio']['median']:.3f}x", ">= 0.98x",
                 "yes" if d["ratio"]["median"] >= 0.98 else "NO"])
    r = result["resume"]
    rows.append([f"resume: open {r['lines']:,} lines, find them done", f"{r['seconds']['median']:.2f} s",
                 f"({r['file_mb']} MB)", "-", "-", "-"])
    return rows


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__.split("\n")[0], str(DEFAULT_OUTPUT))
    parser.add_argument("--prompts", type=int, default=200, help="prompts per batch (default 200)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per prompt (default 4)")
    parser.add_argument("--parallel", default="1,2,4", help="slot counts for map against raw (default 1,2,4)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of batches per server (default 5)")
    parser.add_argument("--resume-lines", type=int, default=100_000, help="lines of the resume figure (100,000)")
    parser.add_argument("--quick", action="store_true", help="a tiny run that only checks that everything works")
    args = parser.parse_args(argv)
    try:
        args.parallel = [int(p) for p in args.parallel.split(",")]
    except ValueError:
        parser.error(f"--parallel takes numbers such as 1,2,4, not {args.parallel!r}")
    if args.quick:
        args.prompts, args.max_tokens, args.parallel, args.repeat, args.resume_lines = 6, 2, [1, 2], 1, 1000
    if min(args.prompts, args.max_tokens, args.repeat, args.resume_lines, *args.parallel) < 1:
        parser.error("every number must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the three figures, print a table, write the JSON, and return it.

    >>> result = main(["--quick"])  # doctest: +SKIP
    """
    args = parse(argv)
    model_path = args.model or bench.default_model()
    started = time.time()
    load_before = loadavg()
    result: Dict[str, Any] = {"options": {k: v for k, v in vars(args).items() if k != "output"}}
    result["map_vs_raw"] = []
    for slots in args.parallel:
        # The durable map is measured on the largest server, in the same rotation.
        figures = on_one_server(args, model_path, slots, durable=slots == max(args.parallel))
        result["map_vs_raw"].append(figures["map_vs_raw"])
        if "durable_vs_memory" in figures:
            result["durable_vs_memory"] = figures["durable_vs_memory"]
    result["resume"] = resume_cost(args.resume_lines, args.repeat)
    result["environment"] = machine_facts(model_path, load_average={"start": load_before, "end": loadavg()})
    finish_run(result, _rows(result), started=started, output=args.output)
    return result


if __name__ == "__main__":
    main()

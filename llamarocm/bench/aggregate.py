"""The aggregate figure: tokens per second with many client threads, over servers of several
slot counts (``parallel=``), through llamarocm and through raw ``http.client``.

Apart from the other figures because it loads a server per slot count and sweeps a grid
of points under a time budget.
"""

from __future__ import annotations

import functools
import itertools
import threading
from typing import Any, Callable, Dict, List, Tuple

import llamarocm

from .baselines import RawTarget
from .common import PROMPT, alternate, loadavg, log, perf, stats
from .figures import ours_stream
from .options import Options

#: (client threads, repetitions) to measure on one server.
Todo = List[Tuple[int, int]]


def aggregate_run(run_one: Callable[[], int], threads: int, requests: int) -> Dict[str, float]:
    """``requests`` streams over ``threads`` client threads; total tokens per wall second."""
    counter = itertools.count()
    barrier = threading.Barrier(threads + 1)
    totals: List[int] = []
    errors: List[BaseException] = []

    def worker() -> None:
        tokens = 0
        try:
            barrier.wait()
            while next(counter) < requests:
                tokens += run_one()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        totals.append(tokens)

    workers = [threading.Thread(target=worker, name=f"bench-client-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = perf()
    for w in workers:
        w.join()
    wall = perf() - start
    if errors:
        raise errors[0]
    return {"tok_s": sum(totals) / wall, "tokens": sum(totals), "seconds": wall}


class _Budget:
    """The sweep's time, from its start; the table's points are measured whatever it says."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = perf()

    def spent(self) -> bool:
        return perf() - self.started > self.seconds


def figure_aggregate(opts: Options) -> Dict[str, Any]:
    """Aggregate tok/s over slots and client threads, ours and raw, same servers.

    The table's two points (``opts.threads`` client threads at each of ``opts.slots``)
    are always measured, first; the other points of the plot's sweep are skipped once
    ``opts.agg_budget`` seconds have gone, so a slow or busy machine still finishes.
    """
    budget = _Budget(opts.agg_budget)
    points: List[Dict[str, Any]] = []
    skipped: List[Dict[str, int]] = []
    for slots, todo in _plan(opts):
        if slots not in opts.slots and budget.spent():
            skipped += [{"slots": slots, "threads": t} for t, _ in todo]
            continue
        measured, passed = _measure_server(opts, slots, todo, budget)
        points += measured
        skipped += passed
    if skipped:
        log(f"  aggregate: {len(skipped)} sweep points skipped after the {opts.agg_budget:.0f} s budget")
    return _summary(opts, points, skipped)


def _plan(opts: Options) -> List[Tuple[int, Todo]]:
    """Each server's slots and what to measure on it, the table's two servers first."""
    lo, hi = opts.slots
    plan = []
    for slots in [lo, hi] + [s for s in sorted(set(opts.sweep_slots)) if s not in (lo, hi)]:
        todo: Todo = []
        if slots in (lo, hi):
            todo.append((opts.threads, opts.agg_repeat))
        if slots in opts.sweep_slots:
            todo += [(t, 1) for t in sorted(opts.sweep_threads) if not (slots in (lo, hi) and t == opts.threads)]
        plan.append((slots, todo))
    return plan


def _measure_server(
    opts: Options, slots: int, todo: Todo, budget: _Budget
) -> Tuple[List[Dict[str, Any]], List[Dict[str, int]]]:
    """Load a server with ``slots`` slots and measure the points of ``todo`` on it; the
    points, and those skipped for the budget."""
    n = opts.agg_tokens
    points: List[Dict[str, Any]] = []
    skipped: List[Dict[str, int]] = []
    with llamarocm.load_model(opts.model, **opts.load_kwargs(parallel=slots)) as model:
        raw = RawTarget(model)

        def ours_one() -> int:
            return ours_stream(model, PROMPT, n).tokens

        def raw_one() -> int:
            return raw.stream(PROMPT, n).tokens

        # Warm-up: every slot has the prompt cached, whoever comes first.
        ours_one()
        aggregate_run(raw_one, slots, slots)
        for threads, reps in todo:
            table_point = slots in opts.slots and threads == opts.threads
            if not table_point and budget.spent():
                skipped.append({"slots": slots, "threads": threads})
                continue
            point = _point(opts, slots, threads, reps, ours_one, raw_one)
            points.append(point)
            log(f"  aggregate slots={slots} threads={threads}: ours {point['ours_tok_s']['median']:.1f} "
                f"tok/s, raw {point['raw_tok_s']['median']:.1f} tok/s")
    return points, skipped


def _point(
    opts: Options, slots: int, threads: int, reps: int, ours_one: Callable[[], int], raw_one: Callable[[], int]
) -> Dict[str, Any]:
    requests = max(opts.agg_requests, threads)
    run_ours = functools.partial(aggregate_run, ours_one, threads, requests)
    run_raw = functools.partial(aggregate_run, raw_one, threads, requests)
    runs = [alternate(i, run_ours, run_raw) for i in range(reps)]
    return {
        "slots": slots,
        "threads": threads,
        "requests": requests,
        "tokens_per_request": opts.agg_tokens,
        "ours_tok_s": stats([a["tok_s"] for a, _ in runs], 2),
        "raw_tok_s": stats([b["tok_s"] for _, b in runs], 2),
        "load_average": loadavg(),
    }


def _summary(opts: Options, points: List[Dict[str, Any]], skipped: List[Dict[str, int]]) -> Dict[str, Any]:
    lo, hi = opts.slots

    def at(slots: int, key: str) -> float:
        for p in points:
            if p["slots"] == slots and p["threads"] == opts.threads:
                return float(p[key]["median"])
        raise KeyError(slots)

    out: Dict[str, Any] = {"points": points, "threads": opts.threads, "slots": list(opts.slots), "skipped": skipped}
    out["ours_ratio"] = round(at(hi, "ours_tok_s") / at(lo, "ours_tok_s"), 3)
    out["raw_ratio"] = round(at(hi, "raw_tok_s") / at(lo, "raw_tok_s"), 3)
    # Context for the ratio of ratios: ours against raw at each end, same server.
    out["ours_vs_raw"] = {str(s): round(at(s, "ours_tok_s") / at(s, "raw_tok_s"), 3) for s in (lo, hi)}
    return out

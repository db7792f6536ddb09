"""What a run's result says: the targets, the table printed after a run, the plot, the JSON file.

Nothing here measures; :data:`TARGETS` is also what benchmarks/update_docs.py judges the
documentation's table by.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence


def aggregate_met(aggregate: Dict[str, Any]) -> bool:
    """Whether the slots pay off through llamarocm at least as much as through raw HTTP.

    The two ratios are compared at the precision the table shows (two decimals): a
    finer difference is far inside the figure's run-to-run spread (1-4 %).
    """
    return bool(round(aggregate["ours_ratio"], 2) >= round(aggregate["raw_ratio"], 2))


#: Each target of the table as a test of its figure's JSON: one definition for this
#: command's table and for the one benchmarks/update_docs.py writes into the docs.
TARGETS: Dict[str, Callable[[Dict[str, Any]], bool]] = {
    "startup": lambda s: s["overhead_ms"]["median"] <= 30,
    "ttft": lambda st: st["ttft_ms"]["overhead"]["median"] <= 2,
    "decode": lambda st: st["decode_tok_s"]["paired_ratio"]["median"] >= 0.98,
    "client": lambda c: c["ratio_ours_vs_raw"] <= 1.5,
    "openai": lambda c: c["ratio_openai_vs_ours"] >= 10,
    "aggregate": aggregate_met,
    "memory": lambda m: m["rss_growth_mb"] < 5 and m["thread_growth"] <= 0 and m["fd_growth"] <= 0,
    "gguf": lambda g: g["ratio"] >= 100,
}


def _row(figure: str, ours: str, baseline: str, ratio: str, target: str, met: Optional[bool]) -> Dict[str, Any]:
    return {"figure": figure, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target, "met": met}


def build_table(figures: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The table's rows (figure, ours, baseline, ratio, target, met) for a run's ``figures``."""
    rows = []
    s = figures.get("startup")
    if s:
        o = s["overhead_ms"]["median"]
        rows.append(_row("start-up: load_model() until a request can be sent", f"{s['ours_ms']['median']:.0f} ms",
                         f"{s['raw_ms']['median']:.0f} ms (raw spawn, 5 ms /health poll)", f"{o:+.1f} ms",
                         "overhead <= 30 ms", TARGETS["startup"](s)))
    st = figures.get("stream")
    if st:
        t = st["ttft_ms"]
        o = t["overhead"]["median"]
        rows.append(_row("time to first token", f"{t['ours']['median']:.2f} ms",
                         f"{t['raw']['median']:.2f} ms (http.client)", f"{o:+.2f} ms", "overhead <= 2 ms",
                         TARGETS["ttft"](st)))
        d = st["decode_tok_s"]
        # The median of per-pair ratios, like the paired differences above: each pair
        # ran back to back, so a drift in the machine's speed cancels out.
        r = d["paired_ratio"]["median"]
        rows.append(_row(f"decode tok/s, one stream of {d['tokens']} tokens", f"{d['ours']['median']:.2f}",
                         f"{d['raw']['median']:.2f} (http.client)", f"{r:.3f}x (paired)", ">= 0.98x",
                         TARGETS["decode"](st)))
    c = figures.get("client")
    if c:
        us = c["us_per_token"]
        r = c["ratio_ours_vs_raw"]
        rows.append(_row("client cost per token (replay server)", f"{us['ours']['median']:.1f} us",
                         f"{us['raw']['median']:.1f} us (http.client + json.loads)", f"{r:.2f}x",
                         "<= 1.5x raw", TARGETS["client"](c)))
        if "openai" in us:
            ro = c["ratio_openai_vs_ours"]
            rows.append(_row("client cost per token vs openai", f"{us['ours']['median']:.1f} us",
                             f"{us['openai']['median']:.1f} us (openai client)", f"openai {ro:.2f}x slower",
                             ">= 10x faster than openai", TARGETS["openai"](c)))
    a = figures.get("aggregate")
    if a:
        lo, hi = a["slots"]
        rows.append(_row(f"aggregate tok/s, {a['threads']} threads, parallel={hi} / parallel={lo}",
                         f"{a['ours_ratio']:.2f}x", f"{a['raw_ratio']:.2f}x (http.client)",
                         f"{a['ours_ratio'] / a['raw_ratio']:.3f}", "ours >= raw", TARGETS["aggregate"](a)))
    m = figures.get("memory")
    if m:
        rows.append(_row(f"memory after {m['streams']} streams",
                         f"RSS {m['rss_growth_mb']:+.2f} MB, threads {m['thread_growth']:+d}, fds {m['fd_growth']:+d}",
                         f"before: RSS {m['before']['rss'] / 2**20:.1f} MB, {m['before']['os_threads']} threads, "
                         f"{m['before']['fds']} fds", "-", "< 5 MB, no thread or fd growth",
                         TARGETS["memory"](m)))
    g = figures.get("gguf")
    if g and "ratio" in g:
        rows.append(_row("GGUF metadata walk", f"{g['ours_ms']['median']:.1f} ms",
                         f"{g['gguf_reader_ms']['median']:.0f} ms (gguf.GGUFReader)", f"{g['ratio']:.0f}x faster",
                         ">= 100x faster", TARGETS["gguf"](g)))
    return rows


def print_table(rows: List[Dict[str, Any]], out: Any = None) -> None:
    """The rows of :func:`build_table` as aligned columns."""
    cols = ("figure", "ours", "baseline", "ratio", "target", "met")
    cells = [[str(r[c]) if c != "met" else {True: "yes", False: "NO", None: "-"}[r[c]] for c in cols] for r in rows]
    print_columns(cols, cells, out)


def print_columns(header: Sequence[str], rows: Sequence[Sequence[str]], out: Any = None) -> None:
    """``rows`` of strings under ``header``, left-aligned in columns as wide as their widest cell."""
    out = out or sys.stdout
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)), file=out)


def plot_aggregate(aggregate: Dict[str, Any], path: str, title: str) -> Optional[str]:
    """A PNG of aggregate tok/s against client threads, one line per slot count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    by_slots: Dict[int, List[Dict[str, Any]]] = {}
    for p in aggregate["points"]:
        by_slots.setdefault(p["slots"], []).append(p)
    for i, (slots, pts) in enumerate(sorted(by_slots.items())):
        pts.sort(key=lambda p: p["threads"])
        xs = [p["threads"] for p in pts]
        color = f"C{i}"
        ax.plot(xs, [p["ours_tok_s"]["median"] for p in pts], "o-", color=color, label=f"parallel={slots}, llamarocm")
        ax.plot(xs, [p["raw_tok_s"]["median"] for p in pts], "x--", color=color, alpha=0.6,
                label=f"parallel={slots}, raw http.client")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p["threads"] for p in aggregate["points"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("client threads")
    ax.set_ylabel("aggregate tokens / second")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path



def write_json(path: str, data: Any) -> None:
    """``data`` as indented JSON in ``path``, its folder made if need be."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_result(path: str, result: Any) -> None:
    """:func:`write_json`, and say where: the last line a benchmark script prints."""
    write_json(path, result)
    print(f"wrote {path}")


#: The columns of the tables benchmarks/bench_batch.py and bench_sessions.py print.
SCRIPT_COLUMNS = ("figure", "llamarocm", "baseline", "ratio (median of pairs)", "target", "met")


def finish_run(result: Dict[str, Any], rows: List[List[str]], *, started: float, output: str) -> None:
    """A benchmark script's ending: how long it took (``started``: its ``time.time()``)
    and when, ``rows`` printed under :data:`SCRIPT_COLUMNS` and kept in ``result``, and
    ``result`` written to ``output``."""
    result["minutes"] = round((time.time() - started) / 60, 1)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["table"] = rows
    print_columns(SCRIPT_COLUMNS, rows)
    write_result(output, result)

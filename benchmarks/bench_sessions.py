"""Chat sessions: a conversation resumed from a saved session after a restart, against
the same history sent cold; and many sessions interleaved on one server, through
``ChatSession`` and through plain ``chat()``.

    python benchmarks/bench_sessions.py [--model PATH] [--server PATH] [--history-tokens N]
                                        [--sessions N] [--parallel N] [--turns N] [--items N]
                                        [--repeat N] [--quick] [--output FILE]

Two figures, each side by side in one run, in rotating order, ``--repeat`` times:

* **resumed against cold**: a conversation of at least ``--history-tokens`` tokens
  (1,000 by default) is saved once (``session.save``). Then, each time after
  ``model.restart()`` (not timed): *resumed* is ``ChatSession.load(model, FILE)``
  followed by ``send(next message)``, timed from the load's start to the reply's first
  token (the file read, its checks and the slot restore included); *cold* is
  ``model.chat(history + [next message])``, timed from the call to the first token.
  Both on the same server (``sessions=True``), so the only difference is the restored
  slot. Goal: the resumed first token at least 10x sooner.
* **interleaved sessions**: ``--sessions`` conversations (16), each opening with its
  own list of ``--items`` items (40: about 350 tokens), take ``--turns`` turns each on a
  ``parallel=--parallel`` (4) server, all of a turn's messages sent at once from one
  thread per conversation: through ``ChatSession.send``, and through ``chat()`` with
  the history kept by hand. More conversations than slots, so prompts leave the slots
  and come back from the server's RAM cache (``--cache-ram``) on both sides. Reported:
  seconds per round, mean time to first token and prompt tokens evaluated (not
  cached), which should be equal.

Replies are greedy and ignore end-of-text, so both sides generate the same tokens.
Prints a table and writes JSON to benchmarks/results/sessions.json (or ``--output``).
"""

from __future__ import annotations

import argparse
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
from llamarocm.bench.command import script_parser  # noqa: E402
from llamarocm.bench.common import alternate, loadavg, log, machine_facts  # noqa: E402
from llamarocm.bench.report import finish_run  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "sessions.json"
REPLY: Dict[str, Any] = {"max_tokens": 8, "temperature": 0.0, "extra": {"ignore_eos": True}}
NEXT = "Which colour is item 7? Answer in one word."
COLOURS = ["red cup", "blue pen", "green hat", "yellow kite", "white shell"]


def long_text(items: int, tag: str) -> str:
    """A list to remember, about 8 tokens an item, different for each ``tag``."""
    return f"Remember this list ({tag}). " + " ".join(
        f"Item {i} is a {COLOURS[(i + len(tag)) % len(COLOURS)]}." for i in range(items)
    )


def _first_token(stream: llamarocm.TokenStream, started: float) -> Dict[str, Any]:
    """Seconds from ``started`` to the first token; the stream is then drained."""
    next(stream)
    first = time.perf_counter() - started
    for _ in stream:
        pass
    metrics = stream.metrics
    assert metrics is not None and metrics.cached_prompt_tokens is not None and metrics.prompt_tokens is not None
    return {"ttft": first, "evaluated": metrics.prompt_tokens - metrics.cached_prompt_tokens,
            "prompt_tokens": metrics.prompt_tokens}


def resumed_against_cold(args: argparse.Namespace, model_path: str) -> Dict[str, Any]:
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as folder, llamarocm.load_model(
        model_path, parallel=1, context_length=args.history_tokens * 2 + 512, sessions=True,
        server_path=args.server,
    ) as model:
        items = max(4, args.history_tokens // 8)
        while True:  # a history of at least --history-tokens tokens, the reply included
            chat = model.session("You keep lists and answer briefly.")
            stream = chat.send(long_text(items, "history"), **REPLY)
            stream.text()
            assert stream.metrics is not None and stream.metrics.prompt_tokens is not None
            if stream.metrics.prompt_tokens + stream.metrics.generated_tokens >= args.history_tokens:
                break
            items += max(1, items // 4)
        path = os.path.join(folder, "chat.state")
        chat.save(path)
        history = chat.messages
        size = os.path.getsize(path)

        def resumed() -> Dict[str, Any]:
            model.restart()
            started = time.perf_counter()
            session = llamarocm.ChatSession.load(model, path)
            return _first_token(session.send(NEXT, **REPLY), started)

        def cold() -> Dict[str, Any]:
            model.restart()
            started = time.perf_counter()
            return _first_token(model.chat([*history, {"role": "user", "content": NEXT}], **REPLY), started)

        runs: Dict[str, List[Dict[str, Any]]] = {"resumed": [], "cold": []}
        for i in range(args.repeat):
            a, b = alternate(i, resumed, cold)
            runs["resumed"].append(a)
            runs["cold"].append(b)
            log(f"  resumed {a['ttft'] * 1000:.0f} ms ({a['evaluated']} tokens evaluated), "
                      f"cold {b['ttft'] * 1000:.0f} ms ({b['evaluated']} evaluated)")
    ours, base = [r["ttft"] for r in runs["resumed"]], [r["ttft"] for r in runs["cold"]]
    return {
        "history_tokens": runs["cold"][0]["prompt_tokens"],
        "state_file_mb": round(size / 1e6, 1),
        "resumed_ttft_s": bench.stats(ours, 3),
        "cold_ttft_s": bench.stats(base, 3),
        "speedup": bench.stats([b / o for o, b in zip(ours, base, strict=True)], 1),
        "resumed_evaluated_tokens": [r["evaluated"] for r in runs["resumed"]],
        "cold_evaluated_tokens": [r["evaluated"] for r in runs["cold"]],
        "load_average": {"start": load_before, "end": loadavg()},
    }


def _round(sends: List[Callable[[], Dict[str, Any]]]) -> Dict[str, Any]:
    """All of one turn's messages at once, one thread each; the round's figures."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(sends)) as pool:
        results = list(pool.map(lambda send: send(), sends))
    return {"seconds": time.perf_counter() - started, "ttft": statistics.mean(r["ttft"] for r in results),
            "evaluated": sum(r["evaluated"] for r in results)}


def _with_sessions(model: llamarocm.Model, texts: List[str], turns: int) -> List[Dict[str, Any]]:
    sessions = [model.session("You keep lists and answer briefly.") for _ in texts]

    def send(session: llamarocm.ChatSession, message: str) -> Callable[[], Dict[str, Any]]:
        return lambda: _first_token(session.send(message, **REPLY), time.perf_counter())

    rounds = [_round([send(s, t) for s, t in zip(sessions, texts, strict=True)])]
    for turn in range(1, turns):
        rounds.append(_round([send(s, f"Which colour is item {turn}?") for s in sessions]))
    return rounds


def _with_chat(model: llamarocm.Model, texts: List[str], turns: int) -> List[Dict[str, Any]]:
    histories: List[List[Dict[str, Any]]] = [[{"role": "system", "content": "You keep lists and answer briefly."}]
                                             for _ in texts]

    def send(history: List[Dict[str, Any]], message: str) -> Callable[[], Dict[str, Any]]:
        def run() -> Dict[str, Any]:
            started = time.perf_counter()
            history.append({"role": "user", "content": message})
            stream = model.chat(history, **REPLY)
            first = next(stream)
            ttft = time.perf_counter() - started
            text = first.text + "".join(token.text for token in stream)
            history.append({"role": "assistant", "content": text})
            metrics = stream.metrics
            assert metrics is not None and metrics.prompt_tokens is not None
            return {"ttft": ttft, "evaluated": metrics.prompt_tokens - (metrics.cached_prompt_tokens or 0)}

        return run

    rounds = [_round([send(h, t) for h, t in zip(histories, texts, strict=True)])]
    for turn in range(1, turns):
        rounds.append(_round([send(h, f"Which colour is item {turn}?") for h in histories]))
    return rounds


def interleaved(args: argparse.Namespace, model_path: str) -> Dict[str, Any]:
    load_before = loadavg()
    runs: Dict[str, List[Dict[str, Any]]] = {"sessions": [], "chat": []}
    with llamarocm.load_model(
        model_path, parallel=args.parallel, context_length=2048, server_path=args.server
    ) as model:
        for i in range(args.repeat):
            # Texts of the same length but never seen before: no side finds the other's
            # prompts in the cache.
            texts = {side: [long_text(args.items, f"{side} {i} {n}") for n in range(args.sessions)] for side in runs}
            a, b = alternate(
                i,
                lambda: _with_sessions(model, texts["sessions"], args.turns),  # noqa: B023 - called at once
                lambda: _with_chat(model, texts["chat"], args.turns),  # noqa: B023
            )
            for side, rounds in (("sessions", a), ("chat", b)):
                runs[side].append({"seconds": sum(r["seconds"] for r in rounds),
                                   "ttft": statistics.mean(r["ttft"] for r in rounds),
                                   "evaluated": sum(r["evaluated"] for r in rounds)})
            log(f"  {args.sessions} sessions x {args.turns} turns: ChatSession "
                      f"{runs['sessions'][-1]['seconds']:.1f} s, chat() {runs['chat'][-1]['seconds']:.1f} s")
    ours, base = runs["sessions"], runs["chat"]
    return {
        "sessions": args.sessions,
        "parallel": args.parallel,
        "turns": args.turns,
        "session_seconds": bench.stats([r["seconds"] for r in ours], 2),
        "chat_seconds": bench.stats([r["seconds"] for r in base], 2),
        "ratio": bench.stats([o["seconds"] / b["seconds"] for o, b in zip(ours, base, strict=True)], 3),
        "session_mean_ttft_s": bench.stats([r["ttft"] for r in ours], 3),
        "chat_mean_ttft_s": bench.stats([r["ttft"] for r in base], 3),
        "session_evaluated_tokens": [r["evaluated"] for r in ours],
        "chat_evaluated_tokens": [r["evaluated"] for r in base],
        "load_average": {"start": load_before, "end": loadavg()},
    }


def _rows(result: Dict[str, Any]) -> List[List[str]]:
    r = result["resumed_vs_cold"]
    speedup = r["speedup"]["median"]
    rows = [[f"next turn after a restart, {r['history_tokens']:,}-token history: first token",
             f"{r['resumed_ttft_s']['median'] * 1000:.0f} ms (loaded session)",
             f"{r['cold_ttft_s']['median'] * 1000:.0f} ms (cold chat())", f"{speedup:.1f}x faster",
             ">= 10x", "yes" if speedup >= 10 else "NO"]]
    s = result["interleaved"]
    rows.append([f"{s['sessions']} sessions x {s['turns']} turns, parallel={s['parallel']}: seconds",
                 f"{s['session_seconds']['median']:.2f} s (ChatSession)",
                 f"{s['chat_seconds']['median']:.2f} s (chat())",
                 f"{s['ratio']['median']:.3f}x", "~1x", "yes" if 0.9 <= s["ratio"]["median"] <= 1.1 else "NO"])
    rows.append(["  prompt tokens evaluated (not cached), per run",
                 ", ".join(map(str, s["session_evaluated_tokens"])), ", ".join(map(str, s["chat_evaluated_tokens"])),
                 "-", "equal", "yes" if s["session_evaluated_tokens"] == s["chat_evaluated_tokens"] else "NO"])
    return rows


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__.split("\n")[0], str(DEFAULT_OUTPUT))
    parser.add_argument("--history-tokens", type=int, default=1000, help="the resumed history's size (1000)")
    parser.add_argument("--sessions", type=int, default=16, help="interleaved conversations (default 16)")
    parser.add_argument("--parallel", type=int, default=4, help="slots of their server (default 4)")
    parser.add_argument("--turns", type=int, default=3, help="turns of each conversation (default 3)")
    parser.add_argument("--items", type=int, default=40, help="list items each conversation opens with (40)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each figure (default 5)")
    parser.add_argument("--quick", action="store_true", help="a tiny run that only checks that everything works")
    args = parser.parse_args(argv)
    if args.quick:
        args.history_tokens, args.sessions, args.parallel, args.turns, args.items, args.repeat = 200, 4, 2, 2, 8, 1
    if min(args.history_tokens, args.sessions, args.parallel, args.turns, args.items, args.repeat) < 1:
        parser.error("every number must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run both figures, print a table, write the JSON, and return it.

    >>> result = main(["--quick"])  # doctest: +SKIP
    """
    args = parse(argv)
    model_path = args.model or bench.default_model()
    started = time.time()
    load_before = loadavg()
    result: Dict[str, Any] = {"options": {k: v for k, v in vars(args).items() if k != "output"}}
    result["resumed_vs_cold"] = resumed_against_cold(args, model_path)
    result["interleaved"] = interleaved(args, model_path)
    result["environment"] = machine_facts(model_path, load_average={"start": load_before, "end": loadavg()})
    finish_run(result, _rows(result), started=started, output=args.output)
    return result


if __name__ == "__main__":
    main()

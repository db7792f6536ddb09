"""The figures of one model at a time, each measured next to its baseline: start-up, first
token and decode rate, client cost per token, memory, and the GGUF metadata walk.

(The aggregate figure, which loads a server per slot count, is in :mod:`.aggregate`.)
"""

from __future__ import annotations

import functools
import gc
import json
import os
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

import llamarocm

from .baselines import (
    RAW_POLL_INTERVAL,
    RawTarget,
    openai_client,
    openai_count,
    openai_stream,
    proc_argv_env,
    raw_headers,
    raw_startup,
    raw_stream,
)
from .common import GREEDY, HOST, PROMPT, Timed, alternate, package_version, perf, request_body, stats, time_ms
from .options import Options
from .replay import ReplayServer


def ours_stream(model: llamarocm.Model, prompt: str, max_tokens: int) -> Timed:
    """Stream through llamarocm, timing the consumer's view."""
    start = perf()
    first = last = 0.0
    n = 0
    stream = model.generate(prompt, max_tokens=max_tokens, **GREEDY)
    for _token in stream:
        last = perf()
        if not n:
            first = last
        n += 1
    end = perf()
    metrics = stream.metrics
    return Timed(first - start, last - start, end - start, n, metrics.decode_tokens_per_second if metrics else None)


# -- start-up ------------------------------------------------------------------------------


def figure_startup(opts: Options) -> Dict[str, Any]:
    """load_model() until it returns, against the same server spawned and polled every 5 ms."""
    kwargs = opts.load_kwargs()
    # Warm-up (page cache, dynamic loader), and the exact argv and environment to copy.
    with llamarocm.load_model(opts.model, **kwargs) as model:
        assert model.server is not None
        argv, env = proc_argv_env(model.server.pid)

    def ours() -> float:
        start = perf()
        model = llamarocm.load_model(opts.model, **kwargs)
        elapsed = perf() - start
        model.close()
        return elapsed

    pairs = [alternate(i, ours, lambda: raw_startup(argv, env)) for i in range(opts.startup_repeat)]
    ours_ms = [a * 1000 for a, _ in pairs]
    raw_ms = [b * 1000 for _, b in pairs]
    overhead = [a - b for a, b in zip(ours_ms, raw_ms, strict=True)]
    # The part of ours that is our own work before the spawn, measured on its own: the
    # rest of the difference is noise in the load itself, and whatever readiness costs.
    header_ms = time_ms(lambda: llamarocm.read_metadata(opts.model), 5)
    return {
        "ours_ms": stats(ours_ms, 1),
        "raw_ms": stats(raw_ms, 1),
        "overhead_ms": stats(overhead, 1),
        "gguf_header_ms": stats(header_ms, 1),
        "samples": {"ours_ms": [round(x, 1) for x in ours_ms], "raw_ms": [round(x, 1) for x in raw_ms]},
        "server_args": argv[1:],
        "raw_poll_interval_ms": RAW_POLL_INTERVAL * 1000,
    }


# -- one stream on a real server -------------------------------------------------------------


def figure_stream(opts: Options, model: llamarocm.Model) -> Dict[str, Any]:
    """Time to first token and decode tok/s, ours against raw http.client, same server."""
    raw = RawTarget(model)
    ttft_tokens = 2
    # Warm-up: the prompt is now in the slot's cache for both, so every later request
    # does the same work on the server whoever sends it.
    ours_stream(model, PROMPT, ttft_tokens)
    raw.stream(PROMPT, ttft_tokens)

    def prompt(k: int) -> str:
        # Fresh: a new first token every request, so nothing is cached and the server
        # evaluates the whole prompt (the same number of tokens) each time.
        return f"Request {k:05d}. {PROMPT}" if opts.fresh_prompt else PROMPT

    ttft = [
        alternate(
            i,
            functools.partial(lambda k: ours_stream(model, prompt(k), ttft_tokens), 2 * i),
            functools.partial(lambda k: raw.stream(prompt(k), ttft_tokens), 2 * i + 1),
        )
        for i in range(opts.ttft_repeat)
    ]
    ours_ttft = [a.first * 1000 for a, _ in ttft]
    raw_ttft = [b.first * 1000 for _, b in ttft]
    return {
        "prompt": PROMPT,
        "fresh_prompt": opts.fresh_prompt,
        "ttft_ms": {
            "ours": stats(ours_ttft),
            "raw": stats(raw_ttft),
            "overhead": stats([a - b for a, b in zip(ours_ttft, raw_ttft, strict=True)]),
            "max_tokens": ttft_tokens,
        },
        "decode_tok_s": _decode(opts, model, raw),
    }


def _decode(opts: Options, model: llamarocm.Model, raw: RawTarget) -> Dict[str, Any]:
    n = opts.decode_tokens
    decode = [
        alternate(i, lambda: ours_stream(model, PROMPT, n), lambda: raw.stream(PROMPT, n))
        for i in range(opts.repeat)
    ]
    for a, b in decode:
        if a.tokens != n or b.tokens != n:
            raise RuntimeError(f"expected {n} tokens, got {a.tokens} (ours) and {b.tokens} (raw)")
    ours_rate = [a.decode_rate for a, _ in decode]
    raw_rate = [b.decode_rate for _, b in decode]
    server_rates = {
        name: stats(rates, 2) if rates else None
        for name, rates in (
            ("ours", [a.server_rate for a, _ in decode if a.server_rate]),
            ("raw", [b.server_rate for _, b in decode if b.server_rate]),
        )
    }
    return {
        "ours": stats(ours_rate, 2),
        "raw": stats(raw_rate, 2),
        "ratio_of_medians": round(statistics.median(ours_rate) / statistics.median(raw_rate), 4),
        "paired_ratio": stats([a / b for a, b in zip(ours_rate, raw_rate, strict=True)], 4),
        "tokens": n,
        # What llama-server itself measured for the same streams: a client that stole
        # CPU from the server would show here too.
        "server_reported": server_rates,
    }


# -- the replay server: the client's own cost ------------------------------------------------


def figure_client(opts: Options, recordings: Dict[str, bytes]) -> Dict[str, Any]:
    """Client cost per token on the replay server: ours, raw http.client, openai."""
    n = opts.replay_tokens
    with ReplayServer(recordings) as replay:
        model = llamarocm.connect(replay.url)
        headers = raw_headers(None)
        data = json.dumps(request_body(PROMPT, n)).encode()
        oai_data = json.dumps({"model": "x", "prompt": PROMPT, "max_tokens": n, "stream": True}).encode()
        runners: Dict[str, Callable[[], Timed]] = {
            "ours": lambda: ours_stream(model, PROMPT, n),
            "raw": lambda: raw_stream(HOST, replay.port, "/completion", data, headers),
            "raw_openai_shape": lambda: raw_stream(
                HOST, replay.port, "/v1/completions", oai_data, headers, openai_count
            ),
        }
        client = openai_client(replay.url)
        if client is not None:
            runners["openai"] = lambda: openai_stream(client, PROMPT, n)
        try:
            samples, tokens = _rotate(runners, opts.replay_repeat)
        finally:
            model.close()
            if client is not None:
                client.close()
    out: Dict[str, Any] = {
        "tokens_per_stream": tokens,
        "us_per_token": {name: stats(s, 2) for name, s in samples.items()},
        "recording_bytes": {route: len(raw) for route, raw in recordings.items()},
    }
    med = {name: statistics.median(s) for name, s in samples.items()}
    out["ratio_ours_vs_raw"] = round(med["ours"] / med["raw"], 3)
    if "openai" in med:
        out["ratio_openai_vs_ours"] = round(med["openai"] / med["ours"], 2)
        out["openai_version"] = package_version("openai")
    else:
        out["openai"] = "skipped: pip install openai (the bench extra)"
    return out


def _rotate(runners: Dict[str, Callable[[], Timed]], repeat: int) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """Each runner ``repeat`` times, who goes first rotating; microseconds per token and tokens."""
    names = list(runners)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    tokens: Dict[str, int] = {}
    for name in names:  # warm-up: imports, first connections
        runners[name]()
    for i in range(repeat):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            t = runners[name]()
            tokens[name] = t.tokens
            samples[name].append(t.end / t.tokens * 1e6)
    return samples, tokens


def figure_memory(opts: Options, recordings: Dict[str, bytes]) -> Dict[str, Any]:
    """RSS, threads and fds before and after many streams through one Model."""
    n = opts.replay_tokens  # the replay server sends the whole recording whatever is asked
    total = opts.memory_streams
    with ReplayServer(recordings) as replay:
        model = llamarocm.connect(replay.url)
        idle_threads = threading.active_count()
        try:
            for _ in range(20):  # warm-up: lazily built caches, the first thread stacks
                ours_stream(model, PROMPT, n)
            before = _counters(idle_threads)
            checkpoints = []
            start = perf()
            marks = {max(1, total * k // 4) for k in (1, 2, 3, 4)}
            for i in range(1, total + 1):
                ours_stream(model, PROMPT, n)
                if i in marks:
                    checkpoints.append({"streams": i, "rss_mb": round((_rss_bytes() - before["rss"]) / 2**20, 2)})
            elapsed = perf() - start
            after = _counters(idle_threads)
        finally:
            model.close()
    return {
        "streams": total,
        "seconds": round(elapsed, 2),
        "before": before,
        "after": after,
        "rss_growth_mb": round((after["rss"] - before["rss"]) / 2**20, 2),
        "thread_growth": after["os_threads"] - before["os_threads"],
        "fd_growth": after["fds"] - before["fds"],
        "growth_by_checkpoint": checkpoints,
    }


def _counters(idle_threads: int) -> Dict[str, int]:
    """This process's resident bytes, threads and fds, once the last stream's threads are gone."""
    _settle(idle_threads)
    gc.collect()
    return {"rss": _rss_bytes(), "threads": threading.active_count(), "os_threads": len(os.listdir("/proc/self/task")),
            "fds": len(os.listdir("/proc/self/fd"))}


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _settle(threads: int, timeout: float = 2.0) -> None:
    # A reader thread hands over its sentinel a moment before it exits.
    deadline = perf() + timeout
    while threading.active_count() > threads and perf() < deadline:
        time.sleep(0.01)


# -- GGUF ----------------------------------------------------------------------------------


def figure_gguf(opts: Options) -> Dict[str, Any]:
    """Our metadata walk against gguf-py's GGUFReader on the same file."""
    try:
        import gguf
    except ImportError:
        return {"skipped": "pip install gguf (the bench extra)"}
    llamarocm.read_metadata(opts.model)  # first call compiles a regular expression
    ours = time_ms(lambda: llamarocm.read_metadata(opts.model), max(opts.repeat, 5))
    # GGUFReader parses every array element in Python: tens of seconds on a big vocabulary,
    # so one run (the ratio is in the hundreds either way).
    reader = time_ms(lambda: gguf.GGUFReader(opts.model), 1)
    return {
        "ours_ms": stats(ours),
        "gguf_reader_ms": stats(reader),
        "ratio": round(statistics.median(reader) / statistics.median(ours), 1),
    }

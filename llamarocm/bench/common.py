"""What the figures share: the workload every client sends, timing and statistics, small
facts about the machine."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import llamarocm

HOST = "127.0.0.1"
PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "Tonight the sea was calm, and far away a small boat"
)
# Greedy, and never stopping early, so that ours and the baseline produce the same tokens.
GREEDY: Dict[str, Any] = {"temperature": 0.0, "extra": {"ignore_eos": True}}

perf = time.perf_counter


def request_body(prompt: str, max_tokens: int) -> Dict[str, Any]:
    """The body ``Model.generate(prompt, max_tokens=..., **GREEDY)`` sends, for the raw baseline."""
    cfg = llamarocm.GenerateConfig(max_tokens=max_tokens, temperature=0.0, extra={"ignore_eos": True})
    body: Dict[str, Any] = {
        "prompt": prompt,
        "stream": True,
        "n_predict": max_tokens,
        "cache_prompt": True,
        "return_tokens": True,
    }
    body.update(cfg.sampling_fields())
    body.update(cfg.extra)
    return body


@dataclass
class Timed:
    """One stream as a client saw it: seconds from the call, and the tokens received."""

    first: float
    last: float
    end: float
    tokens: int
    #: The server's own decode rate for the stream (its ``timings``), when it sent one.
    server_rate: Optional[float] = None

    @property
    def decode_rate(self) -> float:
        span = self.last - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def stats(samples: Sequence[float], digits: int = 3) -> Dict[str, Any]:
    """``min``, ``median`` and ``max`` of ``samples`` rounded to ``digits``, and ``runs``."""
    return {
        "min": round(min(samples), digits),
        "median": round(statistics.median(samples), digits),
        "max": round(max(samples), digits),
        "runs": len(samples),
    }


def time_ms(fn: Callable[[], Any], repeat: int) -> List[float]:
    """Milliseconds each of ``repeat`` calls of ``fn`` took."""
    samples = []
    for _ in range(repeat):
        start = perf()
        fn()
        samples.append((perf() - start) * 1000)
    return samples


def alternate(i: int, a: Callable[[], Any], b: Callable[[], Any]) -> Tuple[Any, Any]:
    """Run a then b on even i, b then a on odd i; return (a's, b's) results."""
    if i % 2 == 0:
        ra = a()
        rb = b()
    else:
        rb = b()
        ra = a()
    return ra, rb


def rotation(names: Sequence[str], i: int) -> List[str]:
    """``names`` in round ``i``'s order: who goes first moves on by one each round, so
    that no side always runs on a warmer (or busier) machine than the others."""
    k = i % len(names)
    return list(names[k:]) + list(names[:k])


def loadavg() -> Optional[List[float]]:
    """The load averages over 1, 5 and 15 minutes, or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_facts(model: str, **more: Any) -> Dict[str, Any]:
    """The machine, Python and llamarocm a run measured with, and its model; ``more``
    adds what a figure also needs to say (the server binary, the load average...)."""
    return {
        "llamarocm": llamarocm.__version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "model": model,
        **more,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def package_version(name: str) -> Optional[str]:
    """The installed version of the distribution ``name``; None when unknown."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed, or unreadable metadata: unknown
        return None


def log(message: str) -> None:
    """Progress, on stderr: stdout is for the table."""
    print(message, file=sys.stderr, flush=True)

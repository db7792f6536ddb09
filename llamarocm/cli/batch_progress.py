"""What a ``llamarocm batch`` run has done, and its progress line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict

from ..batch import BatchResult


def format_duration(seconds: float) -> str:
    """``seconds`` as the progress line shows them: 42s, 3m05s or 1h02m."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class BatchTally:
    """What a ``batch`` run has done, and its progress line on a terminal: done/total,
    tokens per second, time left; redrawn at most ten times a second."""

    def __init__(self, total: int, resumed: int, show: bool) -> None:
        self.total, self.resumed, self.show = total, resumed, show
        self.ran = self.failed = self.tokens = 0
        self.done = resumed
        self.started = time.monotonic()
        self._drawn_at = 0.0

    def result(self, result: BatchResult) -> None:
        self.ran += 1
        self.failed += not result.ok
        self.done += result.ok
        if result.metrics is not None:
            self.tokens += result.metrics.generated_tokens

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def progress(self, finished: int, total: int) -> None:
        now = time.monotonic()
        if not self.show or (now - self._drawn_at < 0.1 and finished < total):
            return
        self._drawn_at = now
        elapsed = now - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        parts = [f"{finished}/{total} finished"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.ran:
            parts += [f"{rate:.1f} tok/s", f"{format_duration((total - finished) * elapsed / self.ran)} left"]
        sys.stderr.write("\r\033[K" + ", ".join(parts))
        sys.stderr.flush()

    def clear(self) -> None:
        if self.show:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def summary(self, args: argparse.Namespace) -> Dict[str, Any]:
        seconds = self.seconds
        return {
            "input": args.input,
            "output": args.output,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "resumed": self.resumed,
            "ran": self.ran,
            "seconds": round(seconds, 3),
            "generated_tokens": self.tokens,
            "tokens_per_second": round(self.tokens / seconds, 2) if self.ran and seconds > 0 else None,
        }

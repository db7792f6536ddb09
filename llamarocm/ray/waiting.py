"""Waiting on Ray's calls in a way that lets the caller's signals through."""

from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence

import ray


def _wait(refs: Sequence[Any], *, num_returns: int = 1, timeout: Optional[float] = None) -> List[Any]:
    """``ray.wait`` in slices of a second: during a wait, Ray lets only KeyboardInterrupt
    out of a signal handler, so any other exception (an alarm, a test's timeout) would
    wait for the whole call."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
        ready, _ = ray.wait(list(refs), num_returns=num_returns, timeout=left)
        if len(ready) >= num_returns or (deadline is not None and time.monotonic() >= deadline):
            return list(ready)

"""``llamarocm batch``'s progress line: drawn on a terminal only, with what is done,
the rate and the time left."""

from __future__ import annotations

import io

import pytest

from llamarocm.batch import BatchResult
from llamarocm.cli import batch_progress
from llamarocm.cli.batch_progress import BatchTally, format_duration
from llamarocm.stream import GenerateMetrics

pytestmark = pytest.mark.timeout(30)


class _Terminal(io.StringIO):
    """stderr as a terminal: what is written to it, and ``isatty()`` true."""

    def isatty(self) -> bool:
        return True


class _Clock:
    """``time.monotonic`` under the test's control (the rate and the time left are
    computed from it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _result(ok=True, tokens=10):
    if not ok:
        return BatchResult("p", None, ValueError("bad"), None, None)
    return BatchResult("p", "text", None, GenerateMetrics(4, tokens, 0.1, 1.0, None, None), "length")


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(batch_progress.time, "monotonic", clock)
    return clock


@pytest.mark.parametrize("seconds, shown", [(0, "0s"), (42.9, "42s"), (185, "3m05s"), (3720, "1h02m")])
def test_format_duration(seconds, shown):
    assert format_duration(seconds) == shown


def test_the_progress_line_shows_done_rate_and_time_left_on_a_terminal(monkeypatch, clock):
    terminal = _Terminal()
    monkeypatch.setattr(batch_progress.sys, "stderr", terminal)
    tally = BatchTally(total=10, resumed=2, show=terminal.isatty())
    clock.now += 4.0
    for _ in range(2):
        tally.result(_result(tokens=10))
    tally.result(_result(ok=False))
    tally.progress(5, 10)  # 2 resumed + 3 ran in 4 s: 20 tokens, 5 items left
    line = terminal.getvalue()
    assert line.startswith("\r\033[K") and "\n" not in line
    # 20 tokens in 4 s; 5 left at 4 s / 3 ran each.
    assert line[len("\r\033[K"):] == "5/10 finished, 1 failed, 5.0 tok/s, 6s left"

    # Redrawn at most ten times a second, except the last line, always drawn.
    terminal.truncate(0), terminal.seek(0)
    clock.now += 0.05
    tally.progress(6, 10)
    assert terminal.getvalue() == ""
    tally.progress(10, 10)
    # 20 tokens in 4.05 s now.
    assert terminal.getvalue() == "\r\033[K10/10 finished, 1 failed, 4.9 tok/s, 0s left"

    terminal.truncate(0), terminal.seek(0)
    tally.clear()
    assert terminal.getvalue() == "\r\033[K"


def test_nothing_is_drawn_before_an_item_ran_but_the_count(monkeypatch, clock):
    terminal = _Terminal()
    monkeypatch.setattr(batch_progress.sys, "stderr", terminal)
    tally = BatchTally(total=4, resumed=1, show=True)
    tally.progress(1, 4)
    assert terminal.getvalue() == "\r\033[K1/4 finished"  # no rate, no time left yet


def test_nothing_is_printed_when_stderr_is_not_a_terminal(monkeypatch, clock):
    stream = io.StringIO()
    monkeypatch.setattr(batch_progress.sys, "stderr", stream)
    tally = BatchTally(total=3, resumed=0, show=stream.isatty())
    for done in range(1, 4):
        clock.now += 1.0
        tally.result(_result())
        tally.progress(done, 3)
    tally.clear()
    assert stream.getvalue() == ""
    assert (tally.done, tally.ran, tally.tokens) == (3, 3, 30)

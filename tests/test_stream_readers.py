"""Who reads a stream: its own reader thread, or (in a batch) the thread that consumes it.

``Model.map``'s workers read their streams themselves: a thread per item, started and
handed each token over, was a cost per item with no use when the consumer only waits
for the end. A stream its consumer has not read yet must still be settled by a close,
a drop or a model's close, without sending anything.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time

import pytest

from llamarocm.stream import consumer_reads

pytestmark = pytest.mark.timeout(20)

DONE = {"content": "", "tokens": [], "stop": True, "stop_type": "limit"}


def _sse(*objs) -> bytes:
    return "".join(f"data: {json.dumps(o)}\n\n" for o in objs).encode()


@pytest.fixture
def started(monkeypatch):
    """The names of the threads started from now on."""
    names = []
    start = threading.Thread.start

    def recording_start(thread):
        names.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    return names


def test_map_reads_each_stream_in_its_worker_without_a_reader_thread(canned_model, canned, started):
    canned.stream("/completion", _sse({"content": "a", "tokens": [1], "stop": False}, DONE))
    results = canned_model.map([f"p{i}" for i in range(6)], max_workers=2)
    assert [r.text for r in results] == ["a"] * 6
    assert [r.finish_reason for r in results] == ["length"] * 6
    assert "llamarocm-stream" not in started
    assert len(canned.requests) == 6
    # A stream outside a batch still has its own reader, which is what the count sees.
    assert canned_model.generate("x").text() == "a"
    assert started.count("llamarocm-stream") == 1


def test_a_stream_its_consumer_never_read_is_settled_by_close_without_a_request(canned_model, canned):
    canned.stream("/completion", _sse(DONE))
    with consumer_reads():
        stream = canned_model.generate("x")
    stream.close()
    assert stream.finish_reason == "cancelled" and stream.closed
    assert list(stream) == []
    assert canned.requests == []
    stream._reader.thread.join(5)  # what settled it forgets it last
    assert not canned_model._streams  # unregistered: a model's close has nothing to wait for


def test_a_dropped_stream_its_consumer_never_read_is_settled(canned_model, canned):
    canned.stream("/completion", _sse(DONE))
    with consumer_reads():
        stream = canned_model.generate("x")
    state, reader = stream._state, stream._reader
    del stream
    gc.collect()
    assert state.done.wait(5) and state.finish_reason == "cancelled"
    reader.thread.join(5)
    assert canned.requests == [] and not canned_model._streams


def test_closing_the_model_settles_a_registered_stream_once_its_consumer_reads(canned_model, canned):
    canned.stream("/completion", _sse(DONE))
    with consumer_reads():
        stream = canned_model.generate("x")
    closing = threading.Thread(target=canned_model.close)
    closing.start()
    assert list(stream) == []  # the consumer's read finds it cancelled, and sends nothing
    closing.join(5)
    assert not closing.is_alive()
    assert stream.finish_reason == "cancelled" and canned.requests == []


def test_consumer_reads_is_for_the_thread_and_the_block_that_ask(canned_model, canned, started):
    canned.stream("/completion", _sse({"content": "a", "tokens": [1], "stop": False}, DONE))
    other = []
    with consumer_reads():
        elsewhere = threading.Thread(target=lambda: other.append(canned_model.generate("x").text()))
        elsewhere.start()
        elsewhere.join(10)
        assert canned_model.generate("x").text() == "a"
    assert other == ["a"]
    assert started.count("llamarocm-stream") == 1  # the other thread's stream only
    assert canned_model.generate("x").text() == "a"
    assert started.count("llamarocm-stream") == 2  # and after the block


def test_closing_a_model_cancels_a_stream_its_consumer_is_reading(canned_model, canned):
    canned.hang_after("/completion", _sse({"content": "a", "tokens": [1], "stop": False}))
    results = []
    batch = threading.Thread(target=lambda: results.extend(canned_model.map(["x", "y"], max_workers=2)))
    batch.start()
    deadline = time.monotonic() + 10
    while len(canned.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # waits for a condition the server reports, bounded
    assert len(canned.requests) == 2
    canned_model.close()
    batch.join(10)
    assert not batch.is_alive()
    assert [r.finish_reason for r in results] == ["cancelled", "cancelled"]
    assert [r.text for r in results] == ["a", "a"]


def _when(condition, seconds=10.0):
    """Wait for ``condition()`` (a state the server or the model reports), bounded."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_ctrl_c_during_map_cancels_the_streams_its_workers_read(canned_model, canned):
    # A real SIGINT to the main thread: it wakes the wait for a result, as Ctrl-C does
    # (_thread.interrupt_main only sets a flag that a blocked wait never looks at).
    main = threading.main_thread().ident
    canned.hang_after("/completion", _sse({"content": "a", "tokens": [1], "stop": False}))
    interrupter = threading.Thread(
        target=lambda: _when(lambda: len(canned.requests) == 2) and signal.pthread_kill(main, signal.SIGINT)
    )
    interrupter.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        canned_model.map(["x", "y", "z", "w"], max_workers=2)
    interrupter.join(10)
    assert time.monotonic() - started < 10  # the hanging streams were cut, not waited out
    assert len(canned.requests) == 2  # the prompts not started were never sent
    assert _when(lambda: not canned_model._streams)
    assert not [t for t in threading.enumerate() if t.name.startswith("llamarocm-map")]


def test_ctrl_c_landing_inside_concurrent_futures_wait_does_not_hang_map(canned_model, canned, monkeypatch):
    # A real SIGINT can land between two of the lock acquisitions that
    # concurrent.futures.wait() makes in Python code; the lock it took is then never
    # released, and a worker finishing that future blocks on it forever (and the pool's
    # exit with it). Simulated here: the first acquisition made, then the interrupt.
    from concurrent.futures import _base

    def interrupted_enter(self):
        self.futures[0]._condition.acquire()
        raise KeyboardInterrupt

    monkeypatch.setattr(_base._AcquireFutures, "__enter__", interrupted_enter)
    canned.stream("/completion", _sse({"content": "a", "tokens": [1], "stop": False}, DONE))
    done = []
    batch = threading.Thread(target=lambda: _map_or_interrupt(canned_model, done), daemon=True)
    batch.start()
    batch.join(10)
    assert not batch.is_alive(), "map() hung after the interrupt"
    assert done and done[0] in ("results", "interrupted")


def _map_or_interrupt(model, done):
    try:
        model.map([f"p{i}" for i in range(8)], max_workers=2)
        done.append("results")
    except KeyboardInterrupt:
        done.append("interrupted")

"""``ModelPool`` with the real server: models loaded on first use and shared, the least
recently used idle one unloaded to make room, callers waiting for a model in use,
idle models unloaded, and nothing left running after ``close()``.

The "different models" are the embedded model with different ``context_length``:
each is its own server. Waiting is on events and on process ends (pidfd), never on
sleeps.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from conftest import llama_server_pids, wait_pid_gone

import llamarocm
from llamarocm.loading import estimate_memory

pytestmark = pytest.mark.timeout(180)

integration = pytest.mark.integration


@pytest.fixture
def load(model_path, server_binary):
    """``load(pool, context_length, **options)``: the pool's lease on the embedded model."""

    def lease(pool, context_length, **options):
        return pool.model(model_path, context_length=context_length, server_path=server_binary, **options)

    return lease


def _reaper_threads():
    return [t for t in threading.enumerate() if t.name == "llamarocm-pool-reaper"]


# -- arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error",
    [({"max_models": 0}, ValueError), ({"max_models": 1.5}, TypeError), ({"memory_budget": "1GB"}, TypeError),
     ({"memory_budget": 0}, ValueError), ({"idle_timeout": 0}, ValueError), ({"idle_timeout": "1"}, TypeError)],
)
def test_bad_pool_arguments_are_refused(kwargs, error):
    with pytest.raises(error):
        llamarocm.ModelPool(**kwargs)


def test_bad_model_arguments_are_refused_before_any_load(model_path):
    before = llama_server_pids()
    with llamarocm.ModelPool() as pool:
        with pytest.raises(TypeError, match="contxt_length"):
            pool.model(model_path, contxt_length=256)
        with pytest.raises(TypeError, match="extra_args must be"):
            pool.model(model_path, extra_args={"--no-warmup"})
        with pytest.raises(ValueError):
            pool.model(model_path, wait=-1)
        with pytest.raises(TypeError):
            pool.model(b"model.gguf")
        # Refused when asked for, as load_model would refuse them, not on entering.
        for bad, error in [({"parallel": 0}, ValueError), ({"context_length": "x"}, TypeError),
                           ({"sessions": 1}, TypeError), ({"cache_ram": -5}, ValueError),
                           ({"lora": [("a.gguf", "x")]}, TypeError)]:
            with pytest.raises(error):
                pool.model(model_path, **bad)
        with pytest.raises(llamarocm.ModelNotFoundError):
            with pool.model(model_path + ".missing"):
                pass
        assert len(pool) == 0
    assert llama_server_pids() == before
    with pytest.raises(llamarocm.ClosedError):
        with pool.model(model_path):
            pass
    assert repr(pool) == "<ModelPool closed>"


def test_a_model_larger_than_the_budget_is_refused_at_once(model_path, server_binary):
    before = llama_server_pids()
    with llamarocm.ModelPool(memory_budget=1000) as pool:
        with pytest.raises(llamarocm.PoolFullError, match="more than the pool's whole memory_budget"):
            with pool.model(model_path, server_path=server_binary):
                pass
    assert llama_server_pids() == before


def test_a_failed_load_raises_in_every_thread_that_waited_for_it(tmp_path, server_binary):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)  # GGUF's magic, then nonsense
    errors = []
    start = threading.Barrier(3)
    with llamarocm.ModelPool() as pool:

        def use():
            start.wait()
            try:
                with pool.model(bad, server_path=server_binary):
                    pass
            except Exception as exc:  # noqa: BLE001 - the test looks at each
                errors.append(exc)

        threads = [threading.Thread(target=use) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(errors) == 3 and all(isinstance(e, llamarocm.GGUFError) for e in errors), errors
        assert len(pool) == 0


# -- the real server ----------------------------------------------------------------------


@integration
def test_threads_share_one_server_and_one_load(load):
    before = llama_server_pids()
    inside = threading.Barrier(4, timeout=60)
    pids, texts = [], []
    with llamarocm.ModelPool() as pool:

        def use():
            with load(pool, 256) as model:
                pids.append(model.server.pid)
                inside.wait()  # all four hold it at once
                texts.append(model.generate("Hello", max_tokens=4, temperature=0).text())

        threads = [threading.Thread(target=use) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(set(pids)) == 1 and len(pids) == 4
        assert llama_server_pids() - before == set(pids), "one server, loaded once"
        assert len(texts) == 4 and len(set(texts)) == 1
        with load(pool, 256, parallel=1) as model:  # the defaults are part of the name
            assert model.server.pid == pids[0]
        assert repr(pool) == "<ModelPool 1 model, 0 in use>"
    assert wait_pid_gone(pids[0], 10)


@integration
def test_the_least_recently_used_idle_model_makes_room(load):
    with llamarocm.ModelPool(max_models=2) as pool:
        with load(pool, 256) as a:
            pid_a = a.server.pid
        with load(pool, 512) as b:
            pid_b = b.server.pid
        with load(pool, 256) as again:
            assert again.server.pid == pid_a  # used last: b is now the least recent
        with load(pool, 384) as c:
            assert wait_pid_gone(pid_b, 10), "the least recently used model is unloaded"
            assert not wait_pid_gone(pid_a, 0)
            assert c.generate("Hi", max_tokens=2).text() is not None
            pid_c = c.server.pid
        assert len(pool) == 2
        # A model in use is never unloaded: with a held and c idle, b's return unloads c.
        with load(pool, 256) as held:
            with load(pool, 512) as b2:
                assert held.server.alive() and b2.server.pid != pid_b
                assert wait_pid_gone(pid_c, 10)
            pid_b2 = b2.server.pid
    for pid in (pid_a, pid_b2):
        assert wait_pid_gone(pid, 10), "close() stops every server"


@integration
def test_a_waiting_caller_is_released_when_the_model_in_its_way_is(load):
    with llamarocm.ModelPool(max_models=1) as pool:
        release = threading.Event()
        holding = threading.Event()
        held_pid = []

        def hold():
            with load(pool, 256) as model:
                held_pid.append(model.server.pid)
                holding.set()
                release.wait(60)

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(60)
        # Full of a model in use: no wait means an error at once.
        with pytest.raises(llamarocm.PoolFullError, match="in use"):
            with load(pool, 512, wait=0):
                pass
        entered = threading.Event()
        got = []

        def wait_for_room():
            with load(pool, 512, wait=60) as model:
                got.append(model.server.pid)
                entered.set()

        waiter = threading.Thread(target=wait_for_room)
        waiter.start()
        assert not entered.wait(0.5), "the model in use must not be unloaded"
        assert not wait_pid_gone(held_pid[0], 0)
        release.set()
        assert entered.wait(60), "the waiter goes on once the model is released"
        holder.join(10)
        waiter.join(10)
        assert wait_pid_gone(held_pid[0], 10) and got and got[0] != held_pid[0]


@integration
def test_a_thread_that_holds_the_only_room_is_told_at_once(load):
    with llamarocm.ModelPool(max_models=1) as pool:
        with load(pool, 256):
            # Waiting for itself would never end, whatever the wait.
            with pytest.raises(llamarocm.PoolFullError, match="held by this thread"):
                with load(pool, 512):
                    pass


@integration
def test_the_memory_budget_unloads_to_make_room(load, model_path):
    small, large = estimate_memory(model_path, context_length=256), estimate_memory(model_path, context_length=512)
    assert small < large
    with llamarocm.ModelPool(memory_budget=small + large - 1) as pool:
        with load(pool, 256) as model:
            pid_small = model.server.pid
            with pytest.raises(llamarocm.PoolFullError, match=r"MB"):
                with load(pool, 512, wait=0):
                    pass
        with load(pool, 512) as model:
            assert wait_pid_gone(pid_small, 10)
            assert len(pool) == 1


@integration
def test_an_idle_model_is_unloaded_after_idle_timeout(load):
    with llamarocm.ModelPool(idle_timeout=0.3) as pool:
        with load(pool, 256) as model:
            pid = model.server.pid
            assert not wait_pid_gone(pid, 1.0), "a model in use is kept past idle_timeout"
        assert wait_pid_gone(pid, 10), "and unloaded once idle that long"
        assert len(pool) == 0
        assert len(_reaper_threads()) == 1
        with load(pool, 256) as model:
            assert model.server.pid != pid  # loaded again on the next use
            pid = model.server.pid
    assert wait_pid_gone(pid, 10)
    assert _reaper_threads() == [], "close() ends the pool's thread"


@integration
def test_a_model_whose_server_died_is_loaded_again(load):
    with llamarocm.ModelPool() as pool:
        with load(pool, 256) as model:
            pid = model.server.pid
        os.kill(pid, signal.SIGKILL)
        assert wait_pid_gone(pid, 10)
        with load(pool, 256) as model:
            assert model.server.pid != pid
            assert model.generate("Hi", max_tokens=2, temperature=0).text() is not None


@integration
def test_close_stops_models_in_use_too(load):
    pool = llamarocm.ModelPool()
    holding, release = threading.Event(), threading.Event()
    outcome, pids = [], []

    def hold():
        with load(pool, 256) as model:
            pids.append(model.server.pid)
            stream = model.generate("Count to a thousand:", max_tokens=2000)
            holding.set()
            release.wait(60)
            try:
                stream.text()
                model.generate("Hi", max_tokens=2).text()
            except llamarocm.ClosedError as exc:
                outcome.append(exc)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(60)
    pool.close()
    assert wait_pid_gone(pids[0], 0), "close() returns once every server has stopped"
    release.set()
    holder.join(30)
    assert outcome, "the model in use is closed: a later call raises ClosedError"
    pool.close()  # idempotent

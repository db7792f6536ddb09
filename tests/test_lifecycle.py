"""Lifecycle races and failure paths of Model and Server: close against restart, crash
errors raised afresh, forks, signal handlers, the child's log in error messages.

Servers here are the fake script of conftest (fast, no model); streams come from the
canned server. Each test pins down one way the library once broke a promise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import traceback

import pytest
from conftest import llama_server_pids

import llamarocm
from llamarocm import _process
from llamarocm.client import Client
from llamarocm.model import Model
from llamarocm.server import Server
from llamarocm.stream import consumer_reads

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_gpus")]

DONE = {"content": "", "tokens": [], "stop": True, "stop_type": "eos"}


def _sse(*objs) -> bytes:
    return "".join(f"data: {json.dumps(o)}\n\n" for o in objs).encode()


class _Gate:
    """A start hook that blocks the second start (the restart) until released."""

    def __init__(self) -> None:
        self.starts = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args) -> None:
        self.starts += 1
        if self.starts == 2:
            self.entered.set()
            assert self.release.wait(20), "the gate was never opened"


def _run(fn):
    """Run ``fn`` in a thread; returns (thread, outcome dict with 'error' or 'value')."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


# -- close() against restart() -------------------------------------------------------


def test_close_while_a_restart_waits_to_spawn_leaves_no_process(fake_server, model_file):
    before = llama_server_pids()
    gate = _Gate()
    server = Server(model_file, server_path=fake_server, before_start=gate)
    model = Model(server.client, server)
    thread, outcome = _run(model.restart)
    assert gate.entered.wait(20)
    model.close()
    gate.release.set()
    thread.join(20)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), llamarocm.ClosedError), outcome
    assert not server.alive()
    assert {pid for pid in llama_server_pids() - before if _alive(pid)} == set()


def test_close_while_a_restarted_server_loads_fails_the_restart(fake_server, model_file):
    gate = _Gate()
    server = Server(model_file, server_path=fake_server, on_ready=gate)
    model = Model(server.client, server)
    thread, outcome = _run(model.restart)
    assert gate.entered.wait(20)
    model.close()  # stops the new process while its start is still being checked
    assert not server.alive()
    gate.release.set()
    thread.join(20)
    assert isinstance(outcome.get("error"), llamarocm.ClosedError), outcome
    assert not server.alive()


def test_calls_after_close_raise_closed_error(canned_model):
    canned_model.close()
    for call in (lambda: canned_model.generate("x"), lambda: canned_model.tokenize("x")):
        with pytest.raises(llamarocm.ClosedError):
            call()


def test_a_call_during_a_restart_waits_for_it_and_is_not_a_crash(fake_server, model_file, monkeypatch):
    gate = _Gate()
    server = Server(model_file, server_path=fake_server, before_start=gate)
    model = Model(server.client, server)
    try:
        thread, outcome = _run(model.restart)
        assert gate.entered.wait(20)  # the old server is stopped, the new one not started
        waiting = threading.Event()
        real_wait = model._not_restarting.wait

        def wait(*args):
            waiting.set()
            return real_wait(*args)

        monkeypatch.setattr(model._not_restarting, "wait", wait)
        caller, called = _run(lambda: model.tokenize("x"))
        assert waiting.wait(20), "the call did not wait for the restart"
        gate.release.set()
        thread.join(20)
        caller.join(20)
        assert "error" not in outcome, outcome
        # The fake server answers POST with 501: the call reached the new server.
        error = called.get("error")
        assert isinstance(error, llamarocm.RequestError) and error.status == 501, called
        assert model.last_error is error
        assert model._crashed is None  # no crash was recorded
    finally:
        gate.release.set()
        model.close()


# -- crash errors ----------------------------------------------------------------------


def test_each_call_on_a_crashed_server_raises_a_fresh_error(fake_server, model_file):
    server = Server(model_file, server_path=fake_server)
    model = Model(server.client, server)
    try:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        errors = []
        for _ in range(3):
            with pytest.raises(llamarocm.ServerCrashedError) as info:
                model.generate("x" * 1000)
            errors.append(info.value)
        assert len({id(e) for e in errors}) == 3, "one exception object re-raised: its traceback grows"
        depths = {len(traceback.extract_tb(e.__traceback__)) for e in errors}
        assert len(depths) == 1, depths
        assert errors[1].__cause__ is errors[2].__cause__ is not None  # the first record of the crash
        assert errors[2].returncode == -signal.SIGKILL
    finally:
        model.close()


class _LiveServer:
    """Stands in for a Server that is alive: records how long callers wait on it."""

    pid = 1
    waits: list

    def __init__(self) -> None:
        self.waits = []

    def alive(self) -> bool:
        return True

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return None

    def stderr_tail(self, lines=40):
        return ""

    def close(self):
        pass


@pytest.mark.parametrize("body", [
    _sse({"content": "a", "tokens": [1], "stop": False}) + b'event: error\ndata: {"error": {"message": "boom"}}\n\n',
    _sse({"content": "a", "tokens": [1], "stop": False}) + b"data: {not json\n\n",
    _sse({"error": {"message": "boom"}}),
])
def test_an_error_from_a_live_server_does_not_wait_for_a_crash(canned, body):
    live = _LiveServer()
    model = Model(Client(canned.url, api_key="k"), live)
    canned.stream("/completion", body)
    try:
        with pytest.raises(llamarocm.RequestError):
            model.generate("x").text()
        assert [t for t in live.waits if t] == [], "waited for a crash the server answered against"
    finally:
        model.close()


# -- batches ---------------------------------------------------------------------------


def test_map_keeps_every_result_when_a_chat_template_call_fails(canned_model, canned):
    canned.stream("/completion", _sse({"content": "ok", "tokens": [1], "stop": False}, DONE))
    canned.json("/apply-template", {"error": {"code": 500, "message": "template exploded"}}, status=500)
    results = canned_model.map(["a", [{"role": "user", "content": "hi"}], "b"], max_tokens=2)
    assert len(results) == 3
    assert results[0].ok and results[2].ok and results[0].text == "ok"
    assert isinstance(results[1].error, llamarocm.RequestError) and results[1].error.status == 500


def test_fail_fast_cancels_a_stream_started_after_the_failure(canned_model, canned):
    canned.hang_after("/completion", _sse({"content": "a", "tokens": [1], "stop": False}))
    entered, failed = threading.Event(), threading.Event()
    real_generate = canned_model.generate

    def generate(prompt, **config):
        if prompt == "fail":
            assert entered.wait(20)
            raise llamarocm.RequestError("refused")
        # A worker that passed the stop check before the failure, and opens its
        # stream only after the batch began cancelling.
        entered.set()
        assert failed.wait(20)
        return real_generate(prompt, **config)

    canned_model.generate = generate
    thread, outcome = _run(lambda: canned_model.map(
        ["fail", "hang"], max_workers=2, fail_fast=True, progress=lambda done, total: failed.set()))
    thread.join(5)  # the hanging stream would hold the batch for 30 s
    assert not thread.is_alive(), "a stream started after the failure was never cancelled"
    assert isinstance(outcome.get("error"), llamarocm.RequestError)


# -- fork and signals ------------------------------------------------------------------


def _in_child(fn) -> int:
    """Run ``fn`` in a forked child (alarm after 10 s); its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(10)
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_stream_inherited_by_a_fork_raises_in_the_child(canned_model, canned):
    canned.stream("/completion", _sse(*({"content": "a", "tokens": [1], "stop": False} for _ in range(3)), DONE))
    stream = canned_model.generate("x")
    next(stream)
    assert stream._state.done.wait(10)  # everything the server sent is queued

    def child() -> int:
        try:
            list(stream)
        except llamarocm.LlamaRocmError as exc:
            return 0 if "fork" in str(exc) else 4
        return 3  # ended silently

    assert _in_child(child) == 0
    assert len(list(stream)) == 2  # the parent's stream is untouched


def test_close_in_a_child_forked_while_the_lock_was_held_does_not_deadlock(canned_model):
    with canned_model._lock:  # as another thread might hold it at the moment of fork
        code = _in_child(lambda: (canned_model.close(), 0)[1])
    assert code == 0, f"close() in the child did not return (exit {code})"


@pytest.mark.parametrize("read", ["by its reader thread", "not yet, by a batch's worker"])
def test_stream_close_from_a_signal_handler_while_the_model_lock_is_held(canned_model, canned, read):
    # An unread batch stream is settled (and forgotten by the model, under its lock) by
    # whoever closes it first, unless that is done on a thread of its own.
    canned.hang_after("/completion", _sse({"content": "a", "tokens": [1], "stop": False}))
    if read == "by its reader thread":
        stream = canned_model.generate("x")
        next(stream)
    else:
        with consumer_reads():
            stream = canned_model.generate("x")
    lock = canned_model._lock
    rescued = []

    def rescue():  # only if close() blocked on the lock its own thread holds
        rescued.append(True)
        lock.release()

    previous = signal.signal(signal.SIGUSR1, lambda *_: stream.close())
    timer = threading.Timer(15, rescue)
    lock.acquire()
    try:
        timer.start()
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs here, inside the lock
        for _ in range(1000):
            pass
    finally:
        timer.cancel()
        if not rescued:
            lock.release()
        signal.signal(signal.SIGUSR1, previous)
    assert not rescued, "close() from a signal handler blocked on a lock the interrupted thread held"
    assert stream.finish_reason == "cancelled" or stream._state.cancel_requested
    if read != "by its reader thread":
        assert stream.finish_reason == "cancelled" and canned.requests == []


# -- the child process -----------------------------------------------------------------


def test_a_nan_startup_timeout_is_refused_before_spawning(fake_server, model_file):
    before = llama_server_pids()
    with pytest.raises(ValueError):
        Server(model_file, server_path=fake_server, startup_timeout=float("nan"))
    assert llama_server_pids() == before


@pytest.mark.parametrize("use_setpriv", [True, False])
def test_a_child_whose_owner_died_before_the_signal_was_armed_never_runs(tmp_path, monkeypatch, use_setpriv):
    if use_setpriv and not _process.shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    if not use_setpriv:
        monkeypatch.setattr(_process.shutil, "which", lambda name: None)
    marker = tmp_path / "ran"
    # An owner pid that is not our parent: as if the owner died between fork and prctl.
    argv = _process._pdeathsig_prefix(owner_pid=1) + [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    code = subprocess.run(argv, timeout=30).returncode
    assert not marker.exists()
    assert code == _process.ORPHANED_EXIT_CODE
    ok = subprocess.run(_process._pdeathsig_prefix(owner_pid=os.getpid()) + [sys.executable, "-c", "pass"],
                        timeout=30)
    assert ok.returncode == 0


def test_the_log_buffer_is_bounded_in_bytes(tmp_path):
    script = tmp_path / "chatty"
    script.write_text(f"#!{sys.executable}\nimport sys\nfor i in range(300):\n    print(str(i) * 100000, flush=True)\n")
    script.chmod(0o755)
    proc = _process.ManagedProcess([str(script)], dict(os.environ), max_lines=1000)
    try:
        proc.wait(30)
        proc.wait_drained(10)
        assert proc.output_tail(1000).encode().__len__() <= _process.MAX_LOG_BYTES
        assert proc.line_count == 300
    finally:
        proc.stop()


def test_error_messages_leave_request_and_response_bodies_out(fake_server, model_file, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "bodies")
    with pytest.raises(llamarocm.ServerStartError) as info:
        Server(model_file, server_path=fake_server)
    message = str(info.value)
    assert "the real reason" in message
    assert "SECRET" not in message and "SECRET" not in info.value.stderr_tail
    assert len(message) < 20000


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

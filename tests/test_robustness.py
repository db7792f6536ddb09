"""Faults on the real server: stalls, interrupts, forks, bad starts, taken ports."""

from __future__ import annotations

import _thread
import os
import shutil
import signal
import socket
import threading

import pytest
from conftest import slots_idle

import llamarocm
from llamarocm import server as server_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GREEDY = {"temperature": 0.0, "top_k": 1}
LONG = {"max_tokens": 600, "extra": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def model(model_path, server_binary):
    with llamarocm.load_model(model_path, context_length=512, server_path=server_binary) as m:
        yield m


def test_a_stalled_server_times_out_and_the_stream_is_cancelled(model):
    stream = model.generate("Once upon a time", timeout=1.0, **LONG, **GREEDY)
    next(stream)
    os.kill(model.server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(llamarocm.StreamTimeoutError) as info:
            list(stream)
        assert isinstance(info.value, TimeoutError)
    finally:
        os.kill(model.server.pid, signal.SIGCONT)
    assert stream.error is info.value
    assert slots_idle(model), "the timed-out request kept its slot"


def test_ctrl_c_while_waiting_for_a_token_cancels(model):
    stream = model.generate("Once upon a time", **LONG, **GREEDY)
    next(stream)

    class Interrupting:
        """Where Ctrl-C lands nearly always: the consumer blocked on the next token."""

        def put(self, item):
            pass

        def empty(self):
            return True

        def get(self, *args, **kwargs):
            raise KeyboardInterrupt

    stream._state.queue = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    assert stream.finish_reason == "cancelled"
    assert slots_idle(model)


def test_ctrl_c_in_a_loop_over_a_temporary_stream_cancels(model):
    def consume():
        for i, _ in enumerate(model.generate("Once upon a time", **LONG, **GREEDY)):
            if i == 2:
                _thread.interrupt_main()
                for _ in range(10**6):  # the interrupt lands here, in the user's code
                    pass

    with pytest.raises(KeyboardInterrupt):
        consume()
    # The stream was only referenced by the unwound loop: collecting it cancelled it.
    assert slots_idle(model)


def test_fork_child_neither_uses_nor_stops_the_parents_server(model):
    stream = model.generate("Once upon a time", max_tokens=40, **GREEDY)
    next(stream)
    pid = os.fork()
    if pid == 0:  # the child: every use must be refused, close must not touch the parent's
        code = 0
        try:
            model.generate("x")
            code = 3
        except llamarocm.LlamaRocmError:
            pass
        try:
            model.close()
            stream.close()
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert model.server.alive()
    rest = list(stream)  # the parent's stream was not cancelled by the child
    assert stream.finish_reason == "length" and len(rest) == 39
    assert model.generate("1, 2,", max_tokens=2, **GREEDY).text()


def test_progress_is_reported_while_loading(model_path, server_binary):
    calls = []
    with llamarocm.load_model(model_path, context_length=256, server_path=server_binary,
                              progress=lambda f, m: calls.append((f, m))):
        pass
    assert calls[-1] == (1.0, "ready")
    fractions = [f for f, _ in calls]
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_a_bad_flag_fails_the_start_with_the_servers_words(model_path, server_binary):
    with pytest.raises(llamarocm.ServerStartError) as info:
        llamarocm.load_model(model_path, server_path=server_binary, extra_args=["--no-such-flag"])
    assert "no-such-flag" in info.value.stderr_tail
    assert info.value.returncode not in (None, 0)


def test_a_missing_shared_library_fails_the_start(model_path, server_binary, tmp_path):
    lonely = tmp_path / "llama-server"
    shutil.copy(server_binary, lonely)  # without the libraries beside it
    with pytest.raises(llamarocm.ServerStartError) as info:
        llamarocm.load_model(model_path, server_path=str(lonely))
    assert "shared librar" in info.value.stderr_tail


def test_a_port_taken_before_the_server_binds_is_retried(model_path, server_binary, monkeypatch):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    ports = iter([taken])
    real = server_module._free_port
    monkeypatch.setattr(server_module, "_free_port", lambda: next(ports, None) or real())
    try:
        with llamarocm.load_model(model_path, context_length=256, server_path=server_binary) as m:
            assert m.server.port != taken
            assert m.generate("1, 2,", max_tokens=2, **GREEDY).text()
    finally:
        squatter.close()


def test_one_failing_stream_leaves_the_others_alone(model):
    results, errors = {}, {}

    def run(name, prompt):
        try:
            results[name] = model.generate(prompt, max_tokens=8, **GREEDY).text()
        except llamarocm.LlamaRocmError as exc:
            errors[name] = exc

    threads = [threading.Thread(target=run, args=("good", "1, 2, 3,")),
               threading.Thread(target=run, args=("bad", "word " * 3000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["good"] and "good" not in errors
    assert isinstance(errors["bad"], llamarocm.ContextLengthError)


def test_requests_without_the_key_are_refused(model):
    import requests

    url = model.server.url
    assert requests.get(url + "/health", timeout=5).status_code == 200  # open by design
    assert requests.get(url + "/slots", timeout=5).status_code == 401
    assert requests.post(url + "/completion", json={"prompt": "x", "n_predict": 1}, timeout=5).status_code == 401


def test_awkward_model_paths_pass_through_as_arguments(model_path, server_binary, tmp_path):
    odd = tmp_path / "-m --port 1 ünïcode model.gguf"
    os.symlink(model_path, odd)
    with llamarocm.load_model(str(odd), context_length=256, server_path=server_binary) as m:
        assert os.path.samefile(m.server.props["model_path"], str(odd))
        assert m.generate("1, 2,", max_tokens=2, **GREEDY).text()


def test_a_model_the_server_cannot_load_fails_the_start(server_binary, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.add_context_length(256)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(llamarocm.ServerStartError) as info:
        llamarocm.load_model(path, server_path=server_binary)
    assert "no-such-architecture" in info.value.stderr_tail


def test_an_owner_that_exits_without_closing_leaves_no_server(model_path, server_binary):
    import select
    import subprocess
    import sys

    code = ("import sys, llamarocm\n"
            "m = llamarocm.load_model(sys.argv[1], context_length=256, server_path=sys.argv[2])\n"
            "print(m.server.pid, flush=True)\n")  # and exit without close()
    owner = subprocess.Popen([sys.executable, "-c", code, model_path, server_binary], stdout=subprocess.PIPE, text=True)
    pid = int(owner.stdout.readline())
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    assert owner.wait(60) == 0
    owner.stdout.close()
    if fd is not None:
        try:
            ready, _, _ = select.select([fd], [], [], 10.0)
            assert ready, "llama-server outlived an owner that exited without closing it"
        finally:
            os.close(fd)

"""Server lifecycle against a fake binary: the failures real servers rarely show on cue."""

from __future__ import annotations

import os
import signal

import pytest

import llamarocm
from llamarocm import server as server_module
from llamarocm.server import PORT_ATTEMPTS, Server

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_gpus")]


def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [entry.split(b"=", 1) for entry in f.read().split(b"\0") if b"=" in entry]
    return {k.decode(): v.decode() for k, v in items}


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_sigill_is_reported_as_an_unsupported_cpu(fake_server, model_file, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "sigill")
    with pytest.raises(llamarocm.ServerStartError) as info:
        Server(model_file, server_path=fake_server)
    message = str(info.value)
    assert info.value.returncode == -signal.SIGILL
    assert "SIGILL" in message and "CPU instructions this processor lacks" in message
    assert "llamarocm setup" in message
    assert "llama threadpool init" in info.value.stderr_tail


def test_early_exit_quotes_the_log_with_the_key_redacted(fake_server, model_file, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "exit")
    with pytest.raises(llamarocm.ServerStartError) as info:
        Server(model_file, server_path=fake_server)
    assert info.value.returncode == 3
    assert "exited with code 3" in str(info.value)
    assert "failed to load model, key=***" in info.value.stderr_tail


def test_port_taken_is_retried_with_a_new_port(fake_server, model_file, monkeypatch, tmp_path):
    counter = tmp_path / "launches"
    monkeypatch.setenv("FAKE_COUNTER", str(counter))
    monkeypatch.setenv("FAKE_BIND_FAILURES", str(PORT_ATTEMPTS - 1))
    with Server(model_file, server_path=fake_server) as server:
        assert server.alive()
        assert server.props == {"fake": True}
    assert counter.read_text() == "x" * PORT_ATTEMPTS


def test_port_retries_are_bounded(fake_server, model_file, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_COUNTER", str(tmp_path / "launches"))
    monkeypatch.setenv("FAKE_BIND_FAILURES", "99")
    with pytest.raises(llamarocm.ServerStartError, match=f"free port on 127.0.0.1 in {PORT_ATTEMPTS} attempts"):
        Server(model_file, server_path=fake_server)
    assert (tmp_path / "launches").read_text() == "x" * PORT_ATTEMPTS


def test_a_server_without_progress_is_stopped(fake_server, model_file, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "hang")
    with pytest.raises(llamarocm.ServerStartError, match="no progress") as info:
        Server(model_file, server_path=fake_server, startup_timeout=0.5)
    assert "fake llama-server starting" in info.value.stderr_tail


def test_readiness_is_read_from_the_log(fake_server, model_file, monkeypatch):
    # With the fallback probe an hour away, only the logged "model loaded" line can
    # trigger the /health probe that finds the server ready.
    monkeypatch.setattr(server_module, "FALLBACK_PROBE_INTERVAL", 3600.0)
    monkeypatch.setenv("FAKE_MODE", "logged")
    with Server(model_file, server_path=fake_server) as server:
        assert server.alive() and server.props == {"fake": True}


def test_a_silent_log_still_reaches_readiness_by_probing(fake_server, model_file, monkeypatch):
    monkeypatch.setattr(server_module, "READY_MARKERS", ("a line no server prints",))
    monkeypatch.setenv("FAKE_MODE", "logged")
    with Server(model_file, server_path=fake_server) as server:
        assert server.alive() and server.props == {"fake": True}


def test_a_server_that_closes_its_output_is_still_found_ready(fake_server, model_file, monkeypatch):
    # With the pipe closed there is no output to wait for: the probes alone find it.
    monkeypatch.setenv("FAKE_MODE", "closed-output")
    with Server(model_file, server_path=fake_server) as server:
        assert server.alive() and server.props == {"fake": True}
        assert server._process._output.ended


def test_key_in_environment_never_on_command_line(fake_server, model_file, monkeypatch):
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # must not hijack loopback
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with Server(model_file, server_path=fake_server) as server:
        env = _environ(server.pid)
        assert env["LLAMA_API_KEY"] == server.api_key and len(server.api_key) >= 32
        assert env["HIP_VISIBLE_DEVICES"] == "0"
        cmdline = _cmdline(server.pid)
        assert server.api_key not in cmdline
        assert "--host 127.0.0.1" in cmdline
        pid = server.pid
    assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)


def test_devices_are_limited_by_the_users_variable(fake_server, model_file, monkeypatch):
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1,2")
    with Server(model_file, server_path=fake_server, devices=[2, 3]) as server:
        assert _environ(server.pid)["HIP_VISIBLE_DEVICES"] == "2"


def test_each_server_gets_a_fresh_key(fake_server, model_file):
    with Server(model_file, server_path=fake_server) as a, Server(model_file, server_path=fake_server) as b:
        assert a.api_key != b.api_key and a.port != b.port


def test_close_is_idempotent_and_reaps(fake_server, model_file):
    server = Server(model_file, server_path=fake_server)
    server.close()
    server.close()
    assert not server.alive()
    assert server.returncode == -signal.SIGTERM


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_new_output_lines_are_read_with_their_count():
    import sys

    from llamarocm._process import ManagedProcess

    proc = ManagedProcess([sys.executable, "-c", "print('a'); print('b'); print('c')"], dict(os.environ), max_lines=2)
    try:
        proc.wait(30)
        proc.wait_drained(30)
        assert proc.lines_since(1) == (["b\n", "c\n"], 3)
        assert proc.lines_since(2) == (["c\n"], 3)
        assert proc.lines_since(3) == ([], 3)
        # Lines that have left the ring buffer are gone, not repeated.
        assert proc.lines_since(0) == (["b\n", "c\n"], 3)
    finally:
        proc.stop()


def test_start_hooks_run_around_every_start_and_can_refuse_it(fake_server, model_file):
    from conftest import llama_server_pids, wait_pid_gone

    calls = []

    def refuse(server):
        calls.append(("ready", server.pid))
        raise llamarocm.ServerStartError("refused by the check")

    before = llama_server_pids()
    with pytest.raises(llamarocm.ServerStartError, match="refused by the check"):
        Server(model_file, server_path=fake_server, before_start=lambda: calls.append("before"), on_ready=refuse)
    assert calls[0] == "before" and calls[1][0] == "ready"
    assert wait_pid_gone(calls[1][1], 5.0)  # the checked server was stopped
    assert llama_server_pids() == before

    def not_now():
        raise ValueError("not now")

    with pytest.raises(ValueError, match="not now"):
        Server(model_file, server_path=fake_server, before_start=not_now)
    assert llama_server_pids() == before

    seen = []
    with Server(model_file, server_path=fake_server, before_start=lambda: seen.append("before"),
                on_ready=lambda s: seen.append(s.pid)) as server:
        first = server.pid
        server.restart()
        assert seen == ["before", first, "before", server.pid] and server.pid != first

"""RpcWorker: a fake worker for the failures a real one rarely shows on cue, then the real
``ggml-rpc-server`` serving layers of Gemma to a real llama-server."""

from __future__ import annotations

import math
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import wait_pid_gone, write_script

import llamarocm
from llamarocm import rpc
from llamarocm.devices import device_environment
from llamarocm.rpc import PORT_ATTEMPTS, RpcWorker, _is_loopback, _listener_owner

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0.0, "seed": 1}

FAKE_RPC = textwrap.dedent(
    '''\
    #!{python}
    """A stand-in ggml-rpc-server whose behaviour FAKE_RPC_MODE chooses (tests only)."""
    import os, signal, socket, sys, time

    host = sys.argv[sys.argv.index("--host") + 1]
    port = int(sys.argv[sys.argv.index("--port") + 1])
    mode = os.environ.get("FAKE_RPC_MODE", "serve")
    launches = os.environ.get("FAKE_RPC_LAUNCHES")
    if launches:
        with open(launches, "a") as f:
            f.write(f"{{port}}\\n")
        with open(launches) as f:
            count = len(f.read().split())
        if count <= int(os.environ.get("FAKE_RPC_BIND_FAILURES", "0")):
            mode = "bind"
    print("Starting RPC server v0.0.0 (fake)", flush=True)
    print(f"  endpoint       : {{host}}:{{port}}", flush=True)
    time.sleep(float(os.environ.get("FAKE_RPC_DELAY", "0")))
    if mode == "sigill":
        os.kill(os.getpid(), signal.SIGILL)
    if mode == "bind":
        # What the real worker prints, on stderr, before exiting with status 0.
        print("Failed to create server socket", file=sys.stderr, flush=True)
        sys.exit(0)
    if mode == "exit":
        print("No devices found", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "hang":
        time.sleep(3600)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    while True:
        client, _ = server.accept()
        print("Accepted client connection", flush=True)
        client.close()
    '''
)


@pytest.fixture
def fake_rpc(tmp_path):
    """Path of an executable fake ggml-rpc-server (see FAKE_RPC)."""
    return write_script(tmp_path / "fake-ggml-rpc-server", FAKE_RPC)


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [entry.split(b"=", 1) for entry in f.read().split(b"\0") if b"=" in entry]
    return {k.decode(): v.decode() for k, v in items}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- where the server put the weights ----------------------------------------------

LOAD_LOG = """\
0.01.656.990 I load_tensors: offloaded 19/19 layers to GPU
0.01.656.998 I load_tensors:   CPU_Mapped model buffer size =   170.00 MiB
0.01.656.999 I load_tensors: RPC0[127.0.0.1:34673] model buffer size =   199.34 MiB
0.01.657.001 I load_tensors: RPC0[127.0.0.1:43149] model buffer size =    35.82 MiB
0.02.367.971 I llama_kv_cache: RPC0[127.0.0.1:34673] KV buffer size =     0.50 MiB
0.02.379.035 I sched_reserve: RPC0[127.0.0.1:43149] compute buffer size =    17.42 MiB
"""


def test_placement_is_read_from_the_load_report():
    # Weights only: KV cache and compute buffers are not layers.
    assert rpc.rpc_placement(LOAD_LOG) == {"127.0.0.1:34673": 199.34, "127.0.0.1:43149": 35.82}
    assert rpc.rpc_placement("llama_server: model loaded") == {}


def test_a_worker_without_weights_is_named():
    placement = rpc.rpc_placement(LOAD_LOG)
    rpc.check_placement(["127.0.0.1:34673", "127.0.0.1:43149"], placement, "")
    with pytest.raises(llamarocm.ServerStartError, match=r"no model layers on RPC worker 127\.0\.0\.1:9 ") as info:
        rpc.check_placement(["127.0.0.1:34673", "127.0.0.1:9"], placement, "the log")
    assert "127.0.0.1:34673 199.3 MiB" in str(info.value) and info.value.stderr_tail == "the log"


def test_a_silent_load_report_is_a_warning_not_an_error(caplog):
    with caplog.at_level("WARNING", logger="llamarocm"):
        rpc.check_placement(["127.0.0.1:34673"], {}, "")
    assert "could not verify" in caplog.text


def _probe_one_connection(handle) -> str:
    """Probe a listener whose one connection ``handle(conn)`` serves in a thread;
    the probe's error message."""
    import threading

    with _listening_socket() as listener:
        def serve():
            conn, _ = listener.accept()
            with conn:
                handle(conn)

        server = threading.Thread(target=serve)
        server.start()
        with pytest.raises(llamarocm.ServerStartError) as info:
            rpc.probe_worker(f"127.0.0.1:{listener.getsockname()[1]}")
        server.join(5)
        assert not server.is_alive()
    return str(info.value)


def test_a_listener_that_closes_without_answering_is_not_a_worker():
    # What the local end of an SSH tunnel does when the worker behind it is down.
    assert "closed the connection without answering" in _probe_one_connection(lambda conn: None)


def test_a_web_server_on_the_port_is_not_a_worker():
    hang_up = []

    def answer_http(conn):
        conn.recv(100)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        try:
            hang_up.append(conn.recv(100))  # b"": an orderly close
        except ConnectionResetError:
            hang_up.append("reset")

    assert "answered, but not as a ggml-rpc-server" in _probe_one_connection(answer_http)
    # The probe always hangs up with a reset: a worker answering late must find the
    # connection gone rather than write into it (SIGPIPE).
    assert hang_up == ["reset"]


def test_a_listener_that_never_answers_is_named_busy(monkeypatch):
    monkeypatch.setattr(rpc, "RPC_PROBE_TIMEOUT", 0.2)
    with _listening_socket() as listener:  # never accepts: the connection waits in the queue
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(llamarocm.ServerStartError, match="serving another llama-server"):
            rpc.probe_worker(address)


# -- arguments and security ---------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "gpu-box.example"])
def test_a_host_beyond_loopback_is_refused(host):
    with pytest.raises(ValueError, match="no authentication"):
        RpcWorker(host=host)


def test_allow_remote_warns_that_the_worker_is_unauthenticated(fake_rpc, monkeypatch):
    # The fake exits at once, so nothing ever listens on all interfaces.
    monkeypatch.setenv("FAKE_RPC_MODE", "exit")
    with pytest.warns(RuntimeWarning, match="WITHOUT authentication"):
        with pytest.raises(llamarocm.ServerStartError):
            RpcWorker(host="0.0.0.0", allow_remote=True, server_path=fake_rpc)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("gpu-box", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert _is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"port": -1}, ValueError),
        ({"port": 70000}, ValueError),
        ({"port": True}, TypeError),
        ({"port": "50052"}, TypeError),
        ({"threads": 0}, ValueError),
        ({"extra_args": "-c"}, TypeError),
        ({"startup_timeout": 0}, ValueError),
    ],
)
def test_bad_arguments_fail_before_anything_runs(kwargs, error):
    with pytest.raises(error):
        RpcWorker(server_path="/nonexistent/ggml-rpc-server", **kwargs)


@pytest.mark.parametrize(
    ("extra_args", "keyword"),
    [
        (["-H", "0.0.0.0"], "host="),
        (["--host", "0.0.0.0"], "host="),
        (["--host=0.0.0.0"], "host="),
        (["-p", "50052"], "port="),
        (["--port", "50052"], "port="),
        (["--cache", "-t", "4"], "threads="),
        (["--threads", "4"], "threads="),
    ],
)
def test_flags_the_worker_manages_are_refused_in_extra_args(extra_args, keyword):
    # ggml-rpc-server keeps the last -H: the worker would listen on every interface
    # while reporting 127.0.0.1.
    with pytest.raises(ValueError, match=f"extra_args must not contain .*use {keyword}"):
        RpcWorker(extra_args=extra_args, server_path="/nonexistent/ggml-rpc-server")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"startup_timeout": math.nan}, ValueError),
        ({"startup_timeout": math.inf}, ValueError),
        ({"startup_timeout": 10**400}, ValueError),
        ({"startup_timeout": 1e300}, ValueError),
        ({"startup_timeout": True}, TypeError),
        ({"startup_timeout": "30"}, TypeError),
        ({"extra_args": [1]}, TypeError),
        ({"extra_args": ["--cache\0"]}, ValueError),
    ],
)
def test_unusable_startup_timeouts_and_args_are_refused(kwargs, error):
    # A NaN start-up timeout would never expire: the wait would be endless.
    with pytest.raises(error):
        RpcWorker(server_path="/nonexistent/ggml-rpc-server", **kwargs)


# -- start-up failures (fake worker) ------------------------------------------------


def test_sigill_is_reported_as_an_unsupported_cpu(fake_rpc, monkeypatch):
    monkeypatch.setenv("FAKE_RPC_MODE", "sigill")
    with pytest.raises(llamarocm.ServerStartError) as info:
        RpcWorker(server_path=fake_rpc)
    message = str(info.value)
    assert info.value.returncode == -signal.SIGILL
    assert "SIGILL" in message and "CPU instructions this processor lacks" in message
    assert "llamarocm setup" in message and "LLAMAROCM_RPC_SERVER" in message
    assert "Starting RPC server" in info.value.stderr_tail


def test_early_exit_raises_at_once_with_the_output(fake_rpc, monkeypatch):
    monkeypatch.setenv("FAKE_RPC_MODE", "exit")
    started = time.monotonic()
    with pytest.raises(llamarocm.ServerStartError, match="exited with code 1") as info:
        RpcWorker(server_path=fake_rpc, startup_timeout=60)
    assert time.monotonic() - started < 10  # not the startup timeout
    assert "No devices found" in info.value.stderr_tail


def test_a_worker_that_never_listens_is_stopped(fake_rpc, monkeypatch):
    monkeypatch.setenv("FAKE_RPC_MODE", "hang")
    with pytest.raises(llamarocm.ServerStartError, match="did not listen") as info:
        RpcWorker(server_path=fake_rpc, startup_timeout=0.5)
    assert "Starting RPC server" in info.value.stderr_tail


def test_a_lost_port_is_retried_with_a_new_one(fake_rpc, monkeypatch, tmp_path):
    launches = tmp_path / "launches"
    monkeypatch.setenv("FAKE_RPC_LAUNCHES", str(launches))
    monkeypatch.setenv("FAKE_RPC_BIND_FAILURES", str(PORT_ATTEMPTS - 1))
    with RpcWorker(server_path=fake_rpc) as worker:
        assert worker.alive()
        ports = [int(p) for p in launches.read_text().split()]
        assert len(ports) == PORT_ATTEMPTS and len(set(ports)) == PORT_ATTEMPTS
        assert worker.port == ports[-1]
        assert worker.address == f"127.0.0.1:{ports[-1]}"


def test_port_retries_are_bounded(fake_rpc, monkeypatch, tmp_path):
    launches = tmp_path / "launches"
    monkeypatch.setenv("FAKE_RPC_LAUNCHES", str(launches))
    monkeypatch.setenv("FAKE_RPC_BIND_FAILURES", "99")
    with pytest.raises(llamarocm.ServerStartError, match=f"free port on 127.0.0.1 in {PORT_ATTEMPTS} attempts") as info:
        RpcWorker(server_path=fake_rpc)
    assert len(launches.read_text().split()) == PORT_ATTEMPTS
    assert "Failed to create server socket" in info.value.stderr_tail


def test_an_explicit_port_that_is_taken_is_an_error(fake_rpc, tmp_path, monkeypatch):
    launches = tmp_path / "launches"
    monkeypatch.setenv("FAKE_RPC_LAUNCHES", str(launches))
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(llamarocm.ServerStartError, match=f"127.0.0.1:{port}: the port is already in use"):
            RpcWorker(port=port, server_path=fake_rpc)
    assert not launches.exists()  # refused before anything was spawned


def test_an_explicit_port_lost_to_a_race_is_not_retried(fake_rpc, tmp_path, monkeypatch):
    launches = tmp_path / "launches"
    monkeypatch.setenv("FAKE_RPC_LAUNCHES", str(launches))
    monkeypatch.setenv("FAKE_RPC_BIND_FAILURES", "99")
    port = _free_port()
    with pytest.raises(llamarocm.ServerStartError, match=f"could not bind 127.0.0.1:{port}: the port is in use"):
        RpcWorker(port=port, server_path=fake_rpc)
    assert launches.read_text().split() == [str(port)]


def test_another_listener_on_the_port_is_not_taken_for_the_worker(fake_rpc, monkeypatch):
    # The race the pre-check cannot close: the port is taken after it was checked. A
    # connection to it succeeds (someone else answers) while our worker is still about
    # to fail; readiness must not be declared on that.
    from llamarocm import rpc

    monkeypatch.setenv("FAKE_RPC_MODE", "bind")
    monkeypatch.setenv("FAKE_RPC_DELAY", "0.5")
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        monkeypatch.setattr(rpc, "_check_bindable", lambda host, requested: port)
        with pytest.raises(llamarocm.ServerStartError, match="port is in use"):
            RpcWorker(port=port, server_path=fake_rpc)


def test_listener_ownership_is_read_from_the_kernel():
    with _listening_socket() as sock:
        port = sock.getsockname()[1]
        assert _listener_owner(os.getpid(), port) is True
        assert _listener_owner(os.getppid(), port) is False
    assert _listener_owner(os.getpid(), port) is False


def test_device_environment_and_flags_reach_the_worker(fake_rpc, monkeypatch):
    for name in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES", "GGML_NO_BACKTRACE"):
        monkeypatch.delenv(name, raising=False)
    # The same variables Server would set for these devices, whatever GPUs this machine has.
    expected = device_environment(dict(os.environ), [0])
    with RpcWorker(devices=[0], threads=3, extra_args=["--cache"], server_path=fake_rpc) as worker:
        env = _environ(worker.pid)
        assert expected and {name: env.get(name) for name in expected} == expected
        assert env["GGML_NO_BACKTRACE"] == "1"
        with open(f"/proc/{worker.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[-6:-1] == [b"--port", str(worker.port).encode(), b"--threads", b"3", b"--cache"]


# -- the real ggml-rpc-server -------------------------------------------------------


def test_worker_listens_on_a_free_port_and_close_kills_it(rpc_binary):
    worker = RpcWorker(server_path=rpc_binary)
    try:
        pid = worker.pid
        assert worker.alive()
        assert worker.port > 0 and worker.address == f"127.0.0.1:{worker.port}"
        assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(rpc_binary)
        with socket.create_connection(("127.0.0.1", worker.port), timeout=5):
            pass
        # The banner may reach us a moment after the socket listens: wait for output.
        proc, expected = worker._process, f"endpoint       : 127.0.0.1:{worker.port}"
        deadline = time.monotonic() + 10
        while expected not in worker.output_tail() and time.monotonic() < deadline:
            proc.wait_output(proc.line_count, deadline - time.monotonic())
        assert expected in worker.output_tail()
    finally:
        worker.close()
    assert not worker.alive()
    assert wait_pid_gone(pid, 1.0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", worker.port), timeout=5).close()
    worker.close()  # idempotent


def test_two_workers_get_different_ports_and_a_taken_port_is_refused(rpc_binary):
    with RpcWorker(server_path=rpc_binary) as a, RpcWorker(server_path=rpc_binary) as b:
        assert a.port != b.port and a.pid != b.pid
        with pytest.raises(llamarocm.ServerStartError, match="already in use"):
            RpcWorker(port=a.port, server_path=rpc_binary)
        assert a.alive() and b.alive()


def test_an_explicit_free_port_is_used(rpc_binary):
    port = _free_port()
    with RpcWorker(port=port, server_path=rpc_binary) as worker:
        assert worker.port == port and worker.address == f"127.0.0.1:{port}"


def test_worker_dies_with_its_owner_even_on_sigkill(rpc_binary):
    owner_code = textwrap.dedent(
        f"""
        import sys, time
        from llamarocm.rpc import RpcWorker
        worker = RpcWorker(server_path={rpc_binary!r})
        print(worker.pid, flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(owner.stdout.readline())
        # Opened before the owner dies, so the descriptor follows this very process
        # even if its pid is reused later.
        fd = os.pidfd_open(worker_pid)
        try:
            owner.send_signal(signal.SIGKILL)
            owner.wait(10)
            ready, _, _ = select.select([fd], [], [], 10.0)
            assert ready, f"worker {worker_pid} outlived its SIGKILLed owner"
        finally:
            os.close(fd)
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()


def _generate(model, prompts):
    return [[t.id for t in model.generate(p, max_tokens=24, **GREEDY)] for p in prompts]


def test_a_model_split_across_two_workers_matches_a_local_run(model_path, server_binary, rpc_binary):
    # "Once upon a time" tells the two arithmetics apart: a local CPU run repacks the
    # weights for its own kernels, which changes its 4th greedy token for this model;
    # RPC never repacks. So the local reference runs with --no-repack.
    prompts = ["Once upon a time", "The capital of France is"]
    with llamarocm.load_model(
        model_path, context_length=256, server_path=server_binary, extra_args=["--no-repack"]
    ) as local:
        expected = _generate(local, prompts)
    with RpcWorker(server_path=rpc_binary) as a, RpcWorker(server_path=rpc_binary) as b:
        idle = {w.pid: _rss_mib(w.pid) for w in (a, b)}
        # Without -ngl the server keeps its "-ngl auto": it fits layers to the memory of
        # every device, and each RPC worker counts as one.
        with llamarocm.load_model(
            model_path, context_length=256, server_path=server_binary, rpc=[a, b.address]
        ) as model:
            # The weights are in the workers' memory, not only mapped by the server.
            for w in (a, b):
                assert _rss_mib(w.pid) - idle[w.pid] > 20, w.output_tail()
            # The server's own report agrees: both workers hold weights.
            assert set(model.rpc_placement) == {a.address, b.address}
            assert all(mib > 20 for mib in model.rpc_placement.values()), model.rpc_placement
            got = _generate(model, prompts)
            # Again: two runs over RPC agree with each other too.
            assert _generate(model, prompts[:1]) == got[:1]
        for w in (a, b):
            # One connection is our readiness probe; the server made the others.
            assert w.output_tail(400).count("Accepted client connection") > 1
            assert w.alive()
    assert got == expected
    assert all(len(ids) == 24 for ids in got)


def test_a_worker_killed_mid_stream_is_a_typed_error(model_path, server_binary, rpc_binary):
    with RpcWorker(server_path=rpc_binary) as worker:
        with llamarocm.load_model(
            model_path, context_length=256, server_path=server_binary, rpc=[worker]
        ) as model:
            stream = model.generate("Once upon a time", max_tokens=200, extra={"ignore_eos": True}, **GREEDY)
            next(stream)
            os.kill(worker.pid, signal.SIGKILL)
            # llama-server aborts when its RPC device vanishes: the layers really ran there.
            with pytest.raises(llamarocm.ServerCrashedError):
                for _ in stream:
                    pass
            assert not model.server.alive()
            assert worker.returncode == -signal.SIGKILL
            # A restart probes the workers again: the dead one is named, nothing starts.
            with pytest.raises(llamarocm.ServerStartError, match=f"RPC worker {worker.address} is unreachable"):
                model.restart()
            assert not model.server.alive()
            # The documented way back: the worker again on its address, then restart().
            with RpcWorker(port=worker.port, server_path=rpc_binary) as revived:
                model.restart()
                assert model.rpc_placement == {revived.address: model.rpc_placement[revived.address]}
                assert model.rpc_placement[revived.address] > 0
                assert model.generate("1, 2,", max_tokens=2, **GREEDY).text()


def test_a_worker_busy_with_another_server_is_named_and_survives(model_path, server_binary, rpc_binary):
    with RpcWorker(server_path=rpc_binary) as worker:
        with llamarocm.load_model(model_path, context_length=256, server_path=server_binary, rpc=[worker]) as first:
            # A worker serves one client at a time: a second server would wait forever.
            with pytest.raises(llamarocm.ServerStartError, match=f"RPC worker {worker.address} .* serving another"):
                llamarocm.load_model(model_path, context_length=256, server_path=server_binary, rpc=[worker])
            assert first.generate("1, 2,", max_tokens=2, **GREEDY).text()
        # The refused probe left nothing behind that could hurt the worker later.
        with llamarocm.load_model(model_path, context_length=256, server_path=server_binary, rpc=[worker]) as again:
            assert again.rpc_placement[worker.address] > 0
        assert worker.alive()


def test_a_worker_given_no_layers_fails_the_load(model_path, server_binary, rpc_binary):
    from conftest import llama_server_pids

    before = llama_server_pids()
    with RpcWorker(server_path=rpc_binary) as a, RpcWorker(server_path=rpc_binary) as b:
        # Reachable, but the split gives it nothing: llama-server itself would not say.
        with pytest.raises(llamarocm.ServerStartError, match=f"no model layers on RPC worker {b.address} "):
            llamarocm.load_model(model_path, context_length=256, server_path=server_binary, rpc=[a, b],
                                 extra_args=["--tensor-split", "1,0"])
    assert llama_server_pids() == before


def test_an_unreachable_worker_is_named_before_anything_starts(model_path, server_binary):
    from conftest import llama_server_pids

    before = llama_server_pids()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(llamarocm.ServerStartError, match=f"RPC worker 127.0.0.1:{free} is unreachable"):
        llamarocm.load_model(model_path, server_path=server_binary, rpc=[f"127.0.0.1:{free}"])
    with pytest.raises(ValueError, match="host:port"):
        llamarocm.load_model(model_path, server_path=server_binary, rpc=["nowhere"])
    with pytest.raises(ValueError, match="gpu_layers=0 puts no layers on the rpc workers"):
        llamarocm.load_model(model_path, server_path=server_binary, rpc=[f"127.0.0.1:{free}"], gpu_layers=0)
    assert llama_server_pids() == before

"""Shared fixtures: the real model file, a real server binary, one shared loaded model.

Integration tests need llama-server and the Gemma 3 270M package. Without them they
skip on a developer's machine, and *fail* under CI (``CI=true``), where a skip would
hide that nothing was tested.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from typing import Iterator, List, Optional

import pytest

import llamarocm
from llamarocm._binaries import find_binary

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def model_path() -> str:
    """The embedded Gemma 3 270M file (or $LLAMAROCM_TEST_MODEL)."""
    explicit = os.environ.get("LLAMAROCM_TEST_MODEL")
    if explicit:
        return explicit
    try:
        from llamarocm._default_model import default_model_path

        return default_model_path()
    except llamarocm.ModelNotFoundError as exc:
        _unavailable(f"the test model is missing: {exc}")
        raise


def _binary(kind: str, name: str) -> str:
    try:
        return find_binary(kind).path
    except llamarocm.ServerNotFoundError as exc:
        _unavailable(f"no {name}: {exc}")
        raise


@pytest.fixture(scope="session")
def server_binary() -> str:
    return _binary("server", "llama-server")


@pytest.fixture(scope="session")
def rpc_binary() -> str:
    """ggml-rpc-server from the same build as the llama-server the tests use."""
    return _binary("rpc", "ggml-rpc-server")


@pytest.fixture(scope="session")
def shared_model(model_path: str, server_binary: str):
    """One model with 4 slots for every test that only sends requests."""
    with llamarocm.load_model(model_path, parallel=4, context_length=1024, server_path=server_binary) as model:
        yield model


@pytest.fixture(autouse=True)
def no_thread_exceptions():
    """Fail any test in which an exception escaped a thread (reader threads included)."""
    escaped = []
    previous = threading.excepthook

    def hook(args):
        escaped.append(args)
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
    assert not escaped, f"exception escaped a thread: {escaped[0].exc_type.__name__}: {escaped[0].exc_value}"


FAKE_SERVER = textwrap.dedent(
    '''\
    #!{python}
    """A stand-in llama-server whose behaviour FAKE_MODE chooses (tests only)."""
    import http.server, json, os, signal, sys, time

    mode = os.environ.get("FAKE_MODE", "serve")
    counter = os.environ.get("FAKE_COUNTER")
    if counter:
        with open(counter, "a") as f:
            f.write("x")
        launches = os.path.getsize(counter)
        if launches <= int(os.environ.get("FAKE_BIND_FAILURES", "0")):
            mode = "bind"
    print("fake llama-server starting, mode", mode, flush=True)
    if mode == "sigill":
        print("llama threadpool init", flush=True)
        os.kill(os.getpid(), signal.SIGILL)
    if mode == "bind":
        print("couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 1", flush=True)
        sys.exit(1)
    if mode == "exit":
        print("error: failed to load model, key=" + os.environ.get("LLAMA_API_KEY", ""), flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(3600)
    if mode == "bodies":  # what a verbose log shows: request and response bodies
        print('srv  log_server_request: request: {{"prompt": "SECRET-PROMPT"}}', flush=True)
        print('srv  operator(): http: streamed chunk: data: {{"content": "SECRET-REPLY"}}', flush=True)
        print("x" * 200000, flush=True)
        print("error: the real reason", flush=True)
        sys.exit(3)
    port = int(sys.argv[sys.argv.index("--port") + 1])
    key = os.environ.get("LLAMA_API_KEY", "")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self._send(200, {{"status": "ok"}})
            if self.headers.get("Authorization") != "Bearer " + key:
                return self._send(401, {{"error": {{"code": 401, "message": "Invalid API Key"}}}})
            self._send(200, {{"fake": True}})

    if mode == "closed-output":
        os.close(1)
        os.close(2)
    httpd = http.server.HTTPServer(("127.0.0.1", port), Handler)
    if mode == "logged":
        print("srv  llama_server: model loaded", flush=True)  # llama-server's own wording
    httpd.serve_forever()
    '''
)


def write_script(path, template: str) -> str:
    """Write ``template`` (a Python script with a ``{python}`` shebang) as an executable."""
    path.write_text(template.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_server(tmp_path):
    """Path of an executable fake llama-server (see FAKE_SERVER)."""
    return write_script(tmp_path / "fake-llama-server", FAKE_SERVER)


def llama_server_pids(parent: Optional[int] = None) -> "set[int]":
    """llama-server processes that ``parent`` (default: this test process) started, its
    children alive or not yet reaped; other sessions' servers on the machine are none
    of our business."""
    parent = os.getpid() if parent is None else parent
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", "llama-server"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@contextlib.contextmanager
def running(argv: List[str]) -> Iterator[subprocess.Popen]:
    """``argv`` as a child process, its output piped as text, killed if it is still
    running when the block ends (a failed assertion must not leave it behind)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def slots_idle(model: llamarocm.Model, timeout: float = 10.0) -> bool:
    """Whether every slot of ``model``'s server is free within ``timeout`` seconds: a
    cancelled or finished request must give its slot back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(slot.get("is_processing") for slot in model.client.slots()):
            return True
        time.sleep(0.02)
    return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that may not be our child to end, without polling (pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


@pytest.fixture
def no_gpus(monkeypatch, tmp_path):
    """Device choice from an empty sysfs tree, whatever this machine's GPUs are."""
    import functools

    from llamarocm import devices
    from llamarocm import server as server_module

    empty_root = tmp_path / "sysfs-root"
    empty_root.mkdir()
    monkeypatch.setattr(server_module, "device_environment",
                        functools.partial(devices.device_environment, sysfs_root=str(empty_root)))


@pytest.fixture
def model_file(tmp_path):
    """A file that starts like GGUF: enough for a fake server, never for a real one."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return str(path)


@pytest.fixture
def canned():
    """A CannedServer (tests/canned_server.py) for the test."""
    from canned_server import CannedServer

    server = CannedServer()
    yield server
    server.close()


@pytest.fixture
def canned_model(canned):
    """A Model attached to the canned server."""
    from llamarocm.client import Client
    from llamarocm.model import Model

    m = Model(Client(canned.url, api_key="k"))
    yield m
    m.close()

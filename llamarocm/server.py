"""``Server``: one ``llama-server`` process, from finding the binary to reaping it.

Knows processes, ports and the server's log; not inference. Start-up follows the
pattern of jupyter_client: spawn, then wait for a probe (``/health``, then ``/props``
with our key, which proves the server on the port is ours) while watching that the
process lives; on any failure, tear down what was started.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._binaries import find_binary
from ._process import PORT_ATTEMPTS, ManagedProcess, ProcessOwner
from .client import Client
from .config import DEFAULT_REQUEST_TIMEOUT, check_timeout
from .devices import device_environment
from .errors import ClosedError, RequestError, ServerStartError
from .gguf import check_model_file

__all__ = ["Server", "PORT_ATTEMPTS"]

log = logging.getLogger("llamarocm")

HOST = "127.0.0.1"
#: Lines of the server's log kept: room for a verbose (-lv 4) load report.
LOG_LINES = 1000
# Readiness comes from the log: llama-server prints one of these once the model is
# loaded, and a single /health then confirms it. Polling instead costs a full HTTP
# exchange per probe (the server answers 503 while loading), CPU taken from the load
# on small machines, and up to one interval of idle wait.
READY_MARKERS = ("model loaded", "listening on", "all slots are idle")
# Probes also run this often whatever the log says, so that a build that words its log
# differently, or logging turned down in extra_args, still reaches readiness, only later:
# about 35 probes in a 1.8 s load instead of 360 at 5 ms.
FALLBACK_PROBE_INTERVAL = 0.05
# How often load progress (/proc/<pid>/io and statm) is sampled.
PROGRESS_INTERVAL = 0.25

ProgressCallback = Callable[[float, str], None]


def _free_port() -> int:
    # Bind port 0 to let the kernel choose, then release it for the server. Another
    # process may take it in between: that case is detected and retried.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _read_progress(pid: int) -> "tuple[int, int]":
    """Bytes the process has read and its resident pages: both grow while a model loads."""
    read = rss = 0
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    read = int(line.split()[1])
                    break
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return read, rss


class Server(ProcessOwner):
    """Owns one ``llama-server`` process serving ``model_path`` on a loopback port.

    ``args`` are the model-specific arguments (``-c``, ``-ngl``, ``--parallel`` ...);
    the host, port and model are added here. The API key is fresh for every process
    and reaches the child only through its environment (``LLAMA_API_KEY``): the
    command line is readable by every local user in ``/proc/<pid>/cmdline``.
    ``startup_timeout`` is the longest the start may go *without progress* (the
    child reading the model file or growing); a slow disk is waited for, a hung
    server is not. ``progress(fraction, message)`` is called while it loads.
    ``before_start()`` runs before every start (restarts too) and ``on_ready(server)``
    once it is ready; either may raise to refuse the start, which stops the process.

    >>> with Server("gemma.gguf", ["-c", "4096"]) as server:  # doctest: +SKIP
    ...     print(server.url, server.alive())
    http://127.0.0.1:41234 True
    """

    def __init__(
        self,
        model_path: str,
        args: Sequence[str] = (),
        *,
        server_path: Optional[str] = None,
        devices: Optional[Sequence[int]] = None,
        startup_timeout: float = 120.0,
        progress: Optional[ProgressCallback] = None,
        env: Optional[Dict[str, str]] = None,
        before_start: Optional[Callable[[], None]] = None,
        on_ready: Optional[Callable[["Server"], None]] = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.model_path = os.path.abspath(os.fspath(model_path))
        check_model_file(self.model_path)
        check_timeout("startup_timeout", startup_timeout)
        check_timeout("request_timeout", request_timeout)
        self._request_timeout = request_timeout
        binary = find_binary("server", server_path)
        self._args = list(args)
        self._startup_timeout = startup_timeout
        self._progress = progress
        # Checks of what the server depends on (run before every start, restarts too)
        # and of what it did (run once it is ready; raising fails the start).
        self._before_start = before_start
        self._on_ready = on_ready
        self.api_key = secrets.token_urlsafe(32)
        base_env = dict(os.environ if env is None else env)
        base_env.update(binary.env)
        base_env.update(device_environment(base_env, devices))
        base_env["LLAMA_API_KEY"] = self.api_key
        super().__init__(binary, base_env, HOST)
        self.url = ""
        self.client: Optional[Client] = None
        self.props: Dict[str, Any] = {}
        self._start()

    @property
    def args(self) -> List[str]:
        """The arguments given to llama-server after the model (a copy): what a saved
        chat session reads its KV-cache flags from."""
        return list(self._args)

    # -- what the start loop needs -----------------------------------------------

    _kind = "server"
    _logger_name = "llamarocm.server"
    _bind_failure_markers = ("couldn't bind", "address already in use", "failed to bind")
    _max_lines = LOG_LINES

    def _argv(self, port: int) -> List[str]:
        return [self.binary.path, "--host", HOST, "--port", str(port), "-m", self.model_path, *self._args]

    def _choose_port(self) -> int:
        return _free_port()

    def _redact(self) -> List[str]:
        return [self.api_key]

    def _before_spawn(self) -> None:
        if self._before_start is not None:
            self._before_start()

    def _spawned(self, port: int) -> None:
        self.url = f"http://{HOST}:{port}"
        self.client = Client(self.url, self.api_key, self._request_timeout)

    def _after_ready(self) -> None:
        if self._on_ready is not None:
            self._on_ready(self)
        if self._progress is not None:
            self._progress(1.0, "ready")

    def _wait_ready(self, proc: ManagedProcess) -> None:
        client = self.client
        assert client is not None
        file_size = max(os.path.getsize(self.model_path), 1) if os.path.exists(self.model_path) else 1
        base_read, _ = _read_progress(proc.pid)
        start = time.monotonic()
        deadline = start + self._startup_timeout
        last_mark = (-1, -1)
        next_progress_check = start
        next_probe = start + FALLBACK_PROBE_INTERVAL
        seen = 0
        status: Optional[str] = None
        while True:
            code = proc.returncode
            if code is not None:
                raise self._exit_error(code, "before it was ready")
            now = time.monotonic()
            lines, seen = proc.lines_since(seen)
            logged_ready = any(marker in line for line in lines for marker in READY_MARKERS)
            if logged_ready or now >= next_probe:
                next_probe = now + FALLBACK_PROBE_INTERVAL
                status = client.health(timeout=1.0)
                if status == "ok":
                    self._confirm_ours(proc, client)
                    return
            if now >= next_progress_check:
                next_progress_check = now + PROGRESS_INTERVAL
                mark = _read_progress(proc.pid)
                if mark != last_mark:
                    last_mark = mark
                    deadline = now + self._startup_timeout
                    if self._progress is not None:
                        fraction = min(max(mark[0] - base_read, 0) / file_size, 0.99)
                        self._progress(fraction, "loading model")
            if now >= deadline:
                raise ServerStartError(
                    f"llama-server made no progress for {self._startup_timeout} s and was stopped "
                    f"(last status: {status or 'not listening'})",
                    proc.output_tail(),
                )
            # Sleep until the server logs something, or the next probe or progress sample.
            proc.wait_output(seen, max(min(next_probe, next_progress_check) - now, 0.0))

    def _confirm_ours(self, proc: ManagedProcess, client: Client) -> None:
        """Read /props with our key: something that answers /health but refuses the
        key or serves another model is not our server (the port was taken in the race)."""
        try:
            self.props = client.props()
            served = self.props.get("model_path")
            if served and os.path.abspath(served) != self.model_path:
                raise RequestError(f"it serves {served}")
        except RequestError as exc:  # a lost connection included
            if proc.returncode is not None:
                raise self._exit_error(proc.returncode, "before it was ready") from exc
            raise ServerStartError(f"a server on port {self.port} answered /health but is not ours: {exc}") from exc

    def _teardown(self) -> None:
        if self.client is not None:
            self.client.close()
        super()._teardown()

    def restart(self) -> None:
        """Stop the process and start a fresh one (new port, new API key).

        A :meth:`close` from another thread wins: the restart raises
        :class:`~llamarocm.ClosedError` and leaves no process behind.
        """
        if self._closed:
            raise ClosedError("this server was closed; start a new one")
        self._teardown()
        self.api_key = secrets.token_urlsafe(32)
        self._env["LLAMA_API_KEY"] = self.api_key
        self._start()

    def stderr_tail(self, lines: int = 40) -> str:
        """The last lines the server logged: the API key redacted, lines of request or
        response data (a verbose log's prompts and replies) left out."""
        return self._tail(lines)

    def __repr__(self) -> str:
        state = "alive" if self.alive() else f"exited {self.returncode}"
        return f"<Server {self.url} pid={self._process.pid if self._process else None} {state}>"

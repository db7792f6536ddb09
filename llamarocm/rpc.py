"""``RpcWorker``: one ``ggml-rpc-server`` process that lends its devices to llama-server.

llama.cpp's RPC backend lets a ``llama-server`` (started with ``--rpc host:port``) put
model layers on the devices of another process, on this machine or another. A worker
holds no model of its own: it waits for a client and runs whatever tensors and graphs
the client sends.

**The worker has no authentication and no encryption.** Anyone who can reach its port
can allocate its memory and run computations on it, and the protocol was not written to
withstand a hostile client. ``RpcWorker`` therefore binds to loopback and refuses any
other address unless the caller passes ``allow_remote=True``; even then, expose it only
on a private network you control, or keep it on loopback and reach it through an SSH
tunnel (``ssh -L 50052:127.0.0.1:50052 gpu-box``), never on an open network.

The process side is shared with :class:`~llamarocm.Server` (``_process.ManagedProcess``:
own process group, parent-death signal, drained output, TERM → KILL → reap) and so is
binary discovery (``find_binary("rpc")``): the worker must come from the same llama.cpp
build as the llama-server that connects to it, because the RPC protocol is versioned
and a mismatch is refused at connect time.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import time
import warnings
from typing import List, Optional, Sequence, Tuple

from ._binaries import Binary, find_binary, unsupported_cpu_message
from ._process import ManagedProcess, ProcessOwner
from .config import _check_devices, _check_int, _check_optional, _check_timeout, _shown, check_extra_args
from .devices import device_environment
from .errors import ServerStartError

__all__ = ["RpcWorker", "unsupported_cpu_message"]

log = logging.getLogger("llamarocm")

PORT_ATTEMPTS = 3
DEFAULT_HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 30.0
# Readiness is re-checked this often while the worker is silent; a check reads two
# small /proc files and costs microseconds, so a fine interval only trims the wait.
POLL_INTERVAL = 0.005
# ggml-rpc-server reports any failure to bind or listen with this one line, and then
# exits with status 0.
_BIND_FAILURE_MARKERS = ("failed to create server socket", "address already in use", "failed to bind")
_TCP_LISTEN = "0A"

# Worker flags RpcWorker sets itself (see RpcWorker._argv). ggml-rpc-server keeps the
# last occurrence, so one of these in extra_args would override ours: a second -H would
# listen on every interface while the worker reports 127.0.0.1.
_MANAGED_FLAGS = {
    "-H": "use host= (beyond loopback only with allow_remote=True)",
    "--host": "use host= (beyond loopback only with allow_remote=True)",
    "-p": "use port= (0 picks a free one)",
    "--port": "use port= (0 picks a free one)",
    "-t": "use threads=",
    "--threads": "use threads=",
}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _bind_error(host: str, port: int, exc: OSError) -> ServerStartError:
    if exc.errno == errno.EADDRINUSE:
        why = "the port is already in use"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "that address does not belong to this machine"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
    else:
        why = str(exc)
    return ServerStartError(f"ggml-rpc-server cannot listen on {host}:{port}: {why}")


def _check_bindable(host: str, port: int) -> int:
    """Bind ``host:port`` ourselves and release it; return the port (chosen by the
    kernel when ``port`` is 0).

    This turns a bad host or a taken port into a precise error before anything is
    spawned: the worker itself says only "Failed to create server socket" and exits 0.
    SO_REUSEADDR matches what the worker sets, so a port that only has connections in
    TIME_WAIT counts as free, as it is for the worker. Between our release and the
    worker's bind another process may take the port: the worker's failure is detected
    and, for a port we chose, retried.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            return sock.getsockname()[1]
    except socket.gaierror as exc:
        raise ServerStartError(f"ggml-rpc-server cannot listen on {host!r}: {exc}") from exc
    except OSError as exc:
        raise _bind_error(host, port, exc) from exc


def _listener_owner(pid: int, port: int) -> Optional[bool]:
    """Whether process ``pid`` holds a listening TCP socket on ``port``; ``None`` when
    /proc cannot tell (not Linux).

    A connection to the port proves only that *someone* listens there: when the port is
    taken, the other owner answers while our worker is still starting and about to fail.
    The RPC protocol has no key to prove identity the way llama-server's API key does,
    so ownership is read from the kernel: the socket inodes listening on the port
    against the worker's open file descriptors.
    """
    inodes = set()
    readable = False
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # the header
                readable = True
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _TCP_LISTEN and fields[1].endswith(suffix):
                        inodes.add(fields[9])
        except OSError:
            continue
    if not readable:
        return None
    if not inodes:
        return False
    wanted = {f"socket:[{inode}]" for inode in inodes}
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False  # the process is gone (or not ours to inspect)
    for fd in fds:
        try:
            if os.readlink(os.path.join(fd_dir, fd)) in wanted:
                return True
        except OSError:
            continue  # closed while we looked
    return False


def _accepts(host: str, port: int) -> bool:
    # A wildcard bind is reachable through loopback; connecting to 0.0.0.0 itself is
    # a Linux quirk that other systems reject.
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        with socket.create_connection((target, port), timeout=1.0):
            return True
    except OSError:
        return False


def check_worker_arguments(
    host: str,
    port: int,
    devices: Optional[Sequence[int]],
    startup_timeout: float,
    threads: Optional[int],
    extra_args: Sequence[str],
    allow_remote: bool,
) -> Tuple[Optional[Tuple[int, ...]], Tuple[str, ...]]:
    """Check :class:`RpcWorker`'s arguments without starting anything; return its
    ``devices`` and ``extra_args`` as tuples. Raises ``TypeError`` / ``ValueError``."""
    if not isinstance(host, str) or not host:
        raise TypeError(f"host must be a non-empty str, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0 (pick a free one) or 1..65535, not {_shown(port)}")
    _check_optional(_check_int, "threads", threads, 1, 4096)
    # Non-finite values are refused: a NaN deadline never passes, so the wait would be endless.
    _check_timeout("startup_timeout", startup_timeout)
    checked_devices = _check_devices(devices)
    if isinstance(extra_args, str):
        raise TypeError("extra_args must be a sequence of strings, not one string")
    extra = check_extra_args("extra_args", extra_args, _MANAGED_FLAGS)
    if not _is_loopback(host) and not allow_remote:
        raise ValueError(
            f"refusing to bind ggml-rpc-server to {host!r}: the RPC protocol has no authentication, "
            "so anyone who can reach the port can use this machine's devices. Keep it on 127.0.0.1 "
            "(and use an SSH tunnel), or pass allow_remote=True for a private network you trust."
        )
    return checked_devices, extra


class _PortLost(Exception):
    """The worker could not bind a port we chose; worth another port."""

    def __init__(self, error: ServerStartError) -> None:
        super().__init__(str(error))
        self.error = error


class RpcWorker(ProcessOwner):
    """Owns one ``ggml-rpc-server`` process listening on ``host:port``.

    Give its :attr:`address` to llama-server (``--rpc``) to offload model layers to the
    devices this worker sees. ``port=0`` picks a free port (the worker itself refuses
    port 0) and retries with another if it is taken before the worker binds it; an
    explicit port that is taken raises :class:`~llamarocm.ServerStartError`.
    ``devices`` limits the GPUs the worker uses, as for :class:`~llamarocm.Server`;
    on a machine without a GPU the worker offers its CPU. ``threads`` sets the worker's
    CPU threads (its default is half the cores). ``extra_args`` go to the worker as
    they are, except the flags ``RpcWorker`` sets itself (``-H``/``--host``,
    ``-p``/``--port``, ``-t``/``--threads``): those raise ``ValueError`` naming the
    keyword argument to use. ``host`` is an IPv4 address or name: the worker resolves
    it with ``gethostbyname``.

    Security: the RPC protocol has **no authentication**: whoever reaches the port can
    use the worker's memory and compute and send it crafted requests. A host that is
    not loopback is therefore refused with ``ValueError`` unless ``allow_remote=True``;
    then a warning is issued, and the worker must only ever be reachable from a private
    network you trust (or bind it to loopback and use an SSH tunnel). Never expose it to
    the internet.

    Ready means the worker process is alive and holds a listening socket on its port
    that accepts connections; a worker that exits first raises ``ServerStartError``
    with its output at once. Usable from any thread; ``close()`` is idempotent.

    >>> import llamarocm
    >>> from llamarocm.rpc import RpcWorker
    >>> with RpcWorker() as worker:  # doctest: +SKIP
    ...     with llamarocm.load_model("gemma.gguf", rpc=[worker]) as model:
    ...         print(model.generate("Hello", max_tokens=8).text())
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        devices: Optional[Sequence[int]] = None,
        server_path: Optional[str] = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        *,
        threads: Optional[int] = None,
        allow_remote: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        devices, extra = check_worker_arguments(host, port, devices, startup_timeout, threads, extra_args, allow_remote)
        if not _is_loopback(host):
            message = (
                f"ggml-rpc-server will listen on {host}, beyond loopback, WITHOUT authentication: "
                "anyone who can reach it can use this machine's memory and devices. Never expose it "
                "to an open network."
            )
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.host = host
        self._requested_port = port
        self.binary: Binary = find_binary("rpc", server_path)
        self._startup_timeout = float(startup_timeout)
        self._extra = list(extra)
        if threads is not None:
            self._extra = ["--threads", str(threads), *self._extra]
        env = dict(os.environ)
        env.update(self.binary.env)
        env.update(device_environment(env, devices))
        # On an abort (a client sent something it cannot handle) ggml attaches gdb to
        # print a backtrace: a second of delay and enough frames to push the real
        # error out of the bounded log we quote. A value the user set is kept.
        env.setdefault("GGML_NO_BACKTRACE", "1")
        self._env = env
        self._process: Optional[ManagedProcess] = None
        self.port = 0
        self._start()

    # -- lifecycle ---------------------------------------------------------------

    def _argv(self, port: int) -> List[str]:
        return [self.binary.path, "--host", self.host, "--port", str(port), *self._extra]

    def _start(self) -> None:
        explicit = self._requested_port != 0
        attempts = 1 if explicit else PORT_ATTEMPTS
        lost: Optional[_PortLost] = None
        for attempt in range(1, attempts + 1):
            self.port = _check_bindable(self.host, self._requested_port)
            try:
                self._process = ManagedProcess(self._argv(self.port), self._env, name="ggml-rpc-server")
            except OSError as exc:
                raise ServerStartError(f"could not run {self.binary.path}: {exc}") from exc
            try:
                self._wait_ready()
            except _PortLost as exc:
                self._process.stop()
                if explicit:
                    raise ServerStartError(
                        f"ggml-rpc-server could not bind {self.address}: the port is in use "
                        "(taken after it was checked)",
                        exc.error.stderr_tail,
                        exc.error.returncode,
                    ) from None
                log.warning("port %d was taken before ggml-rpc-server bound it (attempt %d)", self.port, attempt)
                lost = exc
                continue
            except BaseException:  # KeyboardInterrupt included: never leave the child behind
                self._process.stop()
                raise
            log.info("ggml-rpc-server pid %d ready at %s (%s)", self.pid, self.address, self.binary.source)
            return
        assert lost is not None
        raise ServerStartError(
            f"ggml-rpc-server could not bind a free port on {self.host} in {PORT_ATTEMPTS} attempts",
            lost.error.stderr_tail,
            lost.error.returncode,
        )

    def _wait_ready(self) -> None:
        proc = self._process
        assert proc is not None
        deadline = time.monotonic() + self._startup_timeout
        seen = 0
        while True:
            code = proc.returncode
            if code is not None:
                raise self._start_failure(code)
            owned = _listener_owner(proc.pid, self.port)
            # Ownership first, so another program's listener on a taken port is never
            # mistaken for our worker; then one connection proves it accepts clients.
            if owned is not False and _accepts(self.host, self.port):
                if proc.returncode is not None:
                    raise self._start_failure(proc.returncode)
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"ggml-rpc-server did not listen on {self.address} within {self._startup_timeout} s "
                    "and was stopped",
                    proc.output_tail(),
                )
            # Wake as soon as the worker prints (it prints its endpoint as it binds).
            seen = proc.wait_output(seen, POLL_INTERVAL)

    def _start_failure(self, code: int) -> Exception:
        error = self._exit_error(code, "rpc", f"before it was listening on {self.address}")
        if any(marker in error.stderr_tail.lower() for marker in _BIND_FAILURE_MARKERS):
            return _PortLost(error)
        return error

    def close(self) -> None:
        """Stop the worker (TERM, up to 5 s, KILL, reap). Idempotent, thread-safe.

        >>> worker = RpcWorker()  # doctest: +SKIP
        >>> worker.close(); worker.close(); worker.alive()  # doctest: +SKIP
        False
        """
        if self._process is not None:
            self._process.stop()



    # -- state -------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``"host:port"``, the form llama-server's ``--rpc`` takes."""
        return f"{self.host}:{self.port}"





    def output_tail(self, lines: int = 40) -> str:
        """The last lines the worker printed (it logs each client it accepts).

        >>> with RpcWorker() as worker:  # doctest: +SKIP
        ...     print(worker.output_tail())
        Starting RPC server v7.0.0
          endpoint       : 127.0.0.1:41234
        ...
        """
        return self._tail(lines)

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        state = "alive" if self.alive() else f"exited {self.returncode}"
        return f"<RpcWorker {self.address} pid={pid} {state}>"

"""Everything about llama.cpp's RPC workers: ``RpcWorker`` (one ``ggml-rpc-server``
process that lends its devices to llama-server), the probe that a worker is there and
free before a load, and the check that the server put weights on each worker after it.

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

The process side is shared with :class:`~llamarocm.Server` (``_process.ProcessOwner``:
the start loop, own process group, parent-death signal, drained output, TERM → KILL →
reap) and so is
binary discovery (``find_binary("rpc")``): the worker must come from the same llama.cpp
build as the llama-server that connects to it, because the RPC protocol is versioned
and a mismatch is refused at connect time.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import struct
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from ._binaries import find_binary, unsupported_cpu_message
from ._process import PORT_ATTEMPTS, ManagedProcess, ProcessOwner
from .config import check_devices, check_extra_args, check_int, check_optional, check_timeout, shown
from .devices import device_environment
from .errors import ServerStartError

__all__ = [
    "RpcWorker",
    "PORT_ATTEMPTS",
    "probe_worker",
    "rpc_placement",
    "check_placement",
    "LOG_VERBOSITY_ARGS",
    "unsupported_cpu_message",
]

log = logging.getLogger("llamarocm")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 30.0
# Readiness is re-checked this often while the worker is silent; a check reads two
# small /proc files and costs microseconds, so a fine interval only trims the wait.
POLL_INTERVAL = 0.005
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
            bound: int = sock.getsockname()[1]
            return bound
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
        raise ValueError(f"port must be 0 (pick a free one) or 1..65535, not {shown(port)}")
    check_optional(check_int, "threads", threads, 1, 4096)
    # Non-finite values are refused: a NaN deadline never passes, so the wait would be endless.
    check_timeout("startup_timeout", startup_timeout)
    checked_devices = check_devices(devices)
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

    Security (see the module's note: no authentication): a host that is not loopback is
    refused with ``ValueError`` unless ``allow_remote=True``, and warned about then.

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
        self._requested_port = port
        binary = find_binary("rpc", server_path)
        self._startup_timeout = float(startup_timeout)
        self._extra = list(extra)
        if threads is not None:
            self._extra = ["--threads", str(threads), *self._extra]
        env = dict(os.environ)
        env.update(binary.env)
        env.update(device_environment(env, devices))
        super().__init__(binary, env, host)
        self._start()

    # -- what the start loop needs -----------------------------------------------

    _kind = "rpc"
    _logger_name = "llamarocm.rpc"
    # ggml-rpc-server reports any failure to bind or listen with one line, and then
    # exits with status 0.
    _bind_failure_markers = ("failed to create server socket", "address already in use", "failed to bind")

    def _argv(self, port: int) -> List[str]:
        return [self.binary.path, "--host", self.host, "--port", str(port), *self._extra]

    def _choose_port(self) -> int:
        return _check_bindable(self.host, self._requested_port)

    def _port_attempts(self) -> int:
        # An explicit port that is taken is the caller's to fix; one we chose is retried.
        return 1 if self._requested_port else PORT_ATTEMPTS

    def _wait_ready(self, proc: ManagedProcess) -> None:
        deadline = time.monotonic() + self._startup_timeout
        seen = 0
        while True:
            code = proc.returncode
            if code is not None:
                raise self._exit_error(code, f"before it was listening on {self.address}")
            owned = _listener_owner(proc.pid, self.port)
            # Ownership first, so another program's listener on a taken port is never
            # mistaken for our worker; then one connection proves it accepts clients.
            if owned is not False and _accepts(self.host, self.port):
                if proc.returncode is not None:
                    raise self._exit_error(proc.returncode, f"before it was listening on {self.address}")
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"ggml-rpc-server did not listen on {self.address} within {self._startup_timeout} s "
                    "and was stopped",
                    proc.output_tail(),
                )
            # Wake as soon as the worker prints (it prints its endpoint as it binds).
            seen = proc.wait_output(seen, POLL_INTERVAL)

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


# -- before a load: is each worker there, and free? ---------------------------------

#: How long the probe waits for a worker to accept and to answer.
RPC_PROBE_TIMEOUT = 2.0

# The RPC protocol's first message: HELLO (command 14) with its 24 bytes of
# connection capabilities, all zero.
_RPC_HELLO = bytes([14]) + (24).to_bytes(8, "little") + bytes(24)


def probe_worker(address: str) -> None:
    """Raise unless the worker at ``address`` answers now.

    llama-server aborts (SIGABRT, deep in argument parsing) when a worker does not
    accept the connection, so ask first and say which one. A worker serves one client
    at a time and leaves the others queued, unanswered: a worker busy with another
    llama-server accepts the TCP connection but never answers our HELLO, and the new
    server would wait on it forever. A close without an answer is a tunnel to a worker
    that is down, or a worker of another protocol version: llama-server would fail too.
    """
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=RPC_PROBE_TIMEOUT)
    except TimeoutError:
        raise ServerStartError(
            f"RPC worker {address} did not accept a connection within {RPC_PROBE_TIMEOUT} s: it is unreachable, "
            "or busy serving another llama-server (a worker serves one at a time)"
        ) from None
    except OSError as exc:
        raise ServerStartError(f"RPC worker {address} is unreachable: {exc}") from exc
    with sock:
        # Closed with a reset on every path: should the worker answer later (we gave
        # up, or were interrupted), it must find the connection gone, not write into a
        # closed socket, which kills it with SIGPIPE.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            sock.sendall(_RPC_HELLO)
            # The whole answer: a little-endian size, then a body of a few bytes (the
            # protocol version and capabilities).
            size = _recv_exactly(sock, 8)
            length = int.from_bytes(size, "little") if size is not None else 0
            body = _recv_exactly(sock, length) if 3 <= length <= 4096 else None
        except ConnectionError:
            size = body = None
        except TimeoutError:
            raise ServerStartError(
                f"RPC worker {address} accepts connections but did not answer within {RPC_PROBE_TIMEOUT} s: "
                "it is serving another llama-server (a worker serves one at a time), or it is hung"
            ) from None
        except OSError as exc:
            raise ServerStartError(f"RPC worker {address} failed during the handshake: {exc}") from exc
    if size is None:
        raise ServerStartError(
            f"RPC worker {address} closed the connection without answering: an SSH tunnel whose worker "
            "is down, or a ggml-rpc-server from another llama.cpp build (the protocol must match)"
        )
    if body is None:
        raise ServerStartError(f"{address} answered, but not as a ggml-rpc-server of this protocol")


def _recv_exactly(sock: socket.socket, n: int) -> Optional[bytes]:
    """``n`` bytes from ``sock``, or ``None`` if it closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- after a load: did the server put weights on each worker? -----------------------
#
# Reachable workers are not enough: llama-server decides the split itself (``-ngl``,
# ``--tensor-split``, each device's free memory), and a worker it gives nothing to costs
# a connection and helps no one. The server says what it placed where only in its load
# log, one line per device, and only at log verbosity 4::
#
#     load_tensors: RPC0[127.0.0.1:50052] model buffer size =   199.34 MiB
#
# so a server with workers is started with ``-lv 4`` (a couple of hundred lines at load,
# about twenty a request after that) and the lines are read once it is ready.

#: Server arguments that make it log each device's model buffer.
LOG_VERBOSITY_ARGS = ["-lv", "4"]

_BUFFER_LINE = re.compile(r"load_tensors:\s+RPC\d*\[(?P<address>[^\]]+)\] model buffer size =\s*(?P<mib>[0-9.]+) MiB")


def rpc_placement(log_text: str) -> Dict[str, float]:
    """MiB of model weights on each RPC worker, by the address the server was given.

    >>> rpc_placement("load_tensors: RPC0[127.0.0.1:50052] model buffer size =   199.34 MiB")
    {'127.0.0.1:50052': 199.34}
    """
    placement: Dict[str, float] = {}
    for match in _BUFFER_LINE.finditer(log_text):
        address = match.group("address")
        placement[address] = placement.get(address, 0.0) + float(match.group("mib"))
    return placement


def check_placement(addresses: Sequence[str], placement: Dict[str, float], log_tail: str) -> None:
    """Raise :class:`ServerStartError` naming every worker that holds no weights.

    An empty ``placement`` means the log said nothing about devices at all (its
    verbosity lowered in ``extra_args``, or another build's wording): that cannot be
    checked, which is logged, not raised.
    """
    if not placement:
        log.warning(
            "could not verify that llama-server placed layers on the RPC workers: its log has no "
            "'model buffer size' lines (is -lv lowered in extra_args?)"
        )
        return
    unused = [address for address in addresses if placement.get(address, 0.0) <= 0.0]
    if unused:
        raise ServerStartError(
            f"llama-server placed no model layers on RPC worker{'s' if len(unused) > 1 else ''} "
            f"{', '.join(unused)} (placed: {_describe(placement)}); check gpu_layers and any "
            "--tensor-split in extra_args, or use fewer workers for a model this small",
            log_tail,
        )


def _describe(placement: Dict[str, float]) -> str:
    return ", ".join(f"{address} {mib:.1f} MiB" for address, mib in placement.items()) or "nothing"

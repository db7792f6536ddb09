"""A child process that cannot outlive us and whose output is always drained.

Shared by every long-running llama.cpp program the library starts. It is one module
past the usual size because it is one guarantee: spawning (``_Spawner``), watching
(``ManagedProcess``, ``_Output``) and starting and stopping (``ProcessOwner``) are the
parts of "no orphan, no deadlock, no lost error", and each relies on the others'
details (the spawner thread for the parent-death signal, the drain for readiness and
the start-failure report). The layers of
protection against orphans:

* the child leads its own session and process group (``start_new_session=True``), so
  a stop signal reaches anything it forks and a Ctrl-C in our terminal does not reach it
  behind our back;
* the Linux parent-death signal (``PR_SET_PDEATHSIG``) kills it if this process dies,
  even by SIGKILL. The kernel ties that signal to the *thread* that forked the child,
  so every child is forked by one spawner thread that lives as long as the process;
  the signal is set between fork and exec by ``setpriv`` or, where it is missing, by a
  tiny Python shim (no ``preexec_fn``, which is unsafe with threads);
* ``stop()``: SIGTERM to the group, wait, SIGKILL, reap; idempotent and thread-safe;
* ``weakref.finalize`` stops it at interpreter exit or when the owner is collected.

The child's stdout and stderr share one pipe that a reader thread drains into a
ring buffer bounded in lines and in bytes (a verbose llama-server logs whole request
and response bodies, a line of hundreds of kilobytes each): an undrained pipe would
block the child once it fills. Secrets are redacted as lines arrive, and the tails
quoted in errors leave out lines that carry request or response data.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import IO, Any, Deque, Dict, List, Optional, Sequence, Tuple, TypeVar

from ._binaries import Binary, label_of, unsupported_cpu_message
from .errors import ClosedError, ServerStartError

__all__ = ["ManagedProcess", "ProcessOwner", "PORT_ATTEMPTS"]

log = logging.getLogger("llamarocm")

STOP_GRACE_SECONDS = 5.0
#: The most of the child's output kept in memory, and the longest line kept whole.
MAX_LOG_BYTES = 1 << 20
MAX_LINE_BYTES = 8192
#: Exit status of a child that found its owner gone before it could run.
ORPHANED_EXIT_CODE = 70

# Both ways of arming the parent-death signal re-check the parent once it is armed:
# had the owner died between fork and prctl, the signal would never come, and the
# child would run on as an orphan. setpriv execs a shell that compares $PPID (read
# after the arming); without setpriv, a tiny Python shim does both (no preexec_fn).
_PARENT_CHECK = f'test "$PPID" = "$1" || exit {ORPHANED_EXIT_CODE}; shift; exec "$@"'
_PDEATHSIG_SHIM = (
    "import ctypes,os,sys\n"
    "libc=ctypes.CDLL(None,use_errno=True)\n"
    "libc.prctl(1,9,0,0,0)\n"
    f"os.getppid()!=int(sys.argv[1]) and os._exit({ORPHANED_EXIT_CODE})\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


def _pdeathsig_prefix(owner_pid: Optional[int] = None) -> List[str]:
    """The argv prefix that arms the parent-death signal, then runs the rest only if
    ``owner_pid`` (default: this process) is still the parent."""
    if not sys.platform.startswith("linux"):
        return []
    owner = str(os.getpid() if owner_pid is None else owner_pid)
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _PARENT_CHECK, "sh", owner]
    return [sys.executable, "-S", "-E", "-c", _PDEATHSIG_SHIM, owner]


# What the spawner thread is asked (argv, environment, where to answer) and answers:
# (True, the process) or (False, the exception to raise in the caller).
_SpawnAnswer = Tuple[bool, Any]
_SpawnRequest = Tuple[List[str], Dict[str, str], "queue.SimpleQueue[_SpawnAnswer]"]
_Owner = TypeVar("_Owner", bound="ProcessOwner")


class _Spawner:
    """One long-lived thread that forks every child (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: "Optional[queue.SimpleQueue[_SpawnRequest]]" = None
        self._owner_pid = -1

    def spawn(self, argv: Sequence[str], env: Dict[str, str]) -> "subprocess.Popen[bytes]":
        with self._lock:
            # A forked child inherits our state but not our threads: start anew there.
            if self._requests is None or self._owner_pid != os.getpid():
                self._requests = queue.SimpleQueue()
                self._owner_pid = os.getpid()
                # Daemon: it must not keep the interpreter alive; its exit at process
                # exit is exactly when the children should die.
                threading.Thread(
                    target=self._serve, args=(self._requests,), name="llamarocm-spawner", daemon=True
                ).start()
            requests = self._requests
        done: "queue.SimpleQueue[_SpawnAnswer]" = queue.SimpleQueue()
        requests.put((list(argv), env, done))
        try:
            ok, value = done.get()
        except BaseException:
            # Ctrl-C while the spawner works: the child may be starting; the spawner
            # always answers within milliseconds, so take its answer and stop the child.
            ok, value = done.get()
            if ok:
                _stop(value, os.getpid(), 0.0)
            raise
        if ok:
            proc: "subprocess.Popen[bytes]" = value
            return proc
        raise value

    def reset_after_fork(self) -> None:
        # The lock may have been held by another thread at fork time; that thread does
        # not exist in the child, so the lock would never be released there.
        self._lock = threading.Lock()
        self._requests = None

    @staticmethod
    def _serve(requests: "queue.SimpleQueue[_SpawnRequest]") -> None:
        while True:
            argv, env, done = requests.get()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except BaseException as exc:  # handed to the caller, who raises it
                done.put((False, exc))
            else:
                done.put((True, proc))


_spawner = _Spawner()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_spawner.reset_after_fork)


def _stop(proc: "subprocess.Popen[bytes]", owner_pid: int, grace: float) -> Optional[int]:
    """TERM the group, wait ``grace`` seconds, KILL, reap. Safe to call repeatedly."""
    if os.getpid() != owner_pid:
        # A forked copy of the owner must never stop (or reap) the parent's child.
        return None
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group is gone and its id reused: signal the child only
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    log.error("process %d did not exit after SIGKILL", proc.pid)
    return proc.poll()


def _is_data_line(line: str) -> bool:
    # A request or response body (JSON), as a verbose llama-server logs them: prompts
    # and replies, which have no place in an error message or a traceback.
    return '{"' in line


class _Output:
    """The child's recent output lines; shared with the drain thread, which must not
    hold the ManagedProcess itself (that would keep it from ever being collected).

    Bounded by ``max_lines`` and by :data:`MAX_LOG_BYTES`; a line longer than
    :data:`MAX_LINE_BYTES` keeps only its start. ``redact`` strings become ``***``
    before a line is stored, so no cut can leave half a secret behind.
    """

    def __init__(self, max_lines: int, redact: Sequence[str] = (), logger: Optional[logging.Logger] = None) -> None:
        self.lines: Deque[str] = collections.deque()
        # Every line, redacted, also goes to this logger at DEBUG (for an application's
        # own log files); the ring buffer is what error messages quote.
        self.logger = logger
        self.max_lines = max_lines
        self.size = 0
        self.count = 0
        self.ended = False
        self.changed = threading.Condition()
        self._redact = [secret for secret in redact if secret]

    def drain(self, pipe: IO[bytes]) -> None:
        cutting = False  # inside the rest of an over-long line, which is dropped
        try:
            for raw in iter(lambda: pipe.readline(MAX_LINE_BYTES), b""):
                whole = raw.endswith(b"\n")
                if cutting:
                    cutting = not whole
                    continue
                line = raw.decode("utf-8", "replace")
                if not whole and len(raw) == MAX_LINE_BYTES:
                    cutting = True
                    line = self._cut(line)
                self._add(self._redacted(line))
        except (OSError, ValueError):
            pass  # pipe closed under us by stop()
        finally:
            with self.changed:
                self.ended = True
                self.changed.notify_all()

    def _redacted(self, line: str) -> str:
        for secret in self._redact:
            line = line.replace(secret, "***")
        return line

    def _cut(self, line: str) -> str:
        # The cut may fall inside a secret: drop any end that begins one.
        for secret in self._redact:
            for n in range(len(secret) - 1, 0, -1):
                if line.endswith(secret[:n]):
                    line = line[:-n]
                    break
        return line + " [... line cut]\n"

    def _add(self, line: str) -> None:
        if self.logger is not None and self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("%s", line.rstrip("\n"))
        size = len(line.encode())
        with self.changed:
            self.lines.append(line)
            self.size += size
            while len(self.lines) > 1 and (len(self.lines) > self.max_lines or self.size > MAX_LOG_BYTES):
                self.size -= len(self.lines.popleft().encode())
            self.count += 1
            self.changed.notify_all()


class ManagedProcess:
    """Start ``argv`` with ``env`` as a protected, drained child.

    ``redact`` strings are replaced by ``***`` in everything :meth:`output_tail`
    returns, so a secret in the environment never reaches an error message.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Dict[str, str],
        *,
        name: str = "child",
        logger: Optional[logging.Logger] = None,
        max_lines: int = 400,
        redact: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._output = _Output(max_lines, redact, logger)
        self._stop_lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._proc = _spawner.spawn(list(_pdeathsig_prefix()) + list(argv), env)
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._owner_pid, STOP_GRACE_SECONDS)
        self._drainer = threading.Thread(
            target=self._output.drain, args=(self._proc.stdout,), name=f"llamarocm-{name}-output", daemon=True
        )
        self._drainer.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait up to ``timeout`` seconds for the child to exit; its code, or None."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> Optional[int]:
        """Stop the child (TERM, wait ``grace`` s, KILL, reap) and return its exit code."""
        with self._stop_lock:
            code = _stop(self._proc, self._owner_pid, grace)
            if os.getpid() == self._owner_pid:
                self._finalizer.detach()
                self._drainer.join(timeout=1.0)
                if self._proc.stdout is not None:
                    self._proc.stdout.close()
            return code

    def wait_drained(self, timeout: float) -> None:
        """Wait up to ``timeout`` s until everything the child printed has been read
        (after it exited, the last lines may still be in the pipe)."""
        self._drainer.join(timeout)

    def output_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the child printed, for error messages: secrets
        redacted, and each run of request/response data lines shown as one note."""
        with self._output.changed:
            tail = list(self._output.lines)[-lines:]
        shown: List[str] = []
        left_out = 0
        for line in [*tail, ""]:  # "" closes a run of data lines at the end
            if line and _is_data_line(line):
                left_out += 1
                continue
            if left_out:
                shown.append(f"[{left_out} line(s) of request/response data left out]\n")
                left_out = 0
            shown.append(line)
        return "".join(shown)

    @property
    def line_count(self) -> int:
        with self._output.changed:
            return self._output.count

    def lines_since(self, seen: int) -> Tuple[List[str], int]:
        """The lines printed after the first ``seen`` (those still in the ring buffer),
        and the line count they bring it to: read together, so no line slips between."""
        with self._output.changed:
            count = self._output.count
            new = min(count - seen, len(self._output.lines))
            lines = list(self._output.lines)[-new:] if new > 0 else []
        return lines, count

    def wait_output(self, seen: int, timeout: float) -> int:
        """Block until more than ``seen`` lines were printed or ``timeout`` passes;
        return the line count.

        Once the output has ended nothing more will be printed: then it waits for the
        child to exit instead, so that a caller polling the exit code between waits
        sleeps rather than spins (the pipe may close a moment before the exit).
        """
        out = self._output
        deadline = time.monotonic() + timeout
        with out.changed:
            while out.count <= seen and not out.ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                out.changed.wait(remaining)
            count, ended = out.count, out.ended
        if ended and count <= seen:
            self.wait(max(deadline - time.monotonic(), 0.0))
        return count


#: Start attempts when the port chosen for a child is taken before the child binds it.
PORT_ATTEMPTS = 3


class ProcessOwner:
    """The owner of one :class:`ManagedProcess` at a time (``Server``, ``RpcWorker``):
    the one start loop, the one stop, and the state both offer.

    Start follows jupyter_client's pattern, written once: choose a port, spawn, wait
    for readiness while checking the child lives, and on any failure tear down what
    was started; a start that lost its port to another process is retried on a new
    one. An owner supplies only what differs: its argv, its readiness test, what a
    lost port looks like in its log (:attr:`_bind_failure_markers`), and optional hooks
    around the start. ``close()`` wins over a start in another thread: once it returns
    no process of the owner runs, and that start raises :class:`ClosedError`.
    """

    _process: Optional[ManagedProcess] = None
    #: ``find_binary`` kind: "server" or "rpc".
    _kind = "server"
    #: Lines of the child's log that mean it could not bind its port.
    _bind_failure_markers: Tuple[str, ...] = ()
    _max_lines = 400
    #: Where the child's output is logged, line by line, at DEBUG.
    _logger_name = "llamarocm.child"

    def __init__(self, binary: Binary, env: Dict[str, str], host: str) -> None:
        self.binary = binary
        self.host = host
        # On an abort ggml attaches gdb for a backtrace: a second's delay and a log tail
        # full of stack frames instead of the error. A value the user set is kept.
        env.setdefault("GGML_NO_BACKTRACE", "1")
        self._env = env
        self.port = 0
        # Guards _closed and every new process: close() either stops a process or
        # keeps it from being spawned, whatever a start in another thread is doing.
        self._lifecycle = threading.Lock()
        self._closed = False

    # -- what an owner supplies ------------------------------------------------------

    def _argv(self, port: int) -> List[str]:  # pragma: no cover - every owner has one
        raise NotImplementedError

    def _wait_ready(self, proc: ManagedProcess) -> None:  # pragma: no cover
        """Return once ``proc`` serves; raise ``ServerStartError`` if it cannot."""
        raise NotImplementedError

    def _choose_port(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def _port_attempts(self) -> int:
        return PORT_ATTEMPTS

    def _before_spawn(self) -> None:
        """Runs before each start (restarts too); may raise to refuse it."""

    def _spawned(self, port: int) -> None:
        """Runs under the lifecycle lock once the child for ``port`` exists."""

    def _after_ready(self) -> None:
        """Runs once the child is ready; may raise to refuse the start."""

    def _redact(self) -> List[str]:
        return []

    # -- the one start loop and the one stop -----------------------------------------

    def _start(self) -> None:
        self._before_spawn()
        attempts = self._port_attempts()
        lost: Optional[ServerStartError] = None
        for attempt in range(1, attempts + 1):
            proc = self._spawn(self._choose_port())
            try:
                self._wait_ready(proc)
                self._after_ready()
                if self._closed:  # close() stopped it meanwhile
                    raise ClosedError(f"this {label_of(self._kind)} was closed while it started")
                log.info("%s pid %d ready on %s:%d (%s)", label_of(self._kind), proc.pid, self.host, self.port,
                         self.binary.source)
                return
            except ServerStartError as exc:
                self._teardown()
                if self._closed:
                    raise ClosedError(f"this {label_of(self._kind)} was closed while it started") from exc
                if not self._lost_port(exc):
                    raise
                log.warning(
                    "port %d was taken before %s bound it (attempt %d)", self.port, label_of(self._kind), attempt
                )
                lost = exc
            except BaseException:  # KeyboardInterrupt included: never leave the child behind
                self._teardown()
                raise
        assert lost is not None
        raise self._ports_exhausted(lost, attempts)

    def _spawn(self, port: int) -> ManagedProcess:
        with self._lifecycle:
            if self._closed:
                raise ClosedError(f"this {label_of(self._kind)} was closed")
            self.port = port
            try:
                self._process = ManagedProcess(
                    self._argv(port),
                    self._env,
                    name=label_of(self._kind),
                    logger=logging.getLogger(self._logger_name),
                    max_lines=self._max_lines,
                    redact=self._redact(),
                )
            except OSError as exc:
                raise ServerStartError(f"could not run {self.binary.path}: {exc}") from exc
            self._spawned(port)
            return self._process

    def _lost_port(self, error: ServerStartError) -> bool:
        tail = error.stderr_tail.lower()
        return any(marker in tail for marker in self._bind_failure_markers)

    def _ports_exhausted(self, lost: ServerStartError, attempts: int) -> ServerStartError:
        if attempts == 1:
            what = f"{self.host}:{self.port}: the port is in use (taken after it was checked)"
        else:
            what = f"a free port on {self.host} in {attempts} attempts"
        return ServerStartError(f"{label_of(self._kind)} could not bind {what}", lost.stderr_tail, lost.returncode)

    def _teardown(self) -> None:
        if self._process is not None:
            self._process.stop()

    def close(self) -> None:
        """Stop the process (TERM, up to 5 s, KILL, reap). Idempotent, thread-safe.

        Once it returns no process of this owner runs, and none will be started.
        """
        with self._lifecycle:
            self._closed = True
        self._teardown()

    # -- state -----------------------------------------------------------------------

    def __enter__(self: _Owner) -> _Owner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The process id (of the current process, after a restart)."""
        assert self._process is not None
        return self._process.pid

    @property
    def returncode(self) -> Optional[int]:
        """The exit code once the process has ended (negative: killed by that signal)."""
        return self._process.returncode if self._process is not None else None

    def alive(self) -> bool:
        """True while the process runs (it may still be unhealthy)."""
        return self._process is not None and self._process.alive()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait up to ``timeout`` s for the process to exit; its exit code, or None."""
        return self._process.wait(timeout) if self._process is not None else None

    def _tail(self, lines: int) -> str:
        return self._process.output_tail(lines) if self._process is not None else ""

    def _exit_error(self, code: int, when: str) -> ServerStartError:
        """The ServerStartError for the child that exited with ``code`` during start-up,
        quoting its last lines (SIGILL: the unsupported-CPU explanation)."""
        proc = self._process
        assert proc is not None
        proc.wait(1.0)
        proc.wait_drained(1.0)  # the last lines (often the reason) may still be in the pipe
        tail = proc.output_tail()
        if code == -signal.SIGILL:
            return ServerStartError(unsupported_cpu_message(self.binary, self._kind), tail, code)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return ServerStartError(f"{label_of(self._kind)} {how} {when}", tail, code)

"""The checkpoint file of a batch: one JSON line per finished item, appended the moment
the item ends, and read back by the next run to skip what is done.

One job, the file: which items it holds (an item is its id plus a hash of its prompt and
settings), appending whole lines, when they reach the disk, repairing a line cut short
by a kill, and keeping a second run out. What a line means for a batch (which items
run, what is returned) is :mod:`llamarocm.batch`'s business.

Durability, in order of what survives:

* a line is written with one ``os.write`` on an ``O_APPEND`` descriptor, so once
  :meth:`Checkpoint.append` returns it is in the file and survives the process dying
  (SIGKILL, a crash): the kernel has it;
* ``fsync`` runs on the first append once :data:`SYNC_INTERVAL` has passed since the
  last one, and at :meth:`Checkpoint.close`: a power cut loses at most the lines of
  the last second (or those since the last append, in a long quiet spell), never a
  line in the middle;
* a line cut short anyway (the writer killed mid-``write``, or a power cut that left
  the file's tail unwritten) can only be the last one: it is found and cut off at the
  next open, and its item runs again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._files import sync_folder_of
from .config import GenerateConfig
from .errors import CheckpointLockedError

__all__ = ["Checkpoint", "Record", "SYNC_INTERVAL", "item_hash", "settings_identity"]

log = logging.getLogger("llamarocm")

#: Seconds between two ``fsync`` calls of a checkpoint file at most, while lines arrive.
SYNC_INTERVAL = 1.0

ItemId = Union[str, int]
Prompt = Union[str, Sequence[Mapping[str, Any]]]

# A recorded error message is cut here: a crash's message quotes the server's log.
_MESSAGE_LIMIT = 2000

# Settings that do not change what the model writes: a rerun with a longer timeout
# (after timeouts) must not redo the items that finished.
_NOT_IDENTITY = frozenset({"timeout"})

# Each field that counts: its name, its default, whether it is a float setting.
_IDENTITY_FIELDS = tuple(
    (f.name, getattr(GenerateConfig(), f.name), "float" in str(f.type))
    for f in fields(GenerateConfig)
    if f.name not in _NOT_IDENTITY
)


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces, ASCII only (so the bytes
    hashed do not depend on how a text was encoded), no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def settings_identity(config: GenerateConfig) -> str:
    """The canonical JSON of the settings that decide an item's output.

    Only the fields set to something other than their default count (a field added to
    :class:`~llamarocm.GenerateConfig` later leaves every hash as it was), ``timeout``
    never, and a whole number given for a float setting counts as that float
    (``temperature=0`` is ``temperature=0.0``).
    """
    chosen: Dict[str, Any] = {}
    for name, default, is_float in _IDENTITY_FIELDS:
        value = getattr(config, name)
        if value == default:
            continue
        if is_float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, tuple):
            value = list(value)
        chosen[name] = value
    return canonical_json(chosen)


def item_hash(prompt: Prompt, settings: str) -> str:
    """The sha256 (hex) of an item: of the canonical JSON of ``{"prompt": text,
    "settings": {...}}``, or ``{"messages": [...], "settings": {...}}`` for a chat,
    where ``settings`` is :func:`settings_identity`'s JSON."""
    if isinstance(prompt, str):
        head = '{"prompt":' + canonical_json(prompt)
    else:
        head = '{"messages":' + canonical_json([dict(message) for message in prompt])
    # Built by hand, as canonical_json would build it ("messages" and "prompt" sort
    # before "settings"): the settings of a batch are serialised once, not per item.
    return hashlib.sha256(f'{head},"settings":{settings}}}'.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class Record:
    """One line of a checkpoint file: the outcome of one item.

    A success has ``text`` and ``finish_reason`` (``"stop"`` or ``"length"``) and no
    ``error``; a failure has ``error`` (``{"type": ..., "message": ...}``). ``metrics``
    holds the fields of :class:`~llamarocm.GenerateMetrics` when the item got a stream.
    """

    index: int
    id: ItemId
    hash: str
    text: Optional[str]
    finish_reason: Optional[str]
    metrics: Optional[Dict[str, Any]]
    error: Optional[Dict[str, str]]

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, index: int, item_id: ItemId, digest: str, error: BaseException,
                metrics: Optional[Dict[str, Any]] = None) -> "Record":
        message = str(error)
        if len(message) > _MESSAGE_LIMIT:
            message = message[: _MESSAGE_LIMIT - 1] + "…"
        return cls(index, item_id, digest, None, None, metrics, {"type": type(error).__name__, "message": message})

    def line(self) -> bytes:
        """The record as one line of JSON, newline included."""
        obj = {
            "id": self.id,
            "index": self.index,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "metrics": self.metrics,
            "hash": self.hash,
        }
        try:
            return (json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode()
        except UnicodeEncodeError:
            # A lone surrogate (which UTF-8 cannot carry) goes out as a \\u escape.
            return (json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n").encode("ascii")

    @classmethod
    def parse(cls, line: bytes) -> "Record":
        """The record in ``line``; ``ValueError`` saying what is wrong with it."""
        return cls.from_object(json.loads(line))

    @classmethod
    def from_object(cls, obj: Any) -> "Record":
        """The record of a line's parsed JSON; ``ValueError`` saying what is wrong with it."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        item_id, index, digest = obj.get("id"), obj.get("index"), obj.get("hash")
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            raise ValueError("its id is not a string or an integer")
        if isinstance(index, bool) or not isinstance(index, int) or not isinstance(digest, str):
            raise ValueError("it has no integer index or no hash")
        text, reason, error, metrics = obj.get("text"), obj.get("finish_reason"), obj.get("error"), obj.get("metrics")
        if error is not None and not (
            isinstance(error, dict) and isinstance(error.get("type"), str) and isinstance(error.get("message"), str)
        ):
            raise ValueError("its error is not {'type': ..., 'message': ...}")
        if error is None and not (isinstance(text, str) and isinstance(reason, str)):
            raise ValueError("it has neither an error nor a text and a finish reason")
        if metrics is not None and not isinstance(metrics, dict):
            raise ValueError("its metrics are not an object")
        return cls(index, item_id, digest, text, reason, metrics, error)


def _id_key(item_id: ItemId) -> Tuple[bool, ItemId]:
    # The id 1 and the id "1" are different items.
    return (isinstance(item_id, str), item_id)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts: List[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        offset += len(chunk)


Records = Dict[Tuple[Tuple[bool, ItemId], str], Record]


def _keep(records: Records, record: Record) -> None:
    """Add a line to what the file says: the last line of an id and hash wins, and a
    failure is as good as no line (the item runs again), so only successes are kept."""
    key = (_id_key(record.id), record.hash)
    if record.ok:
        records[key] = record
    else:
        records.pop(key, None)


def _scan(data: bytes, path: str) -> Tuple[Records, int]:
    """The file's successful records (the last line of each id and hash), and the
    length of its whole lines: less than ``len(data)`` when the last line was cut short."""
    whole = data.rfind(b"\n") + 1  # what follows the last newline is an unfinished write
    lines = [line for line in data[:whole].split(b"\n") if line.strip()]
    try:
        # One parse for the lot: a tenth of a second per 100,000 lines, where a parse per
        # line takes a second. Any doubt, and the lines are read one by one.
        objects = json.loads(b"[" + b",".join(lines) + b"]")
        if len(objects) != len(lines):
            raise ValueError("a line holds more than one value")
        records: Records = {}
        for obj in objects:
            _keep(records, Record.from_object(obj))
        return records, whole
    except (ValueError, RecursionError):
        return _scan_lines(data, path)


def _scan_lines(data: bytes, path: str) -> Tuple[Records, int]:
    """:func:`_scan` line by line, to name a bad line, or find a bad last line."""
    records: Records = {}
    start = 0
    number = 0
    while start < len(data):
        number += 1
        end = data.find(b"\n", start)
        if end < 0:
            return records, start  # no newline: the write was cut short
        raw = data[start:end]
        if raw.strip():
            try:
                record = Record.parse(raw)
            except (ValueError, RecursionError) as exc:
                if not data[end:].strip():
                    return records, start  # the last line: garbage a power cut left
                raise ValueError(
                    f"{path}: line {number} is not a result line ({exc}); the file was changed by "
                    "something other than llamarocm: fix or remove that line, or use another file"
                ) from None
            _keep(records, record)
        start = end + 1
    return records, len(data)


def _check_path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"checkpoint must be a file path, got {value!r}")
    return os.path.expanduser(path)


def _open_locked(path: str) -> Tuple[int, bool]:
    """The file open for reading and appending, created if need be, and locked; and
    whether it was created."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        fd, created = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        fd, created = os.open(path, flags), False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"checkpoint {path!r} is not a regular file")
        # flock belongs to the open file: a second open, even in this process, is refused.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointLockedError(
            f"{path} is in use by another run, which holds its lock: wait for that run to end, "
            "or write to another file",
            path,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, created


class Checkpoint:
    """A checkpoint file, open and locked for one run (a context manager).

    Opening reads the lines already there and cuts off a last line that a kill left
    unfinished; :meth:`finished` says whether an item is done; :meth:`append` adds a
    line; :meth:`close` syncs and unlocks. Raises
    :class:`~llamarocm.CheckpointLockedError` when another run holds the file, and
    ``ValueError`` naming the line when a line other than the last is not one that
    llamarocm writes. ``append`` may be called from several threads.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        sync_interval: float = SYNC_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = _check_path(path)
        self._interval = sync_interval
        self._clock = clock
        self._lock = threading.Lock()  # the descriptor, the size, the sync state
        self._sync_lock = threading.Lock()  # a sync against the close
        fd, created = _open_locked(self.path)
        #: Whether this open created the file (a run that fails before writing a line
        #: may remove what it created, never a file that was there).
        self.created = created
        try:
            data = _read_all(fd)
            self._records, self._size = _scan(data, self.path)
            #: Bytes of an unfinished last line cut off at the open (0: none).
            self.repaired = len(data) - self._size
            if self.repaired:
                log.warning(
                    "%s: its last line was cut short (a run was killed while writing it); "
                    "it is removed and its item will run again", self.path,
                )
                os.ftruncate(fd, self._size)
                os.fsync(fd)
            if created:
                sync_folder_of(self.path)  # the new file's name, durable too
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._synced_at = clock()
        self._unsynced = False
        self._broken: Optional[OSError] = None

    def finished(self, item_id: ItemId, digest: str) -> Optional[Record]:
        """The item's result in the file if it succeeded: the last line with this id
        and hash, when it is no failure; ``None`` when the item must run."""
        return self._records.get((_id_key(item_id), digest))

    def append(self, record: Record) -> None:
        """Write ``record`` as one line; in the file (not yet on the disk) on return.

        A failed write takes back what it wrote, so the file keeps whole lines, and
        every later append raises: the caller must stop, since what it reports as
        finished would no longer be in the file.
        """
        line = record.line()
        with self._lock:
            self._write(line)
            now = self._clock()
            due = now - self._synced_at >= self._interval
            if due:
                # Claimed under the lock, so one writer syncs; the sync itself runs
                # outside it, so a slow disk holds up this writer only, not the others.
                self._synced_at = now
                self._unsynced = False
        if due:
            self._sync()

    def _write(self, line: bytes) -> None:
        if self._fd < 0:
            raise ValueError(f"checkpoint {self.path} is closed")
        if self._broken is not None:
            raise OSError(self._broken.errno, f"an earlier write to {self.path} failed: {self._broken}")
        try:
            written = 0
            while written < len(line):  # a regular file takes it whole; a full disk may not
                written += os.write(self._fd, line[written:])
        except OSError as exc:
            self._broken = exc
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(line)
        self._unsynced = True

    def _sync(self) -> None:
        # fsync covers every line written before it starts, whoever wrote them.
        with self._sync_lock:
            if self._fd < 0:
                return  # closed meanwhile, and synced by the close
            try:
                os.fsync(self._fd)
            except OSError:
                with self._lock:
                    self._unsynced = True
                raise

    def remove_if_unused(self) -> bool:
        """Remove the file if this open created it and no line was written to it, so a
        run that failed before its first item leaves no empty file behind; whether it
        was removed. Call it before :meth:`close`: while the lock is held, no other run
        can be using the file."""
        with self._lock:
            if not self.created or self._size or self._fd < 0:
                return False
            try:
                if not os.path.samestat(os.stat(self.path), os.fstat(self._fd)):
                    return False  # the name is another file's now
                os.unlink(self.path)
            except OSError:
                return False
            return True

    def close(self) -> None:
        """Sync what was appended since the last sync, close the file, release the
        lock. Idempotent."""
        with self._sync_lock, self._lock:  # in this order, as a failing sync takes them
            fd = self._fd
            if fd < 0:
                return
            try:
                if self._unsynced:
                    os.fsync(fd)
                    self._unsynced = False
            finally:
                self._fd = -1
                os.close(fd)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving on an error (Ctrl-C included): that error is the one to see; a
        # failing last sync is only logged.
        try:
            self.close()
        except OSError as sync_error:
            log.warning("%s: the last sync failed: %s", self.path, sync_error)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"{len(self._records)} results"
        return f"<Checkpoint {self.path} {state}>"

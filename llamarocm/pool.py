"""``ModelPool``: several models in one process, each loaded on first use, shared by
the threads that use it, and unloaded when it has been idle too long or when another
needs its room.

One condition variable guards the pool's state; nothing slow runs under it. A load
(seconds) and a close (up to the server's stop sequence) run in the thread that needs
them, with the model's place reserved beforehand, so the other models stay usable
meanwhile and two threads asking for the same model share one load. A model stopping
still counts against the limits until its process is gone: the room it frees is real.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from types import TracebackType
from typing import Any, ContextManager, Dict, List, Optional, Tuple, Type, Union

from .config import MAX_TIMEOUT, check_float, check_int, check_timeout
from .errors import ClosedError, PoolFullError
from .loading import check_load_arguments, estimate_memory, load_model
from .model import Model

__all__ = ["ModelPool"]

log = logging.getLogger("llamarocm")

PathLike = Union[str, "os.PathLike[str]"]
_Key = Tuple[str, Tuple[Tuple[str, Any], ...]]

# load_model's options that change nothing about the server, so two calls that differ
# only in them share one model.
_NOT_IDENTITY = frozenset({"progress"})
_LOAD_SIGNATURE = inspect.signature(load_model)

_LOADING, _READY = "loading", "ready"


class _Entry:
    """One model of the pool: loading or loaded, its users, when it was last released."""

    def __init__(self, key: _Key, size: int, options: Dict[str, Any]) -> None:
        self.key = key
        self.size = size
        self.options = options
        self.state = _LOADING
        self.model: Optional[Model] = None
        self.error: Optional[BaseException] = None
        # Users by thread: the loading thread and every thread waiting for the load or
        # holding the model. A model with users is never unloaded.
        self.holders: Dict[int, int] = {}
        self.last_used = 0.0

    @property
    def users(self) -> int:
        return sum(self.holders.values())

    def hold(self, thread: int) -> None:
        self.holders[thread] = self.holders.get(thread, 0) + 1

    def let_go(self, thread: int) -> None:
        left = self.holders.get(thread, 0) - 1
        if left > 0:
            self.holders[thread] = left
        else:
            self.holders.pop(thread, None)

    def name(self) -> str:
        return os.path.basename(self.key[0])


class ModelPool:
    """Models loaded on first use and shared between threads, within limits.

    ``with pool.model(path, **load_options) as model:`` gives the model loaded from
    ``path`` with those :func:`~llamarocm.load_model` options, loading it if it is not
    loaded yet; every thread asking for the same path and options gets the same model
    (one server), and a model is *in use* while any ``with`` block holds it.

    * ``max_models``: the most models loaded at once.
    * ``memory_budget``: bytes the loaded models may take in all, each counted as
      ``strict=True`` estimates it (model file + KV cache for ``context_length *
      parallel`` + adapters; see :func:`~llamarocm.load_model`).
    * ``idle_timeout``: seconds after its last use when a model is unloaded (like
      Ollama's keep-alive); ``None`` keeps models until they are needed elsewhere.

    A model that does not fit unloads the least recently used models that are not in
    use, as many as needed; models in use are never unloaded, so the caller waits for
    one to be released (up to ``wait`` seconds, see :meth:`model`) or gets a
    :class:`~llamarocm.PoolFullError`. :meth:`close` unloads everything. Thread-safe.

    >>> with llamarocm.ModelPool(max_models=2) as pool:  # doctest: +SKIP
    ...     with pool.model("gemma.gguf", context_length=2048) as model:
    ...         print(model.generate("Hello", max_tokens=8).text())
    """

    def __init__(
        self,
        max_models: Optional[int] = None,
        memory_budget: Optional[int] = None,
        idle_timeout: Optional[float] = None,
    ) -> None:
        if max_models is not None:
            check_int("max_models", max_models, 1)
        if memory_budget is not None:
            check_int("memory_budget", memory_budget, 1)
        if idle_timeout is not None:
            check_timeout("idle_timeout", idle_timeout)
        self.max_models = max_models
        self.memory_budget = memory_budget
        self.idle_timeout = idle_timeout
        self._cond = threading.Condition()
        self._entries: Dict[_Key, _Entry] = {}
        # Models taken out of the pool whose servers are still stopping: they keep
        # counting against the limits until they are gone.
        self._stopping: List[_Entry] = []
        self._sizes: Dict[_Key, int] = {}
        self._closed = False
        self._reaper: Optional[threading.Thread] = None

    # -- use -----------------------------------------------------------------------

    def model(self, path: PathLike, *, wait: Optional[float] = None, **load_options: Any) -> ContextManager[Model]:
        """A context manager that gives the model of ``path`` with ``load_options``
        (those of :func:`~llamarocm.load_model`), loaded on entering if need be, and
        marks it in use until the block ends.

        Options left out are load_model's defaults, so ``model(p)`` and
        ``model(p, parallel=1)`` are the same model; ``progress`` is not part of the
        identity. When the pool is full of models in use, entering waits for one to be
        released: without limit when ``wait`` is ``None``, else at most ``wait``
        seconds (``0``: not at all), then raises :class:`~llamarocm.PoolFullError`.
        It raises at once when waiting cannot help: the model is larger than
        ``memory_budget``, or every model in the way is held by the calling thread.
        A failed load raises its error in every thread that waited for it; the next
        request tries again.

        >>> with pool.model("gemma.gguf", wait=30) as model:  # doctest: +SKIP
        ...     model.generate("Hi", max_tokens=4).text()
        """
        if wait is not None:
            check_float("wait", wait, 0.0, MAX_TIMEOUT)
        key, options = _identity(path, load_options)
        return ModelLease(self, key, options, wait)

    def _acquire(self, key: _Key, options: Dict[str, Any], wait: Optional[float], thread: int) -> _Entry:
        deadline = None if wait is None else time.monotonic() + wait
        size = self._size(key, options)
        while True:
            victims: List[_Entry] = []
            with self._cond:
                entry = self._join_or_reserve(key, size, options, deadline, thread, victims)
            if entry is not None and entry.state == _READY:
                return entry
            if entry is None:
                # A dead server was taken out (victims holds it): ask again.
                self._stop(victims)
                continue
            self._stop(victims)
            return self._load(entry, thread)

    def _join_or_reserve(
        self, key: _Key, size: int, options: Dict[str, Any], deadline: Optional[float], thread: int,
        victims: List[_Entry],
    ) -> Optional[_Entry]:
        """Under the lock: the ready model of ``key`` (now held), or a new entry reserved
        for this thread to load (``victims`` to stop first), or ``None`` after taking a
        dead model out (into ``victims``)."""
        while True:
            if self._closed:
                raise ClosedError("this model pool is closed")
            entry = self._entries.get(key)
            if entry is not None:
                return self._join(entry, thread, victims)
            room = self._room_for(size)
            if room is not None:
                for victim in room:
                    self._take_out(victim)
                victims.extend(room)
                entry = _Entry(key, size, options)
                entry.hold(thread)
                self._entries[key] = entry
                return entry
            self._wait_for_room(size, deadline, thread)

    def _join(self, entry: _Entry, thread: int, victims: List[_Entry]) -> Optional[_Entry]:
        if entry.state == _READY and entry.users == 0 and not _alive(entry.model):
            # Its server died while nobody held it: load it again rather than hand out
            # a model whose every call raises.
            log.warning("%s: its server had exited; loading it again", entry.name())
            self._take_out(entry)
            victims.append(entry)
            return None
        entry.hold(thread)
        while entry.state == _LOADING:
            self._cond.wait()
        if entry.state == _READY:
            entry.last_used = time.monotonic()
            return entry
        entry.let_go(thread)
        assert entry.error is not None
        raise entry.error

    def _room_for(self, size: int) -> Optional[List[_Entry]]:
        """The idle models to unload (least recently used first) so that one more of
        ``size`` bytes fits, or ``None`` if it cannot fit now, whatever is unloaded."""
        held = list(self._entries.values()) + self._stopping
        count, used = len(held), sum(entry.size for entry in held)
        idle = sorted(
            (e for e in self._entries.values() if e.state == _READY and e.users == 0), key=lambda e: e.last_used
        )
        chosen: List[_Entry] = []
        while not self._fits(count, used, size):
            if not idle:
                return None
            victim = idle.pop(0)
            chosen.append(victim)
            count, used = count - 1, used - victim.size
        return chosen

    def _fits(self, count: int, used: int, size: int) -> bool:
        if self.max_models is not None and count + 1 > self.max_models:
            return False
        return self.memory_budget is None or used + size <= self.memory_budget

    def _wait_for_room(self, size: int, deadline: Optional[float], thread: int) -> None:
        if self.memory_budget is not None and size > self.memory_budget:
            raise PoolFullError(
                f"the model needs about {size / 1e6:.0f} MB, more than the pool's whole "
                f"memory_budget of {self.memory_budget / 1e6:.0f} MB"
            )
        others = [e for e in self._entries.values() if set(e.holders) - {thread}]
        if not others and not self._stopping:
            raise PoolFullError(
                "the pool is full, and every model in it is held by this thread: release one "
                f"first ({self._describe()})"
            )
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise PoolFullError(f"the pool is full of models in use ({self._describe()})")
        self._cond.wait(remaining)

    def _load(self, entry: _Entry, thread: int) -> _Entry:
        """Load ``entry`` (reserved by this thread) outside the lock."""
        try:
            model = load_model(entry.key[0], **entry.options)
        except BaseException as exc:
            with self._cond:
                entry.state, entry.error = "failed", exc
                entry.let_go(thread)
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
                self._cond.notify_all()
            raise
        with self._cond:
            closed = self._closed
            if closed:
                entry.state, entry.error = "failed", ClosedError("the model pool was closed during the load")
                entry.let_go(thread)
                del self._entries[entry.key]
                entry.model = model
                self._stopping.append(entry)
            else:
                entry.model, entry.state, entry.last_used = model, _READY, time.monotonic()
                self._start_reaper()
            self._cond.notify_all()
        if closed:
            self._stop([entry])
            raise ClosedError("the model pool was closed during the load")
        return entry

    def _release(self, entry: _Entry, thread: int) -> None:
        with self._cond:
            entry.let_go(thread)
            entry.last_used = time.monotonic()
            self._cond.notify_all()

    # -- unloading -------------------------------------------------------------------

    def _take_out(self, entry: _Entry) -> None:
        """Under the lock: out of the pool, still counted until :meth:`_stop` ends."""
        del self._entries[entry.key]
        self._stopping.append(entry)

    def _stop(self, entries: List[_Entry]) -> None:
        """Close the models of ``entries`` (taken out), then stop counting them."""
        try:
            for entry in entries:
                if entry.model is not None:
                    log.info("unloading %s", entry.name())
                    entry.model.close()
        finally:
            with self._cond:
                for entry in entries:
                    if entry in self._stopping:
                        self._stopping.remove(entry)
                self._cond.notify_all()

    def _start_reaper(self) -> None:
        if self.idle_timeout is not None and self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="llamarocm-pool-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """The reaper thread: unload each model idle for ``idle_timeout``; ends at close."""
        assert self.idle_timeout is not None
        while True:
            with self._cond:
                expired = self._expired()
                while not expired:
                    if self._closed:
                        return
                    self._cond.wait(self._next_expiry())
                    expired = self._expired()
                for entry in expired:
                    self._take_out(entry)
            self._stop(expired)

    def _expired(self) -> List[_Entry]:
        assert self.idle_timeout is not None
        if self._closed:
            return []
        limit = time.monotonic() - self.idle_timeout
        return [e for e in self._entries.values() if e.state == _READY and e.users == 0 and e.last_used <= limit]

    def _next_expiry(self) -> Optional[float]:
        assert self.idle_timeout is not None
        idle = [e.last_used for e in self._entries.values() if e.state == _READY and e.users == 0]
        if not idle:
            return None
        return max(0.0, min(idle) + self.idle_timeout - time.monotonic())

    def _size(self, key: _Key, options: Dict[str, Any]) -> int:
        """The memory estimate of ``key``, read once (only a memory budget needs it)."""
        if self.memory_budget is None:
            return 0
        with self._cond:
            size = self._sizes.get(key)
        if size is None:
            size = estimate_memory(
                key[0],
                context_length=options.get("context_length"),
                parallel=options.get("parallel", 1),
                lora=options.get("lora", ()),
            )
            with self._cond:
                self._sizes[key] = size
        return size

    # -- life ----------------------------------------------------------------------

    def close(self) -> None:
        """Unload every model, in use or not, and refuse new requests. Idempotent.

        Streams still open on the pool's models are cancelled and later calls on them
        raise :class:`~llamarocm.ClosedError`, as for :meth:`Model.close`; so does
        :meth:`model`. A load in progress is waited for, then closed. Once it
        returns, no server of the pool runs and its background thread has ended.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while any(e.state == _LOADING for e in self._entries.values()):
                self._cond.wait()
            entries = list(self._entries.values())
            for entry in entries:
                self._take_out(entry)
            reaper = self._reaper
        try:
            self._stop(entries)
        finally:
            if reaper is not None and reaper is not threading.current_thread():
                reaper.join()
            with self._cond:
                while self._stopping:  # stopped by other threads (evictions, the reaper)
                    self._cond.wait()

    def __len__(self) -> int:
        """How many models are loaded or loading."""
        with self._cond:
            return len(self._entries)

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _describe(self) -> str:
        in_use = sum(1 for e in self._entries.values() if e.users)
        count = len(self._entries)
        text = f"{count} model{'' if count == 1 else 's'}, {in_use} in use"
        if self.max_models is not None:
            text += f", max_models={self.max_models}"
        if self.memory_budget is not None:
            used = sum(e.size for e in self._entries.values())
            text += f", {used / 1e6:.0f} of {self.memory_budget / 1e6:.0f} MB"
        return text

    def __repr__(self) -> str:
        with self._cond:
            if self._closed:
                return "<ModelPool closed>"
            return f"<ModelPool {self._describe()}>"


class ModelLease:
    """What :meth:`ModelPool.model` returns: enter it for the model, which stays in use
    (never unloaded) until the block ends. One ``with`` block per lease."""

    def __init__(self, pool: ModelPool, key: _Key, options: Dict[str, Any], wait: Optional[float]) -> None:
        self._pool = pool
        self._key = key
        self._options = options
        self._wait = wait
        self._held: Optional[Tuple[_Entry, int]] = None

    def __enter__(self) -> Model:
        if self._held is not None:
            raise RuntimeError("this lease is already entered; call pool.model(...) again for another")
        thread = threading.get_ident()
        entry = self._pool._acquire(self._key, self._options, self._wait, thread)
        self._held = (entry, thread)
        assert entry.model is not None
        return entry.model

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._pool._release(*held)

    def __repr__(self) -> str:
        return f"<ModelLease {os.path.basename(self._key[0])} {'held' if self._held else 'not held'}>"


def _identity(path: PathLike, options: Dict[str, Any]) -> Tuple[_Key, Dict[str, Any]]:
    """The key that names a model in the pool (its absolute path and every load option,
    defaults filled in) and the options to load it with; ``TypeError`` for an unknown
    option or an unhashable value."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, not {type(path).__name__}")
    try:
        bound = _LOAD_SIGNATURE.bind(path, **options)
    except TypeError as exc:
        raise TypeError(f"pool.model(): {exc}") from None
    bound.apply_defaults()
    check_load_arguments(bound.arguments)  # a bad option is refused here, not on entering
    arguments = dict(bound.arguments)
    absolute = os.path.abspath(os.path.expanduser(os.fspath(arguments.pop("path"))))
    frozen = tuple(sorted((name, _frozen(name, value)) for name, value in arguments.items()
                          if name not in _NOT_IDENTITY))
    return (absolute, frozen), arguments


def _frozen(name: str, value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(name, item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(name, v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"pool.model(): {name}={value!r:.60} cannot name a model (not hashable)") from None
    return value


def _alive(model: Optional[Model]) -> bool:
    return model is not None and (model.server is None or model.server.alive())


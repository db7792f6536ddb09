"""The driver's loop for one map over a pool: items pulled by free slots, failures retried."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

import ray
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from ..batch import BatchItem, BatchResult, BatchRun, Resume
from ..errors import ClosedError, ServerCrashedError, ServerStartError, SkippedError
from .replica import _AHEAD
from .waiting import _wait

log = logging.getLogger("llamarocm")

#: What ``ray.get`` raises when a replica's process, actor or node is gone: its call
#: may be retried elsewhere.
_REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)
#: Item errors that say the replica's server is gone, not that the item is bad.
_SERVER_GONE = (ServerCrashedError, ClosedError)


class _Replicas(Protocol):
    """What a run uses of its :class:`~llamarocm.ray.ReplicaPool` (which imports this
    module, so it is named here by what it offers)."""

    slots: int
    actors: List[Any]
    _starting: Dict[Any, int]
    _ready: Dict[int, Dict[str, Any]]
    _ever_ready: bool

    def _wait_start(self) -> List[Any]: ...
    def _on_started(self, ref: Any) -> None: ...
    def _drop(self, index: int, cause: BaseException) -> None: ...
    def _not_started(self) -> ServerStartError: ...


class _Run:
    """One map over a pool: the queue of item indices, the calls in flight, the results.

    Every replica has at most ``slots + _AHEAD`` calls in flight, one item each; when
    one ends, the replica gets the next item. Everything happens in the calling thread, driven by
    ``ray.wait``. With a ``resume``, the items its checkpoint holds are results from the
    start, and each item is written to it as it finishes, before it is reported.
    """

    def __init__(
        self,
        pool: _Replicas,
        items: Sequence[BatchItem],
        max_retries: int,
        progress: Optional[Callable[[int, int], None]],
        on_result: Optional[Callable[[BatchResult], None]],
        resume: Optional[Resume],
    ) -> None:
        self.pool, self.items, self.resume = pool, items, resume
        self.max_retries, self.progress, self.on_result = max_retries, progress, on_result
        self.results: List[Optional[BatchResult]] = [None] * len(items) if resume is None else list(resume.results)
        # Only what the checkpoint does not hold is queued.
        self.queue: Deque[int] = deque(i for i, result in enumerate(self.results) if result is None)
        self.resumed = len(items) - len(self.queue)
        self.tries = [0] * len(items)
        self.calls: Dict[Any, Tuple[int, int]] = {}  # call -> (replica, item)
        self.done = self.resumed
        self.last_failure: Optional[BaseException] = None

    def run(self) -> BatchRun:
        if self.progress is not None and self.resumed:
            self.progress(self.resumed, len(self.items))
        try:
            self._loop()
        except BaseException:
            # Ctrl-C, a failing callback or checkpoint write: what has not started yet
            # must not start (a running call cannot be stopped: its replica finishes it).
            for ref in self.calls:
                try:
                    ray.cancel(ref)
                except Exception:  # best effort: the call may just have ended
                    pass
            raise
        return BatchRun([r for r in self.results if r is not None], self.resumed)

    def _loop(self) -> None:
        pool = self.pool
        while self.done < len(self.items):
            self._feed()
            # While nothing runs, only a replica's start can end the wait: it is bounded.
            ready = _wait([*self.calls, *pool._starting]) if self.calls else pool._wait_start()
            if not ready:
                self._give_up()
                return
            for ref in ready:
                if ref in self.calls:
                    self._call_ended(ref)
                else:
                    pool._on_started(ref)

    def _feed(self) -> None:
        """Give every free slot of every ready replica the next item (and each replica
        ``_AHEAD`` more, waiting in it for a slot)."""
        busy: Dict[int, int] = {}
        for replica, _ in self.calls.values():
            busy[replica] = busy.get(replica, 0) + 1
        for replica in sorted(self.pool._ready):
            actor = self.pool.actors[replica]
            for _ in range(self.pool.slots + _AHEAD - busy.get(replica, 0)):
                if not self.queue:
                    return
                index = self.queue.popleft()
                item = self.items[index]
                self.calls[actor.run.remote(item.prompt, item.options)] = (replica, index)

    def _call_ended(self, ref: Any) -> None:
        replica, item = self.calls.pop(ref)
        failure = self._collect(ref, item)
        if failure is not None:
            self._retry(item, failure)
            self._replica_failed(replica, failure)

    def _collect(self, ref: Any, item: int) -> Optional[BaseException]:
        """Finish ``item`` from its ended call; or return why its replica failed."""
        try:
            text, error, metrics, finish_reason = ray.get(ref)
        except _REPLICA_LOST as exc:
            lost: BaseException = exc  # Ray is untyped for mypy
            return lost
        except RayTaskError as exc:  # the call itself failed: retrying would fail again
            self._finish(item, BatchResult(self.items[item].prompt, None, exc, None, None))
            return None
        if isinstance(error, _SERVER_GONE):
            return error
        self._finish(item, BatchResult(self.items[item].prompt, text, error, metrics, finish_reason))
        return None

    def _replica_failed(self, replica: int, cause: BaseException) -> None:
        """Drop ``replica``: keep what it had finished, queue its other items again."""
        refs = [ref for ref, (r, _) in self.calls.items() if r == replica]
        ended, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        lost = 1  # the item whose call told of the failure
        for ref in refs:
            _, item = self.calls.pop(ref)
            failure = self._collect(ref, item) if ref in ended else cause
            if failure is not None:
                self._retry(item, failure)
                lost += 1
        where = self.pool._ready.get(replica, {}).get("node_ip", "?")
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        log.warning("replica %d (%s) failed: %s; %d unfinished item(s) go back to the queue", replica, where, why, lost)
        self.last_failure = cause
        self.pool._drop(replica, cause)

    def _retry(self, item: int, failure: BaseException) -> None:
        self.tries[item] += 1
        if self.tries[item] > self.max_retries:
            self._finish(item, BatchResult(self.items[item].prompt, None, failure, None, None))
        else:
            self.queue.appendleft(item)  # next in line: not held back behind the whole queue

    def _give_up(self) -> None:
        """No replica is left or coming (in time): fail if none ever started, else skip
        the rest."""
        if not self.pool._ever_ready:
            raise self.pool._not_started()
        for item in list(self.queue):
            error = SkippedError(f"not run: every replica failed (the last: {self.last_failure})")
            error.__cause__ = self.last_failure
            self._finish(item, BatchResult(self.items[item].prompt, None, error, None, None))
        self.queue.clear()

    def _finish(self, item: int, result: BatchResult) -> None:
        """The one place an item's result becomes final (once per item): written to the
        checkpoint first, so that nothing reported is missing from the file."""
        assert self.results[item] is None, f"item {item} finished twice"
        if self.resume is not None:
            self.resume.save(item, self.items[item], result)
        self.results[item] = result
        self.done += 1
        if self.on_result is not None:
            self.on_result(result)
        if self.progress is not None:
            self.progress(self.done, len(self.items))

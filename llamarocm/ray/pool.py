"""``ReplicaPool``: replica actors started once, then used by map after map."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import ray

from ..batch import BatchItem, BatchResult, BatchRun, Resume, read_back
from ..checkpoint import Checkpoint
from ..errors import ClosedError, LlamaRocmError, ServerStartError
from .arguments import _check_map_arguments, _items, _split_options, check_pool_arguments
from .placement import _replicas_to_start
from .replica import _AHEAD, _RemoteReplica
from .run import _Run
from .waiting import _wait

log = logging.getLogger("llamarocm")


class ReplicaPool:
    """``replicas`` Ray actors, each owning one model; :meth:`map` spreads prompts over them.

    Each replica asks Ray for ``gpus_per_replica`` GPUs (a fraction shares one; 0 runs
    on the CPU) and starts its own llama-server with the load options, which are those
    of :func:`~llamarocm.load_model` (``devices`` excepted: Ray chooses). ``ray_options``
    go to the actor's ``.options()`` (``scheduling_strategy``, ``runtime_env``...).
    Connects to Ray (``ray.init()``) if no connection is open. When no node of the
    cluster can ever hold a replica (too few GPUs or CPUs on every node), raises
    :class:`~llamarocm.ServerStartError` before any actor is made; with more
    ``replicas`` than the nodes hold, starts those that fit and logs a warning.
    Replicas start in the background; a map uses them as they become ready. If none is
    ready within ``ready_timeout`` seconds (Ray may be waiting for free GPUs), a map
    raises :class:`~llamarocm.ServerStartError`.

    >>> with ReplicaPool("model.gguf", replicas=4, parallel=2) as pool:  # doctest: +SKIP
    ...     results = pool.map(prompts, max_tokens=64)
    """

    def __init__(
        self,
        model_path: str,
        *,
        replicas: int = 1,
        gpus_per_replica: float = 1,
        load_options: Optional[Mapping[str, Any]] = None,
        ray_options: Optional[Mapping[str, Any]] = None,
        ready_timeout: float = 600.0,
        **options: Any,
    ) -> None:
        load, settings = _split_options(options, load_options)
        if settings:
            raise TypeError(f"generation settings go to map(), not here: {', '.join(sorted(settings))}")
        check_pool_arguments(model_path, load, replicas, gpus_per_replica, ray_options, ready_timeout)
        #: Slots of each replica's server: the items each one runs at once.
        self.slots = int(load.get("parallel", 1))
        actor = _RemoteReplica.options(
            num_gpus=gpus_per_replica,
            # The slots, the calls sent ahead, describe() and close().
            max_concurrency=self.slots + _AHEAD + 2,
            max_restarts=0,  # a failed replica is dropped, its items retried elsewhere
            **dict(ray_options or {}),
        )
        if not ray.is_initialized():
            ray.init()  # what the first actor would do: connect, or start Ray here
        replicas = _replicas_to_start(replicas, gpus_per_replica, ray_options or {})
        #: The replica actors' handles, in order (``ray.kill`` one to simulate a failure).
        self.actors: List[Any] = [actor.remote(model_path, load) for _ in range(replicas)]
        self._starting: Dict[Any, int] = {a.describe.remote(): i for i, a in enumerate(self.actors)}
        self._ready: Dict[int, Dict[str, Any]] = {}
        self._failed: Dict[int, BaseException] = {}
        self._ever_ready = False
        self._deadline = time.monotonic() + ready_timeout
        self._closed = False

    # -- replicas -------------------------------------------------------------------

    def _on_started(self, ref: Any) -> None:
        index = self._starting.pop(ref)
        try:
            self._ready[index] = ray.get(ref)
            self._ever_ready = True
        except Exception as exc:  # its load failed, or Ray could not start it
            log.warning("replica %d did not start: %s", index, exc)
            self._drop(index, exc)

    def _drop(self, index: int, cause: BaseException) -> None:
        self._ready.pop(index, None)
        self._failed[index] = cause
        ray.kill(self.actors[index], no_restart=True)

    def _wait_start(self) -> List[Any]:
        """Wait for a replica's start to end, within the start deadline; ``[]`` once it
        has passed, or when no replica is starting."""
        left = self._deadline - time.monotonic()
        return _wait(list(self._starting), timeout=left) if self._starting and left > 0 else []

    def _not_started(self) -> ServerStartError:
        first = next(iter(self._failed.values()), None)
        if self._starting:
            why = f"{len(self._starting)} still starting or waiting for Ray to place them (free GPUs?)"
        else:
            why = f"the first failure: {first}"
        error = ServerStartError(f"no replica started; {why}")
        error.__cause__ = first
        return error

    def describe(self) -> List[Dict[str, Any]]:
        """Where each ready replica runs (node, pid, ``server_pid``, ``gpu_ids``...),
        once every replica has started or failed."""
        while self._starting:
            ready = self._wait_start()
            if not ready:
                raise self._not_started()
            for ref in ready:
                self._on_started(ref)
        return [self._ready[i] for i in sorted(self._ready)]

    # -- work -----------------------------------------------------------------------

    def map(
        self,
        prompts: Sequence[Any],
        *,
        max_retries: int = 2,
        progress: Optional[Callable[[int, int], None]] = None,
        checkpoint: Optional[Any] = None,
        **settings: Any,
    ) -> List[BatchResult]:
        """A :class:`~llamarocm.BatchResult` per prompt, in input order, as
        :meth:`Model.map() <llamarocm.Model.map>` gives them; ``settings`` are those of
        :meth:`~llamarocm.Model.generate`. An item whose replica failed is retried on
        another one, at most ``max_retries`` times, then reported with that failure as
        its error; items no replica is left to run get a :class:`~llamarocm.SkippedError`,
        and a map on a pool whose replicas have all failed raises
        :class:`~llamarocm.LlamaRocmError`.

        With ``checkpoint`` (a file path, on the driver's machine), the map is durable
        exactly as :meth:`Model.map() <llamarocm.Model.map>`'s: each finished item is
        appended to the file before it is reported, and items the file already holds
        (same position, prompt and settings, whoever ran them) are read back, not run.
        """
        self._check_usable()
        _check_map_arguments(prompts, settings, max_retries, progress)
        items = _items(prompts, settings)
        if checkpoint is None:
            return self.run_items(items, max_retries=max_retries, progress=progress).results
        with Checkpoint(checkpoint) as file:
            resume = read_back(items, file)
            return self.run_items(items, max_retries=max_retries, progress=progress, resume=resume).results

    def run_items(
        self,
        items: Sequence[BatchItem],
        *,
        max_retries: int = 2,
        progress: Optional[Callable[[int, int], None]] = None,
        on_result: Optional[Callable[[BatchResult], None]] = None,
        resume: Optional[Resume] = None,
    ) -> BatchRun:
        """Run ``items``, each with its own settings, as :func:`llamarocm.batch.run_items`
        runs them on one model (``on_result``, ``progress`` and ``resume`` alike); what
        ``llamarocm batch --ray`` calls. Arguments are checked by the caller."""
        self._check_usable()
        return _Run(self, items, max_retries, progress, on_result, resume).run()

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError("this replica pool is closed")
        if self._ever_ready and not self._ready and not self._starting:
            last = list(self._failed.values())[-1]
            raise LlamaRocmError(f"no replica of this pool is left: each one failed (the last: {last})") from last

    def close(self) -> None:
        """Stop every replica's server, then end the actors. Idempotent."""
        if self._closed:
            return
        self._closed = True
        closing = [self.actors[i].close.remote() for i in self._ready]
        if closing:
            _wait(closing, num_returns=len(closing), timeout=30)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)  # also those still waiting to be placed

    def __enter__(self) -> "ReplicaPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

"""Batches over a Ray cluster: a llama-server per replica, replicas pulling the work.

For batches that outgrow one machine. A *replica* is a Ray actor owning one
:class:`~llamarocm.Model`, started on the node where Ray placed it with exactly the GPUs
Ray gave it. The driver keeps the queue of items and hands the next one to a replica
the moment one of its slots frees up, so a slow node simply takes fewer items. A
replica that fails (its server, its actor, its node) is dropped and its unfinished
items go back to the queue, for the others, at most ``max_retries`` times each. With a
checkpoint file, the driver writes each item as its result arrives, with
:mod:`llamarocm.batch`'s identity and lines, so a rerun (local or on Ray) skips it.

Needs the ``ray`` extra; ``import llamarocm`` never imports this module (nor Ray).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import pickle
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

try:
    import ray
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("llamarocm.ray needs Ray: pip install 'llamarocm[ray]'") from exc

from .batch import BatchItem, BatchResult, BatchRun, Resume, read_back
from .checkpoint import Checkpoint
from .config import GenerateConfig, LoadConfig, check_timeout
from .errors import ClosedError, LlamaRocmError, ServerCrashedError, ServerStartError, SkippedError
from .loading import load_model
from .messages import check_prompts
from .model import Model

__all__ = ["map", "ReplicaPool", "Replica", "Predictor", "gpu_options"]

log = logging.getLogger("llamarocm")

#: What ``ray.get`` raises when a replica's process, actor or node is gone: its call
#: may be retried elsewhere.
_REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)
#: Item errors that say the replica's server is gone, not that the item is bad.
_SERVER_GONE = (ServerCrashedError, ClosedError)

_SETTINGS = frozenset(f.name for f in dataclasses.fields(GenerateConfig))
# progress is map()'s own (done, total); devices are named to be refused (Ray chooses).
_LOAD_OPTIONS = frozenset(inspect.signature(load_model).parameters) - {"path", "progress"}
_CHECKED_LOAD_OPTIONS = frozenset(f.name for f in dataclasses.fields(LoadConfig)) & _LOAD_OPTIONS - {"rpc", "devices"}


def gpu_options(env: Mapping[str, str], gpu_ids: Sequence[str], options: Mapping[str, Any]) -> Dict[str, Any]:
    """The load options that keep a replica's server on exactly the GPUs Ray assigned.

    ``gpu_ids`` are Ray's accelerator ids for the actor, ``env`` its environment, in
    which Ray has set a visible-device variable for them: ROCm's on a node where it
    sees AMD GPUs, ``CUDA_VISIBLE_DEVICES`` elsewhere (fake GPUs, or AMD GPUs Ray cannot
    see without ROCm's SMI library). A ROCm variable already is the limit the server
    keeps (never widened); otherwise the ids go to ``devices=``, intersected there with
    any ``HIP_VISIBLE_DEVICES`` the node has. No GPU at all: nothing is offloaded.

    >>> gpu_options({"CUDA_VISIBLE_DEVICES": "1"}, ["1"], {})
    {'devices': [1]}
    >>> gpu_options({"HIP_VISIBLE_DEVICES": "1"}, ["1"], {})
    {}
    """
    if not gpu_ids:
        if options.get("gpu_layers") not in (None, 0):
            raise ValueError("a replica without a GPU (gpus_per_replica=0) offloads no layers: leave gpu_layers unset")
        # -ngl 0 alone still lets llama.cpp run large operations on any GPU it sees.
        return {"gpu_layers": 0, "extra_args": [*options.get("extra_args", ()), "--device", "none"]}
    joined = ",".join(gpu_ids)
    if joined in (env.get("HIP_VISIBLE_DEVICES"), env.get("ROCR_VISIBLE_DEVICES")):
        return {}
    if all(i.isascii() and i.isdigit() for i in gpu_ids):
        return {"devices": [int(i) for i in gpu_ids]}
    # Ids that are no index (UUIDs): the inherited CUDA_VISIBLE_DEVICES is the limit.
    return {}


def _load_here(model_path: str, options: Mapping[str, Any]) -> Tuple[Model, List[str]]:
    """Load the model in this Ray worker, on the GPUs Ray assigned to it."""
    ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    merged = {**options, **gpu_options(os.environ, ids, options)}
    return load_model(model_path, **merged), ids


def _portable(error: Optional[BaseException]) -> Optional[BaseException]:
    """``error``, or a plain copy of its message if it would not survive pickling
    (results cross processes, and one bad exception must not fail the call)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return LlamaRocmError(f"{type(error).__name__}: {error}")


class Replica:
    """The body of a replica actor: one model on the node Ray chose.

    Made by :class:`ReplicaPool` (as a threaded actor with a thread per call it may
    hold); its methods are what the pool calls.
    """

    def __init__(self, model_path: str, load_options: Mapping[str, Any]) -> None:
        self._model, self._gpu_ids = _load_here(model_path, load_options)
        # A call sent ahead of a free slot waits here, not in the server's queue (where
        # it would count against its stream's timeout and time to first token).
        self._slots = threading.BoundedSemaphore(self._model.parallel)

    def describe(self) -> Dict[str, Any]:
        """Where this replica runs: node, process, server process, GPUs, slots, and the
        scheduling niceness its server inherited from the Ray worker."""
        context = ray.get_runtime_context()
        server = self._model.server
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "server_pid": server.pid if server is not None else None,
            "gpu_ids": list(self._gpu_ids),
            "parallel": self._model.parallel,
            # The server's, inherited from this worker: Ray's workers run at 15 unless
            # RAY_worker_niceness says otherwise (see docs/distributed.md).
            "niceness": os.nice(0),
        }

    def run(self, prompt: Any, settings: Mapping[str, Any]) -> Tuple[Any, ...]:
        """One item, exactly as ``Model.map`` runs it: (text, error, metrics, finish_reason)."""
        with self._slots:
            result = self._model.map([prompt], max_workers=1, **settings)[0]
        return result.text, _portable(result.error), result.metrics, result.finish_reason

    def close(self) -> None:
        self._model.close()

    def __ray_shutdown__(self) -> None:
        # Ray calls this when the actor ends gracefully; a killed actor's server dies
        # with its process (parent-death signal).
        self._model.close()


_RemoteReplica = ray.remote(Replica)

#: Calls each replica holds beyond its slots, waiting for one to free: the next item is
#: there when it does, instead of a round trip to the driver later (a gap per item in
#: which the slot would sit idle).
_AHEAD = 1


def _split_options(
    options: Mapping[str, Any], load_options: Optional[Mapping[str, Any]]
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Keyword arguments as (load options, generation settings), by name."""
    _check_mapping("load_options", load_options, "load options (those of load_model)")
    load = dict(load_options or {})
    settings: Dict[str, Any] = {}
    for name, value in options.items():
        if name in _SETTINGS:
            settings[name] = value
        elif name in _LOAD_OPTIONS:
            if name in load:
                raise TypeError(f"{name} is given twice, in load_options and as a keyword")
            load[name] = value
        else:
            known = ", ".join(sorted(_SETTINGS | _LOAD_OPTIONS - {"devices"}))
            raise TypeError(f"unexpected argument {name!r}; known: {known}")
    return load, settings


def _check_load_options(model_path: Any, load: Mapping[str, Any]) -> None:
    if "devices" in load:
        raise ValueError("Ray chooses each replica's GPUs: use gpus_per_replica, not devices=")
    unknown = sorted(set(load) - _LOAD_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected load option(s) {', '.join(unknown)}")
    LoadConfig(model_path, **{k: v for k, v in load.items() if k in _CHECKED_LOAD_OPTIONS})


def check_pool_arguments(
    model_path: Any,
    load: Mapping[str, Any],
    replicas: Any = 1,
    gpus_per_replica: Any = 1,
    ray_options: Optional[Mapping[str, Any]] = None,
    ready_timeout: Any = 600.0,
) -> None:
    """Raise the ``TypeError`` or ``ValueError`` that :class:`ReplicaPool` would raise for
    these arguments (``load`` as split from the keywords), starting nothing: for front
    ends (``llamarocm batch --ray``) that check everything before any work."""
    _check_load_options(model_path, load)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    if (
        isinstance(gpus_per_replica, bool)
        or not isinstance(gpus_per_replica, (int, float))
        or not math.isfinite(gpus_per_replica)
        or gpus_per_replica < 0
    ):
        raise ValueError(f"gpus_per_replica must be a number >= 0, got {gpus_per_replica!r}")
    if gpus_per_replica == 0 and load.get("gpu_layers") not in (None, 0):
        # Refused here rather than by each replica's load, on its node.
        raise ValueError("a replica without a GPU (gpus_per_replica=0) offloads no layers: leave gpu_layers unset")
    check_timeout("ready_timeout", ready_timeout)
    _check_ray_options(ray_options, gpus_per_replica)


def _check_mapping(name: str, value: Any, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of {what}, not {type(value).__name__}")
    keys = [key for key in value if not isinstance(key, str)]
    if keys:
        raise TypeError(f"{name}' keys must be option names (str), got {keys[0]!r}")


def _check_ray_options(ray_options: Any, gpus_per_replica: float) -> None:
    """``ray_options`` as Ray checks them when given to ``.options()``, which starts
    nothing: a bad one fails here, not when the first actor is made."""
    _check_mapping("ray_options", ray_options, "Ray actor options (scheduling_strategy, runtime_env, resources...)")
    taken = {"num_gpus", "max_concurrency", "max_restarts"} & set(ray_options or {})
    if taken:
        raise ValueError(f"ray_options may not set {', '.join(sorted(taken))}: the pool sets them")
    try:
        _RemoteReplica.options(num_gpus=gpus_per_replica, **dict(ray_options or {}))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"ray_options: {exc}") from None


def replica_needs(gpus_per_replica: float, ray_options: Mapping[str, Any]) -> Dict[str, float]:
    """The resources one replica holds on its node while it lives, by Ray's resource
    names: its GPUs, its CPUs (Ray's default for an actor that asks for any resource is
    one), and the memory and custom resources of ``ray_options``."""
    cpus = ray_options.get("num_cpus")
    needs = {"CPU": float(1 if cpus is None else cpus), "GPU": float(gpus_per_replica)}
    if ray_options.get("memory"):
        needs["memory"] = float(ray_options["memory"])
    if ray_options.get("accelerator_type"):
        needs[f"accelerator_type:{ray_options['accelerator_type']}"] = 0.001  # Ray's own amount
    needs.update({name: float(amount) for name, amount in (ray_options.get("resources") or {}).items()})
    return {name: amount for name, amount in needs.items() if amount > 0}


def replicas_that_fit(nodes: Sequence[Mapping[str, Any]], needs: Mapping[str, float]) -> Optional[int]:
    """How many replicas, each whole on one node, the live ``nodes`` (as ``ray.nodes()``
    lists them) can hold at once with all their resources free; ``None`` when a replica
    needs nothing that runs out."""
    if not needs:
        return None
    fit = 0
    for node in nodes:
        if node.get("Alive"):
            have = node.get("Resources", {})
            # Ray counts resources in units of 1/10000: no float rounding below that.
            fit += min(int(have.get(name, 0.0) / amount + 1e-6) for name, amount in needs.items())
    return fit


def _amount(name: str, amount: float) -> str:
    """``2 GPUs``, ``1 CPU``, ``0.5 GPU``, ``1 of 'custom'``."""
    if name in ("CPU", "GPU"):
        return f"{amount:g} {name}{'s' if amount != 1 else ''}"
    return f"{amount:g} of {name!r}"


def _where_replicas_go(nodes: Sequence[Mapping[str, Any]], needs: Mapping[str, float]) -> str:
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    wanted = ", ".join(_amount(name, amount) for name, amount in needs.items())
    have = []
    for name in needs:
        amounts = [resources.get(name, 0.0) for resources in alive]
        have.append(f"{_amount(name, sum(amounts))} in all, at most {_amount(name, max(amounts, default=0.0))} "
                    "on one node")
    return f"each replica needs {wanted} on one node; the cluster's {len(alive)} node(s) have " + "; ".join(have)


def _replicas_to_start(replicas: int, gpus_per_replica: float, ray_options: Mapping[str, Any]) -> int:
    """``replicas``, or as many as the cluster's nodes can ever hold (with a warning);
    a clear error when they hold none, instead of Ray waiting for a node that will not
    come. Counts the nodes present: on a cluster whose autoscaler adds nodes on demand,
    ask for them first (see docs/distributed.md)."""
    needs = replica_needs(gpus_per_replica, ray_options)
    nodes = ray.nodes()
    fit = replicas_that_fit(nodes, needs)
    if fit is None or fit >= replicas:
        return replicas
    where = _where_replicas_go(nodes, needs)
    if fit == 0:
        hint = " (a cluster without GPUs: gpus_per_replica=0 runs on the CPU)" if "GPU" in needs else ""
        raise ServerStartError(f"no node of this Ray cluster can hold a replica: {where}{hint}")
    log.warning("only %d of the %d replicas fit on this Ray cluster: %s; starting %d", fit, replicas, where, fit)
    return fit


def _check_map_arguments(prompts: Any, settings: Mapping[str, Any], max_retries: Any, progress: Any) -> None:
    check_prompts(prompts)
    GenerateConfig.from_kwargs(settings)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable(done, total)")


def _items(prompts: Sequence[Any], settings: Mapping[str, Any]) -> List[BatchItem]:
    # Known by position, as Model.map's are: a checkpoint is shared with a local map.
    return [BatchItem(prompt, settings, index) for index, prompt in enumerate(prompts)]


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


def _wait(refs: Sequence[Any], *, num_returns: int = 1, timeout: Optional[float] = None) -> List[Any]:
    """``ray.wait`` in slices of a second: during a wait, Ray lets only KeyboardInterrupt
    out of a signal handler, so any other exception (an alarm, a test's timeout) would
    wait for the whole call."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
        ready, _ = ray.wait(list(refs), num_returns=num_returns, timeout=left)
        if len(ready) >= num_returns or (deadline is not None and time.monotonic() >= deadline):
            return list(ready)


class _Run:
    """One map over a pool: the queue of item indices, the calls in flight, the results.

    Every replica has at most ``slots + _AHEAD`` calls in flight, one item each; when
    one ends, the replica gets the next item. Everything happens in the calling thread, driven by
    ``ray.wait``. With a ``resume``, the items its checkpoint holds are results from the
    start, and each item is written to it as it finishes, before it is reported.
    """

    def __init__(
        self,
        pool: ReplicaPool,
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


def map(
    model_path: str,
    prompts: Sequence[Any],
    *,
    replicas: int = 1,
    gpus_per_replica: float = 1,
    load_options: Optional[Mapping[str, Any]] = None,
    max_retries: int = 2,
    checkpoint: Optional[Any] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    ray_options: Optional[Mapping[str, Any]] = None,
    ready_timeout: float = 600.0,
    **options: Any,
) -> List[BatchResult]:
    """Run ``prompts`` over ``replicas`` Ray actors, each with its own llama-server, and
    return a :class:`~llamarocm.BatchResult` per prompt, in input order.

    ``options`` are load options (those of :func:`~llamarocm.load_model`, also accepted
    as ``load_options={...}``) and generation settings (those of
    :meth:`~llamarocm.Model.generate`), told apart by name. The replicas are started
    for this call and stopped before it returns; to run several batches on the same
    replicas, use :class:`ReplicaPool`. With ``checkpoint``, the file is opened and
    locked before any replica starts, and when it already holds every item, none does.
    See :class:`ReplicaPool` and :meth:`ReplicaPool.map` for the rest.

    >>> results = llamarocm.ray.map("model.gguf", prompts, replicas=4, parallel=2,
    ...                             max_tokens=64, checkpoint="results.jsonl")  # doctest: +SKIP
    """
    load, settings = _split_options(options, load_options)
    _check_map_arguments(prompts, settings, max_retries, progress)
    check_pool_arguments(model_path, load, replicas, gpus_per_replica, ray_options, ready_timeout)
    if not prompts:
        return []
    items = _items(prompts, settings)

    def run(resume: Optional[Resume]) -> List[BatchResult]:
        with ReplicaPool(
            model_path,
            replicas=replicas,
            gpus_per_replica=gpus_per_replica,
            load_options=load,
            ray_options=ray_options,
            ready_timeout=ready_timeout,
        ) as pool:
            return pool.run_items(items, max_retries=max_retries, progress=progress, resume=resume).results

    if checkpoint is None:
        return run(None)
    with Checkpoint(checkpoint) as file:
        resume = read_back(items, file)
        if resume.pending:
            return run(resume)
    if progress is not None:
        progress(len(items), len(items))  # all read back, as a run would report them
    return [result for result in resume.results if result is not None]


class Predictor:
    """A callable class for Ray Data's ``Dataset.map_batches``: one model per worker.

    The model is loaded when Ray Data starts the worker, on the GPUs it gave the
    worker (``num_gpus=``), and closed when the worker ends. Each batch's ``prompt``
    column (strings, or message lists for chat) gets ``text``, ``finish_reason`` and
    ``error`` columns (``error`` is ``None`` or ``"ExceptionName: message"``; ``text``
    is ``None`` for a failed row). ``options`` are load options and generation
    settings, as for :func:`map`.

    >>> ds.map_batches(Predictor, fn_constructor_kwargs={"model_path": "model.gguf",
    ...     "max_tokens": 64}, concurrency=4, num_gpus=1, batch_size=16)  # doctest: +SKIP
    """

    def __init__(
        self, model_path: str, *, load_options: Optional[Mapping[str, Any]] = None, **options: Any
    ) -> None:
        load, self._settings = _split_options(options, load_options)
        _check_load_options(model_path, load)
        GenerateConfig.from_kwargs(self._settings)
        self._model: Optional[Model] = None
        self._model, _ = _load_here(model_path, load)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        assert self._model is not None
        # Columns arrive as numpy arrays: numpy strings and mappings become plain ones.
        prompts = [str(p) if isinstance(p, str) else [dict(m) for m in p] for p in batch["prompt"]]
        results = self._model.map(prompts, **self._settings)
        out = dict(batch)
        out["text"] = [r.text for r in results]
        out["finish_reason"] = [r.finish_reason for r in results]
        out["error"] = [None if r.ok else f"{type(r.error).__name__}: {r.error}" for r in results]
        return out

    def __del__(self) -> None:
        # Ray Data drops the callable when the worker ends gracefully.
        model = getattr(self, "_model", None)
        if model is not None:
            model.close()

"""The replica actor: one model on the node Ray chose, on exactly the GPUs Ray gave it."""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ray

from ..errors import LlamaRocmError
from ..loading import load_model
from ..model import Model


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

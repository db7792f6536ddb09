"""Batches over a Ray cluster: a llama-server per replica, replicas pulling the work.

For batches that outgrow one machine. A *replica* is a Ray actor owning one
:class:`~llamarocm.Model`, started on the node where Ray placed it with exactly the GPUs
Ray gave it. The driver keeps the queue of items and hands the next one to a replica
the moment one of its slots frees up, so a slow node simply takes fewer items. A
replica that fails (its server, its actor, its node) is dropped and its unfinished
items go back to the queue, for the others, at most ``max_retries`` times each. With a
checkpoint file, the driver writes each item as its result arrives, with
:mod:`llamarocm.batch`'s identity and lines, so a rerun (local or on Ray) skips it.

Needs the ``ray`` extra; ``import llamarocm`` never imports this package (nor Ray).
Inside it, ``import ray`` is Ray itself (imports are absolute); its modules, one job
each: ``replica`` (the actor), ``arguments`` (checks made before anything starts),
``placement`` (how many replicas the cluster holds), ``pool`` (:class:`ReplicaPool`),
``run`` (the driver's loop), ``one_batch`` (:func:`map`), ``predictor`` (Ray Data).
"""

from __future__ import annotations

try:
    import ray  # noqa: F401  # Ray itself, not this package: imports are absolute
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("llamarocm.ray needs Ray: pip install 'llamarocm[ray]'") from exc

from .arguments import check_pool_arguments as check_pool_arguments
from .one_batch import map
from .pool import ReplicaPool
from .predictor import Predictor
from .replica import Replica, gpu_options

__all__ = ["map", "ReplicaPool", "Replica", "Predictor", "gpu_options"]

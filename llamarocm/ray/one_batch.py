"""``map``: one batch on replicas started for it and stopped before it returns."""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence

from ..batch import BatchResult, Resume, read_back
from ..checkpoint import Checkpoint
from .arguments import _check_map_arguments, _items, _split_options, check_pool_arguments
from .pool import ReplicaPool


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

"""The arguments of a map or pool, split by name and checked before anything starts."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..batch import BatchItem
from ..config import GenerateConfig, LoadConfig, check_timeout
from ..loading import load_model
from ..messages import check_prompts
from .replica import _RemoteReplica

_SETTINGS = frozenset(f.name for f in dataclasses.fields(GenerateConfig))
# progress is map()'s own (done, total); devices are named to be refused (Ray chooses).
_LOAD_OPTIONS = frozenset(inspect.signature(load_model).parameters) - {"path", "progress"}
_CHECKED_LOAD_OPTIONS = frozenset(f.name for f in dataclasses.fields(LoadConfig)) & _LOAD_OPTIONS - {"rpc", "devices"}


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

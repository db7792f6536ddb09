"""``Predictor``: the callable class for Ray Data's ``map_batches``, one model per worker."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ..config import GenerateConfig
from ..model import Model
from .arguments import _check_load_options, _split_options
from .replica import _load_here


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

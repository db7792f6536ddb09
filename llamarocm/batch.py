"""``Model.map``: many prompts through one model, as many at once as it has slots."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Sequence, Union

from .config import GenerateConfig
from .model import GenerateMetrics, TokenStream, _check_messages

if TYPE_CHECKING:
    from .model import Model

__all__ = ["BatchResult", "run_batch"]

Prompt = Union[str, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one prompt of :meth:`Model.map`: ``text`` or ``error``, never both."""

    prompt: Prompt
    text: Optional[str]
    error: Optional[BaseException]
    metrics: Optional[GenerateMetrics]
    finish_reason: Optional[str]

    @property
    def ok(self) -> bool:
        return self.error is None


class _Cancelled(Exception):
    """A prompt that never ran because an earlier one failed under ``fail_fast``."""


def run_batch(
    model: "Model",
    prompts: Sequence[Prompt],
    *,
    max_workers: Optional[int] = None,
    fail_fast: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    **config: Any,
) -> List[BatchResult]:
    """Run every prompt (a string for ``generate``, a message list for ``chat``)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or of message lists")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            try:
                _check_messages(prompt)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prompts[{i}]: {exc}") from None
    GenerateConfig.from_kwargs(config)  # refuse bad settings before anything runs
    if max_workers is None:
        max_workers = max(1, getattr(model, "parallel", 1))
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable(done, total)")

    stop = threading.Event()
    lock = threading.Lock()
    running: "set[TokenStream]" = set()
    first_error: List[BaseException] = []

    def start(prompt: Prompt) -> Optional[TokenStream]:
        """Open the prompt's stream, tracked for cancelling; ``None`` once stopping."""
        stream = model.generate(prompt, **config) if isinstance(prompt, str) else model.chat(prompt, **config)
        with lock:
            # Checked with the stream already open and under the lock that cancelling
            # takes: a stop either sees this stream or is seen here.
            if not stop.is_set():
                running.add(stream)
                return stream
        stream.close()
        return None

    def one(prompt: Prompt) -> BatchResult:
        stream: Optional[TokenStream] = None
        try:
            if not stop.is_set():
                stream = start(prompt)
            if stream is None:
                return BatchResult(prompt, None, _Cancelled("not run: the batch was stopped"), None, None)
            text = stream.text()
            return BatchResult(prompt, text, None, stream.metrics, stream.finish_reason)
        except Exception as exc:  # recorded per item (an error before the stream too); fail_fast re-raises below
            if fail_fast:
                with lock:
                    first_error.append(exc)
                stop.set()
            if stream is None:
                return BatchResult(prompt, None, exc, None, None)
            return BatchResult(prompt, None, exc, stream.metrics, stream.finish_reason)
        finally:
            if stream is not None:
                with lock:
                    running.discard(stream)

    def cancel_running() -> None:
        with lock:
            stop.set()
            doomed = list(running)
        for stream in doomed:
            stream.close()

    results: List[Optional[BatchResult]] = [None] * len(prompts)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="llamarocm-map") as pool:
        futures = {pool.submit(one, p): i for i, p in enumerate(prompts)}
        done = 0
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                if progress is not None:
                    progress(done, len(prompts))
                if stop.is_set():
                    cancel_running()
        except BaseException:
            # Ctrl-C or a failing progress callback: cancel what runs, skip the rest.
            for future in futures:
                future.cancel()
            cancel_running()
            raise
    if first_error:
        raise first_error[0]
    return [r for r in results if r is not None]

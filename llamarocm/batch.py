"""``Model.map``: many prompts through one model, as many at once as it has slots.

Knows nothing of models: it is handed the two calls that open streams (``generate``
for a string prompt, ``chat`` for a message list) and runs them on a thread pool,
with one result per prompt whatever fails.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Union

from .config import GenerateConfig, check_messages
from .errors import SkippedError
from .stream import GenerateMetrics, TokenStream

__all__ = ["BatchResult", "run_batch"]

Prompt = Union[str, Sequence[Mapping[str, Any]]]
Opener = Callable[..., TokenStream]


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one prompt of :meth:`Model.map`: ``text`` or ``error``, never both.

    A prompt that never ran because the batch stopped first has a
    :class:`~llamarocm.SkippedError`.
    """

    prompt: Prompt
    text: Optional[str]
    error: Optional[BaseException]
    metrics: Optional[GenerateMetrics]
    finish_reason: Optional[str]

    @property
    def ok(self) -> bool:
        return self.error is None

    def __repr__(self) -> str:
        # A prompt or a text may be pages long: a REPL shows their start.
        prompt = _short(self.prompt if isinstance(self.prompt, str) else f"{len(self.prompt)} messages")
        if self.error is not None:
            return f"<BatchResult {prompt} error={type(self.error).__name__}: {_short(str(self.error))}>"
        return f"<BatchResult {prompt} -> {_short(self.text or '')} finish_reason={self.finish_reason!r}>"


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _check_arguments(
    prompts: Any, config: Dict[str, Any], max_workers: Any, progress: Any
) -> None:
    """Refuse bad input before anything runs."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or of message lists")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            try:
                check_messages(prompt)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prompts[{i}]: {exc}") from None
    GenerateConfig.from_kwargs(config)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable(done, total)")


class _Batch:
    """The shared state of one ``map`` call: which streams run, whether to stop."""

    def __init__(self, generate: Opener, chat: Opener, config: Dict[str, Any], fail_fast: bool) -> None:
        self.generate, self.chat, self.config, self.fail_fast = generate, chat, config, fail_fast
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.running: Set[TokenStream] = set()
        self.first_error: List[BaseException] = []

    def _start(self, prompt: Prompt) -> Optional[TokenStream]:
        """Open the prompt's stream, tracked for cancelling; ``None`` once stopping."""
        opener = self.generate if isinstance(prompt, str) else self.chat
        stream = opener(prompt, **self.config)
        with self.lock:
            # Checked with the stream already open and under the lock that cancelling
            # takes: a stop either sees this stream or is seen here.
            if not self.stop.is_set():
                self.running.add(stream)
                return stream
        stream.close()
        return None

    def run_one(self, prompt: Prompt) -> BatchResult:
        stream: Optional[TokenStream] = None
        try:
            if not self.stop.is_set():
                stream = self._start(prompt)
            if stream is None:
                return BatchResult(prompt, None, SkippedError("not run: the batch was stopped"), None, None)
            text = stream.text()
            return BatchResult(prompt, text, None, stream.metrics, stream.finish_reason)
        except Exception as exc:  # one item's error, raised before its stream too
            if self.fail_fast:
                with self.lock:
                    self.first_error.append(exc)
                self.stop.set()
            if stream is None:
                return BatchResult(prompt, None, exc, None, None)
            return BatchResult(prompt, None, exc, stream.metrics, stream.finish_reason)
        finally:
            if stream is not None:
                with self.lock:
                    self.running.discard(stream)

    def cancel(self) -> None:
        """Stop: cancel what runs; what has not started will be skipped."""
        with self.lock:
            self.stop.set()
            doomed = list(self.running)
        for stream in doomed:
            stream.close()


def run_batch(
    generate: Opener,
    chat: Opener,
    prompts: Sequence[Prompt],
    *,
    max_workers: int,
    fail_fast: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    **config: Any,
) -> List[BatchResult]:
    """Run every prompt (a string through ``generate``, a message list through
    ``chat``) on ``max_workers`` threads; a :class:`BatchResult` per prompt, in order."""
    _check_arguments(prompts, config, max_workers, progress)
    batch = _Batch(generate, chat, config, fail_fast)
    results: List[Optional[BatchResult]] = [None] * len(prompts)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="llamarocm-map") as pool:
        futures: "Dict[Future[BatchResult], int]" = {pool.submit(batch.run_one, p): i for i, p in enumerate(prompts)}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(done, len(prompts))
                if batch.stop.is_set():
                    batch.cancel()
        except BaseException:
            # Ctrl-C or a failing progress callback: cancel what runs, skip the rest.
            for future in futures:
                future.cancel()
            batch.cancel()
            raise
    if batch.first_error:
        raise batch.first_error[0]
    return [r for r in results if r is not None]

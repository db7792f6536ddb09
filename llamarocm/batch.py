"""``Model.map``: many prompts through one model, as many at once as it has slots.

Knows nothing of models: it is handed the two calls that open streams (``generate``
for a string prompt, ``chat`` for a message list) and runs them on a thread pool,
with one result per prompt whatever fails. With a checkpoint file
(:mod:`llamarocm.checkpoint`) each finished item is appended to it by the worker that
ran it, before the calling thread hears of it, and items already in the file are read
back instead of run.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .checkpoint import Checkpoint, ItemId, Record, item_hash, settings_identity
from .config import GenerateConfig
from .errors import SkippedError
from .messages import check_prompts
from .stream import GenerateMetrics, TokenStream, consumer_reads

__all__ = ["BatchItem", "BatchResult", "BatchRun", "Resume", "read_back", "run_batch", "run_items"]

Prompt = Union[str, Sequence[Mapping[str, Any]]]
Opener = Callable[..., TokenStream]
Progress = Callable[[int, int], None]

_NOT_RUN = "not run: the batch was stopped"
# A finished item of a batch: its index, and its result or what its run raised.
_Outcome = Tuple[int, Union["BatchResult", BaseException]]


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


@dataclass(frozen=True)
class BatchItem:
    """One prompt of a batch with its own settings: ``options`` are keyword arguments
    of ``generate()`` / ``chat()``, already checked; ``id`` is what its checkpoint line
    is known by (``map()`` uses the position)."""

    prompt: Prompt
    options: Mapping[str, Any]
    id: ItemId


@dataclass(frozen=True)
class BatchRun:
    """A run of :func:`run_items`: a result per item, in order, and how many of them
    were read back from the checkpoint instead of run."""

    results: List[BatchResult]
    resumed: int


def _check_arguments(
    prompts: Any, config: Dict[str, Any], max_workers: Any, progress: Any
) -> None:
    """Refuse bad input before anything runs."""
    check_prompts(prompts)
    GenerateConfig.from_kwargs(config)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable(done, total)")


_METRICS_FIELDS = tuple(f.name for f in fields(GenerateMetrics))


def _metrics_fields(metrics: Optional[GenerateMetrics]) -> Optional[Dict[str, Any]]:
    if metrics is None:
        return None
    values = {name: getattr(metrics, name) for name in _METRICS_FIELDS}
    # A rate the server could not compute must not make the line invalid JSON.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def _record(index: int, item: BatchItem, digest: str, result: BatchResult) -> Optional[Record]:
    """The checkpoint line of a result; ``None`` for an item that did not finish (skipped,
    or cancelled by a stop), which the next run must do."""
    if result.error is None:
        if result.finish_reason == "cancelled":
            return None
        return Record(index, item.id, digest, result.text, result.finish_reason, _metrics_fields(result.metrics), None)
    if isinstance(result.error, SkippedError):
        return None
    return Record.failure(index, item.id, digest, result.error, _metrics_fields(result.metrics))


def _read_back(prompt: Prompt, record: Record) -> BatchResult:
    """A finished item's result, rebuilt from its line: metrics as far as stored."""
    metrics = None
    if record.metrics is not None:
        try:
            # A field added later (with a default) is absent from older lines.
            metrics = GenerateMetrics(**{name: record.metrics[name] for name in _METRICS_FIELDS
                                         if name in record.metrics})
        except TypeError:  # a field without a default is missing
            metrics = None
    return BatchResult(prompt, record.text, None, metrics, record.finish_reason)


def _hashes(items: Sequence[BatchItem]) -> List[str]:
    """Each item's identity hash; the settings of items sharing one options mapping
    (all of them, in ``map()``) are serialised once."""
    settings: Dict[int, str] = {}
    digests = []
    for item in items:
        key = id(item.options)  # the items hold their options: an id is not reused meanwhile
        if key not in settings:
            settings[key] = settings_identity(GenerateConfig.from_kwargs(item.options))
        digests.append(item_hash(item.prompt, settings[key]))
    return digests


class _Batch:
    """The shared state of one batch: which streams run, whether to stop."""

    def __init__(self, generate: Opener, chat: Opener, fail_fast: bool, checkpoint: Optional[Checkpoint]) -> None:
        self.generate, self.chat, self.fail_fast, self.checkpoint = generate, chat, fail_fast, checkpoint
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.running: Set[TokenStream] = set()
        # What ends the batch with an exception: a fail_fast item's error, or a
        # checkpoint write that failed.
        self.fatal: List[BaseException] = []

    def _start(self, item: BatchItem) -> Optional[TokenStream]:
        """Open the prompt's stream, tracked for cancelling; ``None`` once stopping."""
        opener = self.generate if isinstance(item.prompt, str) else self.chat
        # The worker waits for the whole reply: it reads the stream itself (no thread
        # per item; see consumer_reads).
        with consumer_reads():
            stream = opener(item.prompt, **item.options)
        with self.lock:
            # Checked with the stream already open and under the lock that cancelling
            # takes: a stop either sees this stream or is seen here.
            if not self.stop.is_set():
                self.running.add(stream)
                return stream
        stream.close()
        return None

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            self.fatal.append(exc)
        self.stop.set()

    def _run(self, item: BatchItem) -> BatchResult:
        prompt = item.prompt
        stream: Optional[TokenStream] = None
        try:
            if not self.stop.is_set():
                stream = self._start(item)
            if stream is None:
                return BatchResult(prompt, None, SkippedError(_NOT_RUN), None, None)
            text = stream.text()
            return BatchResult(prompt, text, None, stream.metrics, stream.finish_reason)
        except Exception as exc:  # one item's error, raised before its stream too
            if self.fail_fast:
                self._fail(exc)
            if stream is None:
                return BatchResult(prompt, None, exc, None, None)
            return BatchResult(prompt, None, exc, stream.metrics, stream.finish_reason)
        finally:
            if stream is not None:
                with self.lock:
                    self.running.discard(stream)

    def run_one(self, index: int, item: BatchItem, digest: str) -> BatchResult:
        """Run one item and, with a checkpoint, write its line before returning: the
        calling thread reports nothing that is not in the file."""
        result = self._run(item)
        if self.checkpoint is not None:
            record = _record(index, item, digest, result)
            if record is not None:
                try:
                    self.checkpoint.append(record)
                except OSError as exc:  # a full disk: going on would lose every result
                    self._fail(exc)
        return result

    def run_into(
        self, finished: "queue.SimpleQueue[_Outcome]", index: int, item: BatchItem, digest: str
    ) -> None:
        """:meth:`run_one`, its result put on ``finished``; an exception too, for the
        calling thread to raise (as ``Future.result()`` would)."""
        try:
            outcome: Union[BatchResult, BaseException] = self.run_one(index, item, digest)
        except BaseException as exc:
            outcome = exc
        finished.put((index, outcome))

    def cancel(self) -> None:
        """Stop: cancel what runs; what has not started will be skipped."""
        with self.lock:
            self.stop.set()
            doomed = list(self.running)
        for stream in doomed:
            stream.close()


@dataclass(frozen=True)
class Resume:
    """What a checkpoint holds for a batch's items: the results read back (``None`` for
    an item to run) and every item's hash."""

    checkpoint: Checkpoint
    results: List[Optional[BatchResult]]
    digests: List[str]

    @property
    def pending(self) -> int:
        """How many items must run."""
        return sum(result is None for result in self.results)

    def save(self, index: int, item: BatchItem, result: BatchResult) -> None:
        """Append the line of ``item`` (the one at ``index``) for ``result``, to be
        called before the result is reported; nothing for an item that did not finish
        (skipped, cancelled), which the next run does. For runners other than
        :func:`run_items` (the Ray driver); an ``OSError`` must stop the run."""
        record = _record(index, item, self.digests[index], result)
        if record is not None:
            self.checkpoint.append(record)


def read_back(items: Sequence[BatchItem], checkpoint: Checkpoint) -> Resume:
    """The results of ``items`` that the open ``checkpoint`` already holds."""
    digests = _hashes(items)
    results: List[Optional[BatchResult]] = []
    for item, digest in zip(items, digests, strict=True):
        record = checkpoint.finished(item.id, digest)
        results.append(None if record is None else _read_back(item.prompt, record))
    return Resume(checkpoint, results, digests)


def run_items(
    generate: Opener,
    chat: Opener,
    items: Sequence[BatchItem],
    *,
    max_workers: int,
    fail_fast: bool = False,
    progress: Optional[Progress] = None,
    on_result: Optional[Callable[[BatchResult], None]] = None,
    resume: Optional[Resume] = None,
) -> BatchRun:
    """Run every item on ``max_workers`` threads, each with its own settings; with
    ``resume`` (:func:`read_back`), only those its checkpoint does not hold, each
    written to it as it finishes. ``on_result`` then ``progress(done, total)`` are
    called in the calling thread for each item run; items read back count as done, and
    when there are some ``progress`` is first called once with their number.
    Arguments are checked by the caller."""
    total = len(items)
    checkpoint = None if resume is None else resume.checkpoint
    results: List[Optional[BatchResult]] = [None] * total if resume is None else list(resume.results)
    digests = [""] * total if resume is None else resume.digests
    pending = [i for i, result in enumerate(results) if result is None]
    resumed = total - len(pending)
    if progress is not None and resumed:
        progress(resumed, total)
    done = resumed

    def report(index: int, result: BatchResult) -> None:
        nonlocal done
        results[index] = result
        done += 1
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress(done, total)

    batch = _Batch(generate, chat, fail_fast, checkpoint)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="llamarocm-map") as pool:
        _feed(pool, 2 * max_workers, batch, items, digests, pending, report)
    if batch.fatal:
        raise batch.fatal[0]
    return BatchRun([r for r in results if r is not None], resumed)


def _feed(
    pool: ThreadPoolExecutor,
    window: int,
    batch: _Batch,
    items: Sequence[BatchItem],
    digests: Sequence[str],
    pending: Sequence[int],
    report: Callable[[int, BatchResult], None],
) -> None:
    """Hand the ``pending`` items to the pool, at most ``window`` queued or running at
    once (100,000 prompts are not 100,000 futures at the start), and ``report`` each
    result as it comes; once the batch stops, the items left are skipped unrun.

    Each worker puts its outcome on a queue that this thread waits on, rather than
    this thread waiting on the futures: ``concurrent.futures.wait()`` takes the
    futures' locks in Python code, and a Ctrl-C landing between two of them would
    leave one held for good, and the worker that finishes that future stuck on it."""
    queue_ = iter(pending)
    finished: "queue.SimpleQueue[_Outcome]" = queue.SimpleQueue()
    running: "Dict[int, Future[None]]" = {}
    try:
        while True:
            while len(running) < window:
                index = next(queue_, None)
                if index is None:
                    break
                if batch.stop.is_set():
                    report(index, BatchResult(items[index].prompt, None, SkippedError(_NOT_RUN), None, None))
                else:
                    running[index] = pool.submit(batch.run_into, finished, index, items[index], digests[index])
            if not running:
                return
            index, result = finished.get()
            del running[index]
            if isinstance(result, BaseException):
                raise result
            report(index, result)
            if batch.stop.is_set():
                batch.cancel()
    except BaseException:
        # Ctrl-C or a failing callback: cancel what runs, skip the rest.
        for future in running.values():
            future.cancel()
        batch.cancel()
        raise


def run_batch(
    generate: Opener,
    chat: Opener,
    prompts: Sequence[Prompt],
    *,
    max_workers: int,
    fail_fast: bool = False,
    progress: Optional[Progress] = None,
    checkpoint: Optional[Union[str, "os.PathLike[str]"]] = None,
    **config: Any,
) -> List[BatchResult]:
    """Run every prompt (a string through ``generate``, a message list through
    ``chat``) on ``max_workers`` threads; a :class:`BatchResult` per prompt, in order.

    With ``checkpoint`` (a file path), each finished prompt is appended to that file,
    and prompts already there, with the same position, text and settings, are read
    back instead of run (see :mod:`llamarocm.checkpoint`)."""
    _check_arguments(prompts, config, max_workers, progress)
    items = [BatchItem(prompt, config, index) for index, prompt in enumerate(prompts)]
    if checkpoint is None:
        return run_items(generate, chat, items, max_workers=max_workers, fail_fast=fail_fast, progress=progress).results
    with Checkpoint(checkpoint) as file:
        return run_items(
            generate, chat, items, max_workers=max_workers, fail_fast=fail_fast, progress=progress,
            resume=read_back(items, file),
        ).results

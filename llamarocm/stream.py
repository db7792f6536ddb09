"""Streams of tokens: ``TokenStream``, ``Token``, ``GenerateMetrics``, and the reader
behind each stream.

Each stream has one reader that reads the server's events and puts lists of tokens
(one list per network read, so a burst costs one queue hand-off) on a queue; the
consuming iterator takes them off and re-raises the reader's error at the end, in the
manner of ``concurrent.futures``. The reader always ends with a sentinel, so the
consumer simply blocks. The reader never holds the ``TokenStream`` itself, so dropping
a stream lets it be collected, which cancels the request.

The reader runs on a thread of its own, so that the caller's loop sees each token as
it comes while the next is read. A batch's workers, which only wait for each reply's
end, open their streams inside :func:`consumer_reads`: the worker then runs the reader
itself at its first ``next()``, and a thread per item (its start, and a thread switch
per hand-off) is saved.

A stream knows nothing of models or servers: whoever opens it hands over what it needs
(what a lost connection means, what to do when the reader ends, where errors are
recorded), as a channel receives only the callables it uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple

from ._sse import ServerSentEvent
from .client import EventStream
from .errors import ConnectionLostError, LlamaRocmError, OutputParseError, RequestError, error_from_payload
from .reasoning import ReasoningSplitter
from .tools import ToolCall

__all__ = ["TokenStream", "Token", "TopLogprob", "GenerateMetrics", "StreamState", "consumer_reads", "fork_error"]

_END = object()

# Whether streams opened by this thread are read by their consumer (consumer_reads()).
_opening = threading.local()


@contextlib.contextmanager
def consumer_reads() -> Iterator[None]:
    """Streams this thread opens inside the block get no reader thread: the thread that
    consumes one reads it, wholly, at its first ``next()`` (or ``text()``).

    For a consumer that wants only the end (a batch's worker); a loop that shows
    tokens as they come needs the reader thread. A stream never consumed is settled
    as cancelled, without a request, by ``close()`` or when it is dropped.
    """
    before = getattr(_opening, "by_consumer", False)
    _opening.by_consumer = True
    try:
        yield
    finally:
        _opening.by_consumer = before


def fork_error(owner_pid: int) -> LlamaRocmError:
    """The error every use of a model or stream raises in a forked child."""
    # After os.fork() the child shares the parent's server, sockets and key; using
    # them from two processes would interleave requests on one connection.
    return LlamaRocmError(
        f"this model belongs to process {owner_pid}; after fork, load a new model in the child"
    )


class TopLogprob(NamedTuple):
    """One of the most likely alternatives at a position (``logprobs=N``)."""

    text: str
    id: int
    logprob: float


class Token(NamedTuple):
    """One generated token: its text, id and, with ``logprobs=N``, its log-probability
    and the ``N`` most likely alternatives.

    ``id`` is ``None`` only when the server leaves the ids out (llama-server's
    native stream always carries them). A token that ends inside a multi-byte
    character has empty ``text``; the character arrives whole with the next token.
    """

    text: str
    id: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[Tuple[TopLogprob, ...]] = None
    #: Part of a chat reply's reasoning (its ``<think>`` block), not of the answer.
    reasoning: bool = False


@dataclass(frozen=True)
class GenerateMetrics:
    """Figures for one finished stream.

    ``prompt_tokens`` counts cached plus newly evaluated prompt tokens, and
    ``cached_prompt_tokens`` the first of them (taken from the server's prompt cache,
    not evaluated again); ``generated_tokens`` the tokens the stream yielded.
    Durations are seconds, measured by the client from the call; rates are the
    server's own timings.
    """

    prompt_tokens: Optional[int]
    generated_tokens: int
    time_to_first_token: Optional[float]
    total_duration: float
    prefill_tokens_per_second: Optional[float]
    decode_tokens_per_second: Optional[float]
    cached_prompt_tokens: Optional[int] = None


class Events(Protocol):
    """What the reader needs of a request's events: the client's
    :class:`~llamarocm.client.EventStream`, or a sequence of such requests."""

    cancelled: bool

    def open(self) -> None: ...
    def __iter__(self) -> Iterator[List[ServerSentEvent]]: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...


#: Decodes one event's JSON object into tokens (appended to the list) and records on
#: the state how the stream ended; the default reads the native ``/completion`` stream.
EventDecoder = Callable[[Mapping[str, Any], List["Token"], "StreamState"], None]


class StreamState:
    """Everything the reader thread and the consumer share (never the stream itself)."""

    def __init__(self, events: "Events | EventStream", epoch: int = 0) -> None:
        # SimpleQueue: implemented in C, a cheaper hand-off than Queue for every batch.
        self.queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        # Known before the request is sent, so a cancel during the prompt's evaluation
        # (or while queued for a slot) shuts the socket down at once.
        self.events = events
        self.error: Optional[BaseException] = None
        self.finish_reason: Optional[str] = None
        self.final: Dict[str, Any] = {}
        self.started = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.generated = 0
        self.done = threading.Event()
        # Which server life the request went to (a model's restarts count them): a
        # connection lost to an earlier life is no crash of the current one.
        self.epoch = epoch
        # Set by chat() before the reader starts: what splits reasoning from the answer
        # (the reasoning's text is kept here), and what parses the reply (parsed()).
        self.reasoning: Optional[ReasoningSplitter] = None
        self.reasoning_parts: List[str] = []
        self.parse: Optional[Callable[[str, bool], Any]] = None
        # Set by a chat that offers tools: how its events decode, and the calls made.
        self.decode: EventDecoder = read_native_event
        self.tool_calls: Tuple[ToolCall, ...] = ()

    @property
    def cancel_requested(self) -> bool:
        return self.events.cancelled

    def cancel(self) -> None:
        self.events.cancel()


def _add_tokens(obj: Mapping[str, Any], out: List[Token]) -> None:
    """The tokens of one event of the native ``/completion`` stream: text, token ids,
    log-probabilities."""
    content = obj.get("content") or ""
    ids = obj.get("tokens") or []
    probs = obj.get("completion_probabilities")
    if probs and len(probs) == len(ids):
        # With logprobs, build full tokens; the text stays on the last, as below.
        last = len(ids) - 1
        for i, (token_id, p) in enumerate(zip(ids, probs, strict=True)):
            tops = tuple(
                TopLogprob(t.get("token", ""), t.get("id"), t.get("logprob")) for t in p.get("top_logprobs") or ()
            )
            out.append(Token(content if i == last else "", token_id, p.get("logprob"), tops))
    elif len(ids) > 1:
        # Several tokens in one event (e.g. a held-back partial stop string): yield
        # each id so counts match the server's, the text on the last.
        out.extend(Token("", i) for i in ids[:-1])
        out.append(Token(content, ids[-1]))
    elif ids:
        out.append(Token(content, ids[0]))
    elif content:
        out.append(Token(content, None))


def _read_event(event: ServerSentEvent, out: List[Token], state: StreamState) -> None:
    """Decode one event into ``out``; the final one records how the stream ended."""
    if event.event == "error":
        raise error_from_payload(event.data, None)
    if event.data == "[DONE]":
        return  # the OpenAI-style stream's last word; its final chunk came before
    try:
        obj = json.loads(event.data)
    except ValueError as exc:
        raise RequestError(f"llama-server sent malformed JSON: {event.data[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise RequestError(f"llama-server sent an event that is not an object: {event.data[:200]!r}")
    if "error" in obj:
        raise error_from_payload(event.data, None)
    state.decode(obj, out, state)


def read_native_event(obj: Mapping[str, Any], out: List[Token], state: StreamState) -> None:
    """Decode one event of the native ``/completion`` stream."""
    _add_tokens(obj, out)
    if obj.get("stop"):
        state.final = dict(obj)
        state.finish_reason = "length" if obj.get("stop_type") == "limit" else "stop"


def _hand_over(batch: Sequence[ServerSentEvent], state: StreamState) -> None:
    """Decode one network read's events and queue their tokens, all at once."""
    tokens: List[Token] = []
    try:
        for event in batch:
            _read_event(event, tokens, state)
    finally:
        # Tokens that arrived before an error in the same read are still the
        # consumer's: hand them over first.
        if tokens:
            if state.first_token_at is None:
                state.first_token_at = time.monotonic()
            state.generated += len(tokens)
            if state.reasoning is not None and not state.reasoning.passes_through:
                tokens = _split_reasoning(tokens, state.reasoning, state.reasoning_parts)
            state.queue.put(tokens)


def _split_reasoning(tokens: List[Token], splitter: ReasoningSplitter, reasoning: List[str]) -> List[Token]:
    """``tokens`` marked as reasoning or answer, their text without the tags. A token
    whose text holds both becomes two; the second has no id."""
    out: List[Token] = []
    for token in tokens:
        pieces = splitter.feed(token.text)
        if not pieces:  # a tag, or text held back until the next token decides
            out.append(token._replace(text="", reasoning=splitter.touched_reasoning))
        for k, (text, is_reasoning) in enumerate(pieces):
            if is_reasoning:
                reasoning.append(text)
            piece = token if k == 0 else Token(text)
            out.append(piece._replace(text=text, reasoning=is_reasoning))
    return out


def _flush_reasoning(state: StreamState) -> None:
    """Hand over the text the splitter held back, once the reply has ended."""
    if state.reasoning is None:
        return
    pieces = state.reasoning.finish()
    state.reasoning_parts.extend(text for text, is_reasoning in pieces if is_reasoning)
    if pieces:
        state.queue.put([Token(text, reasoning=is_reasoning) for text, is_reasoning in pieces])


LostHandler = Callable[[StreamState, ConnectionLostError], BaseException]


def read_stream(state: StreamState, on_lost: LostHandler, on_end: Callable[[StreamState], None]) -> None:
    """The reader thread: request, decode, hand tokens over; always ends with _END.

    ``on_lost`` says what a connection lost without an answer means (a crash, a
    close, a restart); an answer of the server, even an error, is taken as it is,
    at once. ``on_end`` runs last, after the consumer has its sentinel.
    """
    events = state.events
    try:
        events.open()
        for batch in events:
            _hand_over(batch, state)
        _flush_reasoning(state)
        if state.finish_reason is None:  # a close() after the final event changes nothing
            if state.cancel_requested:
                state.finish_reason = "cancelled"
            else:
                raise ConnectionLostError("llama-server ended the stream without finishing it")
    except BaseException as exc:  # handed to the consumer, never printed by the thread
        if state.cancel_requested and isinstance(exc, RequestError) and exc.status is None:
            state.finish_reason = state.finish_reason or "cancelled"
        elif isinstance(exc, ConnectionLostError):
            state.error = on_lost(state, exc)
        else:
            state.error = exc
    finally:
        events.close()
        state.ended_at = time.monotonic()
        state.done.set()
        state.queue.put(_END)
        on_end(state)


class _Reader:
    """The reading of one stream (:func:`read_stream`), run once, by the first thread
    to claim it: the stream's reader thread, or for a stream of :func:`consumer_reads`
    its consumer's first ``next()``, or, for such a stream closed or dropped before
    anyone read it, a thread that only settles it (cancelled by then: nothing is sent).
    """

    def __init__(self, state: StreamState, on_lost: LostHandler, on_end: Callable[[StreamState], None]) -> None:
        self._args = (state, on_lost, on_end)
        self.state = state
        self._owner_pid = os.getpid()
        # Acquired once, never released: a claim that never blocks.
        self._claim = threading.Lock()
        #: The thread that runs (or ran) the reading, once claimed.
        self.thread: Optional[threading.Thread] = None

    def _claimed(self) -> bool:
        # Never in a forked child, whose requests would share the parent's connections.
        return os.getpid() == self._owner_pid and self._claim.acquire(blocking=False)

    def start_thread(self) -> None:
        """Read on a thread of its own, started now."""
        if self._claimed():
            self.thread = threading.Thread(target=read_stream, args=self._args, name="llamarocm-stream", daemon=True)
            self.thread.start()

    def read_here(self) -> None:
        """Read in this thread, unless the reading is claimed."""
        if self._claimed():
            self.thread = threading.current_thread()
            read_stream(*self._args)

    def abandon(self) -> None:
        """Cancel (``close()``, or the stream was dropped); a reading nobody has claimed
        is then settled by a thread of its own, which claims it. Never here: the
        settling forgets the stream in its model, under the model's lock, and this
        may run in a signal handler or a finalizer that interrupted a holder of that
        lock; and a thread that gets no Ctrl-C cannot be left half-way."""
        self.state.cancel()
        if not self._claim.locked() and os.getpid() == self._owner_pid:
            threading.Thread(target=self.read_here, name="llamarocm-settle", daemon=True).start()


class TokenStream:
    """An iterator of :class:`Token` as the server produces them.

    Use it as a context manager or call :meth:`close` to cancel early; breaking out
    of a loop over a temporary stream, or dropping the last reference, cancels too.
    A failure raises from iteration and is kept in :attr:`error`.

    >>> with model.generate("Hello", max_tokens=8) as stream:  # doctest: +SKIP
    ...     for token in stream:
    ...         print(token.text, end="")
    """

    def __init__(
        self,
        state: StreamState,
        *,
        on_lost: LostHandler,
        on_end: Callable[[StreamState], None],
        on_error: Callable[[BaseException], None],
        owner_pid: int,
    ) -> None:
        # Made by Model, which hands over only what a stream needs: what a lost
        # connection means, what to do when the reader ends, where errors are recorded.
        self._state = state
        self._on_error = on_error
        self._owner_pid = owner_pid
        self._buffer: List[Token] = []
        self._index = 0
        self._finished = False
        # Every batch taken from the reader, so that text() returns the whole text
        # however much of it the caller's own loop (or reasoning_text()) read first.
        self._received: List[List[Token]] = []
        # Set only for a chat session's replies (see _keep_transcript).
        self._on_consumed: Optional[Callable[["TokenStream"], None]] = None
        self._reader = _Reader(state, on_lost, on_end)
        # Cancel on collection; the callback holds the reader, never the stream.
        self._finalizer = weakref.finalize(self, self._reader.abandon)
        self._consumer_must_read = getattr(_opening, "by_consumer", False)
        if not self._consumer_must_read:
            self._reader.start_thread()

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        if os.getpid() != self._owner_pid:
            # A forked child has the queue but no reader: it would end silently.
            raise fork_error(self._owner_pid)
        if self._index < len(self._buffer):
            token = self._buffer[self._index]
            self._index += 1
            return token
        if self._finished:
            raise StopIteration
        if self._consumer_must_read:
            # The whole reply onto the queue, once: later batches are already there.
            self._consumer_must_read = False
            self._reader.read_here()
        try:
            # Blocks without a timeout: the reader always ends with _END, and a real
            # SIGINT still interrupts the wait.
            item = self._state.queue.get()
        except BaseException:
            # Ctrl-C (or any error) in the consumer: the server must stop working for us.
            self.close()
            raise
        if item is _END:
            self._finish()
            raise StopIteration
        self._buffer = item
        self._index = 1
        self._received.append(item)
        first: Token = item[0]
        return first

    def _finish(self) -> None:
        self._finished = True
        self._finalizer.detach()
        error = self._state.error
        if self._on_consumed is not None:
            self._on_consumed(self)
        if error is not None:
            self._on_error(error)
            raise error

    def close(self) -> None:
        """Cancel the request (the server frees the slot) and wait for the reader.

        Idempotent; callable from any thread, and from a signal handler: it takes no
        lock that the interrupted code could hold (a batch's stream closed before it was
        read is settled by a thread it starts). Tokens already received are dropped.
        """
        if os.getpid() != self._owner_pid:
            return  # a forked child has no reader thread, and must not cut the parent's stream
        self._finalizer.detach()
        self._reader.abandon()
        if self._reader.thread is not threading.current_thread():
            self._state.done.wait(10.0)

    def __repr__(self) -> str:
        state = self._state
        if not state.done.is_set():
            how = "running"
        elif state.error is not None:
            how = f"failed: {type(state.error).__name__}"
        else:
            how = f"finished: {state.finish_reason}"
        return f"<TokenStream {how}, {state.generated} tokens received>"

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def text(self) -> str:
        """Drain the stream and return the whole text: for a chat reply whose reasoning
        is split off (see :meth:`reasoning_text`), the answer only.

        The whole text even if a loop of yours read part or all of it first, and again
        on every call (as openai's stream helpers accumulate it)."""
        for _ in self:
            pass
        return self._kept_text

    def reasoning_text(self) -> str:
        """Drain the stream and return the reply's reasoning: the text of its
        ``<think>`` block without the tags (``""`` when there is none, and always for
        ``generate()`` and ``chat(..., reasoning=False)``).

        The whole reasoning, even if the loop that consumed it was yours.
        """
        for _ in self:
            pass
        return "".join(self._state.reasoning_parts)

    def parsed(self) -> Any:
        """Drain the stream and return the answer as ``response_format`` asked: an
        instance of the pydantic model given, validated, or the JSON value (also with
        ``json_schema=``).

        Raises :class:`~llamarocm.OutputParseError` (a ``ValueError``) with the
        validation message when the text does not parse or validate, and
        ``ValueError`` at once for a stream started without a JSON format.
        """
        parse = self._state.parse
        if parse is None:
            raise ValueError("parsed() needs a stream started with response_format= (a JSON format) or json_schema=")
        text = self.text()
        return parse(text, self.finish_reason == "length")

    def json(self) -> Any:
        """Drain the stream and parse the text as JSON (use with ``json_schema=``).

        Raises :class:`~llamarocm.OutputParseError` (a ``ValueError``) quoting the text
        when it does not parse, e.g. because ``max_tokens`` cut it short.
        """
        text = self.text()
        try:
            return json.loads(text)
        except ValueError as exc:
            hint = " (the output was cut short by max_tokens)" if self.finish_reason == "length" else ""
            raise OutputParseError(f"the output is not valid JSON{hint}: {exc}; output: {text[:500]!r}") from exc

    @property
    def error(self) -> Optional[BaseException]:
        """The error that ended this stream, if any."""
        return self._state.error

    @property
    def finish_reason(self) -> Optional[str]:
        """``"stop"``, ``"length"``, ``"cancelled"``, ``"tool_calls"`` (a chat with
        ``tools=`` whose reply calls them), or ``None`` while running or failed."""
        return self._state.finish_reason

    @property
    def tool_calls(self) -> Tuple[ToolCall, ...]:
        """The calls of a chat with ``tools=`` (:class:`~llamarocm.ToolCall`, arguments
        parsed), once the stream has ended; ``()`` before, and when there are none."""
        return self._state.tool_calls

    @property
    def metrics(self) -> Optional[GenerateMetrics]:
        """Figures for the stream, or ``None`` until it has ended."""
        state = self._state
        if not state.done.is_set() or state.ended_at is None:
            return None
        timings = state.final.get("timings") or {}
        prompt_n = timings.get("prompt_n")
        cache_n = timings.get("cache_n") or 0
        return GenerateMetrics(
            prompt_tokens=(prompt_n + cache_n) if isinstance(prompt_n, int) else None,
            generated_tokens=state.generated,
            time_to_first_token=(state.first_token_at - state.started) if state.first_token_at else None,
            total_duration=state.ended_at - state.started,
            prefill_tokens_per_second=timings.get("prompt_per_second"),
            decode_tokens_per_second=timings.get("predicted_per_second"),
            cached_prompt_tokens=cache_n if isinstance(prompt_n, int) else None,
        )

    @property
    def slot(self) -> Optional[int]:
        """The server slot that ran the request (llama-server's ``id_slot``), or
        ``None`` until the stream has finished."""
        slot = self._state.final.get("id_slot")
        return slot if isinstance(slot, int) else None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the stream was cancelled on collection)."""
        return self._state.cancel_requested

    def _keep_transcript(self, on_consumed: Callable[["TokenStream"], None]) -> None:
        """Call ``on_consumed(self)`` when the consumer reaches the end (error or not;
        never on :meth:`close`): when a chat session records the reply, as
        :attr:`_kept_text`. Must be called before the first token is taken."""
        self._on_consumed = on_consumed

    @property
    def _kept_text(self) -> str:
        """The answer's text among the tokens taken so far (a reply's reasoning is not
        part of it, nor of a conversation's history: templates drop it from earlier
        turns)."""
        return "".join(token.text for batch in self._received for token in batch if not token.reasoning)



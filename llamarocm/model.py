"""The inference API: ``Model``, ``TokenStream``, ``Token`` and ``GenerateMetrics``.

Each stream has one reader thread that reads the server's events and puts lists of
tokens (one list per network read, so a burst costs one queue hand-off) on a
``queue.Queue``; the consuming iterator takes them off and re-raises the reader's
error at the end, in the manner of ``concurrent.futures``. The reader thread never
holds the ``TokenStream`` itself, so dropping a stream lets it be collected, which
cancels the request.

Thread safety: a ``Model`` may be shared by any number of threads, each running its
own streams. A ``TokenStream`` has one consumer; its ``close()`` may be called from
any thread (a watchdog, a signal handler's thread).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from .client import Client, ConnectionLost, EventStream
from .config import GenerateConfig
from .errors import ClosedError, LlamaRocmError, OutputParseError, RequestError, ServerCrashedError

__all__ = ["Model", "TokenStream", "Token", "TopLogprob", "GenerateMetrics"]

log = logging.getLogger("llamarocm")

_END = object()
# How long the consumer blocks on the queue between checks that the reader lives.
# The reader always ends with a sentinel, so this only bounds a bug, never a wait.
_CONSUMER_CHECK_INTERVAL = 1.0
# A dead server's socket closes a moment before the process is reaped: a connection
# lost without an answer waits this long for the exit before calling it a crash.
_CRASH_CONFIRM_SECONDS = 1.0


def _fork_error(owner_pid: int) -> LlamaRocmError:
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


@dataclass(frozen=True)
class GenerateMetrics:
    """Figures for one finished stream.

    ``prompt_tokens`` counts cached plus newly evaluated prompt tokens;
    ``generated_tokens`` the tokens the stream yielded. Durations are seconds,
    measured by the client from the call; rates are the server's own timings.
    """

    prompt_tokens: Optional[int]
    generated_tokens: int
    time_to_first_token: Optional[float]
    total_duration: float
    prefill_tokens_per_second: Optional[float]
    decode_tokens_per_second: Optional[float]


class _StreamState:
    """Everything the reader thread and the consumer share (never the stream itself)."""

    def __init__(self, events: EventStream, epoch: int) -> None:
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
        # Which server life the request went to (Model restarts count them): a
        # connection lost to an earlier life is no crash of the current one.
        self.epoch = epoch

    @property
    def cancel_requested(self) -> bool:
        return self.events.cancelled

    def cancel(self) -> None:
        self.events.cancel()


def _parse_completion_chunk(obj: Mapping[str, Any], out: List[Token], state: _StreamState) -> None:
    """One event of the native ``/completion`` stream: text, token ids, log-probabilities."""
    content = obj.get("content") or ""
    ids = obj.get("tokens") or []
    probs = obj.get("completion_probabilities")
    if probs and len(probs) == len(ids):
        # With logprobs, build full tokens; the text stays on the last, as below.
        last = len(ids) - 1
        for i, (token_id, p) in enumerate(zip(ids, probs)):
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
    if obj.get("stop"):
        state.final = dict(obj)
        stop_type = obj.get("stop_type")
        state.finish_reason = "length" if stop_type == "limit" else "stop"


_Parser = Callable[[Mapping[str, Any], List[Token], _StreamState], None]


def _read(
    state: _StreamState,
    parse: _Parser,
    on_lost: Callable[[_StreamState, ConnectionLost], BaseException],
    on_end: Callable[[_StreamState], None],
) -> None:
    """The reader thread: request, decode, hand tokens over; always ends with _END.

    ``on_lost`` says what a connection lost without an answer means (a crash, a
    close, a restart); an answer of the server, even an error, is taken as it is,
    at once. ``on_end`` runs last, after the consumer has its sentinel.
    """
    events = state.events
    try:
        events.open()
        for batch in events:
            tokens: List[Token] = []
            try:
                for event in batch:
                    if event.event == "error":
                        raise _stream_error(event.data)
                    try:
                        obj = json.loads(event.data)
                    except ValueError as exc:
                        raise RequestError(f"llama-server sent malformed JSON: {event.data[:200]!r}") from exc
                    if isinstance(obj, dict) and "error" in obj:
                        raise _stream_error(event.data)
                    parse(obj, tokens, state)
            finally:
                # Tokens that arrived before an error in the same read are still the
                # consumer's: hand them over first.
                if tokens:
                    if state.first_token_at is None:
                        state.first_token_at = time.monotonic()
                    state.generated += len(tokens)
                    state.queue.put(tokens)
        if state.finish_reason is None:  # a close() after the final event changes nothing
            if state.cancel_requested:
                state.finish_reason = "cancelled"
            else:
                raise ConnectionLost("llama-server ended the stream without finishing it")
    except ConnectionLost as exc:
        if state.cancel_requested:
            state.finish_reason = state.finish_reason or "cancelled"
        else:
            state.error = on_lost(state, exc)
    except BaseException as exc:  # handed to the consumer, never printed by the thread
        if state.cancel_requested and isinstance(exc, RequestError) and exc.status is None:
            state.finish_reason = state.finish_reason or "cancelled"
        else:
            state.error = exc
    finally:
        events.close()
        state.ended_at = time.monotonic()
        state.done.set()
        state.queue.put(_END)
        on_end(state)


def _stream_error(data: str) -> RequestError:
    message = data
    try:
        payload = json.loads(data)
        err = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(err, dict):
            message = str(err.get("message", data))
    except ValueError:
        pass
    return RequestError(f"llama-server reported an error mid-stream: {message}", None, message)


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
        state: _StreamState,
        parse: _Parser,
        *,
        on_lost: Callable[[_StreamState, ConnectionLost], BaseException],
        on_end: Callable[[_StreamState], None],
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
        self._thread = threading.Thread(
            target=_read,
            args=(state, parse, on_lost, on_end),
            name="llamarocm-stream",
            daemon=True,
        )
        # Cancel on collection; the callback holds only the shared state.
        self._finalizer = weakref.finalize(self, state.cancel)
        self._thread.start()

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        if os.getpid() != self._owner_pid:
            # A forked child has the queue but no reader: it would end silently.
            raise _fork_error(self._owner_pid)
        if self._index < len(self._buffer):
            token = self._buffer[self._index]
            self._index += 1
            return token
        if self._finished:
            raise StopIteration
        try:
            item = self._take()
        except BaseException:
            # Ctrl-C (or any error) in the consumer: the server must stop working for us.
            self.close()
            raise
        if item is _END:
            self._finish()
            raise StopIteration
        self._buffer = item
        self._index = 1
        return item[0]

    def _take(self) -> Any:
        while True:
            try:
                return self._state.queue.get(timeout=_CONSUMER_CHECK_INTERVAL)
            except queue.Empty:
                if not self._thread.is_alive() and self._state.queue.empty():
                    return _END

    def _finish(self) -> None:
        self._finished = True
        self._finalizer.detach()
        error = self._state.error
        if error is not None:
            self._on_error(error)
            raise error

    def close(self) -> None:
        """Cancel the request (the server frees the slot) and wait for the reader.

        Idempotent; callable from any thread, and from a signal handler: it takes no
        lock that the interrupted code could hold. Tokens already received are dropped.
        """
        if os.getpid() != self._owner_pid:
            return  # a forked child has no reader thread, and must not cut the parent's stream
        self._state.cancel()
        self._finalizer.detach()
        if self._thread is not threading.current_thread():
            self._state.done.wait(10.0)

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def text(self) -> str:
        """Drain the stream and return the whole text."""
        return "".join(token.text for token in self)

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
        """``"stop"``, ``"length"``, ``"cancelled"``, or ``None`` while running or failed."""
        return self._state.finish_reason

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
        )


class Model:
    """A loaded model: start streams with :meth:`generate` and :meth:`chat`.

    Made by :func:`llamarocm.load_model`; safe to share across threads.

    >>> with llamarocm.load_model("gemma.gguf") as model:  # doctest: +SKIP
    ...     print(model.generate("The capital of France is", max_tokens=4).text())
    """

    def __init__(
        self,
        client: Client,
        server: Any = None,
        info: Any = None,
        *,
        context_length: Optional[int] = None,
        parallel: int = 1,
        chat_template: Optional[str] = None,
        no_chat_template_reason: Optional[str] = None,
        embeddings: Optional[bool] = None,
        rpc_placement: Optional[Dict[str, float]] = None,
    ) -> None:
        self.client = client
        self.server = server
        self.info = info
        #: Tokens of context each request gets (per slot).
        self.context_length = context_length
        #: How many requests the server runs at once.
        self.parallel = parallel
        #: Where ``chat()``'s template comes from (e.g. "embedded in the GGUF file").
        self.chat_template = chat_template
        self._no_chat_template_reason = no_chat_template_reason
        #: Whether the server computes embeddings (``None``: unknown, an attached server).
        self.embeddings = embeddings
        #: MiB of model weights the server put on each RPC worker, by address
        #: (``{}`` without workers); every worker given to ``load_model`` holds some.
        #: Checked again, and updated, by :meth:`restart`.
        self.rpc_placement: Dict[str, float] = rpc_placement if rpc_placement is not None else {}
        self._lock = threading.Lock()
        self._last_error: Optional[BaseException] = None
        # The first record of a crash; each caller gets a fresh copy (see _failure).
        self._crashed: Optional[ServerCrashedError] = None
        self._closed = False
        # Streams whose reader runs; the reader removes its own at its end.
        self._streams: "set[_StreamState]" = set()
        self._owner_pid = os.getpid()
        # Server lives: a restart starts a new one. Calls wait while it is cleared.
        self._epoch = 0
        self._not_restarting = threading.Event()
        self._not_restarting.set()
        self._restart_lock = threading.Lock()

    # -- requests ----------------------------------------------------------------

    def generate(self, prompt: str, **config: Any) -> TokenStream:
        """Complete ``prompt`` (raw text, no chat template) and stream the tokens.

        Keyword arguments are :class:`~llamarocm.GenerateConfig` fields.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        return self._complete(prompt, GenerateConfig.from_kwargs(config))

    def _complete(self, prompt: str, cfg: GenerateConfig) -> TokenStream:
        body: Dict[str, Any] = {
            "prompt": prompt,
            "stream": True,
            "n_predict": cfg.max_tokens if cfg.max_tokens is not None else -1,
            "cache_prompt": True,
            "return_tokens": True,
        }
        body.update(cfg.sampling_fields())
        body.update(cfg.extra)
        return self._open("/completion", body, cfg, _parse_completion_chunk)

    def chat(self, messages: Sequence[Mapping[str, Any]], **config: Any) -> TokenStream:
        """Reply to ``messages`` (``[{"role": ..., "content": ...}]``) with the model's
        chat template, streaming the tokens.

        The server renders the messages (``/apply-template``) and the reply streams from
        its native completion endpoint, the same path as :meth:`generate`: so chat
        tokens carry their ids too (the OpenAI-style chat stream has none), at the cost
        of one extra local round trip of about a millisecond.
        """
        checked = _check_messages(messages)
        cfg = GenerateConfig.from_kwargs(config)
        if self._no_chat_template_reason:
            # llama-server would silently render ChatML, which most models never saw.
            raise ValueError(self._no_chat_template_reason)
        rendered = self._call(lambda client: client.post_json("/apply-template", {"messages": checked}))
        prompt = rendered.get("prompt") if isinstance(rendered, dict) else None
        if not isinstance(prompt, str):
            raise RequestError(f"llama-server's /apply-template answered without a prompt: {rendered!r:.200}")
        return self._complete(prompt, cfg)

    def map(
        self,
        prompts: Sequence[Any],
        *,
        max_workers: Optional[int] = None,
        fail_fast: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
        **config: Any,
    ) -> List[Any]:
        """Run many prompts concurrently and return a :class:`~llamarocm.BatchResult`
        per prompt, in input order.

        A string prompt goes to :meth:`generate`, a message list to :meth:`chat`.
        ``max_workers`` defaults to the server's slots (``parallel``). An item that
        fails records its ``error`` and the rest go on, unless ``fail_fast``: then the
        first error cancels what runs, skips what has not started, and is raised.
        ``progress(done, total)`` is called from the calling thread.

        >>> results = model.map(["Hi", "Hello"], max_tokens=8)  # doctest: +SKIP
        >>> [r.text for r in results if r.ok]  # doctest: +SKIP
        """
        from .batch import run_batch

        return run_batch(self, prompts, max_workers=max_workers, fail_fast=fail_fast, progress=progress, **config)

    def embed(self, texts: Union[str, Sequence[str]]) -> List[List[float]]:
        """Embedding vectors of ``texts``, one per text, in order.

        The model must be loaded with ``embeddings=True`` (or be a server started
        with ``--embeddings``).
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, bytes) or not isinstance(texts, Sequence) or not texts:
            raise TypeError("texts must be a str or a non-empty list of str")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, not {type(text).__name__}")
        if self.embeddings is False:
            raise ValueError("this model was loaded without embeddings=True")
        answer = self._call(lambda client: client.post_json("/v1/embeddings", {"input": list(texts)}))
        data = sorted(answer.get("data") or [], key=lambda item: item.get("index", 0))
        if len(data) != len(texts):
            raise RequestError(f"llama-server returned {len(data)} embeddings for {len(texts)} texts")
        return [list(item["embedding"]) for item in data]

    def tokenize(self, text: str) -> List[int]:
        """The model's token ids for ``text`` (no BOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return list(self._call(lambda client: client.post_json("/tokenize", {"content": text}))["tokens"])

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ``ids``."""
        if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError("ids must be a sequence of ints")
        return str(self._call(lambda client: client.post_json("/detokenize", {"tokens": list(ids)}))["content"])

    def _call(self, fn: Callable[[Client], Any]) -> Any:
        """A plain call: ``fn(client)`` on the server of now, its errors recorded."""
        client, epoch = self._usable()
        try:
            return fn(client)
        except ConnectionLost as exc:
            error = self._failure(epoch, exc)
            self._record_error(error)
            if error is exc:
                raise
            raise error from exc
        except LlamaRocmError as exc:
            self._record_error(exc)
            raise

    def _open(self, path: str, body: Dict[str, Any], cfg: GenerateConfig, parse: _Parser) -> TokenStream:
        while True:
            client, epoch = self._usable()
            # Built here, not in the reader: a body that cannot be sent raises in the caller.
            state = _StreamState(client.stream(path, body, cfg.timeout), epoch)
            if self._register(state):
                break
            # A restart began in between: that client's server is going away.
        try:
            return TokenStream(
                state,
                parse,
                on_lost=self._stream_lost,
                on_end=self._unregister,
                on_error=self._record_error,
                owner_pid=self._owner_pid,
            )
        except BaseException:
            self._unregister(state)
            raise

    # -- state -------------------------------------------------------------------

    def _usable(self) -> "tuple[Client, int]":
        """The client for a new call and the server life it talks to.

        Waits while a restart runs; raises when the model is closed, belongs to the
        parent of a fork, or its server has died (a fresh error each time).
        """
        if os.getpid() != self._owner_pid:
            raise _fork_error(self._owner_pid)
        while True:
            self._not_restarting.wait()
            with self._lock:
                if self._closed:
                    raise ClosedError("this model is closed")
                if self._not_restarting.is_set():
                    client, epoch, crashed = self.client, self._epoch, self._crashed is not None
                    break
        if crashed or (self.server is not None and not self.server.alive()):
            error = self._gone(epoch, None)
            if error is not None:
                raise error
        return client, epoch

    def _failure(self, epoch: int, lost: ConnectionLost) -> BaseException:
        """What a connection ``lost`` without an answer means for a call made in
        server life ``epoch`` (see :meth:`_gone`); ``lost`` itself if the server lives."""
        return self._gone(epoch, lost) or lost

    def _gone(self, epoch: int, cause: Optional[BaseException]) -> Optional[BaseException]:
        """Why the server of life ``epoch`` cannot answer: the model was closed, the
        server restarted, or it died; ``None`` while it runs.

        A crash is recorded once and every caller gets a fresh copy (the record as its
        cause): one object re-raised from many calls and threads would grow its
        traceback, and the locals of every frame in it, without bound.
        """
        server = self.server
        code = None
        if server is not None and self._crashed is None:
            code = server.wait(_CRASH_CONFIRM_SECONDS)  # the socket closes before the exit
        with self._lock:
            if self._closed:
                error: BaseException = ClosedError("the model was closed during this request")
            elif epoch != self._epoch:
                error = RequestError("llama-server was restarted during this request")
            else:
                if self._crashed is None and code is not None and server is not None:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    self._crashed = ServerCrashedError(
                        f"llama-server (pid {server.pid}) {how}", server.stderr_tail(), code
                    )
                record = self._crashed
                if record is None:
                    return None
                error = ServerCrashedError(record.reason, record.stderr_tail, record.returncode)
                error.__cause__ = record
                return error
        error.__cause__ = cause
        return error

    def _stream_lost(self, state: _StreamState, lost: ConnectionLost) -> BaseException:
        return self._failure(state.epoch, lost)

    def _record_error(self, error: BaseException) -> None:
        with self._lock:
            self._last_error = error

    @property
    def last_error(self) -> Optional[BaseException]:
        """The most recent error any stream or call of this model raised."""
        with self._lock:
            return self._last_error

    def _register(self, state: _StreamState) -> bool:
        """Track a new stream, unless a restart began since its client was chosen.
        Atomic with close() and restart(): a stream is either cancelled by them or
        never started."""
        with self._lock:
            if self._closed:
                raise ClosedError("this model is closed")
            if state.epoch != self._epoch:
                return False
            self._streams.add(state)
            return True

    def _unregister(self, state: _StreamState) -> None:
        with self._lock:
            self._streams.discard(state)

    def restart(self) -> None:
        """Stop the server (if it still runs) and start it again with the same settings.

        Open streams are cancelled; calls made meanwhile from other threads wait for
        the new server; a crash recorded before is forgotten. Nothing ever restarts on
        its own: this is the explicit way back after a
        :class:`~llamarocm.ServerCrashedError`. RPC workers are probed and their share
        of the weights checked again, as by ``load_model``. A :meth:`close` from another
        thread wins: the restart then raises :class:`~llamarocm.ClosedError`.
        """
        if self.server is None:
            raise LlamaRocmError("this model is attached to a server it did not start: it cannot restart it")
        if os.getpid() != self._owner_pid:
            raise _fork_error(self._owner_pid)
        with self._restart_lock:
            with self._lock:
                if self._closed:
                    raise ClosedError("this model is closed")
                self._epoch += 1
                self._not_restarting.clear()
                streams = list(self._streams)
            try:
                _cancel(streams)
                self.server.restart()
                with self._lock:
                    if self._closed:
                        raise ClosedError("the model was closed during the restart")
                    self.client = self.server.client
                    self._crashed = None
            finally:
                self._not_restarting.set()

    def close(self) -> None:
        """Cancel open streams, stop the server we started. Idempotent.

        Once it returns, no process of this model runs, whatever other threads do: a
        call or restart overlapping it raises :class:`~llamarocm.ClosedError`.
        """
        if os.getpid() != self._owner_pid:
            # A forked child must not shut down sockets it shares with the parent (that
            # would cancel the parent's streams) nor stop the parent's server; nor take
            # a lock that another thread of the parent may have held at the fork.
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams)
        try:
            _cancel(streams)
        finally:
            # Even if interrupted above, the server must not outlive a closed model.
            try:
                self.client.close()
            finally:
                if self.server is not None:
                    self.server.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Model {getattr(self.info, 'path', '?')} server={self.server!r}>"


def _cancel(streams: Sequence[_StreamState], wait: float = 5.0) -> None:
    """Cancel ``streams`` and wait (at most ``wait`` s in all) for their readers."""
    for state in streams:
        state.cancel()
    deadline = time.monotonic() + wait
    for state in streams:
        state.done.wait(max(0.0, deadline - time.monotonic()))


def _check_messages(messages: Any) -> List[Dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("messages must not be empty")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, not {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise TypeError(f"messages[{i}]['role'] must be a non-empty str")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}]['content'] must be a str")
        checked.append(dict(message))
    try:
        json.dumps(checked, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"messages must be plain JSON (no NaN, no objects): {exc}") from None
    return checked

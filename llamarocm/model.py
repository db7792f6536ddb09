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
from .errors import LlamaRocmError, OutputParseError, RequestError, ServerCrashedError

__all__ = ["Model", "TokenStream", "Token", "TopLogprob", "GenerateMetrics"]

log = logging.getLogger("llamarocm")

_END = object()
# How long the consumer blocks on the queue between checks that the reader lives.
# The reader always ends with a sentinel, so this only bounds a bug, never a wait.
_CONSUMER_CHECK_INTERVAL = 1.0
# A dead server's socket closes a moment before the process is reaped.
_CRASH_CONFIRM_SECONDS = 1.0


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

    def __init__(self, events: EventStream) -> None:
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
    crash_check: Callable[[], Optional[ServerCrashedError]],
) -> None:
    """The reader thread: request, decode, hand tokens over; always ends with _END."""
    events = state.events
    try:
        events.open()
        for batch in events:
            tokens: List[Token] = []
            try:
                for event in batch:
                    if event.event == "error":
                        raise _stream_error(event.data)
                    if event.data == "[DONE]":
                        continue
                    try:
                        obj = json.loads(event.data)
                    except ValueError as exc:
                        raise RequestError(f"llama-server sent malformed JSON: {event.data[:200]!r}") from exc
                    if isinstance(obj, dict) and "error" in obj and not obj.get("choices"):
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
                crashed = crash_check()
                if crashed is not None:
                    raise crashed
                raise RequestError("llama-server ended the stream without finishing it")
    except ConnectionLost as exc:
        if state.cancel_requested:
            state.finish_reason = state.finish_reason or "cancelled"
        else:
            state.error = crash_check() or exc
    except BaseException as exc:  # handed to the consumer, never printed by the thread
        if state.cancel_requested and isinstance(exc, RequestError) and exc.status is None:
            state.finish_reason = state.finish_reason or "cancelled"
        else:
            if isinstance(exc, RequestError) and exc.status is None and not isinstance(exc, ServerCrashedError):
                exc = crash_check() or exc
            state.error = exc
    finally:
        events.close()
        state.ended_at = time.monotonic()
        state.done.set()
        state.queue.put(_END)


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

    def __init__(self, model: "Model", path: str, body: Dict[str, Any], config: GenerateConfig, parse: _Parser) -> None:
        self._model = model
        # Built here, not in the reader: a body that cannot be sent raises in the caller.
        self._state = _StreamState(model.client.stream(path, body, config.timeout))
        self._buffer: List[Token] = []
        self._index = 0
        self._finished = False
        self._thread = threading.Thread(
            target=_read,
            args=(self._state, parse, model._crash_error),
            name="llamarocm-stream",
            daemon=True,
        )
        # Cancel on collection; the callback holds only the shared state.
        self._finalizer = weakref.finalize(self, self._state.cancel)
        model._register(self._state)
        self._thread.start()

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
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
        self._model._unregister(self._state)
        error = self._state.error
        if error is not None:
            self._model._record_error(error)
            raise error

    def close(self) -> None:
        """Cancel the request (the server frees the slot) and wait for the reader.

        Idempotent; callable from any thread. Tokens already received are dropped.
        """
        if os.getpid() != self._model._owner_pid:
            return  # a forked child has no reader thread, and must not cut the parent's stream
        self._state.cancel()
        self._finalizer.detach()
        if self._thread is not threading.current_thread():
            self._state.done.wait(10.0)
        if self._state.done.is_set():  # else Model.close() still waits for this reader
            self._model._unregister(self._state)

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
        self._crashed: Optional[ServerCrashedError] = None
        self._closed = False
        self._streams: "weakref.WeakSet[_StreamState]" = weakref.WeakSet()
        self._owner_pid = os.getpid()

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
        self._check_usable()
        rendered = self._call(lambda: self.client.post_json("/apply-template", {"messages": checked}))
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
        self._check_usable()
        answer = self._call(lambda: self.client.post_json("/v1/embeddings", {"input": list(texts)}))
        data = sorted(answer.get("data") or [], key=lambda item: item.get("index", 0))
        if len(data) != len(texts):
            raise RequestError(f"llama-server returned {len(data)} embeddings for {len(texts)} texts")
        return [list(item["embedding"]) for item in data]

    def tokenize(self, text: str) -> List[int]:
        """The model's token ids for ``text`` (no BOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        self._check_usable()
        return list(self._call(lambda: self.client.post_json("/tokenize", {"content": text}))["tokens"])

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ``ids``."""
        if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError("ids must be a sequence of ints")
        self._check_usable()
        return str(self._call(lambda: self.client.post_json("/detokenize", {"tokens": list(ids)}))["content"])

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ConnectionLost as exc:
            error: BaseException = self._crash_error() or exc
            self._record_error(error)
            raise error from exc
        except LlamaRocmError as exc:
            self._record_error(exc)
            raise

    def _open(self, path: str, body: Dict[str, Any], cfg: GenerateConfig, parse: _Parser) -> TokenStream:
        self._check_usable()
        return TokenStream(self, path, body, cfg, parse)

    def _check_usable(self) -> None:
        if self._closed:
            raise LlamaRocmError("this model is closed")
        if os.getpid() != self._owner_pid:
            # After os.fork() the child shares the parent's server, sockets and key; using
            # them from two processes would interleave requests on one connection pool.
            raise LlamaRocmError(
                f"this model belongs to process {self._owner_pid}; after fork, load a new model in the child"
            )
        with self._lock:
            crashed = self._crashed
        if crashed is None and self.server is not None and not self.server.alive():
            crashed = self._crash_error()
        if crashed is not None:
            raise crashed

    # -- state -------------------------------------------------------------------

    def _crash_error(self) -> Optional[ServerCrashedError]:
        """If our server has died, the error that says so (remembered for later calls)."""
        server = self.server
        if server is None:
            return None
        code = server.wait(_CRASH_CONFIRM_SECONDS)
        if code is None:
            return None
        with self._lock:
            if self._crashed is None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                self._crashed = ServerCrashedError(
                    f"llama-server (pid {server.pid}) {how}", server.stderr_tail(), code
                )
            return self._crashed

    def _record_error(self, error: BaseException) -> None:
        with self._lock:
            self._last_error = error

    @property
    def last_error(self) -> Optional[BaseException]:
        """The most recent error any stream or call of this model raised."""
        with self._lock:
            return self._last_error

    def _register(self, state: _StreamState) -> None:
        with self._lock:
            self._streams.add(state)

    def _unregister(self, state: _StreamState) -> None:
        with self._lock:
            self._streams.discard(state)

    def restart(self) -> None:
        """Stop the server (if it still runs) and start it again with the same settings.

        Open streams are cancelled; a crash recorded before is forgotten. Nothing ever
        restarts on its own: this is the explicit way back after a
        :class:`~llamarocm.ServerCrashedError`. RPC workers are probed and their share
        of the weights checked again, as by ``load_model``.
        """
        if self.server is None:
            raise LlamaRocmError("this model is attached to a server it did not start: it cannot restart it")
        if self._closed:
            raise LlamaRocmError("this model is closed")
        self._cancel_streams()
        self.server.restart()
        with self._lock:
            self.client = self.server.client
            self._crashed = None

    def _cancel_streams(self, wait: float = 5.0) -> None:
        with self._lock:
            streams = list(self._streams)
        for state in streams:
            state.cancel()
        deadline = time.monotonic() + wait
        for state in streams:
            state.done.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Cancel open streams, stop the server we started. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._owner_pid:
            # A forked child must not shut down sockets it shares with the parent (that
            # would cancel the parent's streams) nor stop the parent's server.
            return
        try:
            self._cancel_streams()
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

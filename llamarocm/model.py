"""``Model``: a loaded model, the calls it offers, and its life (crash, restart, close).

Thread safety: a ``Model`` may be shared by any number of threads, each running its
own streams (:mod:`llamarocm.stream`). A lock orders every change of its life: a new
stream registers under it, and ``close()`` / ``restart()`` list the streams to cancel
under it, so none slips between. ``close()`` wins over everything: once it returns no
process of the model runs.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ._slot_state import PrivateDirectory
from .act import ActResult, run_act
from .batch import BatchResult, run_batch
from .client import Client, EventStream
from .config import DEFAULT_STREAM_TIMEOUT, GenerateConfig, check_lora_scales
from .errors import ClosedError, ConnectionLostError, LlamaRocmError, RequestError, ServerCrashedError
from .lora import LoraAdapters
from .messages import check_messages, check_template_kwargs, render_prompt
from .reasoning import ReasoningSplitter, check_reasoning, splitter_for
from .stream import StreamState, TokenStream, fork_error
from .structured import Parser, structured_output
from .tool_stream import ToolStreamPlan, check_tool_settings, server_chat_body
from .tools import ToolRequest

if TYPE_CHECKING:
    from .session import ChatSession

__all__ = ["Model"]

log = logging.getLogger("llamarocm")

# A dead server's socket closes a moment before the process is reaped: a connection
# lost without an answer waits this long for the exit before calling it a crash.
_CRASH_CONFIRM_SECONDS = 1.0


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
        chat_template_source: Optional[str] = None,
        no_chat_template_reason: Optional[str] = None,
        embeddings: Optional[bool] = None,
        rpc_placement: Optional[Dict[str, float]] = None,
        lora: Optional[LoraAdapters] = None,
        slot_dir: Optional[PrivateDirectory] = None,
    ) -> None:
        self.client = client
        self.server = server
        self.info = info
        #: Tokens of context each request gets (per slot).
        self.context_length = context_length
        #: How many requests the server runs at once.
        self.parallel = parallel
        #: Where ``chat()``'s template comes from, in words (e.g. "embedded in the GGUF
        #: file", "built-in chatml"), or ``None`` when there is none.
        self.chat_template_source = chat_template_source
        self._no_chat_template_reason = no_chat_template_reason
        #: Whether the server computes embeddings (``None``: unknown, an attached server).
        self.embeddings = embeddings
        #: MiB of model weights the server put on each RPC worker, by address
        #: (``{}`` without workers); every worker given to ``load_model`` holds some.
        #: Checked again, and updated, by :meth:`restart`.
        self.rpc_placement: Dict[str, float] = rpc_placement if rpc_placement is not None else {}
        self._lora = lora if lora is not None else LoraAdapters(())
        # load_model(sessions=True): where the server saves and restores slot files.
        self._slot_dir = slot_dir
        self._lock = threading.Lock()
        self._last_error: Optional[BaseException] = None
        # The first record of a crash; each caller gets a fresh copy (see _failure).
        self._crashed: Optional[ServerCrashedError] = None
        self._closed = False
        # Whether the chat template renders tools (llama-server then handles calls).
        self._renders_tools: Optional[bool] = None
        # Streams whose reader runs; the reader removes its own at its end.
        self._streams: "set[StreamState]" = set()
        self._owner_pid = os.getpid()
        # Server lives: a restart starts a new one. Calls wait while it is cleared.
        self._epoch = 0
        self._not_restarting = threading.Event()
        self._not_restarting.set()
        self._restart_lock = threading.Lock()

    # -- requests ----------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str]] = (),
        json_schema: Optional[Mapping[str, Any]] = None,
        grammar: Optional[str] = None,
        logprobs: Optional[int] = None,
        timeout: float = DEFAULT_STREAM_TIMEOUT,
        extra: Optional[Mapping[str, Any]] = None,
        lora: Optional[Mapping[str, float]] = None,
        response_format: Any = None,
    ) -> TokenStream:
        """Complete ``prompt`` (raw text, no chat template) and stream the tokens.

        The keyword arguments are the fields of :class:`~llamarocm.GenerateConfig`,
        documented there; bad values raise ``TypeError`` / ``ValueError`` before
        anything is sent. ``response_format`` asks for JSON as OpenAI's API does
        (``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``,
        ``{"type": "json_object"}``, ``{"type": "text"}``) or for a pydantic model
        class; :meth:`TokenStream.parsed() <llamarocm.TokenStream.parsed>` returns the
        value. It replaces ``json_schema=`` (passing both is a ``ValueError``).

        >>> model.generate("The capital of France is", max_tokens=4).text()  # doctest: +SKIP
        ' Paris.'
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        output = structured_output(response_format, json_schema, grammar)
        json_schema = output.json_schema or json_schema
        return self._complete(prompt, GenerateConfig.from_arguments(locals()), parse=output.parse)

    def _complete(
        self,
        prompt: str,
        cfg: GenerateConfig,
        reasoning: Optional[ReasoningSplitter] = None,
        parse: Optional[Parser] = None,
        tools: Optional[ToolStreamPlan] = None,
    ) -> TokenStream:
        body: Dict[str, Any] = {
            "prompt": prompt,
            "stream": True,
            "n_predict": cfg.max_tokens if cfg.max_tokens is not None else -1,
            "cache_prompt": True,
            "return_tokens": True,
        }
        body.update(cfg.sampling_fields())
        return self._open(self._finish_body(body, cfg), cfg, reasoning, parse, tools)

    def _finish_body(self, body: Dict[str, Any], cfg: GenerateConfig) -> Dict[str, Any]:
        """``body`` with what every request of this model carries last: the adapters'
        scales, then the caller's ``extra`` fields (which win)."""
        if self._lora or cfg.lora:
            # Every adapter's scale, every time: see llamarocm.lora.
            body["lora"] = self._lora.request_field(cfg.lora)
        body.update(cfg.extra)
        return body

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str]] = (),
        json_schema: Optional[Mapping[str, Any]] = None,
        grammar: Optional[str] = None,
        logprobs: Optional[int] = None,
        timeout: float = DEFAULT_STREAM_TIMEOUT,
        extra: Optional[Mapping[str, Any]] = None,
        lora: Optional[Mapping[str, float]] = None,
        response_format: Any = None,
        reasoning: Optional[bool] = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
        tools: Optional[Sequence[Any]] = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = False,
    ) -> TokenStream:
        """Reply to ``messages`` with the model's chat template, streaming the tokens.
        The keyword arguments are those of :meth:`generate`, and:

        ``messages`` are OpenAI's: ``content`` a string or a list of text parts,
        assistant ``tool_calls`` and ``tool`` results included (see
        :doc:`/quickstart`). ``reasoning``: a reply that opens with a ``<think>`` block
        has its reasoning marked (:attr:`Token.reasoning <llamarocm.Token.reasoning>`,
        :meth:`~llamarocm.TokenStream.reasoning_text`) and :meth:`~llamarocm.TokenStream.text`
        returns the answer only; ``None`` (auto) does so when the reply or the prompt
        opens the block, ``True`` takes the reply as reasoning until ``</think>`` in any
        case, ``False`` never splits. ``chat_template_kwargs`` go to a Jinja template
        (e.g. ``{"enable_thinking": False}``).

        ``tools`` (Python functions or OpenAI tool dicts) may be called by the reply:
        :attr:`TokenStream.tool_calls <llamarocm.TokenStream.tool_calls>` then holds
        the calls and ``finish_reason`` is ``"tool_calls"``. ``tool_choice``:
        ``"auto"`` (the default), ``"required"``, ``"none"``, or ``{"name": ...}``
        (OpenAI's ``{"type": "function", "function": {"name": ...}}`` too).
        ``parallel_tool_calls=True`` lets one reply make several calls; by default it
        makes one at most, as llama-server does. See :doc:`/quickstart` and :meth:`act`.

        The server renders the messages (``/apply-template``) and the reply streams from
        its native completion endpoint, the same path as :meth:`generate`: so chat
        tokens carry their ids too (the OpenAI-style chat stream has none), at the cost
        of one extra local round trip of about a millisecond.
        """
        checked = check_messages(messages)
        template_kwargs = check_template_kwargs(chat_template_kwargs)
        check_reasoning(reasoning)
        output = structured_output(response_format, json_schema, grammar)
        json_schema = output.json_schema or json_schema
        cfg = GenerateConfig.from_arguments(locals())
        request = ToolRequest.build(tools, tool_choice, parallel_tool_calls)
        check_tool_settings(request, cfg)
        self._lora.request_field(cfg.lora)  # an unknown adapter is refused before any call
        if self._no_chat_template_reason:
            # llama-server would silently render ChatML, which most models never saw.
            raise ValueError(self._no_chat_template_reason)
        if request.tools:
            return self._chat_with_tools(checked, cfg, request, template_kwargs, output.parse, reasoning)
        prompt = render_prompt(self._apply_template, checked, template_kwargs)
        return self._complete(prompt, cfg, splitter_for(reasoning, prompt), output.parse)

    def _apply_template(self, body: Dict[str, Any]) -> Any:
        return self._call(lambda client: client.post_json("/apply-template", body))

    def _chat_with_tools(
        self,
        messages: List[Dict[str, Any]],
        cfg: GenerateConfig,
        request: ToolRequest,
        template_kwargs: Optional[Dict[str, Any]],
        parse: Optional[Parser],
        reasoning: Optional[bool],
    ) -> TokenStream:
        """chat() with tools, on one of the two paths of :mod:`llamarocm.tool_stream`."""
        if self._renders_tools is None:
            caps = self._call(lambda client: client.props()).get("chat_template_caps") or {}
            self._renders_tools = bool(caps.get("supports_tools") and caps.get("supports_tool_calls"))
        if self._renders_tools and request.offered:
            body = self._finish_body(server_chat_body(messages, cfg, request, template_kwargs), cfg)
            return self._open(body, cfg, tools=ToolStreamPlan(request, server_side=True))
        if not self._renders_tools:
            messages = request.plain_messages(messages)
        prompt = render_prompt(self._apply_template, messages, template_kwargs)
        plan = ToolStreamPlan(request, server_side=False) if request.offered else None
        return self._complete(prompt, cfg, splitter_for(reasoning, prompt), parse, plan)

    def act(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Callable[..., Any]],
        *,
        max_rounds: int = 5,
        tool_choice: Any = None,
        **settings: Any,
    ) -> ActResult:
        """Let the model use ``tools`` (Python functions) until it answers: ask it,
        run the functions it calls, send their results back, ask again.

        Returns an :class:`~llamarocm.ActResult` (final ``text``, the whole
        ``messages`` transcript, ``rounds``, ``finished``, the last reply's
        ``finish_reason``). ``max_rounds`` bounds the requests to the model; when it
        runs out while the model still calls tools, the result has ``finished=False``
        (``"tool_calls"``), and so has a last reply cut short by ``max_tokens``
        (``"length"``). ``tool_choice`` applies to the first round;
        ``settings`` are :meth:`chat`'s keyword arguments, for every round. A
        function's exception, an unknown tool or bad arguments go back to the model
        as an error text; Ctrl-C cancels the running request and stops the loop.

        >>> result = model.act([{"role": "user", "content": "Time?"}], [now])  # doctest: +SKIP
        >>> result.text  # doctest: +SKIP
        """
        return run_act(self.chat, messages, tools, max_rounds=max_rounds, tool_choice=tool_choice, settings=settings)

    def map(
        self,
        prompts: Sequence[Any],
        *,
        max_workers: Optional[int] = None,
        fail_fast: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
        checkpoint: Optional[Union[str, "os.PathLike[str]"]] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str]] = (),
        json_schema: Optional[Mapping[str, Any]] = None,
        grammar: Optional[str] = None,
        logprobs: Optional[int] = None,
        timeout: float = DEFAULT_STREAM_TIMEOUT,
        extra: Optional[Mapping[str, Any]] = None,
        lora: Optional[Mapping[str, float]] = None,
    ) -> List[BatchResult]:
        """Run many prompts concurrently and return a :class:`~llamarocm.BatchResult`
        per prompt, in input order.

        A string prompt goes to :meth:`generate`, a message list to :meth:`chat`.
        ``max_workers`` defaults to the server's slots (``parallel``). An item that
        fails records its ``error`` and the rest go on, unless ``fail_fast``: then the
        first error cancels what runs, skips what has not started, and is raised.
        ``progress(done, total)`` is called from the calling thread. With
        ``checkpoint="results.jsonl"`` every finished item is appended to that file the
        moment it ends, and running the same call again skips the items already there
        (see :doc:`/batches`). The other keyword arguments are those of :meth:`generate`,
        for every prompt.

        >>> results = model.map(["Hi", "Hello"], max_tokens=8)  # doctest: +SKIP
        >>> [r.text for r in results if r.ok]  # doctest: +SKIP
        """
        options = GenerateConfig.arguments_of(locals())
        # An unknown adapter is the call's mistake, not each item's: refused before any item.
        self._lora.request_field(check_lora_scales("lora", lora))
        workers = max(1, self.parallel) if max_workers is None else max_workers
        return run_batch(
            self.generate,
            self.chat,
            prompts,
            max_workers=workers,
            fail_fast=fail_fast,
            progress=progress,
            checkpoint=checkpoint,
            **options,
        )

    def session(
        self, system: Optional[str] = None, *, messages: Sequence[Mapping[str, Any]] = ()
    ) -> "ChatSession":
        """A new :class:`~llamarocm.ChatSession`: a conversation that keeps its history
        (starting with ``system``, then ``messages`` if given) and, on a model loaded
        with ``sessions=True``, can be saved and loaded with its KV state.

        >>> chat = model.session("You are terse.")  # doctest: +SKIP
        >>> chat.send("Hi", max_tokens=16).text()  # doctest: +SKIP
        """
        from .session import ChatSession

        return ChatSession(self, system, messages=messages)

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

    @property
    def lora(self) -> Dict[str, float]:
        """The default scale of each LoRA adapter, by the name it was loaded with
        (``{}`` without adapters): what a request that does not set its own uses."""
        return self._lora.defaults()

    def set_lora(self, scales: Mapping[str, float]) -> None:
        """Change the default scale of the named LoRA adapters, without a restart.

        ``scales`` is ``{adapter name: scale}``, named as in ``generate(lora=...)``;
        adapters it does not name keep theirs. Requests already running keep the
        scales they started with; the server's own defaults (``GET /lora-adapters``)
        are set too. A scale of 0 turns an adapter off.

        >>> model.set_lora({"style.gguf": 0.5})  # doctest: +SKIP
        """
        checked = check_lora_scales("scales", scales)
        if checked is None:
            return
        with self._lora.change_lock:
            field = self._lora.request_field(checked)
            self._call(lambda client: client.post_json("/lora-adapters", field))
            self._lora.commit(field)

    def _call(self, fn: Callable[[Client], Any]) -> Any:
        """A plain call: ``fn(client)`` on the server of now, its errors recorded."""
        client, epoch = self._usable()
        try:
            return fn(client)
        except ConnectionLostError as exc:
            error = self._failure(epoch, exc)
            self._record_error(error)
            if error is exc:
                raise
            raise error from exc
        except LlamaRocmError as exc:
            self._record_error(exc)
            raise

    def _open(
        self,
        body: Dict[str, Any],
        cfg: GenerateConfig,
        reasoning: Optional[ReasoningSplitter] = None,
        parse: Optional[Parser] = None,
        tools: Optional[ToolStreamPlan] = None,
    ) -> TokenStream:
        """Start streaming ``body`` from the native ``/completion`` endpoint (or as
        ``tools`` says, for a chat that offers tools)."""
        while True:
            client, epoch = self._usable()
            # Built here, not in the reader: a body that cannot be sent raises in the caller.
            if tools is None:
                state = StreamState(client.stream("/completion", body, cfg.timeout), epoch)
            else:
                events, decode = tools.open(functools.partial(_stream_of, client, cfg.timeout), body)
                state = StreamState(events, epoch)
                state.decode = decode
            state.reasoning, state.parse = reasoning, parse
            if self._register(state):
                break
            # A restart began in between: that client's server is going away.
        try:
            return TokenStream(
                state,
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
            raise fork_error(self._owner_pid)
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

    def _failure(self, epoch: int, lost: ConnectionLostError) -> BaseException:
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

    def _stream_lost(self, state: StreamState, lost: ConnectionLostError) -> BaseException:
        return self._failure(state.epoch, lost)

    def _record_error(self, error: BaseException) -> None:
        with self._lock:
            self._last_error = error

    @property
    def last_error(self) -> Optional[BaseException]:
        """The most recent error any stream or call of this model raised."""
        with self._lock:
            return self._last_error

    def _register(self, state: StreamState) -> bool:
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

    def _unregister(self, state: StreamState) -> None:
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
            raise fork_error(self._owner_pid)
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
                try:
                    if self.server is not None:
                        self.server.close()
                finally:
                    if self._slot_dir is not None:
                        self._slot_dir.remove()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        name = os.path.basename(getattr(self.info, "path", "") or "") or "?"
        if self._closed:
            state = "closed"
        elif self._crashed is not None:
            state = "crashed"
        else:
            state = f"parallel={self.parallel} context_length={self.context_length}"
        where = self.server.url if self.server is not None else f"attached to {self.client.base_url}"
        return f"<Model {name} {state} {where}>"


def _stream_of(client: Client, timeout: float, path: str, body: Dict[str, Any]) -> EventStream:
    """An unopened stream of ``client`` (bound to a client, for requests made later)."""
    return client.stream(path, body, timeout)


def _cancel(streams: Sequence[StreamState], wait: float = 5.0) -> None:
    """Cancel ``streams`` and wait (at most ``wait`` s in all) for their readers."""
    for state in streams:
        state.cancel()
    deadline = time.monotonic() + wait
    for state in streams:
        state.done.wait(max(0.0, deadline - time.monotonic()))

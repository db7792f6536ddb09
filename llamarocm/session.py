"""``ChatSession``: one conversation that keeps its history, and its KV state across a
restart of the server, a crash or another process.

Within one server's life nothing here is needed for speed: llama-server keeps each
slot's prompt and moves evicted prompts to host memory (``--cache-ram``), so a
conversation sent again finds its prefix cached. What the server loses is everything
at its end. :meth:`ChatSession.save` asks it to write the slot holding the
conversation to a file (``POST /slots/{id}?action=save``) and keeps those bytes, with
the messages, in a file of ours (:mod:`llamarocm._slot_state`);
:meth:`ChatSession.load` gives them back to a server of the same model and build
(``action=restore``), and the next turn is sent to that slot, whose cache then already
holds all but the new message.

Which slot holds the conversation when it is saved: with ``parallel > 1`` another
request may take the slot that ran the last turn at any moment. So a save first sends
the conversation itself to that slot (a one-token request: at most a few tokens are
evaluated when the slot still holds it, all of them when it was taken), saves the slot,
and checks that the saved token list holds the conversation's tokens; when another
request took the slot in between, it tries again.
"""

from __future__ import annotations

import copy
import errno
import functools
import itertools
import logging
import os
import threading
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._kv_setup import adapter_setup, check_setup, kv_flags
from ._slot_state import (
    PrivateDirectory,
    StateFile,
    check_identity,
    model_identity,
    read_state_file,
    slot_file_holds,
    write_state_file,
)
from .errors import RequestError, SessionFileError, SessionMismatchError
from .messages import check_messages, render_prompt
from .stream import TokenStream

__all__ = ["ChatSession"]

log = logging.getLogger("llamarocm")

#: How many times a save primes and saves the slot before giving up, when other
#: requests keep taking the slot between the two.
SAVE_ATTEMPTS = 4

_NEEDS_OPTION = (
    "saving and loading chat sessions needs a model loaded with "
    "load_model(..., sessions=True): this one cannot write its KV state"
)

PathLike = Union[str, "os.PathLike[str]"]

# Per model, which slot the next restore tries first, and the lock its saves take turns by.
_restore_turns: "weakref.WeakKeyDictionary[Any, itertools.count[int]]" = weakref.WeakKeyDictionary()
_save_locks: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_turns_lock = threading.Lock()


def _model_lock(model: Any) -> threading.Lock:
    with _turns_lock:
        return _save_locks.setdefault(model, threading.Lock())


class _Turn:
    """A reply being streamed: the user's message it answers (``None`` for a reply to
    tool results), and its stream."""

    def __init__(self, user: Optional[Dict[str, Any]], stream: TokenStream) -> None:
        self.user = user
        self.stream = weakref.ref(stream)


class ChatSession:
    """A conversation with a model: :meth:`send` a message, read the reply's stream,
    and the history grows by both once the reply has been read to its end.

    Make one with :meth:`Model.session <llamarocm.Model.session>` or
    :meth:`ChatSession.load`. One session is one conversation: a second :meth:`send`
    while a reply is still open raises ``RuntimeError``. Any number of sessions may
    share a model, from any threads.

    A reply that ends in an error, is closed (or dropped) before its end, or is
    cancelled by a restart leaves no trace: neither the user's message nor a part of
    the reply is recorded, and the same message can simply be sent again.

    >>> chat = model.session("You are terse.")  # doctest: +SKIP
    >>> chat.send("Name a colour.", max_tokens=8).text()  # doctest: +SKIP
    >>> chat.messages[-1]["role"]  # doctest: +SKIP
    'assistant'
    """

    def __init__(
        self, model: Any, system: Optional[str] = None, *, messages: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a str, not {type(system).__name__}")
        history: List[Mapping[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        history.extend(messages)
        self._model = model
        self._messages: List[Dict[str, Any]] = check_messages(history) if history else []
        self._lock = threading.Lock()
        self._turn: Optional[_Turn] = None
        # The slot a restored state went to: the next request is sent there.
        self._pinned_slot: Optional[int] = None
        # The slot that ran the last turn, where a save looks first.
        self._last_slot: Optional[int] = None

    @property
    def model(self) -> Any:
        """The :class:`~llamarocm.Model` this conversation runs on."""
        return self._model

    @property
    def messages(self) -> List[Dict[str, Any]]:
        """The conversation so far (a copy): the system message if any, then each
        user message and the reply to it, as ``{"role": ..., "content": ...}`` (a reply
        that called tools has its ``tool_calls``, and each result is a ``tool``
        message: OpenAI's shapes)."""
        with self._lock:
            self._settle(refuse_open=False)
            return copy.deepcopy(self._messages)

    def send(self, content: Optional[str] = None, **settings: Any) -> TokenStream:
        """Send the user message ``content`` with the conversation so far and stream
        the reply. ``settings`` are those of :meth:`Model.chat <llamarocm.Model.chat>`
        (``max_tokens``, ``temperature``, ``extra``, ``tools``...), checked before
        anything is sent or recorded.

        The message and the reply join :attr:`messages` when the stream has been read
        to its end (``finish_reason`` ``"stop"`` or ``"length"``, or ``"tool_calls"``:
        the reply then joins as an assistant message with its ``tool_calls``, to be
        answered with :meth:`add_tool_result`); nothing joins it when the stream fails
        or is closed first. Without ``content``, the model replies to the tool results
        just added.
        """
        if content is not None and not isinstance(content, str):
            raise TypeError(f"content must be a str, not {type(content).__name__}")
        with self._lock:
            self._settle(refuse_open=True)
            _check_next_turn(self._messages, content)
            user = None if content is None else {"role": "user", "content": content}
            extra = settings.get("extra")
            if self._pinned_slot is not None and (extra is None or isinstance(extra, Mapping)):
                # The next turn goes to the restored slot (unless extra names one). An
                # extra of a wrong type goes as it is, for chat()'s own refusal.
                settings["extra"] = {"id_slot": self._pinned_slot, **(extra or {})}
            history = self._messages if user is None else [*self._messages, user]
            # chat() checks every setting before it sends anything.
            stream: TokenStream = self._model.chat(history, **settings)
            turn = _Turn(user, stream)
            # Before the stream is handed out: no token can have been taken yet.
            stream._keep_transcript(functools.partial(self._consumed, turn))
            self._turn = turn
        return stream

    def _consumed(self, turn: _Turn, stream: TokenStream) -> None:
        """The consumer reached the end of ``turn``'s stream: record the turn, if the
        reply is whole."""
        with self._lock:
            if self._turn is not turn:
                return
            self._turn = None
            reply = _reply_message(stream)
            if reply is not None:
                self._messages += [turn.user, reply] if turn.user is not None else [reply]
                self._last_slot = stream.slot
                self._pinned_slot = None

    def add_tool_result(self, call_id: str, content: str) -> None:
        """Answer the call ``call_id`` of the last reply's ``tool_calls`` with
        ``content`` (text: ``json.dumps`` a structured result), recorded at once as a
        ``tool`` message. Once every call has its result, :meth:`send` without a
        message has the model reply to them.

        >>> stream = chat.send("Add 2 and 3", tools=[add])  # doctest: +SKIP
        >>> for call in stream.tool_calls:  # doctest: +SKIP
        ...     chat.add_tool_result(call.id, str(add(**call.arguments)))
        >>> chat.send().text()  # doctest: +SKIP
        """
        if not isinstance(call_id, str):
            raise TypeError(f"call_id must be a str, not {type(call_id).__name__}")
        if not isinstance(content, str):
            raise TypeError(f"content must be a str (json.dumps a structured result), not {type(content).__name__}")
        with self._lock:
            self._settle(refuse_open=True)
            calls, answered = _open_calls(self._messages)
            if call_id in answered:
                raise ValueError(f"the call {call_id!r} already has its result")
            if call_id not in calls:
                waiting = ", ".join(repr(c) for c in calls if c not in answered) or "none"
                raise ValueError(f"no call {call_id!r} is waiting for a result; the calls waiting are: {waiting}")
            self._messages.append({"role": "tool", "tool_call_id": call_id, "name": calls[call_id], "content": content})

    def _settle(self, *, refuse_open: bool) -> None:
        """Forget a turn whose stream was closed, dropped or failed; with
        ``refuse_open``, raise while a reply is still open."""
        turn = self._turn
        if turn is None:
            return
        stream = turn.stream()
        if stream is None or stream.closed or stream.error is not None:
            self._turn = None
        elif refuse_open:
            raise RuntimeError(
                "this session's previous reply is still open: read it to the end or close() it "
                "before sending again (one session is one conversation; use another session "
                "for concurrent chats)"
            )

    # -- saved state -------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the conversation and its KV state to the file ``path`` (replaced
        whole, readable by its owner only), for :meth:`load` after a restart, a crash
        or in another process.

        Needs a model loaded with ``sessions=True``, and no reply of this session
        open. ``path`` is checked first: a folder, a missing folder or one that cannot
        be written raises the ``OSError`` a write would (``IsADirectoryError``...)
        before any request. Costs one short request (the conversation, almost all of it cached)
        and the slot's KV bytes on disk: about 10 MB per 1,000 tokens for Gemma 3 270M.
        """
        target = _check_target(_check_path(path))
        slot_dir = _slot_dir(self._model)
        with self._lock:
            self._settle(refuse_open=True)
            messages = copy.deepcopy(self._messages)
            tokens, data = 0, b""
            if messages:
                slot, tokens, data = self._capture(slot_dir, messages)
                self._last_slot = slot
            identity, build = _identity(self._model)
            adapters, flags = _setup(self._model)
            write_state_file(
                target, identity=identity, server_build=build, adapters=adapters, kv_flags=flags,
                messages=messages, tokens=tokens, slot_bytes=data,
            )

    def _capture(self, slot_dir: PrivateDirectory, messages: List[Dict[str, Any]]) -> Tuple[int, int, bytes]:
        """``(slot, token count, slot bytes)`` of a slot verified to hold ``messages``."""
        model = self._model
        prompt = render_prompt(
            lambda body: model._call(lambda client: client.post_json("/apply-template", body)),
            messages,
            add_generation_prompt=False,
        )
        body = {"content": prompt, "add_special": True, "parse_special": True}
        expected = model._call(lambda client: client.post_json("/tokenize", body))["tokens"]
        slot = self._pinned_slot if self._pinned_slot is not None else self._last_slot
        for attempt in range(1, SAVE_ATTEMPTS + 1):
            # Saves of one model's sessions take turns: they would take each other's
            # slots between prime and save. Other requests still may: hence the check.
            with _model_lock(model):
                # The conversation into the slot (cached: a few tokens evaluated).
                prime = model.generate(prompt, max_tokens=1, extra={} if slot is None else {"id_slot": slot})
                prime.text()
                slot = prime.slot
                if slot is None:
                    raise RequestError("llama-server did not say which slot ran the request")
                saved, data = _save_slot(model, slot_dir, slot)
            if slot_file_holds(data, expected):
                return slot, saved, data
            log.debug("slot %d was taken before it was saved (attempt %d); saving again", slot, attempt)
        raise RequestError(
            f"could not save the conversation: other requests took its slot before each of "
            f"{SAVE_ATTEMPTS} saves; try again when the server is less busy"
        )

    @classmethod
    def load(cls, model: Any, path: PathLike) -> "ChatSession":
        """The session saved at ``path``, its KV state given back to ``model``'s server,
        so that the next :meth:`send` evaluates only the new message.

        ``model`` must be loaded with ``sessions=True``, in the same setup as the one
        that saved: model file, llama-server build, LoRA adapters and their default
        scales, KV-cache flags (see :doc:`/sessions`). Otherwise, or when the
        server refuses the restore, :class:`~llamarocm.SessionMismatchError`, which
        carries the ``messages`` (to start a session that evaluates them again). A file that is not a saved session,
        or is truncated or corrupt, raises :class:`~llamarocm.SessionFileError`.
        """
        source = _check_path(path)
        slot_dir = _slot_dir(model)
        state = read_state_file(source)
        identity, build = _identity(model)
        check_identity(state, identity, build)
        check_setup(state, *_setup(model))
        context = getattr(model, "context_length", None)
        if isinstance(context, int) and state.tokens >= context:
            raise SessionMismatchError(
                f"{source} holds {state.tokens} tokens of conversation, more than this model's "
                f"context_length={context} per slot: load it with a larger context_length",
                source,
                state.messages,
            )
        try:
            session = cls(model, messages=state.messages)
        except (TypeError, ValueError) as exc:
            raise SessionFileError(f"{source} is corrupt: its messages are not valid ({exc})", source) from None
        if state.tokens:
            session._pinned_slot = _restore_slot(model, slot_dir, state)
        return session

    def __repr__(self) -> str:
        with self._lock:
            busy = " (a reply is open)" if self._turn is not None else ""
            return f"<ChatSession {len(self._messages)} messages{busy}>"


def _reply_message(stream: TokenStream) -> Optional[Dict[str, Any]]:
    """The assistant message a stream read to its end adds to the history (OpenAI's
    shape: ``tool_calls``, and ``content`` ``None`` when the reply said nothing else);
    ``None`` when the reply is not whole."""
    if stream.error is not None or stream.closed:
        return None
    if stream.finish_reason in ("stop", "length"):
        return {"role": "assistant", "content": stream._kept_text}
    if stream.finish_reason == "tool_calls" and stream.tool_calls:
        calls = [call.to_openai() for call in stream.tool_calls]
        return {"role": "assistant", "content": stream._kept_text or None, "tool_calls": calls}
    return None


def _open_calls(messages: Sequence[Mapping[str, Any]]) -> Tuple[Dict[str, str], "set[str]"]:
    """The calls of the last reply, if only tool results followed it (``{id: tool
    name}``), and the ids among them already answered."""
    answered = set()
    for message in reversed(messages):
        if message.get("role") == "tool":
            answered.add(message.get("tool_call_id"))
            continue
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            break
        calls = {c.get("id"): c.get("function", {}).get("name") for c in message["tool_calls"]}
        return calls, {c for c in answered if c in calls}
    return {}, set()


def _check_next_turn(messages: Sequence[Mapping[str, Any]], content: Optional[str]) -> None:
    """Refuse a turn that would leave tool calls unanswered, or one without a message
    that has no tool results to reply to."""
    calls, answered = _open_calls(messages)
    waiting = [c for c in calls if c not in answered]
    if waiting:
        raise ValueError(
            f"the last reply called tools, and {len(waiting)} call(s) have no result yet "
            f"({', '.join(map(repr, waiting))}): answer each with add_tool_result(call_id, content) first"
        )
    if content is None and not (messages and messages[-1].get("role") == "tool"):
        raise ValueError(
            "send() without a message replies to tool results: add them with add_tool_result() "
            "first, or pass the user's message"
        )


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    value = os.fspath(path)
    if not isinstance(value, str) or not value:
        raise ValueError(f"path must be a non-empty str path, got {value!r}")
    return os.path.expanduser(value)


def _check_target(path: str) -> str:
    """``path`` if a state file can be written there, else the ``OSError`` the write
    would raise after all the work: a folder, a missing or unwritable parent folder."""
    if path.endswith(os.sep) or os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a chat session is saved to a file, not a folder", path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise FileNotFoundError(errno.ENOENT, "the folder to save the chat session in does not exist", path)
    if not os.path.isdir(parent):
        raise NotADirectoryError(errno.ENOTDIR, f"{parent} is not a folder", path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"no permission to write in {parent}", path)
    return path


def _slot_dir(model: Any) -> PrivateDirectory:
    slot_dir: Optional[PrivateDirectory] = getattr(model, "_slot_dir", None)
    if slot_dir is None:
        raise ValueError(_NEEDS_OPTION)
    return slot_dir


def _identity(model: Any) -> Tuple[Dict[str, Any], Optional[str]]:
    """The model file's identity and the server's build, as a state file records them."""
    identity = model_identity(model.info.path)
    props = model._call(lambda client: client.props())
    build = props.get("build_info") if isinstance(props, dict) else None
    return identity, build if isinstance(build, str) else None


def _setup(model: Any) -> Tuple[List[Dict[str, Any]], List[List[str]]]:
    """The model's adapters (identity, default scale) and the server's KV-cache flags."""
    server_args = getattr(model.server, "args", None)
    return adapter_setup(model._lora), kv_flags(server_args if isinstance(server_args, list) else [])


def _save_slot(model: Any, slot_dir: PrivateDirectory, slot: int) -> Tuple[int, bytes]:
    """Have the server write ``slot`` to a fresh file of ours; its token count and bytes."""
    name = slot_dir.new_file()
    file = os.path.join(slot_dir.path, name)
    try:
        answer = model._call(lambda client: client.post_json(f"/slots/{slot}?action=save", {"filename": name}))
        with open(file, "rb") as f:
            data = f.read()
    finally:
        _unlink(file)
    saved = answer.get("n_saved") if isinstance(answer, dict) else None
    if not isinstance(saved, int):
        raise RequestError(f"llama-server's slot save answered without a token count: {answer!r:.200}")
    return saved, data


def _restore_slot(model: Any, slot_dir: PrivateDirectory, state: StateFile) -> int:
    """Give ``state``'s KV bytes to an idle slot of the server; the slot's id. A
    restore the server refuses (HTTP 400: a KV state it cannot read, such as another
    cache data type) is a :class:`~llamarocm.SessionMismatchError`."""
    slot = _idle_slot(model)
    name = slot_dir.new_file()
    file = os.path.join(slot_dir.path, name)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(state.slot_bytes)
        answer = model._call(lambda client: client.post_json(f"/slots/{slot}?action=restore", {"filename": name}))
    except RequestError as exc:
        if exc.status != 400:
            raise
        raise SessionMismatchError(
            f"llama-server refused the KV state of {state.path} ({exc.server_message or exc}): "
            "it was saved by a server set up differently",
            state.path,
            state.messages,
        ) from exc
    finally:
        _unlink(file)
    restored = answer.get("n_restored") if isinstance(answer, dict) else None
    if restored != state.tokens:
        raise RequestError(f"llama-server restored {restored!r} tokens of the {state.tokens} saved")
    return slot


def _idle_slot(model: Any) -> int:
    """A slot for a restore: the next idle one in turn (the server defers a restore
    into a busy slot until it is free), so that sessions loaded one after the other
    land on different slots rather than evicting each other."""
    with _turns_lock:
        turn = _restore_turns.setdefault(model, itertools.count())
        start = next(turn)
    try:
        slots = model._call(lambda client: client.slots())
    except RequestError:
        slots = []  # a server without the /slots endpoint
    busy = {s.get("id"): bool(s.get("is_processing")) for s in slots if isinstance(s, dict)}
    ids = sorted(i for i in busy if isinstance(i, int)) or list(range(max(1, getattr(model, "parallel", 1))))
    order = ids[start % len(ids):] + ids[: start % len(ids)]
    return next((i for i in order if not busy.get(i)), order[0])


def _unlink(file: str) -> None:
    try:
        os.unlink(file)
    except FileNotFoundError:
        pass

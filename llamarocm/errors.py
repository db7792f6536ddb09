"""Every exception llamarocm raises, in one place.

The tree::

    LlamaRocmError                      base of everything raised on purpose
    ├── ServerNotFoundError             no llama-server binary where we looked
    ├── ServerStartError                the server (or an RPC worker) did not become
    │                                   ready: it exited, timed out, crashed on an
    │                                   unsupported CPU (SIGILL), kept losing its port,
    │                                   or an RPC worker is unreachable; carries
    │                                   ``stderr_tail``
    ├── ServerCrashedError              the server died after it was ready
    ├── ClosedError                     the model or server was closed (also by a
    │                                   close() in another thread during the call)
    ├── PoolFullError                   a ModelPool cannot load one more model: those
    │                                   it holds are in use (until ``wait`` ran out)
    ├── RequestError                    the server refused or broke one request;
    │   │                               carries ``status`` and the server's message
    │   ├── ConnectionLostError         the connection broke without an answer (to a
    │   │                               server we did not start: we cannot tell why)
    │   ├── RequestTimeoutError         (also a TimeoutError) no answer to a plain call
    │   │   │                           (tokenize, embed...) within request_timeout
    │   │   └── StreamTimeoutError      no data on a stream for its timeout
    │   └── ContextLengthError          (also a ValueError) prompt + output exceed
    │                                   the slot's context
    ├── GGUFError                       (also a ValueError) not a readable GGUF file
    │                                   (or a LoRA adapter file that is not one)
    ├── ModelNotFoundError              (also a FileNotFoundError) no such model file
    ├── DeviceError                     no usable GPU, or the model does not fit
    ├── OutputParseError                (also a ValueError) output is not what was asked
    ├── SkippedError                    a batch item never ran: the batch was stopped
    │                                   (``fail_fast``, Ctrl-C) before its turn
    ├── CheckpointLockedError           another run is writing the same checkpoint file
    │                                   (``map(checkpoint=...)``, ``llamarocm batch``)
    └── SessionFileError                (also a ValueError) a saved chat session cannot
        │                               be read: not one, truncated or corrupt
        └── SessionMismatchError        it was saved in another setup (model, build, adapters...)

The builtin mix-ins mean callers who know nothing of llamarocm can still write
``except ValueError`` or ``except TimeoutError``. Wrong argument types and values are
plain ``TypeError`` / ``ValueError`` raised before any work starts.

This module is also the one place where what the server or the socket says becomes one
of these classes: :func:`error_from_payload` reads llama-server's error bodies, and the
client translates socket and HTTP failures into :class:`ConnectionLostError` and
:class:`StreamTimeoutError`.
"""

from __future__ import annotations

import json
from typing import Optional, Tuple

__all__ = [
    "LlamaRocmError",
    "ServerNotFoundError",
    "ServerStartError",
    "ServerCrashedError",
    "ClosedError",
    "PoolFullError",
    "RequestError",
    "ConnectionLostError",
    "RequestTimeoutError",
    "StreamTimeoutError",
    "ContextLengthError",
    "GGUFError",
    "ModelNotFoundError",
    "DeviceError",
    "OutputParseError",
    "SkippedError",
    "CheckpointLockedError",
    "SessionFileError",
    "SessionMismatchError",
]


class LlamaRocmError(Exception):
    """Base class of every error llamarocm raises on purpose."""


class ServerNotFoundError(LlamaRocmError):
    """No runnable ``llama-server`` binary was found.

    ``searched`` lists every place that was looked at, in order.
    """

    def __init__(self, message: str, searched: "tuple[str, ...]" = ()) -> None:
        super().__init__(message)
        self.searched = tuple(searched)


class _WithStderr(LlamaRocmError):
    """An error about the server process, quoting the end of its log."""

    def __init__(self, message: str, stderr_tail: str = "", returncode: Optional[int] = None) -> None:
        #: What happened, without the log.
        self.reason = message
        self.stderr_tail = stderr_tail
        self.returncode = returncode
        if stderr_tail:
            message = f"{message}\n--- its log (last lines) ---\n{stderr_tail.rstrip()}"
        super().__init__(message)


class ServerStartError(_WithStderr):
    """The server process exited, hung or could not bind before it became ready."""


class ServerCrashedError(_WithStderr):
    """The server process died after it had become ready."""


class ClosedError(LlamaRocmError):
    """The model or server was closed: by this thread before the call, or by another
    thread while the call or a restart ran. Nothing crashed; nothing will restart."""


class PoolFullError(LlamaRocmError):
    """A :class:`~llamarocm.ModelPool` has no room for one more model (``max_models``
    or ``memory_budget``) and cannot make any: every model it holds is in use, and none
    was released within ``wait`` seconds (or the model would not fit even in an empty
    pool, or the only models in the way are held by the calling thread itself)."""


class RequestError(LlamaRocmError):
    """The server rejected a request or broke it off.

    ``status`` is the HTTP status (``None`` for a broken connection or an error event
    inside a stream); ``server_message`` is the server's own words.
    """

    def __init__(self, message: str, status: Optional[int] = None, server_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class ConnectionLostError(RequestError):
    """The connection to the server broke before its answer was complete.

    With a server this process started, the model checks whether the process died
    and raises :class:`ServerCrashedError` (or :class:`ClosedError`) instead; with a
    server attached by :func:`~llamarocm.connect`, this is all that can be known.
    """


class RequestTimeoutError(RequestError, TimeoutError):
    """The server did not answer in time: a plain call (``tokenize``, ``embed``,
    ``/apply-template``...) within ``request_timeout``."""


class StreamTimeoutError(RequestTimeoutError):
    """No data arrived on a stream for longer than its ``timeout``."""


class ContextLengthError(RequestError, ValueError):
    """The prompt (plus the requested output) does not fit in a slot's context."""


class GGUFError(LlamaRocmError, ValueError):
    """The file is not a GGUF file this library can read (corrupt, truncated, v1...),
    or, given as a LoRA adapter, not a LoRA adapter for the model's architecture."""


class ModelNotFoundError(LlamaRocmError, FileNotFoundError):
    """The model file does not exist."""


class DeviceError(LlamaRocmError):
    """No usable GPU, or the model does not fit on the chosen devices (``strict=True``)."""


class OutputParseError(LlamaRocmError, ValueError):
    """The generated text is not in the requested format: not JSON, or refused by the
    pydantic model given as ``response_format`` (``stream.json()``, ``stream.parsed()``;
    ``__cause__`` is the parser's or the validator's error)."""


class SkippedError(LlamaRocmError):
    """A prompt of :meth:`~llamarocm.Model.map` that never ran: the batch was stopped
    (``fail_fast`` after another prompt failed, or an interrupt) before its turn."""


class CheckpointLockedError(LlamaRocmError):
    """Another run, in this process or another, is writing the checkpoint file that
    :meth:`~llamarocm.Model.map` (``checkpoint=``) or ``llamarocm batch`` was given.

    Raised before any prompt runs. Two runs appending to one file would each redo the
    other's items; wait for the other run to end, or give this one another file.
    ``path`` is the file.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class SessionFileError(LlamaRocmError, ValueError):
    """A file given to :meth:`ChatSession.load <llamarocm.ChatSession.load>` is not a
    saved chat session, or is truncated or corrupt. ``path`` is the file."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class SessionMismatchError(SessionFileError):
    """A saved chat session belongs to another setup (model file, llama-server build,
    LoRA adapters and scales, KV-cache flags), or the server refused its KV state: the
    state would be wrong (or refused) there, so it is never loaded.

    The conversation itself is still readable: ``messages`` holds it, to start a new
    session that evaluates it again (see :doc:`/sessions`).
    """

    def __init__(self, message: str, path: str, messages: "list[dict[str, object]]") -> None:
        super().__init__(message, path)
        self.messages = messages


def _server_words(body: str) -> Tuple[str, str]:
    """The message and the error type in a llama-server error body
    (``{"error": {"code", "message", "type"}}``), or the body itself, cut short."""
    message, kind = body.strip()[:2000], ""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            message = str(err.get("message", message))
            kind = str(err.get("type", ""))
        elif isinstance(err, str):
            message = err
    return message, kind


def error_from_payload(body: str, status: Optional[int]) -> RequestError:
    """The typed error for an error llama-server reported: an HTTP error answer
    (``status``), or an error event in the middle of a stream (``status`` ``None``).

    A context overflow (type ``exceed_context_size_error``) is a
    :class:`ContextLengthError`; a 401 says the key was refused.
    """
    message, kind = _server_words(body)
    if status is None:
        text = f"llama-server reported an error mid-stream: {message or '(no message)'}"
    else:
        text = f"llama-server answered HTTP {status}: {message or '(no message)'}"
    if kind == "exceed_context_size_error" or "context size" in message or "context length" in message:
        return ContextLengthError(text, status, message)
    if status == 401:
        text += " (the API key was refused)"
    return RequestError(text, status, message)

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
    ├── RequestError                    the server refused or broke one request;
    │   │                               carries ``status`` and the server's message
    │   ├── StreamTimeoutError          (also a TimeoutError) no data for too long
    │   └── ContextLengthError          (also a ValueError) prompt + output exceed
    │                                   the slot's context
    ├── GGUFError                       (also a ValueError) not a readable GGUF file
    ├── ModelNotFoundError              (also a FileNotFoundError) no such model file
    ├── DeviceError                     no usable GPU, or the model does not fit
    └── OutputParseError                (also a ValueError) output is not what was asked

The builtin mix-ins mean callers who know nothing of llamarocm can still write
``except ValueError`` or ``except TimeoutError``. Wrong argument types and values are
plain ``TypeError`` / ``ValueError`` raised before any work starts.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "LlamaRocmError",
    "ServerNotFoundError",
    "ServerStartError",
    "ServerCrashedError",
    "ClosedError",
    "RequestError",
    "StreamTimeoutError",
    "ContextLengthError",
    "GGUFError",
    "ModelNotFoundError",
    "DeviceError",
    "OutputParseError",
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


class RequestError(LlamaRocmError):
    """The server rejected a request or broke it off.

    ``status`` is the HTTP status (``None`` for a broken connection or an error event
    inside a stream); ``server_message`` is the server's own words.
    """

    def __init__(self, message: str, status: Optional[int] = None, server_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class StreamTimeoutError(RequestError, TimeoutError):
    """No data arrived from the server for longer than the stream's ``timeout``."""


class ContextLengthError(RequestError, ValueError):
    """The prompt (plus the requested output) does not fit in a slot's context."""


class GGUFError(LlamaRocmError, ValueError):
    """The file is not a GGUF file this library can read (corrupt, truncated, v1...)."""


class ModelNotFoundError(LlamaRocmError, FileNotFoundError):
    """The model file does not exist."""


class DeviceError(LlamaRocmError):
    """No usable GPU, or the model does not fit on the chosen devices (``strict=True``)."""


class OutputParseError(LlamaRocmError, ValueError):
    """The generated text is not in the requested format (e.g. ``stream.json()``)."""


def error_from_response(status: int, body: str) -> RequestError:
    """The typed error for an HTTP error response from llama-server.

    llama-server answers ``{"error": {"code", "message", "type"}}``; a context
    overflow has type ``exceed_context_size_error``.
    """
    import json

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
    text = f"llama-server answered HTTP {status}: {message or '(no message)'}"
    if kind == "exceed_context_size_error" or "context size" in message or "context length" in message:
        return ContextLengthError(text, status, message)
    if status == 401:
        text += " (the API key was refused)"
    return RequestError(text, status, message)

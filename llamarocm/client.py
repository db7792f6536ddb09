"""HTTP to one llama-server: health, props, slots, tokenize, and streaming POSTs.

Knows endpoints and JSON; knows nothing of processes or of tokens as objects. One
:class:`Client` may be shared by many threads.

Plain calls go through a ``requests.Session`` that ignores proxy variables and
``.netrc`` (``trust_env=False``: they must never redirect or decorate loopback
traffic) and never reuses a connection: llama-server closes idle keep-alive
connections, and a request sent on one that it just closed fails with no way to know
whether it arrived. A loopback connect costs a few microseconds.

Each stream has a connection of its own, opened with ``http.client`` so that its
socket is known *before* the request is sent: :meth:`EventStream.cancel` shuts it down
from any thread at any moment, including while the server still evaluates the prompt
(requests only reveals a socket once response headers arrive, and closing a
response from another thread does not wake a blocked read). The shutdown also tells
the server the client is gone, so it frees the slot.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import requests

from ._chunked import Dechunker
from ._sse import ServerSentEvent, SSEDecoder
from .errors import ConnectionLostError, RequestError, RequestTimeoutError, StreamTimeoutError, error_from_payload

__all__ = ["Client", "EventStream"]

# Each request at DEBUG: method, path, status and time, never a body (prompts stay out
# of logs).
log = logging.getLogger("llamarocm.http")

CONNECT_TIMEOUT = 5.0
#: The default ``request_timeout``: how long a plain call waits for its answer.
CALL_TIMEOUT = 30.0
READ_SIZE = 65536


class Client:
    """Talks to ``base_url`` with ``api_key`` as a bearer token.

    >>> client = Client("http://127.0.0.1:8080", api_key="secret")  # doctest: +SKIP
    >>> client.health()  # doctest: +SKIP
    'ok'
    """

    def __init__(self, base_url: str, api_key: Optional[str] = None, request_timeout: float = CALL_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Connection": "close"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: "Optional[requests.Session]" = None
        self._session_lock = threading.Lock()

    def _plain_session(self) -> "requests.Session":
        # requests takes ~45 ms to import, a third of `import llamarocm`: it is loaded
        # with the first plain call instead (a stream never needs it).
        with self._session_lock:
            if self._session is None:
                import requests

                session = requests.Session()
                session.trust_env = False
                session.headers.update(self._headers)
                self._session = session
            return self._session

    def close(self) -> None:
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    # -- plain calls -------------------------------------------------------------

    def health(self, timeout: float = 2.0) -> Optional[str]:
        """The server's status: ``"ok"``, ``"loading"``, another word, or ``None`` when
        nothing answers on the port yet.

        Plain ``http.client``: start-up probes this while the server loads, and
        requests' machinery would cost that server CPU it needs.
        """
        conn = self._connection(timeout)
        try:
            conn.request("GET", self._prefix + "/health", headers={"Connection": "close"})
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        if status == 200:
            return "ok"
        if status == 503:
            return "loading"
        return f"http {status}"

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def get_json(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post_json(self, path: str, body: Any) -> Any:
        """POST ``body`` (JSON: an object, or a list as ``/lora-adapters`` takes)."""
        return self._call("POST", path, body)

    def props(self) -> Dict[str, Any]:
        props: Dict[str, Any] = self.get_json("/props")
        return props

    def slots(self) -> List[Dict[str, Any]]:
        slots: List[Dict[str, Any]] = self.get_json("/slots")
        return slots

    def _call(self, method: str, path: str, body: Any) -> Any:
        timeout = self.request_timeout
        data = None if body is None else _encode(body)
        started = time.monotonic()
        import requests  # see _plain_session

        session = self._plain_session()
        try:
            resp = session.request(
                method,
                self.base_url + path,
                data=data,
                headers={"Content-Type": "application/json"} if data is not None else None,
                timeout=(CONNECT_TIMEOUT, timeout),
            )
        except requests.Timeout as exc:
            raise RequestTimeoutError(f"{method} {path}: no answer within {timeout} s (request_timeout)") from exc
        except requests.RequestException as exc:
            raise ConnectionLostError(f"{method} {path}: connection failed: {exc}") from exc
        log.debug("%s %s -> %d in %.1f ms", method, path, resp.status_code, (time.monotonic() - started) * 1000)
        if resp.status_code >= 400:
            raise error_from_payload(resp.text, resp.status_code)
        try:
            return resp.json()
        except ValueError as exc:
            raise RequestError(
                f"{method} {path}: llama-server sent malformed JSON: {resp.text[:200]!r}", resp.status_code
            ) from exc

    # -- streams -----------------------------------------------------------------

    def stream(self, path: str, body: Dict[str, Any], idle_timeout: float) -> "EventStream":
        """An unopened stream: :meth:`EventStream.open` POSTs ``body`` (in the reader
        thread), after which iterating yields the response's events.

        ``idle_timeout`` bounds every wait for data, the wait for the first byte
        included (that one covers the server's prompt evaluation).
        """
        conn = self._connection(CONNECT_TIMEOUT)
        return EventStream(conn, self._prefix + path, _encode(body), dict(self._headers), idle_timeout)


def _body_reader(resp: http.client.HTTPResponse) -> Callable[[int], bytes]:
    """A ``read(n)`` for the response body that returns whatever one socket read brings.

    For a chunked body (llama-server sends one HTTP chunk per event) the framing is
    decoded here: ``http.client`` would return a single chunk per call.
    """
    if not resp.chunked:
        return resp.read1
    dechunker = Dechunker()
    read_raw = resp.fp.read1

    def read(n: int) -> bytes:
        while not dechunker.done:
            raw = read_raw(n)
            if not raw:
                # EOF before the last chunk: the server went away mid-stream.
                raise http.client.IncompleteRead(b"")
            body = dechunker.feed(raw)
            if body:
                return body
        return b""

    return read


def _encode(body: Any) -> bytes:
    try:
        # allow_nan=False: NaN is not JSON, and llama-server would refuse the request.
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the request cannot be sent as JSON: {exc}") from exc


class EventStream:
    """The SSE events of one streaming response; cancellable from any thread."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        path: str,
        data: bytes,
        headers: Dict[str, str],
        idle_timeout: float,
    ) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.cancelled = False
        self._conn = conn
        self._data = data
        self._headers = headers
        self._sock: Optional[socket.socket] = None
        self._resp: Optional[http.client.HTTPResponse] = None
        self._owner_pid = os.getpid()

    def open(self) -> None:
        """Connect, send the request and read the response headers (raising HTTP errors).
        Nothing, once cancelled: a stream closed before it was read sends no request."""
        if self.cancelled:
            return
        started = time.monotonic()
        try:
            self._conn.connect()
        except OSError as exc:
            raise ConnectionLostError(f"POST {self.path}: connection failed: {exc}") from exc
        # No lock between this and cancel(), which a signal handler may call while the
        # interrupted thread is anywhere. Each side writes its own field, then reads the
        # other's: under the interpreter's sequential order at least one sees the other,
        # so the socket is shut down at least once (twice does no harm).
        self._sock = self._conn.sock
        if self.cancelled:
            self._shutdown()
            return
        try:
            self._sock.settimeout(self.idle_timeout)
            self._conn.request(
                "POST",
                self.path,
                body=self._data,
                headers={**self._headers, "Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            resp = self._conn.getresponse()
        except TimeoutError as exc:
            if self.cancelled:
                return
            raise StreamTimeoutError(f"POST {self.path}: no answer within {self.idle_timeout} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            if self.cancelled:
                return
            raise ConnectionLostError(f"POST {self.path}: connection lost: {exc}") from exc
        log.debug("POST %s -> %d in %.1f ms (streaming)", self.path, resp.status, (time.monotonic() - started) * 1000)
        if resp.status >= 400:
            text = self._error_body(resp)
            if text is None:
                return  # cancelled while the body was read
            raise error_from_payload(text, resp.status)
        self._resp = resp

    def _error_body(self, resp: http.client.HTTPResponse) -> Optional[str]:
        """The body of an error answer, read under the same idle timeout as any other
        read: a server that stalls or breaks mid-body raises the typed errors, and a
        cancel ends the read quietly (``None``)."""
        try:
            return resp.read().decode("utf-8", "replace")
        except TimeoutError as exc:
            if self.cancelled:
                return None
            raise StreamTimeoutError(
                f"POST {self.path}: HTTP {resp.status}, then no data from llama-server for {self.idle_timeout} s"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            if self.cancelled:
                return None
            raise ConnectionLostError(
                f"POST {self.path}: connection lost reading the HTTP {resp.status} answer: {exc}"
            ) from exc
        finally:
            resp.close()

    def __iter__(self) -> Iterator[List[ServerSentEvent]]:
        """Yield the events of each network read, as a list (often of one)."""
        resp = self._resp
        if resp is None:
            return
        decoder = SSEDecoder()
        read = _body_reader(resp)
        try:
            while True:
                # One read of the socket (at most READ_SIZE), without waiting to fill a
                # buffer: tokens are handed on as they arrive, all that arrived at once.
                chunk = read(READ_SIZE)
                if not chunk:
                    break
                events = decoder.feed(chunk)
                if events:
                    yield events
            tail = decoder.flush()
            if tail:
                yield tail
        except TimeoutError as exc:
            if self.cancelled:
                return
            raise StreamTimeoutError(
                f"POST {self.path}: no data from llama-server for {self.idle_timeout} s"
            ) from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self.cancelled:
                return
            raise ConnectionLostError(f"POST {self.path}: connection lost: {exc}") from exc

    def cancel(self) -> None:
        """Stop the stream: the reader sees the end at once and the server frees the slot.

        Takes no lock: safe from any thread and from a signal handler."""
        self.cancelled = True
        self._shutdown()

    def _shutdown(self) -> None:
        if os.getpid() != self._owner_pid:
            # shutdown() acts on the connection itself, which a forked child shares with
            # its parent: it would cut the parent's stream.
            return
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected, or already closed

    def close(self) -> None:
        """Release the connection."""
        if os.getpid() != self._owner_pid:
            return
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()
        self._conn.close()

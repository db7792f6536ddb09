"""HTTP to one llama-server: health, props, slots, tokenize, and streaming POSTs.

Knows endpoints and JSON; knows nothing of processes or of tokens as objects. One
:class:`Client` may be shared by many threads: each call takes its own pooled
connection, and each stream its own socket, which :meth:`EventStream.cancel` shuts
down from any thread (closing a ``requests`` response from another thread does not
wake a blocked read; shutting the socket down does, and tells the server the client
is gone so it frees the slot).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any, Dict, Iterator, List, Optional

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ._sse import ServerSentEvent, SSEDecoder
from .errors import RequestError, StreamTimeoutError, error_from_response

__all__ = ["Client", "EventStream", "ConnectionLost"]

CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 30.0
READ_SIZE = 65536


class ConnectionLost(RequestError):
    """The connection broke mid-request; the caller decides whether the server died."""


def _session(api_key: Optional[str], pool_size: int, retry: Retry) -> requests.Session:
    session = requests.Session()
    # Proxy variables and .netrc must never redirect or decorate loopback traffic.
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    return session


class Client:
    """Talks to ``base_url`` with ``api_key`` as a bearer token.

    >>> client = Client("http://127.0.0.1:8080", api_key="secret")  # doctest: +SKIP
    >>> client.health()  # doctest: +SKIP
    'ok'
    """

    def __init__(self, base_url: str, api_key: Optional[str] = None, *, pool_size: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        # Plain calls (props, slots, tokenize...) are free of side effects, so one
        # retry is safe; it absorbs a pooled keep-alive connection that the server
        # closed while it sat idle.
        self._session = _session(api_key, pool_size, Retry(
            total=1, connect=0, read=1, status=0, other=0, allowed_methods=None, raise_on_status=False
        ))
        # Streams are never re-sent once they may have reached the server, and each
        # gets a connection of its own ("Connection: close"), never pooled, whose
        # socket cancel() can shut down without touching anyone else's request.
        # Health probes use it too: a refused probe is an answer, not a fault to retry.
        self._once_session = _session(api_key, pool_size, Retry(0, read=False))

    def close(self) -> None:
        self._session.close()
        self._once_session.close()

    # -- plain calls -------------------------------------------------------------

    def health(self, timeout: float = 2.0) -> Optional[str]:
        """The server's status: ``"ok"``, ``"loading"``, another word, or ``None`` when
        nothing answers on the port yet."""
        try:
            resp = self._once_session.get(
                self.base_url + "/health", timeout=(timeout, timeout), headers={"Connection": "close"}
            )
        except requests.RequestException:
            return None
        if resp.status_code == 200:
            return "ok"
        if resp.status_code == 503:
            return "loading"
        return f"http {resp.status_code}"

    def get_json(self, path: str, timeout: float = CALL_TIMEOUT) -> Any:
        return self._call("GET", path, None, timeout)

    def post_json(self, path: str, body: Dict[str, Any], timeout: float = CALL_TIMEOUT) -> Any:
        return self._call("POST", path, body, timeout)

    def props(self) -> Dict[str, Any]:
        return self.get_json("/props")

    def slots(self) -> List[Dict[str, Any]]:
        return self.get_json("/slots")

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]], timeout: float) -> Any:
        try:
            resp = self._session.request(
                method, self.base_url + path, json=body, timeout=(CONNECT_TIMEOUT, timeout)
            )
        except requests.Timeout as exc:
            raise StreamTimeoutError(f"{method} {path}: no answer within {timeout} s") from exc
        except requests.RequestException as exc:
            raise ConnectionLost(f"{method} {path}: connection failed: {exc}") from exc
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.text)
        try:
            return resp.json()
        except ValueError as exc:
            raise RequestError(
                f"{method} {path}: llama-server sent malformed JSON: {resp.text[:200]!r}", resp.status_code
            ) from exc

    # -- streams -----------------------------------------------------------------

    def open_stream(self, path: str, body: Dict[str, Any], idle_timeout: float) -> "EventStream":
        """POST ``body`` and return the response's events, or raise the HTTP error.

        ``idle_timeout`` bounds every wait for data, the wait for the first byte
        included (that one covers the server's prompt evaluation).
        """
        stream = EventStream(path, idle_timeout)
        stream._open(self._once_session, self.base_url + path, body)
        return stream


def _socket_of(resp: requests.Response) -> Optional[socket.socket]:
    """The socket under a streaming response, for shutting it down from another thread.

    With "Connection: close", http.client hands the socket over to the response and
    forgets it on the connection, so look on the response's file first.
    """
    fp = getattr(resp.raw, "_fp", None)  # http.client.HTTPResponse
    sock = getattr(getattr(getattr(fp, "fp", None), "raw", None), "_sock", None)  # BufferedReader -> SocketIO
    if isinstance(sock, socket.socket):
        return sock
    conn = getattr(resp.raw, "connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


class EventStream:
    """The SSE events of one streaming response; cancellable from any thread."""

    def __init__(self, path: str, idle_timeout: float) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._resp: Optional[requests.Response] = None
        self.cancelled = False
        self._owner_pid = os.getpid()

    def _open(self, session: requests.Session, url: str, body: Dict[str, Any]) -> None:
        try:
            resp = session.post(
                url,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream", "Connection": "close"},
                stream=True,
                timeout=(CONNECT_TIMEOUT, self.idle_timeout),
            )
        except requests.Timeout as exc:
            raise StreamTimeoutError(
                f"POST {self.path}: no answer within {self.idle_timeout} s", None
            ) from exc
        except requests.RequestException as exc:
            raise ConnectionLost(f"POST {self.path}: connection failed: {exc}") from exc
        if resp.status_code >= 400:
            text = resp.text
            resp.close()
            raise error_from_response(resp.status_code, text)
        with self._lock:
            self._resp = resp
            self._sock = _socket_of(resp)
            cancelled = self.cancelled
        if cancelled:  # cancel() came while we waited for the headers
            self._shutdown()

    def __iter__(self) -> Iterator[List[ServerSentEvent]]:
        """Yield the events of each network read, as a list (often of one)."""
        resp = self._resp
        if resp is None:
            return
        decoder = SSEDecoder()
        try:
            for chunk in resp.raw.stream(READ_SIZE, decode_content=False):
                events = decoder.feed(chunk)
                if events:
                    yield events
            tail = decoder.flush()
            if tail:
                yield tail
        except urllib3.exceptions.ReadTimeoutError as exc:
            if self.cancelled:
                return
            raise StreamTimeoutError(
                f"POST {self.path}: no data from llama-server for {self.idle_timeout} s"
            ) from exc
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError, ValueError) as exc:
            if self.cancelled:
                return
            raise ConnectionLost(f"POST {self.path}: connection lost: {exc}") from exc

    def cancel(self) -> None:
        """Stop the stream: the reader sees the end at once and the server frees the slot."""
        with self._lock:
            self.cancelled = True
        self._shutdown()

    def _shutdown(self) -> None:
        if os.getpid() != self._owner_pid:
            # shutdown() acts on the connection itself, which a forked child shares with
            # its parent: it would cut the parent's stream.
            return
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def close(self) -> None:
        """Release the connection (never back to the pool unless fully read)."""
        with self._lock:
            resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()

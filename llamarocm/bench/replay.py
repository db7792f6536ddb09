"""The replay server: recorded llama-server responses served back byte for byte, no model.

It runs in a child process, ``python -m llamarocm.bench.replay ROUTE=FILE ...``, so that
its work never competes with the measured client for the GIL. Each connection gets the
recorded response of its request's path (llama-server's own chunked framing, one chunk
per event) in one ``sendall``, then the connection closes; tokens arrive as fast as
loopback allows. It prints its port, and exits when its stdin closes, i.e. when the
parent goes.

:class:`ReplayServer` runs it; :func:`record_streams` records what it serves.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any, Dict, List, Optional

import llamarocm

from .common import HOST, PROMPT, request_body


def _json_response(body: bytes) -> bytes:
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


#: Answers besides the recordings: what ``llamarocm.connect()`` asks before it attaches.
FIXED = {
    b"/health": _json_response(b'{"status":"ok"}'),
    b"/props": _json_response(b"{}"),
    b"/v1/models": _json_response(b'{"data":[]}'),
}
MISSING = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


# -- the server, in the child process ---------------------------------------------------


def _read_path(conn: socket.socket) -> Optional[bytes]:
    """The path of the request on ``conn``, once all of it is read; None if the client left."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return lines[0].split(b" ")[1].split(b"?")[0]


def _answer(conn: socket.socket, routes: Dict[bytes, bytes]) -> None:
    try:
        path = _read_path(conn)
        if path is not None:
            conn.sendall(routes.get(path) or FIXED.get(path, MISSING))
            conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def _exit_with_parent() -> None:
    sys.stdin.read()
    os._exit(0)


def serve(routes: Dict[bytes, bytes]) -> None:
    """Answer connections on a free loopback port, printed first, until stdin closes."""
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(256)
    print(srv.getsockname()[1], flush=True)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_answer, args=(conn, routes), daemon=True).start()


def main(argv: List[str]) -> None:
    """``ROUTE=FILE ...``: serve each file's bytes as the response to its route."""
    routes = {}
    for spec in argv:
        route, _, name = spec.partition("=")
        with open(name, "rb") as f:
            routes[route.encode()] = f.read()
    serve(routes)


# -- the parent's side ---------------------------------------------------------------------


def _child_env() -> Dict[str, str]:
    # The child imports this very package, also when it runs from a checkout that is
    # not installed (or not the installed copy).
    root = os.path.dirname(os.path.dirname(os.path.abspath(llamarocm.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class ReplayServer:
    """A local server that answers ``/completion`` and ``/v1/completions`` with
    recorded llama-server responses."""

    def __init__(self, routes: Dict[str, bytes]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="llamarocm-bench-")
        specs = []
        for i, (route, raw) in enumerate(routes.items()):
            name = os.path.join(self._dir.name, f"route{i}.bin")
            with open(name, "wb") as f:
                f.write(raw)
            specs.append(f"{route}={name}")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, *specs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=_child_env(),
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip():
            self.close()
            raise RuntimeError("the replay server did not start")
        self.port = int(line)
        self.url = f"http://{HOST}:{self.port}"

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._dir.cleanup()

    def __enter__(self) -> ReplayServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def record(port: int, api_key: Optional[str], path: str, body: Dict[str, Any]) -> bytes:
    """The whole HTTP response to one streaming request, as the server sent it."""
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}", "Content-Type: application/json",
            "Accept: text/event-stream", "Connection: close", f"Content-Length: {len(data)}"]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    with socket.create_connection((HOST, port), timeout=600) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        parts = []
        while True:
            part = sock.recv(65536)
            if not part:
                break
            parts.append(part)
    raw = b"".join(parts)
    status = raw.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"recording POST {path} failed: {raw[:300]!r}")
    return raw


def record_streams(model: llamarocm.Model, tokens: int) -> Dict[str, bytes]:
    """A real native stream and a real OpenAI-style stream of ``tokens`` tokens each."""
    server = model.server
    assert server is not None
    native = record(server.port, server.api_key, "/completion", request_body(PROMPT, tokens))
    openai_body = {"model": "x", "prompt": PROMPT, "max_tokens": tokens, "stream": True,
                   "temperature": 0.0, "ignore_eos": True}
    oai = record(server.port, server.api_key, "/v1/completions", openai_body)
    return {"/completion": native, "/v1/completions": oai}


if __name__ == "__main__":
    main(sys.argv[1:])

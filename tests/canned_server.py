"""A local HTTP server that answers with canned bytes: for stream parsing and error
paths without a model (streams use their own socket, so they are tested on a real one)."""

from __future__ import annotations

import http.server
import json
import socket
import struct
import threading
from typing import Dict, List, Optional, Tuple


class CannedServer:
    def __init__(self) -> None:
        self.routes: Dict[str, Tuple[int, bytes, str]] = {}
        self.requests: List[Tuple[str, Optional[dict]]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, body: Optional[dict]) -> None:
                owner.requests.append((self.path, body))
                status, payload, mode = owner.routes.get(self.path, (404, b'{"error": "no route"}', "plain"))
                if mode == "hang":
                    # One event, then silence until the client goes away: a stream that
                    # only a cancel can end (bounded, so a leaked one cannot hold a test).
                    self.send_response(status)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                    self.wfile.flush()
                    self.connection.settimeout(30)
                    try:
                        while self.connection.recv(1024):
                            pass
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                if mode == "reset":
                    self.send_response(status)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                    self.wfile.flush()
                    # SO_LINGER 0: close with a TCP reset, as a killed process would.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                self.send_response(status)
                if mode == "chunked":
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for piece in payload.split(b"\n\n"):
                        if piece:
                            piece += b"\n\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    # Like llama-server: the client asks for "Connection: close", and
                    # the answer says so, or the client might pool a closing socket.
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                self.close_connection = True

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                self._answer(json.loads(self.rfile.read(length) or b"null"))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def stream(self, path: str, body: bytes, status: int = 200) -> None:
        self.routes[path] = (status, body, "chunked")

    def json(self, path: str, obj, status: int = 200) -> None:
        self.routes[path] = (status, json.dumps(obj).encode(), "plain")

    def hang_after(self, path: str, body: bytes) -> None:
        self.routes[path] = (200, body, "hang")

    def reset_after(self, path: str, body: bytes) -> None:
        self.routes[path] = (200, body, "reset")

    def body(self, index: int) -> Optional[dict]:
        return self.requests[index][1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

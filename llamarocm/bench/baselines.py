"""The baselines llamarocm is measured against: a bare ``http.client`` stream, the ``openai``
client, and llama-server spawned and polled by hand.

Each client's loop is written out in full rather than through a shared helper: a call
more per token would be part of what the client figure measures.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import llamarocm

from .common import HOST, Timed, free_port, perf, request_body

#: How often the raw start-up polls ``/health``: every 5 ms.
RAW_POLL_INTERVAL = 0.005


# -- streams -------------------------------------------------------------------------


def raw_headers(api_key: Optional[str]) -> Dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", "Connection": "close"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _native_count(obj: Dict[str, Any]) -> int:
    return len(obj.get("tokens") or ())


def openai_count(obj: Dict[str, Any]) -> int:
    """Tokens in one event of an OpenAI-style stream (``/v1/completions``)."""
    choices = obj.get("choices")
    return 1 if choices and choices[0].get("text") else 0


def raw_stream(
    host: str,
    port: int,
    path: str,
    data: bytes,
    headers: Dict[str, str],
    count: Callable[[Dict[str, Any]], int] = _native_count,
) -> Timed:
    """The baseline: a plain ``http.client`` request, a line split and ``json.loads``."""
    start = perf()
    first = last = 0.0
    n = 0
    obj: Dict[str, Any] = {}
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status}: {resp.read()[:200]!r}")
        pending = b""
        read1 = resp.read1
        while True:
            chunk = read1(65536)
            if not chunk:
                break
            if pending:
                chunk = pending + chunk
            lines = chunk.split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line[:7] == b"data: {":
                    obj = json.loads(line[6:])
                    k = count(obj)
                    if k:
                        last = perf()
                        if not n:
                            first = last
                        n += k
        end = perf()
    finally:
        conn.close()
    rate = (obj.get("timings") or {}).get("predicted_per_second")  # the last event's
    return Timed(first - start, last - start, end - start, n, rate)


class RawTarget:
    """Where the baseline sends its requests: the server of a loaded model."""

    def __init__(self, model: llamarocm.Model) -> None:
        server = model.server
        assert server is not None
        self.host, self.port = HOST, server.port
        self.headers = raw_headers(server.api_key)

    def stream(self, prompt: str, max_tokens: int) -> Timed:
        data = json.dumps(request_body(prompt, max_tokens)).encode()
        return raw_stream(self.host, self.port, "/completion", data, self.headers)


def openai_client(url: str) -> Optional[Any]:
    """An ``openai.OpenAI`` client of the server at ``url``; None without the openai package."""
    try:
        import openai
    except ImportError:
        return None
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)


def openai_stream(client: Any, prompt: str, max_tokens: int) -> Timed:
    """A streaming completion through the ``openai`` client."""
    start = perf()
    first = last = 0.0
    n = 0
    stream = client.completions.create(
        model="replay", prompt=prompt, max_tokens=max_tokens, stream=True, temperature=0.0
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = perf()
            if not n:
                first = last
            n += 1
    return Timed(first - start, last - start, perf() - start, n)


# -- the raw llama-server the start-up figure compares with ---------------------------


def proc_argv_env(pid: int) -> Tuple[List[str], Dict[str, str]]:
    """The exact command line and environment of a running process (ours, so readable)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = {}
        for item in f.read().split(b"\0"):
            name, sep, value = item.partition(b"=")
            if sep:
                env[os.fsdecode(name)] = os.fsdecode(value)
    return argv, env


def _with_port(argv: List[str], port: int) -> List[str]:
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    return argv


def _health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _stop_process(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def raw_startup(argv: List[str], env: Dict[str, str], timeout: float = 300.0) -> float:
    """Spawn ``argv`` on a fresh port and poll ``/health`` every 5 ms; seconds until 200."""
    port = free_port()
    argv = _with_port(argv, port)
    start = perf()
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = start + timeout
        while not _health_ok(port):
            if proc.poll() is not None:
                raise RuntimeError(f"raw llama-server exited with code {proc.returncode}")
            if perf() > deadline:
                raise RuntimeError("raw llama-server was not ready in time")
            time.sleep(RAW_POLL_INTERVAL)
        return perf() - start
    finally:
        _stop_process(proc)

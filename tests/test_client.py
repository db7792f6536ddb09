"""The HTTP client and the stream parsing against mocked responses (no server)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Iterator

import pytest
import requests
import responses

import llamarocm
from llamarocm.client import Client
from llamarocm.errors import ConnectionLostError

pytestmark = pytest.mark.timeout(20)

URL = "http://127.0.0.1:9"


@pytest.fixture
def client():
    c = Client(URL, api_key="sekret")
    yield c
    c.close()


@responses.activate
def test_key_is_sent_as_bearer(client):
    responses.get(URL + "/props", json={"n_ctx": 1})
    assert client.props() == {"n_ctx": 1}
    assert responses.calls[0].request.headers["Authorization"] == "Bearer sekret"


@pytest.mark.parametrize(
    "status, body, error, words",
    [
        (401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}},
         llamarocm.RequestError, "API key was refused"),
        (500, {"error": {"code": 500, "message": "boom", "type": "server_error"}}, llamarocm.RequestError, "boom"),
        (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
         llamarocm.RequestError, "Loading model"),
        (400, {"error": {"code": 400, "message": "the request exceeds the available context size",
                         "type": "exceed_context_size_error"}}, llamarocm.ContextLengthError, "context size"),
    ],
)
@responses.activate
def test_http_errors_are_typed(client, status, body, error, words):
    responses.get(URL + "/slots", status=status, json=body)
    with pytest.raises(error, match=words) as info:
        client.slots()
    assert info.value.status == status
    assert info.value.server_message == body["error"]["message"]


@responses.activate
def test_context_error_is_also_a_value_error(client):
    responses.post(URL + "/tokenize", status=400, json={"error": {"type": "exceed_context_size_error",
                                                                    "message": "too long"}})
    with pytest.raises(ValueError):
        client.post_json("/tokenize", {"content": "x"})


@responses.activate
def test_malformed_json_is_a_request_error(client):
    responses.get(URL + "/props", body="{not json")
    with pytest.raises(llamarocm.RequestError, match="malformed JSON"):
        client.props()


@responses.activate
def test_non_json_error_body_is_quoted(client):
    responses.get(URL + "/props", status=502, body="Bad Gateway from somewhere")
    with pytest.raises(llamarocm.RequestError, match="Bad Gateway from somewhere"):
        client.props()


@responses.activate
def test_connection_reset_is_connection_lost(client):
    responses.get(URL + "/props", body=requests.ConnectionError("Connection reset by peer"))
    with pytest.raises(ConnectionLostError, match="reset"):
        client.props()




# -- an error answer whose body never comes -------------------------------------------

ERROR_HEAD = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\nConnection: close\r\n\r\n"
)


@pytest.fixture
def error_head_server() -> Iterator[dict]:
    """A socket server that answers every request with ERROR_HEAD and a few body bytes,
    then stalls; ``reset=True`` in the dict makes it reset the connection instead."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5.0)
    state = {"url": f"http://127.0.0.1:{listener.getsockname()[1]}", "reset": False}
    done = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(ERROR_HEAD + b'{"error": ')
            if state["reset"]:
                time.sleep(0.05)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            done.wait(5.0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield state
    done.set()
    thread.join(5.0)
    listener.close()


def test_an_error_body_that_stalls_is_a_stream_timeout(error_head_server):
    client = Client(error_head_server["url"])
    stream = client.stream("/completion", {"prompt": "x"}, idle_timeout=0.3)
    try:
        with pytest.raises(llamarocm.StreamTimeoutError, match="0.3 s"):
            stream.open()
    finally:
        stream.close()
        client.close()


def test_an_error_body_cut_short_is_connection_lost(error_head_server):
    error_head_server["reset"] = True
    client = Client(error_head_server["url"])
    stream = client.stream("/completion", {"prompt": "x"}, idle_timeout=5.0)
    try:
        with pytest.raises(ConnectionLostError, match="connection lost"):
            stream.open()
    finally:
        stream.close()
        client.close()


def test_cancel_while_an_error_body_stalls_ends_open_quietly(error_head_server):
    client = Client(error_head_server["url"])
    stream = client.stream("/completion", {"prompt": "x"}, idle_timeout=5.0)
    timer = threading.Timer(0.2, stream.cancel)
    timer.start()
    try:
        started = time.monotonic()
        stream.open()  # returns, raising nothing: the caller cancelled
        assert time.monotonic() - started < 3.0
        assert stream.cancelled
    finally:
        timer.join()
        stream.close()
        client.close()


def test_a_plain_call_that_times_out_is_a_request_timeout_not_a_streams():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    client = Client(f"http://127.0.0.1:{listener.getsockname()[1]}", request_timeout=0.3)
    try:
        with pytest.raises(llamarocm.RequestTimeoutError, match="request_timeout") as info:
            client.post_json("/tokenize", {"content": "x"})
        assert not isinstance(info.value, llamarocm.StreamTimeoutError)
        assert isinstance(info.value, TimeoutError)
    finally:
        client.close()
        listener.close()


def test_connect_checks_its_request_timeout_before_connecting():
    with pytest.raises(ValueError, match="request_timeout"):
        llamarocm.connect(URL, request_timeout=0)
    with pytest.raises(TypeError, match="request_timeout"):
        llamarocm.connect(URL, request_timeout="30")

"""The HTTP client and the stream parsing against mocked responses (no server)."""

from __future__ import annotations

import json

import pytest
import requests
import responses

import llamarocm
from llamarocm.client import Client, ConnectionLost

pytestmark = pytest.mark.timeout(20)

URL = "http://127.0.0.1:9"


@pytest.fixture
def client():
    c = Client(URL, api_key="sekret")
    yield c
    c.close()


def _sse(*objs, done=False) -> bytes:
    parts = [f"data: {json.dumps(o)}\n\n" for o in objs]
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


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
    with pytest.raises(ConnectionLost, match="reset"):
        client.props()



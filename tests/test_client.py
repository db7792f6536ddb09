"""The HTTP client and the stream parsing against mocked responses (no server)."""

from __future__ import annotations

import json

import pytest
import requests
import responses

import llamarocm
from llamarocm.client import Client, ConnectionLost
from llamarocm.model import Model

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
def test_health_states(client):
    responses.get(URL + "/health", json={"status": "ok"})
    assert client.health() == "ok"
    responses.replace(responses.GET, URL + "/health", status=503, json={"error": {"message": "Loading model"}})
    assert client.health() == "loading"
    responses.replace(responses.GET, URL + "/health", body=requests.ConnectionError("refused"))
    assert client.health() is None


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


# -- streams through Model (no server process: crash detection is off) ------------------


@pytest.fixture
def model(client):
    m = Model(client)
    yield m
    m.close()


@responses.activate
def test_completion_stream_yields_tokens_ids_and_metrics(model):
    body = _sse(
        {"content": "Hel", "tokens": [10], "stop": False},
        {"content": "", "tokens": [11], "stop": False},
        {"content": "lo é", "tokens": [12, 13], "stop": False},
        {"content": "", "tokens": [], "stop": True, "stop_type": "limit",
         "timings": {"cache_n": 2, "prompt_n": 3, "prompt_per_second": 100.0, "predicted_per_second": 25.0}},
    )
    responses.post(URL + "/completion", body=body, content_type="text/event-stream")
    stream = model.generate("Hi", max_tokens=4, temperature=0)
    tokens = [(t.text, t.id) for t in stream]
    assert tokens == [("Hel", 10), ("", 11), ("", 12), ("lo é", 13)]
    assert stream.finish_reason == "length"
    m = stream.metrics
    assert (m.prompt_tokens, m.generated_tokens) == (5, 4)
    assert m.decode_tokens_per_second == 25.0 and m.time_to_first_token is not None
    sent = json.loads(responses.calls[0].request.body)
    assert sent["prompt"] == "Hi" and sent["n_predict"] == 4 and sent["temperature"] == 0 and sent["stream"]


@responses.activate
def test_error_event_mid_stream_raises_and_is_recorded(model):
    body = _sse({"content": "a", "tokens": [1], "stop": False})
    body += b'error: {"code": 500, "message": "kv cache full"}\n\n'
    responses.post(URL + "/completion", body=body)
    stream = model.generate("x")
    assert next(stream).text == "a"
    with pytest.raises(llamarocm.RequestError, match="kv cache full"):
        next(stream)
    assert stream.error is model.last_error
    with pytest.raises(StopIteration):
        next(stream)


@responses.activate
def test_error_in_data_payload_raises(model):
    responses.post(URL + "/completion", body=_sse({"error": {"code": 400, "message": "bad grammar"}}))
    with pytest.raises(llamarocm.RequestError, match="bad grammar"):
        model.generate("x").text()


@responses.activate
def test_stream_cut_short_is_an_error_not_a_silent_end(model):
    responses.post(URL + "/completion", body=_sse({"content": "a", "tokens": [1], "stop": False}))
    stream = model.generate("x")
    with pytest.raises(llamarocm.RequestError, match="without finishing"):
        stream.text()


@responses.activate
def test_malformed_event_json(model):
    responses.post(URL + "/completion", body=b"data: {oops\n\n")
    with pytest.raises(llamarocm.RequestError, match="malformed JSON"):
        model.generate("x").text()


@responses.activate
def test_http_error_on_stream_open(model):
    responses.post(URL + "/completion", status=400,
                   json={"error": {"type": "exceed_context_size_error", "message": "prompt too long"}})
    with pytest.raises(llamarocm.ContextLengthError):
        model.generate("x").text()
    assert isinstance(model.last_error, llamarocm.ContextLengthError)


@responses.activate
def test_chat_renders_then_streams_a_completion(model):
    responses.post(URL + "/apply-template", json={"prompt": "<turn>user Hello<turn>model "})
    body = _sse(
        {"content": "Hi", "tokens": [5], "stop": False},
        {"content": " there", "tokens": [6], "stop": False},
        {"content": "", "tokens": [], "stop": True, "stop_type": "eos", "timings": {"prompt_n": 12, "cache_n": 0}},
    )
    responses.post(URL + "/completion", body=body)
    stream = model.chat([{"role": "user", "content": "Hello"}], max_tokens=8)
    assert [(t.text, t.id) for t in stream] == [("Hi", 5), (" there", 6)]
    assert stream.finish_reason == "stop"
    assert stream.metrics.prompt_tokens == 12 and stream.metrics.generated_tokens == 2
    assert json.loads(responses.calls[0].request.body) == {"messages": [{"role": "user", "content": "Hello"}]}
    sent = json.loads(responses.calls[1].request.body)
    assert sent["prompt"] == "<turn>user Hello<turn>model " and sent["n_predict"] == 8


@responses.activate
def test_chat_template_failure_is_typed(model):
    responses.post(URL + "/apply-template", status=500, json={"error": {"message": "template error"}})
    with pytest.raises(llamarocm.RequestError, match="template error"):
        model.chat([{"role": "user", "content": "Hello"}])
    assert isinstance(model.last_error, llamarocm.RequestError)


@pytest.mark.parametrize(
    "messages, error",
    [("hi", TypeError), ([], ValueError), ([{"role": "user"}], TypeError), ([{"content": "x"}], TypeError),
     ([["user", "x"]], TypeError), ({"role": "user", "content": "x"}, TypeError)],
)
def test_chat_rejects_bad_messages(model, messages, error):
    with pytest.raises(error):
        model.chat(messages)


def test_generate_rejects_bad_arguments_before_any_request(model):
    with responses.RequestsMock() as mock:  # any request would fail this test
        with pytest.raises(TypeError):
            model.generate(b"bytes")
        with pytest.raises(TypeError):
            model.generate("x", max_tokenz=3)
        with pytest.raises(ValueError):
            model.generate("x", temperature=-1)
        assert len(mock.calls) == 0


@responses.activate
def test_tokenize_roundtrip_calls(model):
    responses.post(URL + "/tokenize", json={"tokens": [1, 2, 3]})
    responses.post(URL + "/detokenize", json={"content": "abc"})
    assert model.tokenize("abc") == [1, 2, 3]
    assert model.detokenize([1, 2, 3]) == "abc"
    with pytest.raises(TypeError):
        model.detokenize("abc")


@responses.activate
def test_logprobs_fill_tokens(model):
    probs = [{"id": 7, "token": "{", "logprob": -0.5, "top_logprobs": [{"id": 7, "token": "{", "logprob": -0.5},
                                                                       {"id": 8, "token": "[", "logprob": -1.5}]}]
    body = _sse({"content": "{", "tokens": [7], "stop": False, "completion_probabilities": probs},
                {"content": "", "tokens": [], "stop": True, "stop_type": "eos"})
    responses.post(URL + "/completion", body=body)
    (token,) = list(model.generate("x", logprobs=2))
    assert token.logprob == -0.5 and [t.id for t in token.top_logprobs] == [7, 8]
    assert token.top_logprobs[1].text == "[" and token.top_logprobs[1].logprob == -1.5
    assert json.loads(responses.calls[0].request.body)["n_probs"] == 2


@responses.activate
def test_json_output_parses_or_raises_a_typed_error(model):
    done = {"content": "", "tokens": [], "stop": True, "stop_type": "eos"}
    responses.post(URL + "/completion", body=_sse({"content": '{"a": 1}', "tokens": [1]}, done))
    assert model.generate("x", json_schema={"type": "object"}).json() == {"a": 1}
    assert json.loads(responses.calls[0].request.body)["json_schema"] == {"type": "object"}
    cut = dict(done, stop_type="limit")
    responses.replace(responses.POST, URL + "/completion", body=_sse({"content": '{"a": ', "tokens": [1]}, cut))
    with pytest.raises(llamarocm.OutputParseError, match="cut short") as info:
        model.generate("x", max_tokens=3).json()
    assert isinstance(info.value, ValueError)

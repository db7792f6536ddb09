"""Stream parsing and error paths through Model, against a canned local server."""

from __future__ import annotations

import json

import pytest

import llamarocm
from llamarocm.client import Client

pytestmark = pytest.mark.timeout(20)


def _sse(*objs, done=False) -> bytes:
    parts = [f"data: {json.dumps(o)}\n\n" for o in objs]
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


DONE = {"content": "", "tokens": [], "stop": True, "stop_type": "eos"}


@pytest.fixture
def model(canned_model):
    return canned_model


def test_completion_stream_yields_tokens_ids_and_metrics(model, canned):
    canned.stream("/completion", _sse(
        {"content": "Hel", "tokens": [10], "stop": False},
        {"content": "", "tokens": [11], "stop": False},
        {"content": "lo é", "tokens": [12, 13], "stop": False},
        {"content": "", "tokens": [], "stop": True, "stop_type": "limit",
         "timings": {"cache_n": 2, "prompt_n": 3, "prompt_per_second": 100.0, "predicted_per_second": 25.0}},
    ))
    stream = model.generate("Hi", max_tokens=4, temperature=0)
    assert [(t.text, t.id) for t in stream] == [("Hel", 10), ("", 11), ("", 12), ("lo é", 13)]
    assert stream.finish_reason == "length"
    m = stream.metrics
    assert (m.prompt_tokens, m.generated_tokens) == (5, 4)
    assert m.decode_tokens_per_second == 25.0 and m.time_to_first_token is not None
    sent = canned.body(0)
    assert sent["prompt"] == "Hi" and sent["n_predict"] == 4 and sent["temperature"] == 0 and sent["stream"]


def test_error_event_mid_stream_raises_after_earlier_tokens(model, canned):
    body = _sse({"content": "a", "tokens": [1], "stop": False})
    body += b'error: {"code": 500, "message": "kv cache full"}\n\n'
    canned.stream("/completion", body)
    stream = model.generate("x")
    assert next(stream).text == "a"
    with pytest.raises(llamarocm.RequestError, match="kv cache full"):
        next(stream)
    assert stream.error is model.last_error
    with pytest.raises(StopIteration):
        next(stream)


def test_error_in_data_payload_raises(model, canned):
    canned.stream("/completion", _sse({"error": {"code": 400, "message": "bad grammar"}}))
    with pytest.raises(llamarocm.RequestError, match="bad grammar"):
        model.generate("x").text()


def test_stream_cut_short_is_an_error_not_a_silent_end(model, canned):
    canned.stream("/completion", _sse({"content": "a", "tokens": [1], "stop": False}))
    with pytest.raises(llamarocm.RequestError, match="without finishing"):
        model.generate("x").text()


def test_connection_reset_mid_stream(model, canned):
    canned.reset_after("/completion", _sse({"content": "a", "tokens": [1], "stop": False}))
    stream = model.generate("x")
    with pytest.raises(llamarocm.RequestError) as info:
        stream.text()
    assert not isinstance(info.value, llamarocm.ServerCrashedError)  # no process to blame here


def test_malformed_event_json(model, canned):
    canned.stream("/completion", b"data: {oops\n\n")
    with pytest.raises(llamarocm.RequestError, match="malformed JSON"):
        model.generate("x").text()


@pytest.mark.parametrize("status, error", [(400, llamarocm.ContextLengthError), (401, llamarocm.RequestError),
                                           (500, llamarocm.RequestError), (503, llamarocm.RequestError)])
def test_http_error_on_stream_open(model, canned, status, error):
    kind = "exceed_context_size_error" if status == 400 else "server_error"
    canned.json("/completion", {"error": {"type": kind, "message": "nope"}}, status=status)
    with pytest.raises(error) as info:
        model.generate("x").text()
    assert info.value.status == status
    assert model.last_error is info.value


def test_chat_renders_then_streams_a_completion(model, canned):
    canned.json("/apply-template", {"prompt": "<turn>user Hello<turn>model "})
    canned.stream("/completion", _sse(
        {"content": "Hi", "tokens": [5], "stop": False},
        {"content": " there", "tokens": [6], "stop": False},
        dict(DONE, timings={"prompt_n": 12, "cache_n": 0}),
    ))
    stream = model.chat([{"role": "user", "content": "Hello"}], max_tokens=8)
    assert [(t.text, t.id) for t in stream] == [("Hi", 5), (" there", 6)]
    assert stream.finish_reason == "stop"
    assert stream.metrics.prompt_tokens == 12 and stream.metrics.generated_tokens == 2
    assert canned.body(0) == {"messages": [{"role": "user", "content": "Hello"}]}
    assert canned.body(1)["prompt"] == "<turn>user Hello<turn>model " and canned.body(1)["n_predict"] == 8


def test_text_is_the_whole_text_however_much_was_read_before(model, canned):
    """As with reasoning_text() (and openai's stream helpers), text() returns all of the
    text, not only what the caller's own loop left unread; and again when called twice."""
    canned.json("/apply-template", {"prompt": "<turn>user Hello<turn>model "})
    canned.stream("/completion", _sse(
        {"content": "<think>hm", "tokens": [1], "stop": False},
        {"content": "</think>Hi", "tokens": [2], "stop": False},
        {"content": " there", "tokens": [3], "stop": False},
        {"content": "!", "tokens": [4], "stop": False},
        DONE,
    ))
    read = model.generate("x")
    assert next(read).text == "<think>hm"
    assert read.text() == "<think>hm</think>Hi there!"
    assert read.text() == "<think>hm</think>Hi there!"
    looped = model.generate("x")
    assert "".join(t.text for t in looped) == looped.text() == "<think>hm</think>Hi there!"
    split = model.chat([{"role": "user", "content": "Hello"}], reasoning=True)
    first = [next(split) for _ in range(3)]
    assert [t.reasoning for t in first] == [True, False, False]
    assert split.text() == "Hi there!" and split.reasoning_text() == "hm"
    ahead = model.chat([{"role": "user", "content": "Hello"}], reasoning=True)
    assert ahead.reasoning_text() == "hm" and ahead.text() == "Hi there!" and ahead.text() == "Hi there!"


def test_chat_template_failure_is_typed(model, canned):
    canned.json("/apply-template", {"error": {"message": "template error"}}, status=500)
    with pytest.raises(llamarocm.RequestError, match="template error"):
        model.chat([{"role": "user", "content": "Hello"}])
    assert isinstance(model.last_error, llamarocm.RequestError)


@pytest.mark.parametrize(
    "messages, error",
    [("hi", TypeError), ([], ValueError), ([{"role": "user"}], TypeError), ([{"content": "x"}], TypeError),
     ([["user", "x"]], TypeError), ({"role": "user", "content": "x"}, TypeError),
     ([{"role": "user", "content": "x", "weight": float("nan")}], ValueError)],
)
def test_chat_rejects_bad_messages(model, canned, messages, error):
    with pytest.raises(error):
        model.chat(messages)
    assert canned.requests == []


def test_bad_arguments_send_nothing(model, canned):
    with pytest.raises(TypeError):
        model.generate(b"bytes")
    with pytest.raises(TypeError):
        model.generate("x", max_tokenz=3)
    with pytest.raises(ValueError):
        model.generate("x", temperature=-1)
    with pytest.raises(ValueError):
        model.generate("x", extra={"mirostat_tau": float("nan")})
    with pytest.raises(ValueError, match="stream"):
        model.generate("x", extra={"stream": False})
    assert canned.requests == []


def test_tokenize_roundtrip_calls(model, canned):
    canned.json("/tokenize", {"tokens": [1, 2, 3]})
    canned.json("/detokenize", {"content": "abc"})
    assert model.tokenize("abc") == [1, 2, 3]
    assert model.detokenize([1, 2, 3]) == "abc"
    with pytest.raises(TypeError):
        model.detokenize("abc")


def test_logprobs_fill_tokens(model, canned):
    probs = [{"id": 7, "token": "{", "logprob": -0.5, "top_logprobs": [{"id": 7, "token": "{", "logprob": -0.5},
                                                                       {"id": 8, "token": "[", "logprob": -1.5}]}]
    canned.stream("/completion", _sse({"content": "{", "tokens": [7], "stop": False,
                                       "completion_probabilities": probs}, DONE))
    (token,) = list(model.generate("x", logprobs=2))
    assert token.logprob == -0.5 and [t.id for t in token.top_logprobs] == [7, 8]
    assert token.top_logprobs[1].text == "[" and token.top_logprobs[1].logprob == -1.5
    assert canned.body(0)["n_probs"] == 2


def test_json_output_parses_or_raises_a_typed_error(model, canned):
    canned.stream("/completion", _sse({"content": '{"a": 1}', "tokens": [1]}, DONE))
    assert model.generate("x", json_schema={"type": "object"}).json() == {"a": 1}
    assert canned.body(0)["json_schema"] == {"type": "object"}
    canned.stream("/completion", _sse({"content": '{"a": ', "tokens": [1]}, dict(DONE, stop_type="limit")))
    with pytest.raises(llamarocm.OutputParseError, match="cut short") as info:
        model.generate("x", max_tokens=3).json()
    assert isinstance(info.value, ValueError)


def test_key_is_sent_on_streams(model, canned):
    canned.stream("/completion", _sse(DONE))
    model.generate("x").text()
    # The canned server records bodies only; a wrong header would show in the real
    # server's 401 (tests/test_integration.py). Here: the request arrived at all.
    assert canned.requests[0][0] == "/completion"


def test_health_states(canned):
    client = Client(canned.url)
    canned.json("/health", {"status": "ok"})
    assert client.health() == "ok"
    canned.json("/health", {"error": {"message": "Loading model"}}, status=503)
    assert client.health() == "loading"
    canned.json("/health", {}, status=500)
    assert client.health() == "http 500"
    canned.close()
    assert client.health(timeout=1.0) is None  # nothing listens any more


def test_reprs_are_readable_and_never_show_the_key(model, canned):
    canned.stream("/completion", _sse({"content": "Hi", "tokens": [1], "stop": False}, DONE))
    stream = model.generate("x")
    assert repr(stream).startswith("<TokenStream ")
    stream.text()
    assert repr(stream) == "<TokenStream finished: stop, 1 tokens received>"
    assert repr(model).startswith("<Model ") and "attached to" in repr(model)
    results = model.map(["x" * 100])
    assert repr(results[0]).startswith("<BatchResult 'xxx") and "…" in repr(results[0])
    for text in (repr(stream), repr(model), repr(results[0])):
        assert "Bearer" not in text and "api_key" not in text
    model.close()
    assert "closed" in repr(model)

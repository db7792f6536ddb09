"""Structured output, log-probabilities, batches, embeddings, attaching and restarting,
on the real llama-server with Gemma 3 270M."""

from __future__ import annotations

import math
import os
import signal

import pytest

import llamarocm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GREEDY = {"temperature": 0.0, "top_k": 1}

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_fits(shared_model):
    stream = shared_model.generate("A person, as JSON:", json_schema=PERSON, max_tokens=64, **GREEDY)
    person = stream.json()
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 20
    assert isinstance(person["age"], int) and person["age"] >= 0


def test_grammar_constrains_output(shared_model):
    text = shared_model.generate("Answer yes or no:", grammar='root ::= "yes" | "no"', max_tokens=4).text()
    assert text in ("yes", "no")


def test_cut_json_raises_output_parse_error(shared_model):
    with pytest.raises(llamarocm.OutputParseError, match="cut short"):
        shared_model.generate("A person, as JSON:", json_schema=PERSON, max_tokens=3, **GREEDY).json()


def test_logprobs_fill_tokens(shared_model):
    tokens = list(shared_model.generate("The capital of France is", max_tokens=4, logprobs=3, **GREEDY))
    assert tokens
    for token in tokens:
        assert token.logprob is not None and token.logprob <= 0
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely alternative.
        assert token.top_logprobs[0].id == token.id
        assert math.isclose(token.top_logprobs[0].logprob, token.logprob, abs_tol=1e-4)


def test_map_keeps_order_and_records_errors(shared_model):
    prompts = [f"{n}, {n + 1}, {n + 2}," for n in (1, 20, 300)] + ["word " * 3000]
    seen = []
    results = shared_model.map(prompts, max_tokens=6, progress=lambda done, total: seen.append((done, total)), **GREEDY)
    assert [r.prompt for r in results] == prompts
    assert all(r.ok and r.text for r in results[:3])
    assert results[0].text == shared_model.generate(prompts[0], max_tokens=6, **GREEDY).text()
    assert isinstance(results[3].error, llamarocm.ContextLengthError) and results[3].text is None
    assert seen[-1] == (4, 4) and len(seen) == 4


def test_map_fail_fast_raises_the_error(shared_model):
    with pytest.raises(llamarocm.ContextLengthError):
        shared_model.map(["word " * 3000, "1, 2, 3,"], max_tokens=4, fail_fast=True)


def test_map_refuses_bad_input_before_running(shared_model):
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        shared_model.map(["ok", 5])
    with pytest.raises(ValueError):
        shared_model.map(["ok"], max_workers=0)
    with pytest.raises(TypeError):
        shared_model.map(["ok"], max_tokenz=2)


def test_embeddings(model_path, server_binary):
    with llamarocm.load_model(model_path, context_length=256, server_path=server_binary, embeddings=True) as model:
        cat, kitten, tax = model.embed(["The cat sat on the mat.", "A kitten sat on a rug.", "Quarterly tax filing"])
        assert len(cat) == llamarocm.read_metadata(model_path).embedding_length == 640

        def cosine(a, b):
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

        assert cosine(cat, kitten) > cosine(cat, tax)
        # Completions keep working beside embeddings.
        assert model.generate("Hello", max_tokens=2, **GREEDY).text() is not None
    with pytest.raises(ValueError):
        llamarocm.load_model(model_path, pooling="mean")


def test_embed_needs_embeddings(shared_model):
    with pytest.raises(ValueError, match="embeddings=True"):
        shared_model.embed(["x"])


def test_connect_attaches_without_owning(shared_model):
    server = shared_model.server
    attached = llamarocm.connect(server.url, api_key=server.api_key)
    with attached:
        assert attached.server is None
        assert attached.info.path.endswith(".gguf") and attached.parallel == 4
        assert attached.generate("1, 2, 3,", max_tokens=4, **GREEDY).text() == \
            shared_model.generate("1, 2, 3,", max_tokens=4, **GREEDY).text()
        with pytest.raises(llamarocm.LlamaRocmError, match="did not start"):
            attached.restart()
    assert server.alive(), "closing an attached model must not stop the server"
    with pytest.raises(llamarocm.RequestError):
        llamarocm.connect(server.url, api_key="wrong")
    with pytest.raises(llamarocm.RequestError, match="no ready llama-server"):
        llamarocm.connect("http://127.0.0.1:9")


def test_restart_after_a_crash(model_path, server_binary):
    with llamarocm.load_model(model_path, context_length=256, server_path=server_binary) as model:
        old_pid = model.server.pid
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(llamarocm.ServerCrashedError):
            model.generate("Hi", max_tokens=2).text()
        model.restart()
        assert model.server.pid != old_pid and model.server.alive()
        assert model.generate("1, 2, 3,", max_tokens=3, **GREEDY).text()


def test_requests_and_server_output_are_logged_at_debug_without_prompts_or_key(shared_model, caplog):
    import logging

    prompt = "Zebras-and-ladders 1, 2, 3,"
    with caplog.at_level(logging.DEBUG, logger="llamarocm"):
        shared_model.generate(prompt, max_tokens=2, temperature=0.0).text()
        shared_model.tokenize("hello")
        # The server logs the request's end a moment after the stream's final event.
        shared_model.client.slots()
    http = [r.getMessage() for r in caplog.records if r.name == "llamarocm.http"]
    assert any(m.startswith("POST /completion -> 200") for m in http), http
    assert any(m.startswith("POST /tokenize -> 200") for m in http), http
    server_lines = [r for r in caplog.records if r.name == "llamarocm.server"]
    assert server_lines and all(r.levelno == logging.DEBUG for r in server_lines)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "Zebras" not in everything
    assert shared_model.server.api_key not in everything

"""Several tool calls in one reply (``chat(..., parallel_tool_calls=True)``), on both
paths: llama-server's own (asked for them) and the constrained one (a list of calls
generated under a schema). Without it a reply makes one call at most, as before.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

import llamarocm
from llamarocm.tools import CALL_TAG, ToolCall, ToolRequest

pytestmark = pytest.mark.timeout(120)

# Greedy, with a repeat penalty: greedy alone, the embedded base model lists the same
# call again and again until max_tokens (a model's habit, not the schema's).
GREEDY = {"temperature": 0.0, "top_k": 1, "repeat_penalty": 1.3}
TOOL_CAPS = {"chat_template_caps": {"supports_tools": True, "supports_tool_calls": True}}
ASK = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]


def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: The city's name.
    """
    return f"Sunny in {city}"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TWO_CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'


def test_the_parallel_call_schema_is_a_list_of_one_or_more_calls():
    one = ToolRequest.build([get_weather, add], None).call_schema()
    many = ToolRequest.build([get_weather, add], None, parallel=True).call_schema()
    assert many == {"type": "array", "items": one, "minItems": 1}


def test_parallel_calls_parse_as_a_list_and_anything_else_is_refused():
    request = ToolRequest.build([get_weather, add], "required", parallel=True)
    calls = request.parse_calls(TWO_CALLS)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in calls}) == 2
    bad = ("[]", '{"name": "add", "arguments": {"a": 1, "b": 2}}', '[{"name": "nope", "arguments": {}}]', "[1]", "[")
    for text in bad:
        with pytest.raises(llamarocm.OutputParseError):
            request.parse_calls(text)
    # Without parallel, one call, written as an object, as before.
    (call,) = ToolRequest.build([add], None).parse_calls('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert call.arguments == {"a": 1, "b": 2}


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_the_instructions_ask_for_a_list_only_when_parallel(choice):
    single = ToolRequest.build([add], choice).instructions()
    several = ToolRequest.build([add], choice, parallel=True).instructions()
    assert "[" not in single.split("\n")[0]
    assert CALL_TAG + '[{"name"' in several.split("\n")[0] and "one or more" in several


def test_earlier_calls_are_written_as_a_parallel_request_asks_for_them():
    calls = [ToolCall("c1", "get_weather", {"city": "Paris"}), ToolCall("c2", "add", {"a": 1, "b": 2})]
    turn = {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in calls]}
    objects = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]
    several = ToolRequest.build([get_weather, add], None, parallel=True).plain_messages([turn])
    assert several[1]["content"] == CALL_TAG + json.dumps(objects)
    single = ToolRequest.build([get_weather, add], None).plain_messages([turn])
    assert single[1]["content"] == "".join(CALL_TAG + json.dumps(o) for o in objects)


@pytest.mark.parametrize(
    "settings, error, words",
    [
        ({"tools": [add], "parallel_tool_calls": "yes"}, TypeError, "parallel_tool_calls must be a bool"),
        ({"tools": [add], "parallel_tool_calls": 1}, TypeError, "parallel_tool_calls must be a bool"),
        ({"parallel_tool_calls": True}, ValueError, "parallel_tool_calls needs tools"),
    ],
)
def test_bad_parallel_tool_calls_fail_before_anything_is_sent(canned, canned_model, settings, error, words):
    with pytest.raises(error, match=words):
        canned_model.chat(ASK, **settings)
    assert canned.requests == []


def _chunk(delta: Dict[str, Any] = None, finish: str = None) -> bytes:
    obj = {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _two_weather_calls() -> bytes:
    def call(index: int, id: str, city: str) -> Dict[str, Any]:
        return {"index": index, "id": id, "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}

    return (
        _chunk({"tool_calls": [call(0, "A", "Paris")]})
        + _chunk({"tool_calls": [call(1, "B", "Rome")]})
        + _chunk(finish="tool_calls")
        + b"data: [DONE]\n\n"
    )


@pytest.mark.parametrize("parallel", [True, False])
def test_the_server_path_asks_the_server_for_parallel_calls_only_when_asked(canned, canned_model, parallel):
    canned.json("/props", TOOL_CAPS)
    canned.stream("/v1/chat/completions", _two_weather_calls())
    stream = canned_model.chat(ASK, tools=[get_weather], parallel_tool_calls=parallel)
    assert stream.text() == "" and stream.finish_reason == "tool_calls"
    assert [c.arguments["city"] for c in stream.tool_calls] == ["Paris", "Rome"]
    sent = [body for path, body in canned.requests if path == "/v1/chat/completions"][0]
    # Sent either way: a recent llama-server's own default follows the template's caps.
    assert sent["parallel_tool_calls"] is parallel


def test_a_session_records_every_call_of_a_reply(canned, canned_model):
    canned.json("/props", TOOL_CAPS)
    canned.stream("/v1/chat/completions", _two_weather_calls())
    session = canned_model.session()
    session.send("Weather?", tools=[get_weather], parallel_tool_calls=True).text()
    assert [c["id"] for c in session.messages[-1]["tool_calls"]] == ["A", "B"]
    sent = [body for path, body in canned.requests if path == "/v1/chat/completions"][0]
    assert sent["parallel_tool_calls"] is True


def test_the_constrained_path_makes_several_calls_in_one_reply(canned, canned_model):
    canned.json("/props", {"chat_template_caps": {}})
    canned.json("/apply-template", {"prompt": "PROMPT"})
    event = {"content": TWO_CALLS, "tokens": [1, 2], "stop": True, "stop_type": "eos"}
    canned.stream("/completion", b"data: " + json.dumps(event).encode() + b"\n\n")
    stream = canned_model.chat(ASK, tools=[get_weather, add], tool_choice="required", parallel_tool_calls=True)
    assert stream.text() == "" and stream.finish_reason == "tool_calls"
    assert [c.name for c in stream.tool_calls] == ["get_weather", "add"]
    sent = [body for path, body in canned.requests if path == "/completion"][0]
    assert sent["json_schema"]["type"] == "array" and sent["json_schema"]["minItems"] == 1
    rendered = [body for path, body in canned.requests if path == "/apply-template"][0]
    assert "one or more" in rendered["messages"][0]["content"]


def test_auto_on_the_constrained_path_continues_with_a_list_of_calls(canned, canned_model):
    canned.json("/props", {"chat_template_caps": {}})
    canned.json("/apply-template", {"prompt": "PROMPT"})
    first = {"content": "Let me see.", "tokens": [1], "stop": True, "stop_type": "word", "stopping_word": CALL_TAG}
    second = {"content": TWO_CALLS, "tokens": [2, 3], "stop": True, "stop_type": "eos"}
    answers = iter([first, second])

    class Answering(list):
        """The request log, which also gives each /completion request the next answer."""

        def append(self, item):
            super().append(item)
            if item[0] == "/completion":
                canned.stream("/completion", b"data: " + json.dumps(next(answers)).encode() + b"\n\n")

    canned.requests = Answering(canned.requests)
    stream = canned_model.chat(ASK, tools=[get_weather, add], parallel_tool_calls=True, max_tokens=50)
    assert stream.text() == "Let me see." and stream.finish_reason == "tool_calls"
    assert [c.name for c in stream.tool_calls] == ["get_weather", "add"]
    bodies = [body for path, body in canned.requests if path == "/completion"]
    assert "json_schema" not in bodies[0]
    assert bodies[1]["prompt"] == "PROMPT" + "Let me see." + CALL_TAG and bodies[1]["json_schema"]["type"] == "array"


@pytest.mark.integration
def test_several_calls_on_the_real_server_constrained_path(shared_model):
    stream = shared_model.chat(
        ASK, tools=[get_weather, add], tool_choice="required", parallel_tool_calls=True, max_tokens=200, **GREEDY
    )
    text = stream.text()
    assert stream.finish_reason == "tool_calls", (text, stream.finish_reason)
    assert stream.tool_calls and len({c.id for c in stream.tool_calls}) == len(stream.tool_calls)
    for call in stream.tool_calls:
        if call.name == "get_weather":
            assert set(call.arguments) == {"city"} and isinstance(call.arguments["city"], str)
        else:
            assert call.name == "add" and set(call.arguments) == {"a", "b"}
            assert all(isinstance(v, int) for v in call.arguments.values())


@pytest.mark.integration
def test_act_answers_every_call_of_a_reply(shared_model):
    result = shared_model.act(
        ASK, [get_weather, add], tool_choice="required", max_rounds=2,
        parallel_tool_calls=True, max_tokens=200, **GREEDY,
    )
    first = next(i for i, m in enumerate(result.messages) if m.get("tool_calls"))
    ids = [call["id"] for call in result.messages[first]["tool_calls"]]
    answers = result.messages[first + 1 : first + 1 + len(ids)]
    assert [(a["role"], a["tool_call_id"]) for a in answers] == [("tool", i) for i in ids]


# -- the command line: chat --tools --parallel-tool-calls -----------------------------


def test_parallel_tool_calls_without_tools_is_a_usage_error_before_anything_loads(monkeypatch, capsys):
    from llamarocm.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("a usage error must be reported before anything starts")

    monkeypatch.setattr("llamarocm.load_model", refuse)
    monkeypatch.setattr("llamarocm.cli.options.default_model_path", refuse)
    with pytest.raises(SystemExit) as info:
        main(["chat", "--parallel-tool-calls"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--parallel-tool-calls needs --tools" in err


def test_chat_with_parallel_tool_calls_asks_for_them_every_round(canned, canned_model, monkeypatch, capsys, tmp_path):
    from llamarocm.cli import main

    (tmp_path / "parallel_tools_for_test.py").write_text(
        "def get_weather(city: str) -> str:\n    '''The weather in a city.'''\n    return 'sunny in ' + city\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    canned.json("/props", TOOL_CAPS)
    canned.stream("/v1/chat/completions", _two_weather_calls())
    monkeypatch.setattr("llamarocm.cli.chat.load", lambda args: canned_model)
    lines = iter(["Weather in Paris and Rome?"])
    monkeypatch.setattr("builtins.input", lambda prompt="": _line(lines))
    assert main(["chat", "--tools", "parallel_tools_for_test:get_weather", "--parallel-tool-calls"]) == 0
    out = capsys.readouterr().out
    assert "[get_weather -> sunny in Paris]" in out and "[get_weather -> sunny in Rome]" in out
    bodies = [body for path, body in canned.requests if path == "/v1/chat/completions"]
    assert bodies and all(body["parallel_tool_calls"] is True for body in bodies)


def _line(lines):
    """The next line typed, then the end of input."""
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None

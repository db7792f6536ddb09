"""Tool calling: schemas from functions, checks of tools and tool_choice, and calls made
on the real server on both paths (the constrained one with the embedded model's
built-in template, and llama-server's own with a Jinja template that renders tools).
"""

from __future__ import annotations

import enum
import json
import typing
from typing import Any, Dict, List, Literal, Optional

import pytest

import llamarocm
from llamarocm.tool_schema import function_schema, type_schema
from llamarocm.tools import CALL_TAG, ToolCall, ToolRequest, check_tool_choice, check_tools

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0.0, "top_k": 1}


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: str, unit: Unit = Unit.CELSIUS) -> str:
    """The weather in a city.

    Args:
        city: The city's name.
        unit: The temperature unit.
    """
    return f"Sunny, 21 degrees {unit.value} in {city}"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


WEATHER_DICT = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# -- schemas from functions ------------------------------------------------------------


def test_function_schema_covers_the_json_types_and_defaults():
    def f(
        text: str,
        count: int,
        ratio: float,
        flag: bool,
        nothing: None,
        maybe: Optional[int],
        either: "int | str",
        names: List[str],
        table: Dict[str, float],
        mode: Literal["fast", "slow"] = "fast",
        unit: Unit = Unit.FAHRENHEIT,
        anything: Any = None,
    ) -> None:
        """Summary line.

        More text.
        """

    name, description, schema = function_schema(f)
    props = schema["properties"]
    assert name == "f" and description == "Summary line."
    assert props["text"] == {"type": "string"}
    assert props["count"] == {"type": "integer"} and props["ratio"] == {"type": "number"}
    assert props["flag"] == {"type": "boolean"} and props["nothing"] == {"type": "null"}
    assert props["maybe"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert props["either"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert props["names"] == {"type": "array", "items": {"type": "string"}}
    assert props["table"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["mode"] == {"enum": ["fast", "slow"], "default": "fast"}
    assert props["unit"] == {"enum": ["celsius", "fahrenheit"], "default": "fahrenheit"}
    assert props["anything"] == {"default": None}
    assert schema["required"] == ["text", "count", "ratio", "flag", "nothing", "maybe", "either", "names", "table"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False


def test_function_schema_reads_parameter_descriptions_in_three_styles():
    def google(city: str, days: int = 1) -> None:
        """Forecast.

        Args:
            city: The city.
            days (int): How many
                days ahead.

        Returns:
            nothing
        """

    def sphinx(city: str) -> None:
        """Forecast.

        :param city: The city.
        """

    def numpy(city: str) -> None:
        """Forecast.

        Parameters
        ----------
        city : str
            The city.
        """

    assert function_schema(google)[2]["properties"]["days"]["description"] == "How many days ahead."
    assert function_schema(google)[2]["properties"]["city"]["description"] == "The city."
    assert "returns" not in function_schema(google)[2]["properties"]
    for fn in (sphinx, numpy):
        assert function_schema(fn)[2]["properties"]["city"]["description"] == "The city.", fn.__name__


@pytest.mark.parametrize(
    "hint, words",
    [
        (object, "object"),
        (Dict[int, str], "keys must be str"),
        (typing.Callable[[], int], "no JSON form"),
        (set, "set"),
    ],
)
def test_a_type_json_cannot_express_is_a_type_error_naming_the_parameter(hint, words):
    def f(value):  # the hint is set below, as a module-level def would have it
        pass

    f.__annotations__ = {"value": hint}
    with pytest.raises(TypeError, match="parameter 'value'") as info:
        function_schema(f)
    assert words in str(info.value)


def test_functions_that_cannot_be_tools_are_refused_clearly():
    def unhinted(x):
        pass

    def star(*args: int) -> None:
        pass

    def positional(x: int, /) -> None:
        pass

    with pytest.raises(TypeError, match="needs a type hint"):
        function_schema(unhinted)
    def keywords(**kw: int) -> None:
        pass

    with pytest.raises(TypeError, match=r"tool star: \*args has no JSON schema"):
        function_schema(star)
    with pytest.raises(TypeError, match=r"tool keywords: \*\*kw has no JSON schema"):
        function_schema(keywords)
    with pytest.raises(TypeError, match="positional-only"):
        function_schema(positional)
    with pytest.raises(TypeError, match="lambda"):
        check_tools([lambda x: x])


def test_type_schema_of_tuples():
    assert type_schema(typing.Tuple[int, ...]) == {"type": "array", "items": {"type": "integer"}}
    assert type_schema(tuple[int, str])["prefixItems"] == [{"type": "integer"}, {"type": "string"}]


# -- tools and tool_choice checked ---------------------------------------------------


@pytest.mark.parametrize(
    "tools, error, words",
    [
        ("get_weather", TypeError, "list of functions"),
        ([], ValueError, "must not be empty"),
        ([42], TypeError, "tools\\[0\\]"),
        ([{"name": "x"}], ValueError, '"type": "function"'),
        ([{"type": "function", "function": {"name": "bad name!"}}], ValueError, "must match"),
        ([{"type": "function", "function": {"name": 3}}], TypeError, "name'\\] must be a str"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], TypeError, "JSON schema dict"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], ValueError, "object"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}],
            ValueError,
            "properties",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "a"}}}],
            ValueError,
            "required",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["a"]}}}],
            ValueError,
            "not in its properties",
        ),
        ([get_weather, WEATHER_DICT], ValueError, "two tools are named 'get_weather'"),
    ],
)
def test_bad_tools_are_refused_with_a_clear_error(tools, error, words):
    with pytest.raises(error, match=words):
        check_tools(tools)


def test_tool_dicts_and_functions_mix():
    tools = check_tools([WEATHER_DICT, add])
    assert [t.name for t in tools] == ["get_weather", "add"]
    assert tools[0].function is None and tools[1].function is add
    assert tools[1].to_openai()["function"]["parameters"]["required"] == ["a", "b"]


def test_tool_choice_forms():
    tools = check_tools([get_weather, add])
    assert check_tool_choice(None, tools) == ("auto", None)
    for mode in ("auto", "required", "none"):
        assert check_tool_choice(mode, tools) == (mode, None)
    assert check_tool_choice({"name": "add"}, tools) == ("named", "add")
    assert check_tool_choice({"type": "function", "function": {"name": "add"}}, tools) == ("named", "add")
    with pytest.raises(ValueError, match="not among the tools"):
        check_tool_choice({"name": "nope"}, tools)
    with pytest.raises(ValueError, match="auto"):
        check_tool_choice("always", tools)
    with pytest.raises(TypeError):
        check_tool_choice(3, tools)
    with pytest.raises(ValueError, match="needs tools"):
        ToolRequest.build(None, "required")


def test_the_call_schema_names_one_offered_tool_with_its_arguments():
    request = ToolRequest.build([get_weather, add], None)
    options = request.call_schema()["anyOf"]
    assert [o["properties"]["name"] for o in options] == [{"const": "get_weather"}, {"const": "add"}]
    assert options[1]["properties"]["arguments"]["required"] == ["a", "b"]
    named = ToolRequest.build([get_weather, add], {"name": "add"})
    assert named.call_schema()["properties"]["name"] == {"const": "add"} and named.forced
    assert ToolRequest.build([get_weather], "none").offered == ()


def test_plain_messages_write_calls_and_results_as_the_model_writes_them():
    request = ToolRequest.build([get_weather], None)
    call = ToolCall("c1", "get_weather", {"city": "Paris"})
    plain = request.plain_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )
    assert plain[0]["content"].startswith("Be brief.\n\n") and "get_weather" in plain[0]["content"]
    written = CALL_TAG + '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert plain[2] == {"role": "assistant", "content": written}
    assert plain[3] == {"role": "user", "content": "<tool_response>sunny</tool_response>"}
    alone = request.plain_messages([{"role": "user", "content": "x"}])
    assert alone[0]["role"] == "system" and alone[1] == {"role": "user", "content": "x"}


def test_parse_call_refuses_what_is_not_a_call_of_an_offered_tool():
    request = ToolRequest.build([get_weather], None)
    (call,) = request.parse_calls('{"name": "get_weather", "arguments": {"city": "Rome"}}')
    assert call.arguments == {"city": "Rome"}
    bad = ('{"name": "get_weather"', '{"name": "add", "arguments": {}}', '{"name": "get_weather", "arguments": 1}')
    for text in bad:
        with pytest.raises(llamarocm.OutputParseError):
            request.parse_calls(text)


def test_tool_call_to_openai_round_trips_the_arguments():
    call = ToolCall("c9", "add", {"a": 1, "b": 2})
    entry = call.to_openai()
    assert entry["type"] == "function" and entry["id"] == "c9"
    assert json.loads(entry["function"]["arguments"]) == {"a": 1, "b": 2}


# -- the server path's stream, on canned answers --------------------------------------


def _chunk(delta=None, finish=None, timings=None) -> bytes:
    obj: Dict[str, Any] = {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if timings:
        obj["timings"] = timings
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


TOOL_CAPS = {"chat_template_caps": {"supports_tools": True, "supports_tool_calls": True}}


def test_server_path_joins_tool_call_deltas(canned, canned_model):
    canned.json("/props", TOOL_CAPS)
    canned.stream(
        "/v1/chat/completions",
        _chunk({"role": "assistant", "content": "Let me look."})
        + _chunk({"tool_calls": [{"index": 0, "id": "X1", "function": {"name": "get_weather", "arguments": '{"ci'}}]})
        + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "ty\": \"Rome\"}"}}]})
        + _chunk({"tool_calls": [{"index": 1, "id": "X2", "function": {"name": "add", "arguments": '{"a": 1,'}}]})
        + _chunk({"tool_calls": [{"index": 1, "function": {"arguments": ' "b": 2}'}}]})
        + _chunk(finish="tool_calls", timings={"prompt_n": 5, "cache_n": 2, "predicted_per_second": 9.0})
        + b"data: [DONE]\n\n",
    )
    stream = canned_model.chat(
        [{"role": "user", "content": "Rome?"}], tools=[get_weather, add], tool_choice={"name": "add"}, max_tokens=9
    )
    assert stream.text() == "Let me look."
    assert stream.tool_calls == (
        ToolCall("X1", "get_weather", {"city": "Rome"}),
        ToolCall("X2", "add", {"a": 1, "b": 2}),
    )
    assert stream.finish_reason == "tool_calls"
    assert stream.metrics.prompt_tokens == 7
    sent = [body for path, body in canned.requests if path == "/v1/chat/completions"][0]
    # A named choice goes as "required" with that tool alone: the server reads strings only.
    assert sent["tool_choice"] == "required" and [t["function"]["name"] for t in sent["tools"]] == ["add"]
    assert sent["max_tokens"] == 9 and sent["stream"] is True


def test_server_path_drops_a_call_cut_short(canned, canned_model):
    canned.json("/props", TOOL_CAPS)
    canned.stream(
        "/v1/chat/completions",
        _chunk({"tool_calls": [{"index": 0, "id": "X1", "function": {"name": "add", "arguments": "{\"a\": 1"}}]})
        + _chunk(finish="length")
        + b"data: [DONE]\n\n",
    )
    stream = canned_model.chat([{"role": "user", "content": "1+2?"}], tools=[add])
    assert stream.text() == "" and stream.tool_calls == () and stream.finish_reason == "length"


def _event(content: str, stop: bool = False, **final: Any) -> bytes:
    obj = {"content": content, "tokens": [1] if content else [], "stop": stop, **final}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_constrained_auto_path_continues_with_the_call_in_a_second_request(canned, canned_model):
    """The model opens a call (the stop string): the same text plus the tag is sent
    again, constrained by the call's schema; the call's JSON is not yielded."""
    canned.json("/props", {"chat_template_caps": {}})
    canned.json("/apply-template", {"prompt": "PROMPT"})
    first = _event("I will ") + _event("check.") + _event("", True, stop_type="word", stopping_word=CALL_TAG)
    second = _event('{"name": "add", ') + _event('"arguments": {"a": 1, "b": 2}}') + _event("", True, stop_type="eos")
    answers = iter([first, second])

    class Answering(list):
        """The request log, which also gives each /completion request the next answer."""

        def append(self, item):
            super().append(item)
            if item[0] == "/completion":
                canned.stream("/completion", next(answers))

    canned.requests = Answering(canned.requests)
    stream = canned_model.chat([{"role": "user", "content": "1+2?"}], tools=[add], max_tokens=50, stop=["END"])
    assert stream.text() == "I will check."
    assert stream.finish_reason == "tool_calls"
    (call,) = stream.tool_calls
    assert (call.name, call.arguments) == ("add", {"a": 1, "b": 2}) and call.id.startswith("call_")
    assert stream.metrics.generated_tokens == 2  # the text's tokens only
    bodies_sent = [body for path, body in canned.requests if path == "/completion"]
    assert bodies_sent[0]["stop"] == ["END", CALL_TAG] and "json_schema" not in bodies_sent[0]
    assert bodies_sent[1]["prompt"] == "PROMPT" + "I will check." + CALL_TAG
    assert bodies_sent[1]["json_schema"]["properties"]["name"] == {"const": "add"}
    assert bodies_sent[1]["n_predict"] == 48 and "stop" not in bodies_sent[1]


# -- the real server: the constrained path (built-in template) --------------------------


def test_close_during_the_second_request_cancels_it(canned, canned_model):
    import threading

    canned.json("/props", {"chat_template_caps": {}})
    canned.json("/apply-template", {"prompt": "PROMPT"})
    second_sent = threading.Event()

    class Answering(list):
        """The request log; it also sets the answer of each /completion request."""

        def append(self, item):
            super().append(item)
            if item[0] == "/completion" and sum(1 for path, _ in self if path == "/completion") == 1:
                canned.stream("/completion", _event("Hm.") + _event("", True, stop_type="word", stopping_word=CALL_TAG))
            elif item[0] == "/completion":
                canned.hang_after("/completion", _event('{"name": "add", '))  # then silence
                second_sent.set()

    canned.requests = Answering(canned.requests)
    stream = canned_model.chat([{"role": "user", "content": "1+2?"}], tools=[add], timeout=30)
    assert next(iter(stream)).text == "Hm."
    assert second_sent.wait(10)
    stream.close()  # must cut the second request, which would otherwise hang for 30 s
    assert stream._state.done.is_set()
    assert stream.finish_reason == "cancelled" and stream.tool_calls == ()


def _assert_weather_call(call: ToolCall) -> None:
    assert call.name == "get_weather"
    assert isinstance(call.arguments.get("city"), str)
    assert set(call.arguments) <= {"city", "unit"}
    assert call.arguments.get("unit", "celsius") in ("celsius", "fahrenheit")


@pytest.mark.integration
def test_required_tool_choice_makes_a_well_formed_call(shared_model):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [get_weather, add]
    with shared_model.chat(messages, tools=tools, tool_choice="required", max_tokens=60, **GREEDY) as stream:
        text = stream.text()
    assert stream.finish_reason == "tool_calls", (text, stream.finish_reason)
    assert text == "" and stream.metrics.generated_tokens == 0  # the call is not text
    (call,) = stream.tool_calls
    assert call.name in ("get_weather", "add")
    if call.name == "add":
        assert set(call.arguments) == {"a", "b"} and all(isinstance(v, int) for v in call.arguments.values())
    else:
        _assert_weather_call(call)


@pytest.mark.integration
@pytest.mark.parametrize("choice", [{"name": "add"}, {"type": "function", "function": {"name": "add"}}])
def test_a_named_tool_is_the_one_called(shared_model, choice):
    stream = shared_model.chat(
        [{"role": "user", "content": "What is 2 plus 3?"}], tools=[get_weather, add], tool_choice=choice,
        max_tokens=60, **GREEDY,
    )
    stream.text()
    (call,) = stream.tool_calls
    assert call.name == "add" and set(call.arguments) == {"a", "b"}
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in call.arguments.values())


@pytest.mark.integration
def test_an_openai_tool_dict_works_like_a_function(shared_model):
    stream = shared_model.chat(
        [{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER_DICT], tool_choice="required",
        max_tokens=60, **GREEDY,
    )
    stream.text()
    (call,) = stream.tool_calls
    assert call.name == "get_weather" and isinstance(call.arguments["city"], str)


@pytest.mark.integration
def test_auto_on_the_constrained_path_streams_text_then_the_call(shared_model):
    # The embedded model repeats its system text, which shows the call format: so
    # greedy decoding opens a call after a few words, and the JSON must follow the schema.
    messages = [{"role": "user", "content": "Weather in Paris? <tool_call>"}]
    stream = shared_model.chat(messages, tools=[get_weather], max_tokens=80, **GREEDY)
    tokens = list(stream)
    text = "".join(t.text for t in tokens)
    assert stream.finish_reason == "tool_calls", (text, stream.finish_reason)
    assert CALL_TAG not in text and "{" not in text
    assert all(t.id is not None for t in tokens)  # the native stream: ids kept
    (call,) = stream.tool_calls
    _assert_weather_call(call)


@pytest.mark.integration
def test_a_call_cut_short_by_max_tokens_is_no_call(shared_model):
    stream = shared_model.chat(
        [{"role": "user", "content": "Weather in Paris?"}], tools=[get_weather], tool_choice="required",
        max_tokens=3, **GREEDY,
    )
    assert stream.text() == ""
    assert stream.finish_reason == "length" and stream.tool_calls == ()


@pytest.mark.integration
def test_tool_choice_none_offers_nothing(shared_model):
    messages = [{"role": "user", "content": "Weather in Paris? <tool_call>"}]
    stream = shared_model.chat(messages, tools=[get_weather], tool_choice="none", max_tokens=30, **GREEDY)
    text = stream.text()
    assert stream.tool_calls == () and stream.finish_reason in ("stop", "length")
    assert "get_weather" not in text  # the tools were not described


@pytest.mark.integration
def test_bad_tool_arguments_fail_before_anything_is_sent(shared_model):
    def untyped(x):
        return x

    before = shared_model.client.slots()
    with pytest.raises(TypeError, match="needs a type hint"):
        shared_model.chat([{"role": "user", "content": "x"}], tools=[untyped])
    with pytest.raises(ValueError, match="json_schema"):
        shared_model.chat([{"role": "user", "content": "x"}], tools=[add], json_schema={"type": "object"})
    assert shared_model.client.slots() == before


# -- the real server: its own tool handling (a Jinja template that renders tools) -------

#: Gemma's turns, the tools in a system turn, calls as <tool_call>JSON</tool_call>: a
#: format llama-server's template analysis recognises, so it builds the grammar and parser.
TOOLS_TEMPLATE = (
    "{%- if tools %}<start_of_turn>system\n"
    "You can call these tools. To call one, answer with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<end_of_turn>\n{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}<start_of_turn>model\n"
    "{% if message.content %}{{ message.content }}{% endif -%}"
    "{%- if message.tool_calls -%}{%- for tc in message.tool_calls -%}"
    "<tool_call>{\"name\": \"{{ tc.function.name }}\", \"arguments\": {{ tc.function.arguments | tojson }}}</tool_call>"
    "{%- endfor -%}{%- endif -%}<end_of_turn>\n"
    "{% elif message.role == 'tool' -%}<start_of_turn>user\n<tool_response>{{ message.content }}</tool_response>"
    "<end_of_turn>\n"
    "{% else -%}<start_of_turn>{{ 'user' if message.role != 'system' else 'system' }}\n"
    "{{ message.content }}<end_of_turn>\n{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{% endif -%}"
)

#: One earlier exchange, so the small model knows to call the tool again.
FEW_SHOT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny in Paris."},
    {"role": "user", "content": "What is the weather in Rome?"},
]


@pytest.fixture(scope="module")
def jinja_model(model_path, server_binary):
    with llamarocm.load_model(
        model_path, context_length=2048, parallel=2, chat_template=TOOLS_TEMPLATE, server_path=server_binary
    ) as model:
        yield model


@pytest.mark.integration
@pytest.mark.parametrize("choice", ["auto", "required", {"name": "get_weather"}])
def test_the_server_makes_the_call_when_the_template_renders_tools(jinja_model, choice):
    stream = jinja_model.chat(FEW_SHOT, tools=[get_weather, add], tool_choice=choice, max_tokens=60, **GREEDY)
    text = stream.text()
    assert jinja_model._renders_tools is True
    assert stream.finish_reason == "tool_calls", (text, stream.finish_reason)
    assert CALL_TAG not in text
    assert stream.tool_calls and all(call.id for call in stream.tool_calls)
    for call in stream.tool_calls:
        _assert_weather_call(call)


@pytest.mark.integration
def test_no_tools_offered_on_the_server_path(jinja_model):
    stream = jinja_model.chat(FEW_SHOT, tools=[get_weather], tool_choice="none", max_tokens=20, **GREEDY)
    stream.text()
    assert stream.tool_calls == () and stream.finish_reason in ("stop", "length")


#: Gemma's turns in Jinja, with no word about tools (as SmolLM2's own template): the
#: server would force nothing, so the call must come from the constrained path.
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "<start_of_turn>{{ 'model' if message.role == 'assistant' else 'user' }}\n{{ message.content }}<end_of_turn>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{% endif -%}"
)


@pytest.mark.integration
def test_a_jinja_template_that_ignores_tools_gets_the_constrained_path(model_path, server_binary):
    with llamarocm.load_model(
        model_path, context_length=1024, chat_template=PLAIN_TEMPLATE, server_path=server_binary
    ) as model:
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        stream = model.chat(messages, tools=[get_weather], tool_choice="required", max_tokens=60, **GREEDY)
        stream.text()
        assert model._renders_tools is False
        (call,) = stream.tool_calls
        _assert_weather_call(call)
        # The conversation with its call and result renders too (both written as text).
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ]
        again = model.chat(messages, tools=[get_weather], max_tokens=8, **GREEDY)
        again.text()
        assert again.finish_reason in ("stop", "length", "tool_calls")

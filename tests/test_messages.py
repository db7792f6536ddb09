"""Messages as OpenAI sends them: checks, and what the real server's templates make of
them (the built-in gemma template, and a Jinja template that reads kwargs)."""

from __future__ import annotations

import json

import pytest

import llamarocm
from llamarocm.messages import check_messages, check_prompts, check_template_kwargs, render_prompt, tool_calls_as_text

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0.0, "top_k": 1}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_TURN = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22 C"},
]

# A Jinja template in Gemma's format that shows what reached it: SHOUT for the kwarg
# "shout", an open <think> block for "enable_thinking", and no tool role at all.
JINJA_TEMPLATE = """{%- for m in messages -%}
{%- if m.role == 'tool' -%}{{ raise_exception('this template knows no tool role') }}{%- endif -%}
<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}
{{ m.content }}<end_of_turn>
{% endfor -%}
{%- if shout %}SHOUT{% endif -%}
<start_of_turn>model
{% if enable_thinking %}<think>
{% endif %}"""


# -- checks ------------------------------------------------------------------------


def test_openai_shapes_are_accepted():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "name": "ana", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        *TOOL_TURN,
    ]
    assert check_messages(messages) == messages


def test_arguments_given_as_a_dict_become_the_json_string_openai_sends():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    checked = check_messages([{"role": "assistant", "tool_calls": [call]}])
    assert checked[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'
    assert call["function"]["arguments"] == {"x": 1}  # the caller's dict is left alone


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_image", "image_url": "https://example.invalid/a.png"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ],
)
def test_media_parts_are_refused_as_not_supported_yet(part):
    messages = [{"role": "user", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "see"}, part]}]
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\]\[1\] .*multimodal input is not supported yet"):
        check_messages(messages)


@pytest.mark.parametrize(
    "message, error, words",
    [
        ({"role": "user", "content": None}, TypeError, r"messages\[1\]\['content'\] must be a str or a list"),
        ({"role": "user", "content": []}, ValueError, "must not be an empty list"),
        ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, ValueError, "only 'text' parts"),
        ({"role": "user", "content": [{"type": "text", "text": 3}]}, TypeError, r"\[0\]\['text'\] must be a str"),
        ({"role": "user", "content": ["Hi"]}, TypeError, r"\[0\] must be a dict"),
        ({"role": "user", "content": "x", "name": 5}, TypeError, r"messages\[1\]\['name'\] must be a str"),
        ({"role": "tool", "content": "22 C"}, ValueError, "without 'tool_call_id'"),
        ({"role": "user", "content": "x", "tool_calls": [CALL]}, ValueError, "only an assistant"),
        ({"role": "assistant", "content": None, "tool_calls": []}, ValueError, "must not be empty"),
        ({"role": "assistant", "tool_calls": CALL}, TypeError, r"\['tool_calls'\] must be a list"),
        ({"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}, ValueError, r"\[0\]\['type'\] must be"),
        ({"role": "assistant", "tool_calls": [{**CALL, "id": 1}]}, TypeError, r"\[0\]\['id'\] must be a str"),
        ({"role": "assistant", "tool_calls": [{"id": "c"}]}, TypeError, r"\['function'\] must be a dict"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": "{}"}}]},
            TypeError,
            r"\['name'\] must be a non-empty str",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
            ValueError,
            r"messages\[1\]\['tool_calls'\]\[0\]\['function'\]\['arguments'\] is not valid JSON",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            ValueError,
            "must encode a JSON object",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
            TypeError,
            "must be a JSON string",
        ),
    ],
)
def test_bad_messages_are_refused_naming_the_place(message, error, words):
    with pytest.raises(error, match=words):
        check_messages([{"role": "user", "content": "first"}, message])


def test_a_batch_names_the_prompt_and_the_message():
    with pytest.raises(ValueError, match=r"prompts\[1\]: messages\[0\]\['content'\]\[0\] .*multimodal"):
        check_prompts(["fine", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]])
    check_prompts(["fine", TOOL_TURN])


def test_template_kwargs_are_checked():
    assert check_template_kwargs(None) is None and check_template_kwargs({}) is None
    assert check_template_kwargs({"enable_thinking": False, "x": [1]}) == {"enable_thinking": False, "x": [1]}
    with pytest.raises(TypeError, match="must be True or False"):
        check_template_kwargs({"enable_thinking": "false"})  # llama-server refuses a string
    with pytest.raises(TypeError, match="keys must be strings"):
        check_template_kwargs({1: True})
    with pytest.raises(ValueError, match="plain JSON"):
        check_template_kwargs({"x": float("nan")})
    with pytest.raises(TypeError, match="must be a dict"):
        check_template_kwargs(["enable_thinking"])


def test_tool_calls_as_text_keeps_every_call_and_result():
    converted = tool_calls_as_text(check_messages([*TOOL_TURN, {"role": "tool", "tool_call_id": "x", "content": "2"}]))
    assert [m["role"] for m in converted] == ["user", "assistant", "user"]  # results in a row: one message
    assert json.loads(converted[1]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]
    }
    first, second = (json.loads(line) for line in converted[2]["content"].split("\n"))
    assert first == {"tool_response": {"tool": "get_weather", "tool_call_id": "call_1", "content": "sunny, 22 C"}}
    assert second == {"tool_response": {"tool_call_id": "x", "content": "2"}}


def test_a_render_that_fails_without_tools_is_not_retried():
    calls = []

    def refuse(body):
        calls.append(body)
        raise llamarocm.RequestError("llama-server answered HTTP 400: bad", 400)

    with pytest.raises(llamarocm.RequestError, match="bad"):
        render_prompt(refuse, [{"role": "user", "content": "Hi"}])
    assert len(calls) == 1
    with pytest.raises(llamarocm.RequestError, match="bad"):  # the first error, not the retry's
        render_prompt(refuse, check_messages(TOOL_TURN))
    assert len(calls) == 3


def _template(shows_calls: bool):
    """A stand-in /apply-template: each message's content, and its calls if asked."""
    bodies = []

    def apply_template(body):
        bodies.append(body)
        lines = []
        for m in body["messages"]:
            calls = [c["function"]["name"] for c in m.get("tool_calls") or ()] if shows_calls else []
            lines.append(f"{m['role']}: {m.get('content') or ''} {' '.join(calls)}")
        return {"prompt": "\n".join(lines)}

    return apply_template, bodies


def test_a_template_that_drops_calls_gets_them_as_text():
    # The user names the tool too: only the comparison with a render without the
    # calls tells that the template dropped them.
    messages = check_messages([{"role": "user", "content": "use get_weather"}, *TOOL_TURN[1:]])
    apply_template, bodies = _template(shows_calls=False)
    prompt = render_prompt(apply_template, messages, {"k": 1})
    assert '{"tool_calls": [{"name": "get_weather"' in prompt and "tool_response" in prompt
    assert len(bodies) == 3 and all(b["chat_template_kwargs"] == {"k": 1} for b in bodies)


def test_a_template_that_shows_calls_gets_the_messages_as_they_are():
    apply_template, bodies = _template(shows_calls=True)
    prompt = render_prompt(apply_template, check_messages(TOOL_TURN))
    assert "assistant:  get_weather" in prompt and "tool: sunny, 22 C" in prompt
    assert len(bodies) == 2 and bodies[0]["messages"] == TOOL_TURN
    apply_template, bodies = _template(shows_calls=False)
    render_prompt(apply_template, [{"role": "user", "content": "Hi"}])
    assert len(bodies) == 1  # nothing to check without calls


def test_an_answer_without_a_prompt_is_a_request_error():
    with pytest.raises(llamarocm.RequestError, match="without a prompt"):
        render_prompt(lambda body: {"nope": 1}, [{"role": "user", "content": "Hi"}])


# -- the real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def jinja_model(model_path, server_binary):
    """The embedded model with a small Jinja template that shows its kwargs."""
    with llamarocm.load_model(
        model_path, context_length=512, chat_template=JINJA_TEMPLATE, server_path=server_binary
    ) as model:
        yield model


def _render(model, messages, kwargs=None):
    return render_prompt(model._apply_template, check_messages(messages), kwargs)


@pytest.mark.integration
def test_text_parts_render_as_the_joined_text(shared_model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    assert _render(shared_model, parts) == _render(shared_model, [{"role": "user", "content": "Hello\nworld"}])
    reply = shared_model.chat(parts, max_tokens=6, **GREEDY).text()
    assert reply == shared_model.chat([{"role": "user", "content": "Hello\nworld"}], max_tokens=6, **GREEDY).text()


@pytest.mark.integration
def test_a_name_passes_through(shared_model):
    assert "Hi" in _render(shared_model, [{"role": "user", "name": "ana", "content": "Hi"}])


@pytest.mark.integration
def test_the_builtin_template_shows_tool_calls_and_results(shared_model):
    # llama.cpp's built-in gemma template renders the calling turn empty: the calls are
    # written as text instead, and the result as a user turn Gemma knows.
    prompt = _render(shared_model, TOOL_TURN)
    assert '"name": "get_weather"' in prompt and '"city": "Paris"' in prompt and "sunny, 22 C" in prompt
    assert "<start_of_turn>tool" not in prompt
    assert prompt.endswith("<start_of_turn>model\n")
    reply = shared_model.chat(TOOL_TURN, max_tokens=8, **GREEDY)
    assert reply.text() and reply.finish_reason in ("stop", "length")


@pytest.mark.integration
def test_a_template_that_refuses_the_tool_role_gets_the_text_form(jinja_model):
    with pytest.raises(llamarocm.RequestError, match="knows no tool role"):
        jinja_model._apply_template({"messages": check_messages(TOOL_TURN)})
    prompt = _render(jinja_model, TOOL_TURN)
    assert "get_weather" in prompt and "sunny, 22 C" in prompt


@pytest.mark.integration
def test_chat_template_kwargs_reach_a_jinja_template(jinja_model):
    messages = [{"role": "user", "content": "Hi"}]
    plain = _render(jinja_model, messages)
    assert "SHOUT" not in plain
    shouted_prompt = plain.replace("<start_of_turn>model", "SHOUT<start_of_turn>model")
    assert _render(jinja_model, messages, {"shout": True}) == shouted_prompt
    # Through chat(): the prompt the server evaluated is longer by what the kwarg added.
    base = jinja_model.chat(messages, max_tokens=1, **GREEDY)
    base.text()
    shouted = jinja_model.chat(messages, max_tokens=1, chat_template_kwargs={"shout": True}, **GREEDY)
    shouted.text()
    assert shouted.metrics.prompt_tokens > base.metrics.prompt_tokens


@pytest.mark.integration
def test_enable_thinking_opens_the_block_and_the_reply_is_split(jinja_model):
    messages = [{"role": "user", "content": "Hi"}]
    assert _render(jinja_model, messages, {"enable_thinking": True}).endswith("<think>\n")
    # The reply starts inside the block: only the closing tag comes.
    grammar = 'root ::= [a-z]{3,12} " " [a-z]{3,12} "</think>" [A-Za-z]{3,12}'
    raw = jinja_model.chat(messages, grammar=grammar, max_tokens=40, reasoning=False,
                           chat_template_kwargs={"enable_thinking": True}, **GREEDY).text()
    thought, answer = raw.split("</think>")
    stream = jinja_model.chat(messages, grammar=grammar, max_tokens=40,
                              chat_template_kwargs={"enable_thinking": True}, **GREEDY)
    assert (stream.text(), stream.reasoning_text()) == (answer, thought)
    # Without the kwarg the block is not open, and the same text is all answer.
    closed = jinja_model.chat(messages, grammar=grammar, max_tokens=40, **GREEDY)
    assert closed.reasoning_text() == "" and "</think>" in closed.text()


@pytest.mark.integration
def test_an_image_is_refused_before_anything_is_sent(shared_model):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    with pytest.raises(ValueError, match="multimodal input is not supported yet"):
        shared_model.chat(image, max_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        shared_model.map([image], max_tokens=4)

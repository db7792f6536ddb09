"""The tool loop (``Model.act``): its logic on a scripted chat, then on the real
embedded model with greedy settings (the first round forced to call, so it is
deterministic), Ctrl-C included."""

from __future__ import annotations

import _thread
import enum
import threading
from typing import Any, Dict, List

import pytest
from conftest import slots_idle

import llamarocm
from llamarocm.act import run_act, run_call
from llamarocm.tools import ToolCall, check_tools

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0.0, "top_k": 1}


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def get_weather(city: str, unit: Unit = Unit.C) -> Dict[str, Any]:
    """The weather in a city."""
    return {"city": city, "sky": "sunny", "unit": unit.value}


def boom(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"kaboom {x}")


# -- run_call: what goes back to the model --------------------------------------------


def test_run_call_returns_results_and_errors_as_text():
    tools = check_tools([get_weather, boom])
    ok = run_call(ToolCall("1", "get_weather", {"city": "Oslo", "unit": "fahrenheit"}), tools)
    assert ok == '{"city": "Oslo", "sky": "sunny", "unit": "fahrenheit"}'  # the Enum member was rebuilt
    assert run_call(ToolCall("2", "boom", {"x": 3}), tools) == "Error: RuntimeError: kaboom 3"
    unknown = run_call(ToolCall("3", "nope", {}), tools)
    assert unknown.startswith("Error: there is no tool named 'nope'") and "get_weather, boom" in unknown
    assert run_call(ToolCall("4", "boom", {}), tools).startswith("Error: bad arguments for boom")
    assert run_call(ToolCall("5", "boom", {"x": 1, "y": 2}), tools).startswith("Error: bad arguments for boom")


def test_keyboard_interrupt_in_a_function_is_not_swallowed():
    def stop() -> str:
        """Stops."""
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_call(ToolCall("1", "stop", {}), check_tools([stop]))


# -- the loop's logic, on a scripted chat ------------------------------------------------


class ScriptedStream:
    def __init__(self, text: str, calls: List[ToolCall], finish_reason: str = "") -> None:
        self._text, self.tool_calls = text, tuple(calls)
        self.finish_reason = finish_reason or ("tool_calls" if calls else "stop")
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True

    def text(self) -> str:
        return self._text


class ScriptedChat:
    """Answers with the given replies in turn, recording what each round was sent."""

    def __init__(self, *replies) -> None:
        self.replies = list(replies)
        self.sent: List[Dict[str, Any]] = []
        self.streams: List[ScriptedStream] = []

    def __call__(self, messages, **kwargs):
        self.sent.append({"messages": [dict(m) for m in messages], **kwargs})
        stream = ScriptedStream(*self.replies.pop(0))
        self.streams.append(stream)
        return stream


def test_the_loop_runs_calls_then_returns_the_answer():
    chat = ScriptedChat(
        ("Checking.", [ToolCall("a", "get_weather", {"city": "Oslo"}), ToolCall("b", "boom", {"x": 1})]),
        ("Sunny in Oslo.", []),
    )
    question = [{"role": "user", "content": "Oslo?"}]
    result = run_act(chat, question, [get_weather, boom], tool_choice="required", settings={"max_tokens": 5})
    assert result.finished and result.rounds == 2 and result.text == "Sunny in Oslo."
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert result.messages[1]["content"] == "Checking."
    assert [c["id"] for c in result.messages[1]["tool_calls"]] == ["a", "b"]
    assert result.messages[2] == {
        "role": "tool", "tool_call_id": "a", "name": "get_weather",
        "content": '{"city": "Oslo", "sky": "sunny", "unit": "celsius"}',
    }
    assert result.messages[3]["content"] == "Error: RuntimeError: kaboom 1"
    # tool_choice holds for the first round only; the settings for every round.
    assert [s["tool_choice"] for s in chat.sent] == ["required", "auto"]
    assert all(s["max_tokens"] == 5 for s in chat.sent)
    assert chat.sent[1]["messages"] == result.messages[:4]
    assert all(stream.closed for stream in chat.streams)
    assert question == [{"role": "user", "content": "Oslo?"}]  # the caller's list is not changed


def test_max_rounds_ends_the_loop_with_finished_false():
    chat = ScriptedChat(("", [ToolCall("a", "boom", {"x": 1})]), ("", [ToolCall("b", "boom", {"x": 2})]))
    result = run_act(chat, [{"role": "user", "content": "go"}], [boom], max_rounds=2)
    assert not result.finished and result.rounds == 2
    assert result.messages[-1]["tool_calls"][0]["id"] == "b"  # the calls not run
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.finish_reason == "tool_calls"


def test_the_result_carries_the_last_finish_reason():
    chat = ScriptedChat(("", [ToolCall("a", "boom", {"x": 1})]), ("Done.", []))
    result = run_act(chat, [{"role": "user", "content": "go"}], [boom])
    assert result.finished and result.finish_reason == "stop"


@pytest.mark.parametrize("reason", ["length", "cancelled"])
def test_a_reply_cut_short_is_not_finished(reason):
    """A forced call cut short by max_tokens (no call, no text) or an answer cut short
    is not an answer: ``finished`` is False and ``finish_reason`` says why."""
    chat = ScriptedChat(("", [ToolCall("a", "boom", {"x": 1})]), ("It is sun", [], reason))
    result = run_act(chat, [{"role": "user", "content": "go"}], [boom], tool_choice="required")
    assert not result.finished and result.finish_reason == reason and result.rounds == 2
    assert result.text == "It is sun" and result.messages[-1] == {"role": "assistant", "content": "It is sun"}
    empty = run_act(ScriptedChat(("", [], "length")), [{"role": "user", "content": "go"}], [boom])
    assert (empty.text, empty.finished, empty.finish_reason, empty.rounds) == ("", False, "length", 1)


def lambda_free_untyped(x):
    return x


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    "arguments, error, words",
    [
        ({"messages": "hello"}, TypeError, "messages must be a list"),
        ({"messages": {"role": "user", "content": "x"}}, TypeError, "messages must be a list"),
        ({"messages": [1]}, TypeError, r"messages\[0\] must be a dict, not int"),
        ({"messages": []}, ValueError, "messages must not be empty"),
        ({"messages": [{"content": "x"}]}, TypeError, r"messages\[0\]\['role'\]"),
        ({"tools": boom}, TypeError, "tools must be a list"),
        ({"tools": "boom"}, TypeError, "tools must be a list"),
        ({"tools": []}, ValueError, "tools must not be empty"),
        ({"tools": [3]}, TypeError, r"tools\[0\] must be a function"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, TypeError, "Python functions"),
        ({"tools": [lambda_free_untyped]}, TypeError, "type hint"),
        ({"max_rounds": 0}, ValueError, "max_rounds must be >= 1"),
        ({"max_rounds": -1}, ValueError, "max_rounds must be >= 1"),
        ({"max_rounds": True}, TypeError, "max_rounds must be an int, not bool"),
        ({"max_rounds": "3"}, TypeError, "max_rounds must be an int, not str"),
        ({"tool_choice": "always"}, ValueError, "tool_choice must be"),
        ({"tool_choice": {"name": "nope"}}, ValueError, "'nope', which is not among the tools"),
        ({"settings": {"tools": [boom]}}, TypeError, "tools and tool_choice are act"),
        ({"settings": {"tool_choice": "auto"}}, TypeError, "tools and tool_choice are act"),
    ],
)
def test_act_refuses_bad_arguments_before_asking_anything(arguments, error, words):
    chat = ScriptedChat()
    call = {"messages": USER, "tools": [boom], **arguments}
    with pytest.raises(error, match=words):
        run_act(chat, call.pop("messages"), call.pop("tools"), **call)
    assert chat.sent == []


def test_an_unknown_setting_is_named_before_asking_anything():
    def chat(messages, *, tools=None, tool_choice=None, max_tokens=None, temperature=None):
        raise AssertionError("nothing may be sent")

    with pytest.raises(TypeError, match="unknown setting 'max_token'.*max_tokens, temperature"):
        run_act(chat, USER, [boom], settings={"max_token": 5})


@pytest.mark.integration
@pytest.mark.parametrize(
    "arguments, error, words",
    [
        ({"messages": "hello"}, TypeError, "messages must be a list"),
        ({"messages": [1]}, TypeError, r"messages\[0\] must be a dict, not int"),
        ({"tools": "f"}, TypeError, "tools must be a list"),
        ({"max_rounds": "3"}, TypeError, "max_rounds must be an int"),
        ({"max_token": 5}, TypeError, "unknown setting 'max_token'"),
        ({"max_tokens": "5"}, TypeError, "max_tokens must be an int"),
        ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
    ],
)
def test_model_act_refuses_bad_arguments_with_clear_errors(shared_model, arguments, error, words):
    call = {"messages": USER, "tools": [boom], **arguments}
    with pytest.raises(error, match=words):
        shared_model.act(call.pop("messages"), call.pop("tools"), **call)
    assert not shared_model._streams


# -- on the real embedded model ------------------------------------------------------


def _check_transcript(messages: List[Dict[str, Any]]) -> None:
    """Every call is answered by a tool message with its id, in order."""
    for i, message in enumerate(messages):
        for k, call in enumerate(message.get("tool_calls") or ()):
            answer = messages[i + 1 + k] if i + 1 + k < len(messages) else None
            if answer is not None:
                assert answer["role"] == "tool" and answer["tool_call_id"] == call["id"]


@pytest.mark.integration
def test_act_on_the_model_runs_the_tool_and_sends_its_result_back(shared_model):
    seen: List[str] = []

    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"Sunny in {city}"

    result = shared_model.act(
        [{"role": "user", "content": "What is the weather in Paris?"}],
        [get_weather],
        tool_choice="required",
        max_rounds=3,
        max_tokens=40,
        **GREEDY,
    )
    assert isinstance(result, llamarocm.ActResult)
    assert seen and all(isinstance(city, str) for city in seen)
    first_call = result.messages[1]["tool_calls"][0]
    assert first_call["function"]["name"] == "get_weather"
    assert result.messages[2] == {
        "role": "tool", "tool_call_id": first_call["id"], "name": "get_weather", "content": f"Sunny in {seen[0]}",
    }
    _check_transcript(result.messages)
    assert 2 <= result.rounds <= 3
    assert sum(1 for m in result.messages if m["role"] == "assistant") == result.rounds
    if result.finished:
        assert result.messages[-1] == {"role": "assistant", "content": result.text}
    # The transcript goes back to chat() as it is.
    again = shared_model.chat(result.messages + [{"role": "user", "content": "Thanks"}], max_tokens=4, **GREEDY)
    assert again.text() is not None and again.finish_reason in ("stop", "length")


@pytest.mark.integration
def test_a_failing_tool_is_reported_to_the_model(shared_model):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        raise RuntimeError(f"kaboom in {city}")

    result = shared_model.act(
        [{"role": "user", "content": "What is the weather in Paris?"}], [get_weather], tool_choice="required",
        max_rounds=2, max_tokens=40, **GREEDY,
    )
    assert result.messages[2]["role"] == "tool"
    assert result.messages[2]["content"].startswith("Error: RuntimeError: kaboom")
    assert result.rounds == 2


def _recording_weather():
    """A ``get_weather`` tool, and the list of the cities it was run for."""
    ran = []

    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return "sunny"

    return ran, get_weather


@pytest.mark.integration
def test_max_rounds_one_returns_the_pending_call_unrun(shared_model):
    ran, get_weather = _recording_weather()

    result = shared_model.act(
        [{"role": "user", "content": "What is the weather in Paris?"}], [get_weather], tool_choice="required",
        max_rounds=1, max_tokens=40, **GREEDY,
    )
    assert not result.finished and result.rounds == 1 and ran == []
    assert result.messages[-1]["role"] == "assistant" and result.messages[-1]["tool_calls"]
    assert result.finish_reason == "tool_calls"


@pytest.mark.integration
def test_a_forced_call_cut_short_by_max_tokens_is_reported(shared_model):
    ran, get_weather = _recording_weather()

    result = shared_model.act(
        [{"role": "user", "content": "What is the weather in Paris?"}], [get_weather], tool_choice="required",
        max_tokens=5, **GREEDY,
    )
    assert (result.finished, result.finish_reason, result.rounds, result.text) == (False, "length", 1, "")
    assert ran == [] and result.messages[-1] == {"role": "assistant", "content": ""}


@pytest.mark.integration
def test_ctrl_c_in_a_tool_stops_the_loop_and_leaves_nothing_running(shared_model):
    def interrupted(city: str) -> str:
        """Interrupted."""
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shared_model.act(
            [{"role": "user", "content": "Weather in Paris?"}], [interrupted], tool_choice="required", max_tokens=30,
            **GREEDY,
        )
    assert not shared_model._streams
    assert slots_idle(shared_model)


@pytest.mark.integration
def test_ctrl_c_during_a_reply_cancels_the_stream(shared_model):
    """SIGINT's KeyboardInterrupt arrives while a reply streams (sent from another
    thread once the first token is in): the stream is closed, the loop stops."""
    opened: List[llamarocm.TokenStream] = []
    interrupter: List[threading.Thread] = []

    class FirstTokenInterrupts:
        def __init__(self, stream: llamarocm.TokenStream) -> None:
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        @property
        def tool_calls(self):
            return self.stream.tool_calls

        def text(self) -> str:
            parts = []
            for token in self.stream:
                if not interrupter:
                    interrupter.append(threading.Thread(target=_thread.interrupt_main))
                    interrupter[0].start()
                parts.append(token.text)
            return "".join(parts)

    def chat(messages, **kwargs):
        stream = shared_model.chat(messages, **kwargs)
        opened.append(stream)
        return FirstTokenInterrupts(stream)

    from llamarocm.act import run_act as loop

    with pytest.raises(KeyboardInterrupt):
        loop(
            chat,
            [{"role": "user", "content": "Tell me a long story."}],
            [get_weather],
            tool_choice="none",
            settings={"max_tokens": 400, "extra": {"ignore_eos": True}, **GREEDY},
        )
    interrupter[0].join()
    (stream,) = opened
    stream._reader.thread.join(10)
    assert stream.finish_reason == "cancelled" and stream.metrics.generated_tokens < 400
    assert stream._state not in shared_model._streams
    assert slots_idle(shared_model)


# -- the command line: chat --tools ---------------------------------------------------

TOOL_MODULE = '''
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny in " + city


def untyped(city):
    return city
'''


@pytest.fixture
def tool_module(tmp_path, monkeypatch):
    """A module of tools in a fresh directory, the current one (as a user's would be)."""
    (tmp_path / "weather_tools_for_test.py").write_text(TOOL_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "spec, words",
    [
        ("weather_tools_for_test", "is not module:function"),
        ("no_such_module_here:f", "cannot import no_such_module_here:f: ModuleNotFoundError"),
        ("weather_tools_for_test:nope", "AttributeError"),
        ("weather_tools_for_test:untyped", "needs a type hint"),
        (",", "at least one"),
    ],
)
def test_bad_tools_specs_are_usage_errors_before_anything_loads(tool_module, monkeypatch, capsys, spec, words):
    from llamarocm.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("a usage error must be reported before anything starts")

    monkeypatch.setattr("llamarocm.load_model", refuse)
    monkeypatch.setattr("llamarocm.cli.options.default_model_path", refuse)
    with pytest.raises(SystemExit) as info:
        main(["chat", "--tools", spec])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--tools" in err and words in err and "Traceback" not in err


@pytest.mark.integration
def test_chat_loop_with_tools_runs_the_loop_each_turn(shared_model):
    import io

    from llamarocm.cli import chat_loop

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny in " + city

    lines = iter(["Weather in Paris? <tool_call>", "/exit"])
    out = io.StringIO()
    history = chat_loop(shared_model, lambda: next(lines), out, tools=[get_weather], max_tokens=60, **GREEDY)
    shown = out.getvalue()
    assert history[0] == {"role": "user", "content": "Weather in Paris? <tool_call>"}
    assert history[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert history[2]["role"] == "tool" and history[2]["content"].startswith("sunny in ")
    assert "[call get_weather(" in shown and f"[get_weather -> {history[2]['content']}]" in shown
    _check_transcript(history)


@pytest.mark.integration
def test_chat_loop_with_tools_shows_a_reply_cut_short(shared_model):
    import io

    from llamarocm.cli import chat_loop

    lines = iter(["What is the weather in Paris?", "/exit"])
    out = io.StringIO()
    history = chat_loop(
        shared_model, lambda: next(lines), out, tools=[get_weather], tool_choice="required", max_tokens=5, **GREEDY
    )
    assert history[-1] == {"role": "assistant", "content": ""}
    assert out.getvalue() == " [cut short]\n"


@pytest.mark.integration
def test_chat_command_with_tools_imports_and_calls_them(tool_module, model_path, server_binary):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "llamarocm", "chat", "--model", model_path, "--server", server_binary,
         "--tools", "weather_tools_for_test:get_weather", "--max-tokens", "60", "--temperature", "0", "--top-k", "1"],
        input="Weather in Paris? <tool_call>\n/exit\n", capture_output=True, text=True, timeout=100, cwd=tool_module,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[call get_weather(" in proc.stdout and "[get_weather -> sunny in " in proc.stdout

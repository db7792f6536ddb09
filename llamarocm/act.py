"""The tool loop behind ``Model.act``: ask the model, run the functions it calls, give
it their results, ask again, until it answers in text.

What a function raises (an ``Exception``), a call naming no tool, and arguments that
do not fit the function are all sent back to the model as the tool's result, as an
error text, so it can correct itself; none ends the loop. ``KeyboardInterrupt`` (and
``SystemExit``) do end it: the running stream is closed first (``with``), so nothing
is left working on the server.
"""

from __future__ import annotations

import enum
import inspect
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .config import check_int
from .messages import check_messages
from .tools import Tool, ToolCall, check_tool_choice, check_tools

__all__ = ["ActResult", "run_act", "run_call"]


@dataclass(frozen=True)
class ActResult:
    """What :meth:`Model.act <llamarocm.Model.act>` ends with.

    ``text`` is the model's last answer; ``messages`` the whole conversation (the
    messages given, then every assistant turn with its ``tool_calls`` and every
    ``tool`` result, OpenAI shapes), ready to be sent again; ``rounds`` how many
    times the model was asked; ``finish_reason`` that of the last reply, as in
    OpenAI's choices: ``"stop"``, ``"length"``, ``"tool_calls"`` or ``"cancelled"``.

    ``finished`` is ``True`` only when the model ended with an answer of its own
    (``finish_reason == "stop"``). It is ``False`` when ``max_rounds`` ran out while
    the model still called tools (``"tool_calls"``: the last message is that assistant
    turn, with calls that were not run), and when the last reply was cut short
    (``"length"``: by ``max_tokens`` or the context; a forced call cut short is no
    call, and ``text`` may be empty) or cancelled.
    """

    text: str
    messages: List[Dict[str, Any]]
    rounds: int
    finished: bool = True
    finish_reason: Optional[str] = None


ChatFunction = Callable[..., Any]


def run_act(
    chat: ChatFunction,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Callable[..., Any]],
    *,
    max_rounds: int = 5,
    tool_choice: Any = None,
    settings: Optional[Mapping[str, Any]] = None,
) -> ActResult:
    """Run the loop with ``chat`` (a model's ``chat``) and return its :class:`ActResult`.

    ``tool_choice`` applies to the first round only; later rounds are ``"auto"``
    (forcing a call every round would never let the model answer).
    """
    transcript = check_messages(messages)  # a copy: the caller's list is not changed
    checked = check_tools(tools)
    for tool in checked:
        if tool.function is None:
            raise TypeError(f"act() runs Python functions; tool {tool.name!r} is a dict with no function to run")
    check_tool_choice(tool_choice, checked)
    check_int("max_rounds", max_rounds, 1, 1000)
    options = dict(settings or {})
    _check_settings(chat, options)
    for round_number in range(1, max_rounds + 1):
        choice = tool_choice if round_number == 1 else "auto"
        with chat(transcript, tools=checked, tool_choice=choice, **options) as stream:
            text = stream.text()
            calls = stream.tool_calls
            reason = stream.finish_reason
        if not calls:
            transcript.append({"role": "assistant", "content": text})
            return ActResult(text, transcript, round_number, finished=reason == "stop", finish_reason=reason)
        transcript.append({"role": "assistant", "content": text or None, "tool_calls": [c.to_openai() for c in calls]})
        if round_number == max_rounds:
            return ActResult(text, transcript, round_number, finished=False, finish_reason=reason)
        for call in calls:
            result = run_call(call, checked)
            transcript.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns


def _check_settings(chat: ChatFunction, settings: Mapping[str, Any]) -> None:
    """Refuse a setting ``chat`` does not take, naming those it does, before any request
    (their values ``chat`` checks itself, before it sends anything)."""
    taken = sorted({"tools", "tool_choice"} & set(settings))
    if taken:
        raise TypeError(f"tools and tool_choice are act()'s own arguments, not settings: {', '.join(taken)}")
    try:
        parameters = list(inspect.signature(chat).parameters.values())
    except (TypeError, ValueError):
        return  # a chat whose signature cannot be read checks its own arguments
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    known = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in ("tools", "tool_choice")]
    for name in settings:
        if name not in known:
            raise TypeError(f"act() got an unknown setting {name!r}; the settings are chat()'s: {', '.join(known)}")


def run_call(call: ToolCall, tools: Sequence[Tool]) -> str:
    """Run ``call`` and return its result as text for the model; an error as text too."""
    tool = next((t for t in tools if t.name == call.name), None)
    if tool is None or tool.function is None:
        return f"Error: there is no tool named {call.name!r}; the tools are: {', '.join(t.name for t in tools)}"
    function = tool.function
    try:
        bound = inspect.signature(function).bind(**_converted(function, call.arguments))
    except TypeError as exc:
        return f"Error: bad arguments for {call.name}: {exc}"
    try:
        result = function(*bound.args, **bound.kwargs)
    except Exception as exc:  # the model reads what went wrong and may try again
        return f"Error: {type(exc).__name__}: {exc}"
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


def _converted(function: Callable[..., Any], arguments: Mapping[str, Any]) -> Dict[str, Any]:
    """``arguments`` with the values of ``Enum`` parameters turned into their members."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:
        return dict(arguments)
    converted = dict(arguments)
    for name, value in arguments.items():
        hint = hints.get(name)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            try:
                converted[name] = hint(value)
            except ValueError:
                pass  # left as it is: the function says what is wrong with it
    return converted

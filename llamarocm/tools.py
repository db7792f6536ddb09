"""Tools a model may call: checking what ``chat(tools=..., tool_choice=...)`` is given,
the constraint that makes a call well-formed, and reading calls back.

No I/O here. Two ways a call is made, chosen per model (see :doc:`/how-it-works`):

- the model's own Jinja template renders ``tools``: llama-server does everything
  (prompt, grammar, parsing) on its OpenAI-style endpoint;
- otherwise (a built-in template, or a Jinja one that ignores ``tools``): the tools are
  described in a system message, and a call is written ``<tool_call>`` + JSON. The
  JSON is generated under a JSON schema whose ``name`` is one of the tools and whose
  ``arguments`` follow that tool's parameters, so it always parses and always names a
  tool. :class:`ToolRequest` builds what that needs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import OutputParseError
from .tool_schema import function_schema

__all__ = ["ToolCall", "Tool", "ToolRequest", "check_tools", "check_tool_choice", "CALL_TAG"]

#: What a call starts with on the constrained path.
CALL_TAG = "<tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ToolLike = Union[Callable[..., Any], Mapping[str, Any]]


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: ``name`` with ``arguments`` (a dict, already parsed).

    ``id`` pairs it with its answer: the ``tool`` message carries it as ``tool_call_id``.
    """

    id: str
    name: str
    arguments: Dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> Dict[str, Any]:
        """The call as an entry of an assistant message's ``tool_calls`` (OpenAI shape)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass(frozen=True)
class Tool:
    """A checked tool: its name, description, parameters schema, and the Python
    function behind it (``None`` for a tool given as a dict)."""

    name: str
    description: str
    parameters: Dict[str, Any]
    function: Optional[Callable[..., Any]] = None

    def to_openai(self) -> Dict[str, Any]:
        spec: Dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            spec["description"] = self.description
        return {"type": "function", "function": spec}


def new_call_id() -> str:
    """A fresh id in OpenAI's style, for calls whose id the server does not give."""
    return "call_" + os.urandom(12).hex()


def check_tools(tools: Any) -> Tuple[Tool, ...]:
    """``tools`` (Python functions and/or OpenAI tool dicts) checked, in order.

    Raises ``TypeError`` / ``ValueError`` naming the bad entry.

    >>> def now() -> str:
    ...     '''The time.'''
    ...     return "noon"
    >>> [t.name for t in check_tools([now])]
    ['now']
    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError("tools must be a list of functions or OpenAI tool dicts")
    if not tools:
        raise ValueError("tools must not be empty (leave it out, or pass tool_choice='none')")
    checked: List[Tool] = []
    for i, item in enumerate(tools):
        if isinstance(item, Tool):
            tool = item
        elif isinstance(item, Mapping):
            tool = _tool_from_dict(item, f"tools[{i}]")
        elif callable(item):
            name, description, parameters = function_schema(item)
            tool = Tool(name, description, parameters, item)
        else:
            raise TypeError(f"tools[{i}] must be a function or an OpenAI tool dict, not {type(item).__name__}")
        if not _NAME.match(tool.name):
            raise ValueError(f"tools[{i}]: name {tool.name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if any(t.name == tool.name for t in checked):
            raise ValueError(f"tools[{i}]: two tools are named {tool.name!r}")
        checked.append(tool)
    return tuple(checked)


def _tool_from_dict(item: Mapping[str, Any], where: str) -> Tool:
    """An OpenAI tool dict (``{"type": "function", "function": {...}}``) checked."""
    if item.get("type") != "function" or not isinstance(item.get("function"), Mapping):
        raise ValueError(f'{where} must look like {{"type": "function", "function": {{"name": ..., ...}}}}')
    spec = item["function"]
    name, description = spec.get("name"), spec.get("description", "")
    if not isinstance(name, str):
        raise TypeError(f"{where}['function']['name'] must be a str")
    if not isinstance(description, str):
        raise TypeError(f"{where}['function']['description'] must be a str")
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    _check_parameters(parameters, f"{where}['function']['parameters']")
    try:
        parameters = json.loads(json.dumps(parameters, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}['function']['parameters'] must be plain JSON: {exc}") from None
    return Tool(name, description, parameters)


def _check_parameters(parameters: Any, where: str) -> None:
    """A JSON schema of an object: what every tool's arguments must be."""
    if not isinstance(parameters, Mapping):
        raise TypeError(f"{where} must be a JSON schema dict, not {type(parameters).__name__}")
    if parameters.get("type") != "object":
        raise ValueError(f'{where} must be a JSON schema of an object ("type": "object")')
    properties = parameters.get("properties", {})
    if not isinstance(properties, Mapping) or not all(isinstance(v, Mapping) for v in properties.values()):
        raise ValueError(f"{where}['properties'] must map each argument name to its schema")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}['required'] must be a list of argument names")
    unknown = [r for r in required if r not in properties]
    if unknown:
        raise ValueError(f"{where}: required arguments {unknown} are not in its properties")


def check_tool_choice(choice: Any, tools: Sequence[Tool]) -> Tuple[str, Optional[str]]:
    """``(mode, name)``: mode ``"auto"``, ``"required"``, ``"none"`` or ``"named"``
    (then ``name`` is the tool). ``None`` means ``"auto"``.

    Accepts ``{"name": ...}`` and OpenAI's ``{"type": "function", "function": {"name": ...}}``.
    """
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in ("auto", "required", "none"):
            raise ValueError(f'tool_choice must be "auto", "required", "none" or {{"name": ...}}, not {choice!r}')
        return choice, None
    if not isinstance(choice, Mapping):
        raise TypeError(f"tool_choice must be a str or a dict, not {type(choice).__name__}")
    spec = choice.get("function") if choice.get("type") == "function" else choice
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if not isinstance(name, str):
        raise ValueError('tool_choice as a dict must be {"name": ...} or {"type": "function", "function": {...}}')
    if not any(t.name == name for t in tools):
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools: {[t.name for t in tools]}")
    return "named", name


@dataclass(frozen=True)
class ToolRequest:
    """What one ``chat(tools=..., tool_choice=..., parallel_tool_calls=...)`` asks
    for, checked."""

    tools: Tuple[Tool, ...]
    mode: str = "auto"
    named: Optional[str] = None
    #: Whether a reply may make several calls (else one at most, llama-server's default).
    parallel: bool = False

    @classmethod
    def build(cls, tools: Any, tool_choice: Any, parallel: Any = False) -> "ToolRequest":
        if not isinstance(parallel, bool):
            raise TypeError(f"parallel_tool_calls must be a bool, not {type(parallel).__name__}")
        if tools is None:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools")
            if parallel:
                raise ValueError("parallel_tool_calls needs tools")
            return cls((), "none")
        checked = check_tools(tools)
        mode, named = check_tool_choice(tool_choice, checked)
        return cls(checked, mode, named, parallel)

    @property
    def offered(self) -> Tuple[Tool, ...]:
        """The tools the model may call in this request (none for ``"none"``)."""
        if self.mode == "none":
            return ()
        if self.mode == "named":
            return tuple(t for t in self.tools if t.name == self.named)
        return self.tools

    @property
    def forced(self) -> bool:
        """Whether the reply must be a call."""
        return self.mode in ("required", "named")

    # -- llama-server's own tool handling (templates that render tools) -----------------

    def server_fields(self) -> Dict[str, Any]:
        """``tools`` / ``tool_choice`` for llama-server's OpenAI-style endpoint. A named
        choice is sent as "required" with that tool alone: the server reads only strings.
        ``parallel_tool_calls`` is sent either way: a recent server's own default follows
        what the template can do, and a reply makes one call unless asked."""
        return {
            "tools": [t.to_openai() for t in self.offered],
            "tool_choice": "required" if self.forced else "auto",
            "parallel_tool_calls": self.parallel,
        }

    # -- the constrained path (templates that do not) --------------------------------

    def call_schema(self) -> Dict[str, Any]:
        """The JSON schema of what follows :data:`CALL_TAG`: one call (the name of an
        offered tool and its arguments), or with ``parallel`` a list of one or more."""
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.offered
        ]
        one = options[0] if len(options) == 1 else {"anyOf": options}
        return {"type": "array", "items": one, "minItems": 1} if self.parallel else one

    def instructions(self) -> str:
        """The system text that tells the model its tools and how to call one."""
        listing = "\n".join(
            json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
            for t in self.offered
        )
        call = '{"name": "<tool name>", "arguments": {<arguments as JSON>}}'
        how, some = (f"{CALL_TAG}[{call}, ...]", "one or more") if self.parallel else (CALL_TAG + call, "one")
        if self.forced:
            ask = f"Answer by calling {some} of the tools below: write {how}"
        else:
            ask = f"You can call tools. To call {some}, write {how}; otherwise answer normally."
        return f"{ask}\nThe tools:\n{listing}"

    def plain_messages(self, messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """``messages`` for a template that knows only roles and text: earlier calls
        written as the model writes them, tool results as user turns, and the tools
        described in the (first) system message."""
        plain = [_plain_message(m, self.parallel) for m in messages]
        if not self.offered:
            return plain
        text = self.instructions()
        if plain and plain[0].get("role") == "system" and isinstance(plain[0].get("content"), str):
            plain[0] = {**plain[0], "content": plain[0]["content"] + "\n\n" + text}
        else:
            plain.insert(0, {"role": "system", "content": text})
        return plain

    def parse_calls(self, text: str) -> Tuple[ToolCall, ...]:
        """The calls written as ``text`` (the JSON after :data:`CALL_TAG`): one object,
        or with ``parallel`` a list of one or more."""
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise OutputParseError(f"the tool call is not valid JSON: {exc}; output: {text[:500]!r}") from exc
        if not self.parallel:
            return (self._call_of(obj, text),)
        if not isinstance(obj, list) or not obj:
            raise OutputParseError(f"the tool calls are not a list of one or more calls: {text[:500]!r}")
        return tuple(self._call_of(item, text) for item in obj)

    def _call_of(self, obj: Any, text: str) -> ToolCall:
        if not isinstance(obj, dict) or not isinstance(obj.get("arguments"), dict):
            raise OutputParseError(f"the tool call has no arguments object: {text[:500]!r}")
        name = obj.get("name")
        if not any(t.name == name for t in self.offered):
            raise OutputParseError(f"the tool call names no offered tool: {text[:500]!r}")
        return ToolCall(new_call_id(), str(name), obj["arguments"])


def _plain_message(message: Mapping[str, Any], parallel: bool) -> Dict[str, Any]:
    """``message`` as a template that knows only roles and text takes it; earlier calls
    in the format the request asks the model for (one tag and a list, with ``parallel``)."""
    role = message.get("role")
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>{_text(message.get('content'))}</tool_response>"}
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        objects = [_call_object(call) for call in calls]
        if parallel:
            written = CALL_TAG + json.dumps(objects, ensure_ascii=False)
        else:
            written = "".join(CALL_TAG + json.dumps(obj, ensure_ascii=False) for obj in objects)
        before = _text(message.get("content")) if message.get("content") else ""
        return {"role": "assistant", "content": (before + "\n" if before else "") + written}
    return dict(message)


def _call_object(call: Any) -> Dict[str, Any]:
    """``{"name", "arguments"}`` of an OpenAI ``tool_calls`` entry (arguments decoded)."""
    function = call.get("function", {}) if isinstance(call, Mapping) else {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {"name": function.get("name"), "arguments": arguments}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts, joined as llama-server joins them
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return json.dumps(content, ensure_ascii=False)

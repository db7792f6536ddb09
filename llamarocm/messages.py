"""Chat messages as OpenAI sends them: their checks, and how they reach the template.

The shapes accepted are those of OpenAI's chat API: ``content`` as a string or a list
of text parts, ``name`` on any message, an assistant message with ``tool_calls`` (and
``content`` ``None``), and ``tool`` messages answering a call (``tool_call_id``).
Images and audio are refused with a ``ValueError`` before anything is sent.

Templates that know nothing of tools (llama.cpp's built-in ones, most small models'
own) drop an assistant's ``tool_calls`` without a word, and some refuse the ``tool``
role. :func:`render_prompt` notices this and renders the conversation again with the
calls and their results written as JSON text, the way llama.cpp's template engine
used to fill in for such templates, so that nothing the model said or was told is lost.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .config import _check_json
from .errors import RequestError

__all__ = ["check_messages", "check_prompts", "check_template_kwargs", "render_prompt", "tool_calls_as_text"]

# Content part types that carry media. Named so the refusal says what is missing,
# not that a dict had the wrong type.
_MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video"})


def check_prompts(prompts: Any) -> None:
    """Refuse a batch's prompts unless each is a string or a valid message list,
    naming the first bad one (``prompts[i]: ...``)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or of message lists")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            try:
                check_messages(prompt)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prompts[{i}]: {exc}") from None


def check_messages(messages: Any) -> List[Dict[str, Any]]:
    """``messages`` as a list of plain dicts, or ``TypeError`` / ``ValueError`` naming
    the first bad message (``messages[2]['content'] ...``).

    Tool-call ``arguments`` given as a dict are turned into the JSON string OpenAI
    sends; everything else is passed on as it was given.

    >>> check_messages([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    [{'role': 'user', 'content': [{'type': 'text', 'text': 'Hi'}]}]
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("messages must not be empty")
    checked = [_check_message(f"messages[{i}]", message) for i, message in enumerate(messages)]
    _check_json("messages", checked)
    return checked


def check_template_kwargs(kwargs: Any) -> Optional[Dict[str, Any]]:
    """``chat_template_kwargs`` as a dict (``None`` for ``None`` or ``{}``), refusing
    what llama-server would: keys that are not strings, values that are not JSON, and
    an ``enable_thinking`` that is not a bool."""
    if kwargs is None:
        return None
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"chat_template_kwargs must be a dict, not {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str):
            raise TypeError("chat_template_kwargs' keys must be strings")
    if "enable_thinking" in kwargs and not isinstance(kwargs["enable_thinking"], bool):
        raise TypeError("chat_template_kwargs['enable_thinking'] must be True or False")
    _check_json("chat_template_kwargs", kwargs)
    return dict(kwargs) or None


def _check_message(where: str, message: Any) -> Dict[str, Any]:
    if not isinstance(message, Mapping):
        raise TypeError(f"{where} must be a dict, not {type(message).__name__}")
    checked = dict(message)
    role = checked.get("role")
    if not isinstance(role, str) or not role:
        raise TypeError(f"{where}['role'] must be a non-empty str")
    for key in ("name", "tool_call_id"):
        if key in checked and not isinstance(checked[key], str):
            raise TypeError(f"{where}[{key!r}] must be a str, not {type(checked[key]).__name__}")
    if "tool_calls" in checked and checked["tool_calls"] is not None:
        if role != "assistant":
            raise ValueError(f"{where} has tool_calls, which only an assistant message can have")
        checked["tool_calls"] = _check_tool_calls(f"{where}['tool_calls']", checked["tool_calls"])
    if role == "tool" and "tool_call_id" not in checked:
        raise ValueError(f"{where} is a tool result without 'tool_call_id' (the id of the call it answers)")
    content = checked.get("content")
    if content is None and checked.get("tool_calls"):
        return checked  # an assistant turn that only calls tools
    _check_content(f"{where}['content']", content)
    return checked


def _check_content(where: str, content: Any) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise TypeError(f"{where} must be a str or a list of text parts, not {type(content).__name__}")
    if not content:
        raise ValueError(f"{where} must not be an empty list")
    for j, part in enumerate(content):
        part_where = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise TypeError(f"{part_where} must be a dict like {{'type': 'text', 'text': ...}}")
        kind = part.get("type")
        if kind in _MEDIA_PARTS:
            raise ValueError(
                f"{part_where} is an {kind!r} part: multimodal input is not supported yet; send text parts only"
            )
        if kind != "text":
            raise ValueError(f"{part_where} has type {kind!r}; only 'text' parts are supported")
        if not isinstance(part.get("text"), str):
            raise TypeError(f"{part_where}['text'] must be a str")


def _check_tool_calls(where: str, calls: Any) -> List[Dict[str, Any]]:
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise TypeError(f"{where} must be a list of calls, not {type(calls).__name__}")
    if not calls:
        raise ValueError(f"{where} must not be empty (leave it out instead)")
    return [_check_tool_call(f"{where}[{k}]", call) for k, call in enumerate(calls)]


def _check_tool_call(where: str, call: Any) -> Dict[str, Any]:
    if not isinstance(call, Mapping):
        raise TypeError(f"{where} must be a dict like {{'id': ..., 'type': 'function', 'function': {{...}}}}")
    checked = dict(call)
    if "id" in checked and not isinstance(checked["id"], str):
        raise TypeError(f"{where}['id'] must be a str")
    if checked.get("type", "function") != "function":
        raise ValueError(f"{where}['type'] must be 'function', got {checked.get('type')!r}")
    function = checked.get("function")
    if not isinstance(function, Mapping):
        raise TypeError(f"{where}['function'] must be a dict with 'name' and 'arguments'")
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}['function']['name'] must be a non-empty str")
    if isinstance(arguments, Mapping):
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not isinstance(arguments, str):
        raise TypeError(f"{where}['function']['arguments'] must be a JSON string (or a dict)")
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise ValueError(f"{where}['function']['arguments'] is not valid JSON: {arguments[:200]!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}['function']['arguments'] must encode a JSON object, got {arguments[:200]!r}")
    checked["function"] = {**function, "arguments": arguments}
    return checked


def _text_of(content: Any) -> str:
    """The text of checked ``content``: parts joined by newlines, as llama-server joins them."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def tool_calls_as_text(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Checked ``messages`` with tool calls and their results written as JSON text, for a
    template that does not render them.

    An assistant's calls become its content, ``{"tool_calls": [{"name", "arguments",
    "id"}], "content": ...}``; a ``tool`` message becomes a user message
    ``{"tool_response": {"tool", "tool_call_id", "content"}}``, and results in a row
    share one message (templates that insist on alternating roles accept that).

    >>> tool_calls_as_text([{"role": "tool", "tool_call_id": "c1", "content": "22 C"}])
    [{'role': 'user', 'content': '{"tool_response": {"tool_call_id": "c1", "content": "22 C"}}'}]
    """
    names: Dict[str, str] = {}
    converted: List[Dict[str, Any]] = []
    results: Optional[Dict[str, Any]] = None  # the user message gathering results in a row
    for message in messages:
        if message.get("role") == "tool":
            text = _tool_result_text(message, names)
            if results is not None:
                results["content"] += "\n" + text
            else:
                results = {"role": "user", "content": text}
                converted.append(results)
            continue
        results = None
        if message.get("tool_calls"):
            converted.append(_calls_message(message, names))
        else:
            converted.append(dict(message))
    return converted


def _calls_message(message: Mapping[str, Any], names: Dict[str, str]) -> Dict[str, Any]:
    """An assistant message with tool calls, its calls written in its content."""
    calls = []
    for call in message["tool_calls"]:
        function = call["function"]
        shown = {"name": function["name"], "arguments": json.loads(function["arguments"])}
        if isinstance(call.get("id"), str):
            shown["id"] = call["id"]
            names[call["id"]] = function["name"]  # a result names its tool by the id
        calls.append(shown)
    body: Dict[str, Any] = {"tool_calls": calls}
    if _text_of(message.get("content")):
        body["content"] = _text_of(message.get("content"))
    rest = {k: v for k, v in message.items() if k not in ("tool_calls", "content")}
    return {**rest, "content": json.dumps(body, ensure_ascii=False)}


def _tool_result_text(message: Mapping[str, Any], names: Mapping[str, str]) -> str:
    response: Dict[str, Any] = {}
    call_id = message["tool_call_id"]
    tool = message.get("name") or names.get(call_id)
    if tool:
        response["tool"] = tool
    response["tool_call_id"] = call_id
    response["content"] = _text_of(message.get("content"))
    return json.dumps({"tool_response": response}, ensure_ascii=False)


def _without_calls(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """``messages`` with the assistants' tool calls left out (their content kept)."""
    stripped = []
    for message in messages:
        if message.get("tool_calls"):
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            message = {**rest, "content": _text_of(message.get("content"))}
        stripped.append(dict(message))
    return stripped


def render_prompt(
    apply_template: Callable[[Dict[str, Any]], Any],
    messages: List[Dict[str, Any]],
    template_kwargs: Optional[Mapping[str, Any]] = None,
    **fields: Any,
) -> str:
    """The prompt the server's template makes of checked ``messages``.

    ``apply_template(body)`` posts ``body`` to ``/apply-template`` and returns the
    answer; ``template_kwargs`` go to the template as ``chat_template_kwargs`` (Jinja
    templates only: llama.cpp's built-in ones take none), ``fields`` into the body as
    they are. When the conversation has tool calls or results and the template drops
    the calls (the prompt is the same without them) or refuses them, it is rendered
    once more with :func:`tool_calls_as_text`; if that fails too, the first error is
    raised.
    """
    body: Dict[str, Any] = {"messages": messages, **fields}
    if template_kwargs:
        body["chat_template_kwargs"] = dict(template_kwargs)
    has_calls = any(m.get("tool_calls") for m in messages)
    has_tools = has_calls or any(m.get("role") == "tool" for m in messages)
    try:
        prompt = _prompt_of(apply_template(body))
    except RequestError as exc:
        if not has_tools or exc.status is None:
            raise
        try:
            return _prompt_of(apply_template({**body, "messages": tool_calls_as_text(messages)}))
        except RequestError:
            raise exc from None
    if has_calls and _drops_calls(apply_template, body, prompt):
        prompt = _prompt_of(apply_template({**body, "messages": tool_calls_as_text(messages)}))
    return prompt


def _drops_calls(apply_template: Callable[[Dict[str, Any]], Any], body: Dict[str, Any], prompt: str) -> bool:
    """Whether the template left the tool calls out of ``prompt``: dropped calls leave
    no trace, so the prompt is the same without them."""
    try:
        bare = _prompt_of(apply_template({**body, "messages": _without_calls(body["messages"])}))
    except RequestError:
        return False  # it wants the calls: it rendered them
    return bare == prompt


def _prompt_of(answer: Any) -> str:
    prompt = answer.get("prompt") if isinstance(answer, dict) else None
    if not isinstance(prompt, str):
        raise RequestError(f"llama-server's /apply-template answered without a prompt: {answer!r:.200}")
    return prompt

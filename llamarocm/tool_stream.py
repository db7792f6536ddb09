"""The streams of a chat that offers tools: what is requested, and how the reply's
events become text tokens and :class:`~llamarocm.ToolCall` objects.

Two paths (chosen per model by ``Model.chat``):

- **server**: the model's Jinja template renders ``tools``, so llama-server builds the
  prompt, the grammar and the parser itself; the reply streams from its OpenAI-style
  ``/v1/chat/completions``, and :class:`ServerToolCalls` gathers the ``tool_calls``
  deltas.
- **constrained**: any other template. :class:`ConstrainedToolCall` streams from the
  native ``/completion``. With ``tool_choice`` ``"required"`` or a named tool, the
  whole reply is generated under the call's JSON schema. With ``"auto"`` the model
  writes freely, with :data:`~llamarocm.tools.CALL_TAG` as a stop string; if it stops
  there, a second request continues the same text (its prefix comes from the prompt
  cache) under the call's JSON schema. Either way the call parses and names a tool,
  and its JSON is not yielded as text.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from ._sse import ServerSentEvent
from .config import GenerateConfig
from .errors import OutputParseError
from .stream import EventDecoder, Events, StreamState, Token, read_native_event
from .tools import CALL_TAG, ToolCall, ToolRequest, new_call_id

__all__ = ["ToolStreamPlan", "ServerToolCalls", "ConstrainedToolCall", "check_tool_settings", "server_chat_body"]

OpenEvents = Callable[[str, Dict[str, Any]], Events]


def check_tool_settings(request: ToolRequest, cfg: GenerateConfig) -> None:
    """Refuse settings that cannot hold together with offered tools, before any work."""
    if not request.offered:
        return
    if cfg.json_schema is not None or cfg.grammar is not None:
        raise ValueError("tools cannot be combined with json_schema, grammar or response_format: a call has its own")
    if cfg.logprobs:
        raise ValueError("logprobs is not available together with tools")


def server_chat_body(
    messages: List[Dict[str, Any]],
    cfg: GenerateConfig,
    request: ToolRequest,
    template_kwargs: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The body for llama-server's ``/v1/chat/completions`` (the server path)."""
    body: Dict[str, Any] = {"messages": messages, "stream": True, "cache_prompt": True, **request.server_fields()}
    if cfg.max_tokens is not None:
        body["max_tokens"] = cfg.max_tokens
    body.update(cfg.sampling_fields())
    if template_kwargs:
        body["chat_template_kwargs"] = dict(template_kwargs)
    return body


class ToolStreamPlan:
    """How a tool chat's stream is opened: its events and their decoder, per request."""

    def __init__(self, request: ToolRequest, server_side: bool) -> None:
        self.request = request
        self.server_side = server_side

    def open(self, open_events: OpenEvents, body: Dict[str, Any]) -> Tuple[Events, EventDecoder]:
        """``open_events(path, body)`` makes an unopened stream of the model's client."""
        if self.server_side:
            return open_events("/v1/chat/completions", body), ServerToolCalls()
        constrained = ConstrainedToolCall(self.request, open_events, body)
        return constrained, constrained.decode


class ServerToolCalls:
    """Decoder of llama-server's OpenAI-style chunks: text deltas become tokens
    (reasoning deltas are marked as such), ``tool_calls`` deltas are joined per index."""

    def __init__(self) -> None:
        self._calls: Dict[int, Dict[str, str]] = {}

    def __call__(self, obj: Mapping[str, Any], out: List[Token], state: StreamState) -> None:
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content")
            if isinstance(thought, str) and thought:
                state.reasoning_parts.append(thought)
                out.append(Token(thought, reasoning=True))
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.append(Token(content))
            for part in delta.get("tool_calls") or ():
                self._add(part)
            if choice.get("finish_reason"):
                self._finish(str(choice["finish_reason"]), state)
        if "timings" in obj:
            state.final = dict(obj)

    def _add(self, part: Mapping[str, Any]) -> None:
        entry = self._calls.setdefault(int(part.get("index", 0)), {"id": "", "name": "", "arguments": ""})
        if part.get("id"):
            entry["id"] = str(part["id"])
        function = part.get("function") or {}
        entry["name"] += function.get("name") or ""
        entry["arguments"] += function.get("arguments") or ""

    def _finish(self, reason: str, state: StreamState) -> None:
        calls = []
        for _, entry in sorted(self._calls.items()):
            try:
                arguments = json.loads(entry["arguments"] or "{}")
            except ValueError as exc:
                if reason == "length":
                    continue  # cut short by max_tokens: not a call
                raise OutputParseError(f"llama-server sent a tool call that is not JSON: {entry!r:.300}") from exc
            if isinstance(arguments, dict) and entry["name"]:
                calls.append(ToolCall(entry["id"] or new_call_id(), entry["name"], arguments))
        state.tool_calls = tuple(calls)
        state.finish_reason = "tool_calls" if calls else ("length" if reason == "length" else "stop")


class ConstrainedToolCall:
    """The events of a tool chat on the constrained path (one or two requests to
    ``/completion``), and their decoder (:meth:`decode`).

    Behaves as the client's event stream to the reader thread: ``open``, iteration,
    ``cancel`` (from any thread, lock-free), ``close``.
    """

    def __init__(self, request: ToolRequest, open_events: OpenEvents, body: Dict[str, Any]) -> None:
        self.request = request
        self._open_events = open_events
        self._body = body
        self._calling = request.forced  # the current request generates the call's JSON
        self._text: List[str] = []  # what the current request generated
        self._generated = 0
        self._continue = False
        self.cancelled = False
        self._current = open_events("/completion", self._first_body())

    def _first_body(self) -> Dict[str, Any]:
        body = dict(self._body)
        if self._calling:
            body.pop("stop", None)  # a stop string must not cut the call short
            body["json_schema"] = self.request.call_schema()
        else:
            body["stop"] = [*body.get("stop", []), CALL_TAG]
        return body

    def _call_body(self) -> Dict[str, Any]:
        """The second request: the same text, the tag, then the call."""
        body = {k: v for k, v in self._body.items() if k != "stop"}
        body["prompt"] = self._body["prompt"] + "".join(self._text) + CALL_TAG
        body["json_schema"] = self.request.call_schema()
        limit = self._body.get("n_predict", -1)
        if isinstance(limit, int) and limit > 0:
            body["n_predict"] = limit - self._generated
        return body

    # -- the event stream ------------------------------------------------------------

    def open(self) -> None:
        self._current.open()

    def __iter__(self) -> Iterator[List[ServerSentEvent]]:
        yield from self._current
        if not self._continue or self.cancelled:
            return
        self._current.close()
        body = self._call_body()
        self._calling, self._text = True, []
        self._current = self._open_events("/completion", body)
        # As in the client's stream: each side writes its own field, then reads the
        # other's, so a cancel racing this switch cuts one stream or the other.
        if self.cancelled:
            self._current.cancel()
        self._current.open()
        yield from self._current

    def cancel(self) -> None:
        self.cancelled = True
        self._current.cancel()

    def close(self) -> None:
        self._current.close()

    # -- the decoder -----------------------------------------------------------------

    def decode(self, obj: Mapping[str, Any], out: List[Token], state: StreamState) -> None:
        if self._calling:
            self._text.append(obj.get("content") or "")  # the call's JSON: not text
            if obj.get("stop"):
                self._end_call(obj, state)
            return
        read_native_event(obj, out, state)
        self._text.append(obj.get("content") or "")
        self._generated += len(obj.get("tokens") or ())
        if obj.get("stop") and obj.get("stop_type") == "word" and obj.get("stopping_word") == CALL_TAG:
            limit = self._body.get("n_predict", -1)
            if isinstance(limit, int) and 0 < limit <= self._generated:
                state.finish_reason = "length"  # no room left for the call
            else:
                state.finish_reason = None  # not the end: the call follows
                self._continue = True

    def _end_call(self, obj: Mapping[str, Any], state: StreamState) -> None:
        state.final = dict(obj)
        if obj.get("stop_type") == "limit":
            state.finish_reason = "length"  # the call was cut short by max_tokens: none made
            return
        state.tool_calls = self.request.parse_calls("".join(self._text))
        state.finish_reason = "tool_calls"

"""Server-Sent Events decoding: bytes in, events out, no I/O.

Follows the WHATWG "event stream interpretation" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation)
with one extension for llama-server, and is written to be fed whatever byte chunks the
HTTP layer happens to deliver: a chunk may end anywhere, including between the CR and
LF of a CRLF or inside a multi-byte UTF-8 character.

Two decisions differ from what a reader might guess:

* **End of stream discards an incomplete event** (this is the spec's rule, and what
  openai-python's decoder ends up doing). llama-server terminates every event it
  writes, ``data: [DONE]`` included, with a blank line, so a stream that stops before
  one was cut short (crash, dropped connection). Dispatching the fragment would hand
  the caller half a JSON document; dropping it lets the caller see "stream ended
  before the final event" and report the real cause.
* **An ``error:`` line makes the event an ``"error"`` event.** Older llama-server
  builds report a failure inside a stream as ``error: {json}`` and a blank line; the
  spec would ignore that unknown field and the error would vanish. Here its value is
  added to the data like a ``data:`` line, and the event is dispatched at the next
  blank line like any other, with type ``"error"`` whatever an ``event:`` line says.
  (Newer builds send ``data: {"error": {...}}``, an ordinary message the caller
  inspects.)

``data: [DONE]`` is passed through untouched as data ``"[DONE]"``; whether it ends the
stream is the caller's business.

Cost: every byte is scanned a constant number of times by C-level bytes methods
(``splitlines``, ``partition``, ``decode``); there is no per-byte Python loop. A line
split over many chunks is kept as a list of pieces and joined once, when its
terminator arrives, so feeding a long line one byte at a time stays linear rather
than quadratic. The Python work is per line, and a llama-server token is two lines
(the data line and the blank line).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

__all__ = ["SSEDecoder", "ServerSentEvent", "iter_events"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D


# A NamedTuple rather than a frozen dataclass: it is built once per token, and a tuple
# costs a fraction of a frozen dataclass's object.__setattr__-per-field construction.
class ServerSentEvent(NamedTuple):
    """One dispatched event.

    ``id`` is the stream's last event ID at dispatch time (it carries over from
    earlier events, as the spec says), ``None`` if the stream never set one. ``retry``
    is the reconnection time in milliseconds from a ``retry:`` line in this event's
    block, if any.

    >>> ServerSentEvent(data='{"content": "hi"}').json()
    {'content': 'hi'}
    """

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        """Parse ``data`` as JSON; raises ``json.JSONDecodeError``, a ``ValueError``."""
        return json.loads(self.data)


class SSEDecoder:
    """Incremental decoder for one ``text/event-stream`` response body.

    Not thread-safe: one decoder per stream, fed by one reader.

    >>> decoder = SSEDecoder()
    >>> decoder.feed(b'data: {"content": "h')
    []
    >>> decoder.feed(b'i"}\\r\\n\\r\\ndata: [DONE]\\n\\n')
    [ServerSentEvent(event='message', data='{"content": "hi"}', id=None, retry=None), \
ServerSentEvent(event='message', data='[DONE]', id=None, retry=None)]
    >>> decoder.flush()
    []
    """

    __slots__ = (
        "_at_start",
        "_data",
        "_event",
        "_is_error",
        "_last_id",
        "_pending",
        "_retry",
        "_skip_lf",
    )

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Pieces of the current, not yet terminated line. A list so that a line arriving
        # in many small chunks is joined once instead of re-copied per chunk.
        self._pending: list[bytes] = []
        # The previous chunk ended in CR: an LF opening the next chunk belongs to the
        # same line break and must not count as a second (blank) line.
        self._skip_lf = False
        # The spec strips one BOM, and only before the first line of the stream.
        self._at_start = True
        # Field buffers of the event being built. Kept as undecoded bytes so an event is
        # decoded once at dispatch rather than once per line.
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._is_error = False
        self._retry: int | None = None
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume the next piece of the body; return the events it completed, in order.

        >>> SSEDecoder().feed(b"event: ping\\ndata: 1\\n\\ndata: 2")
        [ServerSentEvent(event='ping', data='1', id=None, retry=None)]
        """
        # This runs once per network read of every token stream, so the common case (a
        # whole event in one chunk, data lines and blank lines only) stays in this one
        # frame; what is rare goes to helpers: a line left over from the last chunk,
        # the stream's first line, and fields other than ``data``.
        if self._skip_lf or self._pending or self._at_start:
            chunk = self._resume(chunk)
        if not chunk:
            return []

        # bytes.splitlines breaks on exactly CR, LF and CRLF, the spec's three line
        # endings (str.splitlines would also break on U+2028 and friends).
        lines = chunk.splitlines()
        last = chunk[-1]
        if last == _CR:
            self._skip_lf = True
        elif last != _LF:
            self._pending.append(lines.pop())
            if not lines:
                return []

        events: list[ServerSentEvent] = []
        data = self._data
        for line in lines:
            # Every llama-server token is a "data: " line: take it without partitioning.
            if line[:6] == b"data: ":
                data.append(line[6:])
            elif not line:
                if data:
                    events.append(self._dispatch(data))
                    data = self._data = []
                else:
                    self._clear_fields()
            else:
                self._field(line)
        return events

    def _resume(self, chunk: bytes) -> bytes:
        """``chunk`` with what the previous chunks left undone applied to it.

        Drops an LF that completes a CRLF split across chunks, prepends the pieces of an
        unfinished line and strips the stream's byte order mark. Returns ``b""`` when
        there is no complete line yet (the chunk is then held in ``_pending``).
        """
        if not chunk:
            return chunk
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return chunk
        pending = self._pending
        if pending:
            pending.append(chunk)
            if b"\n" not in chunk and b"\r" not in chunk:
                return b""
            chunk = b"".join(pending)
            self._pending = []
        # The BOM can only be judged once the first line is whole: it may arrive split.
        if self._at_start and (b"\n" in chunk or b"\r" in chunk):
            self._at_start = False
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        return chunk

    def _field(self, line: bytes) -> None:
        """Apply a non-blank line other than ``data: ...`` to the event being built."""
        # A line without a colon is a field name with an empty value; one starting
        # with a colon has an empty name: a comment, such as a keep-alive ping.
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"error":
            self._data.append(value)
            self._is_error = True
        elif name == b"id" and b"\0" not in value:
            self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            # bytes.isdigit accepts ASCII digits only, as the spec requires; int()
            # still refuses absurdly long numbers (CPython's int_max_str_digits).
            with contextlib.suppress(ValueError):
                self._retry = int(value)
        # Anything else, comments (an empty name) included, is ignored, as the spec says.

    def _clear_fields(self) -> None:
        # The last event ID deliberately survives: the spec makes it stream state.
        self._event = self._retry = None
        self._is_error = False

    def _dispatch(self, data: list[bytes]) -> ServerSentEvent:
        event = self._event
        if self._is_error:
            event_type = "error"
        elif event:
            event_type = event.decode("utf-8", "replace")
        else:
            event_type = "message"
        event_data = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
        sse = ServerSentEvent(event_type, event_data, self._last_id, self._retry)
        # _clear_fields() inlined: this runs once per token.
        self._event = self._retry = None
        self._is_error = False
        return sse

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: discard any incomplete event and reset for a new stream.

        Per the spec only a blank line dispatches, so this returns ``[]``; it returns a
        list so callers treat it like :meth:`feed`. See the module docstring for why a
        truncated final event is dropped rather than delivered.

        >>> decoder = SSEDecoder()
        >>> decoder.feed(b'data: {"content": "cut sho')
        []
        >>> decoder.flush()
        []
        """
        self._reset()
        return []


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Decode a whole body given as an iterable of byte chunks.

    >>> body = [b": ping\\n\\ndata: {\\"content\\"", b': "hi"}\\n\\n']
    >>> body.append(b"data: [DONE]\\n\\n")
    >>> [event.data for event in iter_events(body)]
    ['{"content": "hi"}', '[DONE]']
    """
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()

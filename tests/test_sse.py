"""Tests for llamarocm._sse: the stream must decode the same however it is chunked."""

from __future__ import annotations

import doctest
import json
import random

import pytest

import llamarocm._sse as sse_module
from llamarocm._sse import ServerSentEvent, SSEDecoder, iter_events

pytestmark = pytest.mark.timeout(30)

TEXT = "héllo 世界 🎉"
ERROR_JSON = '{"code": 500, "message": "boom 💥", "type": "server_error"}'


def _chunk(content: str) -> str:
    return json.dumps(
        {"choices": [{"index": 0, "delta": {"content": content}}]}, ensure_ascii=False
    )


# Shaped like llama-server's /v1/chat/completions output (non-ASCII kept raw, as
# llama-server writes it), plus the rarer features the decoder must get right.
LINES = [
    ": ping",
    "",
    f"data: {_chunk('hé')}",
    "",
    f"data: {_chunk('llo 世界')}",
    "",
    "id: 7",
    "event: custom",
    "retry: 1500",
    f"data: {_chunk(' 🎉')}",
    "",
    "data: first line",
    "data:",
    "data:  indented line",
    "",
    f"error: {ERROR_JSON}",
    "",
    "data: [DONE]",
    "",
]

EXPECTED = [
    ServerSentEvent("message", _chunk("hé"), None, None),
    ServerSentEvent("message", _chunk("llo 世界"), None, None),
    ServerSentEvent("custom", _chunk(" 🎉"), "7", 1500),
    ServerSentEvent("message", "first line\n\n indented line", "7", None),
    ServerSentEvent("error", ERROR_JSON, "7", None),
    ServerSentEvent("message", "[DONE]", "7", None),
]


def _stream(newline: str | list[str] = "\n") -> bytes:
    if isinstance(newline, str):
        return "".join(line + newline for line in LINES).encode("utf-8")
    return "".join(line + nl for line, nl in zip(LINES, newline, strict=True)).encode("utf-8")


def _decode(chunks: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def _random_splits(data: bytes, rng: random.Random, max_pieces: int) -> list[bytes]:
    count = rng.randint(0, min(max_pieces, len(data) + 1))
    bounds = [0, *sorted(rng.sample(range(len(data) + 1), count)), len(data)]
    return [data[bounds[k] : bounds[k + 1]] for k in range(len(bounds) - 1)]


def _mixed_newlines(seed: int) -> list[str]:
    rng = random.Random(seed)
    newlines: list[str] = []
    for line in LINES:
        newline = rng.choice(["\n", "\r", "\r\n"])
        # CR then an empty line ended by LF is really one CRLF: the blank line would
        # vanish and the expected events with it.
        while newlines and newlines[-1] == "\r" and not line and newline == "\n":
            newline = rng.choice(["\n", "\r", "\r\n"])
        newlines.append(newline)
    assert {"\r", "\n", "\r\n"} <= set(newlines)
    return newlines


STREAMS = {
    "lf": _stream("\n"),
    "cr": _stream("\r"),
    "crlf": _stream("\r\n"),
    "mixed": _stream(_mixed_newlines(1)),
    "mixed2": _stream(_mixed_newlines(2)),
    "bom": b"\xef\xbb\xbf" + _stream("\r\n"),
}


# --- the realistic stream, chunked every way ------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_whole_stream(name: str) -> None:
    assert _decode([STREAMS[name]]) == EXPECTED


def test_sample_really_has_the_awkward_bytes() -> None:
    # Guards the split tests against a sample that silently lost its hard parts.
    data = STREAMS["crlf"]
    assert "🎉".encode() in data
    assert "世".encode() in data
    assert b"\r\n\r\n" in data


@pytest.mark.parametrize("name", STREAMS)
def test_every_two_way_split(name: str) -> None:
    data = STREAMS[name]
    for i in range(len(data) + 1):
        assert _decode([data[:i], data[i:]]) == EXPECTED, f"split at byte {i}"


@pytest.mark.parametrize("name", STREAMS)
def test_one_byte_chunks(name: str) -> None:
    data = STREAMS[name]
    assert _decode([data[i : i + 1] for i in range(len(data))]) == EXPECTED


@pytest.mark.parametrize("name", STREAMS)
def test_random_multi_splits(name: str) -> None:
    data = STREAMS[name]
    rng = random.Random(f"multi-{name}")
    for trial in range(200):
        chunks = _random_splits(data, rng, max_pieces=12)
        assert _decode(chunks) == EXPECTED, f"trial {trial}: {chunks!r}"


def test_empty_chunks_are_harmless() -> None:
    data = STREAMS["crlf"]
    chunks = [b""]
    for i in range(len(data)):
        chunks += [data[i : i + 1], b""]
    assert _decode(chunks) == EXPECTED


def test_events_are_returned_by_the_feed_that_completes_them() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent(data="a")]
    assert decoder.feed(b"data: b\n\ndata: c\n\ndata: d") == [
        ServerSentEvent(data="b"),
        ServerSentEvent(data="c"),
    ]
    assert decoder.feed(b"\n\n") == [ServerSentEvent(data="d")]


def test_iter_events_matches_feed() -> None:
    data = STREAMS["mixed"]
    chunks = (data[i : i + 7] for i in range(0, len(data), 7))
    assert list(iter_events(chunks)) == EXPECTED
    assert list(iter_events([])) == []


# --- line endings ---------------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r", b"\r\n"])
def test_each_line_ending(newline: bytes) -> None:
    data = b"data: a" + newline + b"data: b" + newline + newline + b"data: c"
    data += newline * 2
    assert _decode([data]) == [ServerSentEvent(data="a\nb"), ServerSentEvent(data="c")]


def test_crlf_split_across_chunks_is_one_line_break() -> None:
    # Counted as two breaks, the LF would be a blank line dispatching "a" on its own.
    chunks = [b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]
    assert _decode(chunks) == [ServerSentEvent(data="a\nb")]


def test_crlf_split_with_empty_chunk_between() -> None:
    assert _decode([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == [
        ServerSentEvent(data="a\nb")
    ]


def test_lf_after_cr_is_only_swallowed_once() -> None:
    # CR, then LF (same break), then LF: that last LF is a blank line.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent(data="a")]


def test_cr_terminated_blank_line_dispatches_without_waiting() -> None:
    # A trailing CR ends its line at once; the decoder must not hold the event back
    # to see whether an LF follows.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [ServerSentEvent(data="a")]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [ServerSentEvent(data="a")]


def test_cr_cr_is_two_breaks() -> None:
    assert _decode([b"data: a\r\rdata: b\r\r"]) == [
        ServerSentEvent(data="a"),
        ServerSentEvent(data="b"),
    ]


def test_lf_cr_is_two_breaks() -> None:
    assert _decode([b"data: a\n\rdata: b\n\r"]) == [
        ServerSentEvent(data="a"),
        ServerSentEvent(data="b"),
    ]


def test_only_ascii_line_breaks_count() -> None:
    # U+2028, U+0085, form feed and vertical tab are data, not line breaks.
    text = "a\u2028b\x85c\x0cd\x0be"
    assert _decode([f"data: {text}\n\n".encode()]) == [ServerSentEvent(data=text)]


# --- UTF-8 ----------------------------------------------------------------------------


def test_multibyte_character_split_at_every_byte() -> None:
    data = "data: 🎉世é\n\n".encode()
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            chunks = [data[:i], data[i:j], data[j:]]
            assert _decode(chunks) == [ServerSentEvent(data="🎉世é")], (i, j)


def test_invalid_utf8_is_replaced() -> None:
    events = _decode([b"data: \xff ok \xe4\xb8\n\n"])
    assert events == [ServerSentEvent(data="\ufffd ok \ufffd")]


def test_invalid_utf8_in_field_name_ignores_the_line() -> None:
    assert _decode([b"da\xfftai: x\n\ndata: y\n\n"]) == [ServerSentEvent(data="y")]


def test_leading_bom_is_stripped() -> None:
    assert _decode([b"\xef\xbb\xbfdata: x\n\n"]) == [ServerSentEvent(data="x")]


def test_bom_split_across_chunks_is_stripped() -> None:
    chunks = [b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"]
    assert _decode(chunks) == [ServerSentEvent(data="x")]


def test_only_one_bom_is_stripped() -> None:
    # The second BOM becomes part of the field name, which is then unknown.
    data = b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n"
    assert _decode([data]) == [ServerSentEvent(data="y")]


def test_bom_is_not_stripped_after_the_first_line() -> None:
    data = b": hi\n\xef\xbb\xbfdata: x\n\ndata: y\n\n"
    assert _decode([data]) == [ServerSentEvent(data="y")]


def test_bom_inside_data_is_kept() -> None:
    assert _decode([b"data: \xef\xbb\xbfx\n\n"]) == [ServerSentEvent(data="\ufeffx")]


# --- field parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b"data:x", "x"),
        (b"data: x", "x"),
        (b"data:  x", " x"),
        (b"data: x ", "x "),
        (b"data:\tx", "\tx"),
        (b"data: a: b", "a: b"),
        (b"data:", ""),
        (b"data: ", ""),
        (b"data", ""),
    ],
)
def test_value_after_colon(line: bytes, data: str) -> None:
    assert _decode([line + b"\n\n"]) == [ServerSentEvent(data=data)]


def test_comments_are_ignored() -> None:
    data = b": ping\n:\n:: x\ndata: a\n: between\ndata: b\n\n: ping\n\n"
    assert _decode([data]) == [ServerSentEvent(data="a\nb")]


def test_field_names_are_case_sensitive_and_unknown_ones_ignored() -> None:
    data = b"Data: x\nDATA: y\nfoo: z\nfoo\n data: w\ndata: v\n\n"
    assert _decode([data]) == [ServerSentEvent(data="v")]


def test_line_without_colon_is_field_with_empty_value() -> None:
    # "event" alone sets an empty type, which dispatches as "message".
    data = b"event: custom\nevent\ndata\ndata\n\n"
    assert _decode([data]) == [ServerSentEvent("message", "\n")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    data = b'data: {\ndata:   "a": 1\ndata: }\n\n'
    events = _decode([data])
    assert events == [ServerSentEvent(data='{\n  "a": 1\n}')]
    assert events[0].json() == {"a": 1}


def test_event_type_applies_to_one_event_only() -> None:
    data = b"event: a\ndata: 1\n\ndata: 2\n\nevent: b\n\ndata: 3\n\n"
    assert _decode([data]) == [
        ServerSentEvent("a", "1"),
        ServerSentEvent("message", "2"),
        ServerSentEvent("message", "3"),
    ]


def test_last_event_type_line_wins() -> None:
    assert _decode([b"event: a\nevent: b\ndata: x\n\n"]) == [ServerSentEvent("b", "x")]


@pytest.mark.parametrize(
    ("value", "retry"),
    [
        (b"1500", 1500),
        (b"0", 0),
        (b"007", 7),
        (b" 15", None),
        (b"15 ", None),
        (b"-1", None),
        (b"+1", None),
        (b"1.5", None),
        (b"15a", None),
        (b"", None),
        ("١٢".encode(), None),
        (b"1" * 5000, None),
    ],
)
def test_retry_parsing(value: bytes, retry: int | None) -> None:
    data = b"retry: " + value + b"\ndata: x\n\n"
    assert _decode([data]) == [ServerSentEvent(data="x", retry=retry)]


def test_retry_belongs_to_its_own_event_and_invalid_keeps_earlier() -> None:
    data = b"retry: 10\nretry: x\ndata: a\n\ndata: b\n\n"
    assert _decode([data]) == [
        ServerSentEvent(data="a", retry=10),
        ServerSentEvent(data="b"),
    ]


def test_id_persists_across_events() -> None:
    data = b"data: a\n\nid: 1\ndata: b\n\ndata: c\n\nid\ndata: d\n\nid: 2\ndata: e\n\n"
    assert [event.id for event in _decode([data])] == [None, "1", "1", "", "2"]


def test_id_containing_nul_is_ignored() -> None:
    data = b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"
    assert [event.id for event in _decode([data])] == ["1", "1"]


def test_id_without_data_still_updates_last_id() -> None:
    data = b"id: 5\n\ndata: a\n\n"
    assert _decode([data]) == [ServerSentEvent(data="a", id="5")]


def test_block_without_data_is_not_dispatched() -> None:
    data = b"event: custom\n\nretry: 5\n\n\n\n\n: only a comment\n\n"
    assert _decode([data]) == []
    # The discarded block's event type must not leak into the next event.
    assert _decode([data + b"data: x\n\n"]) == [ServerSentEvent("message", "x")]


def test_empty_data_line_is_dispatched() -> None:
    # The spec drops a block with no data lines, not one whose data is "".
    assert _decode([b"data:\n\n"]) == [ServerSentEvent(data="")]


# --- llama-server specifics -----------------------------------------------------------


def test_done_is_passed_through() -> None:
    events = _decode([b"data: [DONE]\n\n"])
    assert events == [ServerSentEvent("message", "[DONE]")]


def test_error_line_becomes_error_event() -> None:
    payload = b'{"code":500,"message":"failed","type":"server_error"}'
    events = _decode([b"data: {}\n\nerror: " + payload + b"\n\ndata: [DONE]\n\n"])
    assert events == [
        ServerSentEvent("message", "{}"),
        ServerSentEvent("error", payload.decode()),
        ServerSentEvent("message", "[DONE]"),
    ]
    assert events[1].json()["message"] == "failed"


def test_error_event_waits_for_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"error: {}\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent("error", "{}")]


def test_error_line_wins_over_event_line() -> None:
    data = b"error: boom\nevent: custom\n\nevent: custom\nerror: bang\n\n"
    assert _decode([data]) == [
        ServerSentEvent("error", "boom"),
        ServerSentEvent("error", "bang"),
    ]


def test_error_and_data_lines_join_in_order() -> None:
    assert _decode([b"data: a\nerror: b\ndata: c\n\n"]) == [
        ServerSentEvent("error", "a\nb\nc")
    ]


def test_error_type_does_not_leak_into_next_event() -> None:
    data = b"error: x\n\ndata: y\n\nerror\n\ndata: z\n\n"
    assert _decode([data]) == [
        ServerSentEvent("error", "x"),
        ServerSentEvent("message", "y"),
        ServerSentEvent("error", ""),
        ServerSentEvent("message", "z"),
    ]


def test_newer_llama_server_error_is_an_ordinary_message() -> None:
    data = b'data: {"error": {"code": 500, "message": "boom"}}\n\n'
    (event,) = _decode([data])
    assert event.event == "message"
    assert event.json()["error"]["message"] == "boom"


# --- end of stream --------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        b'data: {"content": "cut sho',
        b"data: complete line but no blank line\n",
        b"data: complete line but no blank line\r\n",
        b"data: complete line but no blank line\r",
        b"error: {}\n",
        b"event: x\ndata: y\n",
    ],
)
def test_flush_discards_incomplete_event(tail: bytes) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: whole\n\n" + tail) == [ServerSentEvent(data="whole")]
    assert decoder.flush() == []
    assert list(iter_events([b"data: whole\n\n", tail])) == [
        ServerSentEvent(data="whole")
    ]


def test_flush_after_complete_stream_returns_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(STREAMS["lf"]) == EXPECTED
    assert decoder.flush() == []
    assert decoder.flush() == []


def test_flush_resets_for_a_new_stream() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 9\nevent: custom\nretry: 3\ndata: cut\r")
    assert decoder.flush() == []
    # No leftover partial line, CR state, field buffers or last ID; a BOM is the
    # start of a new stream again.
    assert decoder.feed(b"\xef\xbb\xbf\ndata: x\n\n") == [ServerSentEvent(data="x")]


# --- robustness -----------------------------------------------------------------------


def _junk(rng: random.Random) -> bytes:
    # Random bytes alone rarely form fields; mixing in SSE tokens reaches more states.
    tokens = [
        b"data:", b"data: ", b"event:", b"id:", b"retry:", b"error:", b":", b" ",
        b"\r", b"\n", b"\r\n", b"\x00", b"\xef\xbb\xbf", b"\xff", b"\xe4\xb8", b"123",
        "🎉".encode(),
    ]  # fmt: skip
    parts: list[bytes] = []
    for _ in range(rng.randint(0, 80)):
        if rng.random() < 0.5:
            parts.append(rng.choice(tokens))
        else:
            parts.append(rng.randbytes(rng.randint(1, 8)))
    return b"".join(parts)


def test_junk_never_raises_and_chunking_never_matters() -> None:
    rng = random.Random(20240601)
    for trial in range(300):
        data = _junk(rng)
        whole = _decode([data])
        for event in whole:
            assert isinstance(event.event, str)
            assert isinstance(event.data, str)
            assert event.id is None or isinstance(event.id, str)
            assert event.retry is None or isinstance(event.retry, int)
        chunks = _random_splits(data, rng, max_pieces=10)
        assert _decode(chunks) == whole, f"trial {trial}: {chunks!r}"


def test_long_line_in_tiny_chunks() -> None:
    # Exercises the pending-pieces path: one line built from thousands of feeds.
    value = "x" * 20_000 + TEXT
    data = f"data: {value}\n\n".encode()
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for i in range(0, len(data), 3):
        events.extend(decoder.feed(data[i : i + 3]))
    assert events == [ServerSentEvent(data=value)]


# --- ServerSentEvent ------------------------------------------------------------------


def test_event_defaults() -> None:
    event = ServerSentEvent(data="x")
    assert event == ("message", "x", None, None)
    assert (event.event, event.id, event.retry) == ("message", None, None)


def test_event_is_immutable() -> None:
    event = ServerSentEvent(data="x")
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]


def test_json_helper() -> None:
    (event,) = _decode([f"data: {_chunk(TEXT)}\n\n".encode()])
    assert event.json()["choices"][0]["delta"]["content"] == TEXT
    with pytest.raises(ValueError, match="Expecting value"):
        ServerSentEvent(data="[DONE]").json()
    with pytest.raises(json.JSONDecodeError):
        ServerSentEvent(data="").json()


def test_docstring_examples() -> None:
    result = doctest.testmod(sse_module)
    assert result.attempted > 0
    assert result.failed == 0

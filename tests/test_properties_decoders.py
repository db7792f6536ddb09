"""Property-based tests of the two byte-stream decoders: chunked transfer coding and SSE.

The network decides where one read ends and the next begins, so the central property of
both decoders is that the split never matters: every way of cutting a body into pieces
(inside a CRLF, inside a multi-byte UTF-8 character, into empty pieces) decodes exactly
like the whole body. Valid bodies are generated from a structured description, so the
expected result is known independently of the decoder; junk checks that bad input only
ever raises the decoder's documented error and that memory stays proportional to input.

The example-based tests in test_chunked.py and test_sse.py pin down individual rules;
these explore the combinations.
"""

from __future__ import annotations

import tracemalloc
from typing import Callable, NamedTuple, Optional, Union

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llamarocm._chunked import Dechunker
from llamarocm._sse import ServerSentEvent, SSEDecoder

pytestmark = pytest.mark.timeout(60)

# Example counts are kept small: these run in every test session on two shared cores.
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CR, LF = 0x0D, 0x0A


# --------------------------------------------------------------------------- splitting


def _awkward_cuts(data: bytes) -> list[int]:
    """Cut positions the decoders find hardest: between CR and LF, inside a UTF-8 character."""
    return [i for i in range(1, len(data)) if (data[i - 1] == CR and data[i] == LF) or 0x80 <= data[i] <= 0xBF]


# A split is drawn as a list of cut requests, kept independent of the data so a failing
# example can be written down with @example: (True, k) cuts at the k-th awkward position
# (modulo how many there are), (False, k) at byte k modulo the length.
Cuts = list[tuple[bool, int]]
cuts = st.lists(st.tuples(st.booleans(), st.integers(0, 2**16)), max_size=16)


def _pieces(data: bytes, requests: Cuts) -> list[bytes]:
    """``data`` cut as ``requests`` say; repeated positions give empty pieces on purpose."""
    awkward = _awkward_cuts(data)
    positions = sorted(
        awkward[k % len(awkward)] if use_awkward and awkward else k % (len(data) + 1) for use_awkward, k in requests
    )
    bounds = [0, *positions, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --------------------------------------------------------------------------- chunked: model


class Chunked(NamedTuple):
    """A chunked body and what it carries."""

    raw: bytes
    body: bytes
    spans: tuple[tuple[int, int], ...]  # where each chunk's data sits in ``raw``
    done_at: int  # length of the prefix of ``raw`` that ends with the last-chunk line


# RFC 9110 token characters.
_TCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
_token = st.text(_TCHAR, min_size=1, max_size=8)
_bws = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def _extension(draw: st.DrawFn) -> bytes:
    """Zero or more RFC 9112 chunk extensions, with optional whitespace around ';' and '='."""
    out = ""
    for _ in range(draw(st.integers(0, 2))):
        out += f"{draw(_bws)};{draw(_bws)}{draw(_token)}"
        if draw(st.booleans()):
            value = draw(st.one_of(_token, _token.map(lambda t: f'"{t} \\" x"')))
            out += f"{draw(_bws)}={draw(_bws)}{value}"
    return out.encode()


def _size(n: int, draw: st.DrawFn) -> bytes:
    digits = f"{n:x}"
    if draw(st.booleans()):
        digits = digits.upper()
    return b"0" * draw(st.integers(0, 3)) + digits.encode()


_payload = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.text(min_size=1, max_size=24).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"\r\n", b"\r", b"\n", b"0\r\n\r\n", b"data: x\r\n\r\n"]),  # framing look-alikes as data
)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> Chunked:
    raw = bytearray()
    body = bytearray()
    spans = []
    for data in draw(st.lists(_payload, max_size=8)):
        raw += _size(len(data), draw) + draw(_extension()) + b"\r\n"
        spans.append((len(raw), len(raw) + len(data)))
        raw += data + b"\r\n"
        body += data
    raw += _size(0, draw) + draw(_extension()) + b"\r\n"
    done_at = len(raw)
    for name, value in draw(st.lists(st.tuples(_token, st.text("abc xyz:;=\t", max_size=12)), max_size=3)):
        raw += f"{name}: {value}\r\n".encode()
    raw += b"\r\n"
    return Chunked(bytes(raw), bytes(body), tuple(spans), done_at)


def _dechunk(pieces: list[bytes]) -> tuple[bytes, bool]:
    d = Dechunker()
    out = b"".join(d.feed(piece) for piece in pieces)
    return out, d.done


Outcome = Union[tuple[bytes, bool], str]


def _outcome(pieces: list[bytes]) -> Outcome:
    """Decoded body and done flag, or "ValueError" when the framing is refused."""
    try:
        return _dechunk(pieces)
    except ValueError:
        # ValueError and its subclasses are the documented failure; anything else
        # (IndexError, TypeError...) escapes and fails the test.
        return "ValueError"


# --------------------------------------------------------------------------- chunked: properties


@SETTINGS
@given(chunked_bodies(), cuts)
def test_chunked_any_split_decodes_like_the_whole(chunked: Chunked, split: Cuts) -> None:
    expected = (chunked.body, True)
    assert _dechunk([chunked.raw]) == expected
    assert _dechunk(_pieces(chunked.raw, split)) == expected
    assert _dechunk(_bytewise(chunked.raw)) == expected


@SETTINGS
@given(chunked_bodies(), st.integers(0, 2**16), cuts)
def test_chunked_prefix_gives_exactly_the_data_received(chunked: Chunked, cut: int, split: Cuts) -> None:
    # A body cut short (dropped connection) must stream out exactly the data bytes that
    # arrived, never claim to be done early, and never raise: it is not malformed yet.
    cut %= len(chunked.raw) + 1
    received = b"".join(chunked.raw[start : min(end, cut)] for start, end in chunked.spans if start < cut)
    prefix = chunked.raw[:cut]
    assert _dechunk(_pieces(prefix, split)) == (received, cut >= chunked.done_at)


_framing_tokens = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b"0", b"1", b"a", b"F", b"10", b";", b"=", b" ", b"\t", b"-", b"+", b"x", b"_", b"\x00"]
)
# Size lines and extensions just under and over the decoder's 1024-byte size-line limit.
_long_line = st.integers(1000, 1100).flatmap(lambda n: st.sampled_from([b"1" * n, b"5;" + b"e" * n, b" " * n]))
_junk = st.lists(st.one_of(_framing_tokens, st.binary(max_size=8), _long_line), max_size=30).map(b"".join)

# An extension long enough to cross the size-line limit: refused whole, accepted split.
_OVERLONG = b"5;" + b"e" * 1030 + b"\r\nhello\r\n0\r\n\r\n"


@SETTINGS
@given(_junk, cuts)
@example(_OVERLONG, [(False, 600)]).via("discovered failure")
def test_chunked_junk_splits_agree_and_errors_are_value_errors(junk: bytes, split: Cuts) -> None:
    # Whether a body is accepted, and what it decodes to, must not depend on how the
    # network cut it up; otherwise a server's output would fail only sometimes.
    whole = _outcome([junk])
    assert _outcome(_pieces(junk, split)) == whole
    assert _outcome(_bytewise(junk)) == whole


@pytest.mark.parametrize("line", [b"5;" + b"e" * 1030, b"0" * 1030 + b"5", b"5" + b" " * 1030])
def test_chunked_overlong_size_line_is_refused_however_split(line: bytes) -> None:
    raw = line + b"\r\nhello\r\n0\r\n\r\n"
    for pieces in ([raw], _bytewise(raw), [raw[:1025], raw[1025:]], [raw[:600], raw[600:]]):
        with pytest.raises(ValueError, match="too long"):
            _dechunk(pieces)


def test_chunked_size_line_at_the_limit_is_accepted_however_split() -> None:
    line = b"5;" + b"e" * 1022  # exactly 1024 bytes before the CRLF
    raw = line + b"\r\nhello\r\n0\r\n\r\n"
    for cut in (1023, 1024, 1025, 1026, 1027):
        assert _dechunk([raw[:cut], raw[cut:]]) == (b"hello", True), cut
    assert _dechunk(_bytewise(raw)) == (b"hello", True)


def _traced(run: Callable[[], object]) -> tuple[int, int]:
    """(memory still held, peak) in bytes while ``run`` runs, as tracemalloc sees it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = run()
        current, peak = tracemalloc.get_traced_memory()
        del kept
    finally:
        tracemalloc.stop()
    return current - before, peak - before


@FEW
@given(st.one_of(_junk, chunked_bodies().map(lambda c: c.raw)), cuts)
def test_chunked_memory_is_bounded(raw: bytes, split: Cuts) -> None:
    pieces = _pieces(raw, split)

    def run() -> Dechunker:
        d = Dechunker()
        for piece in pieces:
            try:
                d.feed(piece)  # the output is dropped: only the decoder's own state remains
            except ValueError:
                break
        return d

    held, peak = _traced(run)
    # The decoder keeps at most one unfinished size line (<= 1024 bytes) between feeds;
    # while feeding it needs the input once or twice over.
    assert held < 4096, held
    assert peak < 8 * len(raw) + 16384, (peak, len(raw))


# --------------------------------------------------------------------------- SSE: model


class Field(NamedTuple):
    """One non-blank line of an event stream."""

    name: str  # "" makes the line a comment
    value: str
    space: bool  # one space between the colon and the value (the decoder drops it)
    colon: bool  # False: the line is the bare name, a field with an empty value

    def line(self) -> str:
        if not self.colon:
            return self.name
        return f"{self.name}:{' ' if self.space else ''}{self.value}"

    def parsed(self) -> str:
        if not self.colon:
            return ""
        if not self.space and self.value.startswith(" "):
            return self.value[1:]
        return self.value


# Any text but line breaks; surrogates cannot be encoded. Non-ASCII is kept common so
# that splits land inside multi-byte characters.
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
_value = st.one_of(
    _text, st.sampled_from(["[DONE]", '{"content": "hé 🎉"}', " lead", "  two", "a: b", "\x00", "\ufeff"])
)
# Digits only count if every character is an ASCII digit: int() would accept the rest.
_retry_value = st.one_of(
    st.from_regex(r"[0-9]{1,12}", fullmatch=True),
    st.sampled_from(["-1", "+1", "1_0", "1.5", " 7", "7 ", "0x1", "١٢", "７"]),
)


@st.composite
def _field(draw: st.DrawFn) -> Field:
    name = draw(st.sampled_from(["data", "data", "data", "event", "id", "retry", "retry", "error", "", "foo", "data "]))
    value = draw(_retry_value if name == "retry" and draw(st.integers(0, 3)) else _value)
    colon = name == "" or draw(st.integers(0, 9)) > 0
    return Field(name, value, draw(st.booleans()), colon)


class Stream(NamedTuple):
    raw: bytes
    events: list[ServerSentEvent]


def _expected(blocks: list[list[Field]], tail: list[Field]) -> list[ServerSentEvent]:
    """The events a spec-conforming decoder dispatches: written from the spec, not the code."""
    events = []
    last_id: Optional[str] = None
    for block in [*blocks, tail]:
        data: list[str] = []
        event_type = ""
        error = False
        retry: Optional[int] = None
        for f in block:
            value = f.parsed()
            if f.name == "data":
                data.append(value)
            elif f.name == "error":
                data.append(value)
                error = True
            elif f.name == "event":
                event_type = value
            elif f.name == "id" and "\x00" not in value:
                last_id = value
            elif f.name == "retry" and value and all(c in "0123456789" for c in value):
                retry = int(value)
        if data and block is not tail:  # the unterminated tail is never dispatched
            kind = "error" if error else event_type or "message"
            events.append(ServerSentEvent(kind, "\n".join(data), last_id, retry))
    return events


@st.composite
def sse_streams(draw: st.DrawFn) -> Stream:
    blocks: list[list[Field]] = draw(st.lists(st.lists(_field(), max_size=5), max_size=6))
    tail: list[Field] = draw(st.lists(_field(), max_size=3))
    lines = [f.line() for block in blocks for f in [*block, Field("", "", False, False)]]
    lines += [f.line() for f in tail]
    out = ["\ufeff"] if draw(st.booleans()) else []
    previous = ""
    for line in lines:
        newline: str = draw(st.sampled_from(["\n", "\r", "\r\n"]))
        if previous == "\r" and not line and newline == "\n":
            newline = "\r\n"  # CR then a lone LF is one CRLF: the blank line would vanish
        out += [line, newline]
        previous = newline
    raw = "".join(out).encode("utf-8")
    if tail and draw(st.booleans()):
        raw = raw[: draw(st.integers(len(raw) - len(out[-2].encode()) - 1, len(raw)))]
    return Stream(raw, _expected(blocks, tail))


def _events(pieces: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for piece in pieces:
        events += decoder.feed(piece)
    return events + decoder.flush()


# --------------------------------------------------------------------------- SSE: properties


@SETTINGS
@given(sse_streams(), cuts)
def test_sse_any_split_decodes_like_the_model(stream: Stream, split: Cuts) -> None:
    assert _events([stream.raw]) == stream.events
    assert _events(_pieces(stream.raw, split)) == stream.events
    assert _events(_bytewise(stream.raw)) == stream.events


_sse_tokens = st.sampled_from(
    [b"data:", b"data: ", b"event:", b"id:", b"retry:", b"error:", b":", b" ", b"\r", b"\n", b"\r\n"]
    + [b"\x00", b"\xef\xbb\xbf", b"\xef\xbb", b"\xff", b"\xe4\xb8", "🎉".encode(), b"123", b"99999999999999999999"]
)
_sse_junk = st.lists(st.one_of(_sse_tokens, st.binary(max_size=8)), max_size=40).map(b"".join)


@SETTINGS
@given(_sse_junk, cuts)
def test_sse_junk_never_raises_and_splits_agree(junk: bytes, split: Cuts) -> None:
    # The SSE decoder has no error of its own: undecodable bytes become U+FFFD and
    # unknown lines are ignored, so any exception at all is a bug.
    whole = _events([junk])
    for event in whole:
        assert type(event.event) is str and type(event.data) is str
        assert event.id is None or type(event.id) is str
        assert event.retry is None or (type(event.retry) is int and event.retry >= 0)
    assert _events(_pieces(junk, split)) == whole
    assert _events(_bytewise(junk)) == whole


def _sse_growth(decoder_type: type[SSEDecoder], pieces: list[bytes], repeats: int = 20) -> tuple[int, int]:
    """How much more memory a decoder holds after ``repeats`` passes over ``pieces`` than
    after one (each pass closed by a blank line, events dropped), and the peak of one pass.
    """

    def passes(times: int) -> Callable[[], SSEDecoder]:
        def feed() -> SSEDecoder:
            decoder = decoder_type()
            for _ in range(times):
                for piece in pieces:
                    decoder.feed(piece)
                decoder.feed(b"\n\n")  # ends any unterminated tail, so nothing is pending
            return decoder

        return feed

    held_once, peak_once = _traced(passes(1))
    held_many, _ = _traced(passes(repeats))
    return held_many - held_once, peak_once


def _sse_growth_limit(raw: bytes) -> int:
    # Between events the decoder holds the last id and nothing else, the same after one
    # pass as after twenty; the slack is for allocator noise, far below 19 passes' worth.
    return 2048 + len(raw)


@FEW
@given(sse_streams(), cuts)
def test_sse_memory_is_bounded(stream: Stream, split: Cuts) -> None:
    growth, peak = _sse_growth(SSEDecoder, _pieces(stream.raw, split))
    assert growth < _sse_growth_limit(stream.raw), growth
    # One pass needs memory proportional to its input (lines, then events), no more.
    assert peak < 64 * len(stream.raw) + 65536, (peak, len(stream.raw))


def test_sse_memory_check_can_see_a_leak() -> None:
    # The growth bound must be tight enough to notice state that grows per event.
    class Leaky(SSEDecoder):
        __slots__ = ("seen",)

        def feed(self, chunk: bytes) -> list[ServerSentEvent]:
            events = super().feed(chunk)
            if not hasattr(self, "seen"):
                self.seen: list[ServerSentEvent] = []
            self.seen += events
            return events

    raw = b"data: x\n\n" * 5
    growth, _ = _sse_growth(Leaky, [raw])
    assert growth > _sse_growth_limit(raw), growth
    assert _sse_growth(SSEDecoder, [raw])[0] < _sse_growth_limit(raw)

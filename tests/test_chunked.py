"""The chunked transfer-coding decoder under awkward splits and junk."""

from __future__ import annotations

import random

import pytest

from llamarocm._chunked import Dechunker

pytestmark = pytest.mark.timeout(30)

BODY = [b"data: {\"content\": \"h\xc3\xa9llo\"}\n\n", b"data: [DONE]\n\n", b"x" * 300]


def _encode(pieces, extension=b"") -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces)
    return out + b"0\r\n\r\n"


def _decode(chunks):
    d = Dechunker()
    body = b"".join(d.feed(c) for c in chunks)
    return body, d.done


@pytest.mark.parametrize("extension", [b"", b";name=value"])
def test_every_two_way_split(extension):
    raw = _encode(BODY, extension)
    for cut in range(len(raw) + 1):
        assert _decode([raw[:cut], raw[cut:]]) == (b"".join(BODY), True), cut


def test_one_byte_at_a_time_and_random_splits():
    raw = _encode(BODY)
    assert _decode([raw[i : i + 1] for i in range(len(raw))]) == (b"".join(BODY), True)
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 10)))
        parts = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)], strict=True)]
        assert _decode(parts) == (b"".join(BODY), True)


def test_unfinished_body_is_not_done():
    raw = _encode(BODY)[:-5]
    body, done = _decode([raw])
    assert not done and body == b"".join(BODY)


def test_trailers_after_the_last_chunk_are_ignored():
    d = Dechunker()
    assert d.feed(b"3\r\nabc\r\n0\r\n") == b"abc" and d.done
    assert d.feed(b"X-Trailer: 1\r\n\r\n") == b""


@pytest.mark.parametrize("junk", [b"zz\r\nabc\r\n", b"3\r\nabcXY", b"-1\r\n", b"1" * 2000])
def test_malformed_framing_is_a_value_error(junk):
    with pytest.raises(ValueError):
        Dechunker().feed(junk)


def test_random_junk_raises_only_value_error():
    rng = random.Random(11)
    for _ in range(500):
        d = Dechunker()
        try:
            for _ in range(5):
                d.feed(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
        except ValueError:
            pass

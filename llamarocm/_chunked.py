"""A pure, incremental decoder of HTTP/1.1 chunked transfer coding: raw bytes in,
body bytes out. No I/O.

llama-server sends each SSE event as its own HTTP chunk, and ``http.client`` returns at
most one chunk per read: decoding the framing ourselves lets one network read carry
every event that has arrived, which turns a thread hand-off per token into one per read.
"""

from __future__ import annotations

__all__ = ["Dechunker"]

_DATA_END = -2  # the CRLF that closes a chunk's data is next
# Longest chunk-size line accepted (size plus extensions, without its CRLF). llama-server
# sends bare sizes; the cap keeps junk from growing the buffer without end.
_MAX_LINE = 1024
_CR = 0x0D


class Dechunker:
    """Feed raw bytes of a chunked body; get the body bytes they complete.

    >>> d = Dechunker()
    >>> d.feed(b"5\\r\\nhel") + d.feed(b"lo\\r\\n0\\r\\n\\r\\n"), d.done
    (b'hello', True)
    """

    __slots__ = ("_buf", "_left", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # data bytes still due in the current chunk (or _DATA_END)
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Decode ``data``; raises ``ValueError`` on malformed framing (a bad or over-long
        chunk-size line, chunk data not followed by CRLF), however the body was split."""
        if self.done:
            return b""  # trailers after the last chunk carry nothing we use
        # This runs once per network read of every token stream, so the three states
        # stay inline (a call per HTTP chunk costs a few percent); helpers only judge
        # framing that is wrong or not all here yet.
        buf = self._buf + data if self._buf else data
        out = []
        pos, n, left = 0, len(buf), self._left
        while pos < n:
            if left > 0:
                end = pos + left
                if end <= n:
                    out.append(buf[pos:end])
                    pos, left = end, _DATA_END
                else:
                    out.append(buf[pos:])
                    left -= n - pos
                    pos = n
            elif left == _DATA_END:
                if buf[pos : pos + 2] != b"\r\n":
                    _check_data_end(buf, pos)
                    break  # the CRLF is not all here yet
                pos, left = pos + 2, 0
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0 or eol - pos > _MAX_LINE:
                    _check_size_line_length(buf, pos, eol)
                    break  # the size line is not all here yet
                size_text = buf[pos:eol].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ValueError(f"chunked body: bad chunk size {size_text[:20]!r}") from None
                if size < 0:
                    raise ValueError("chunked body: negative chunk size")
                pos = eol + 2
                if size == 0:
                    self.done = True
                    pos = n
                    break
                left = size
        self._buf = buf[pos:]
        self._left = left
        return b"".join(out)


def _check_data_end(buf: bytes, pos: int) -> None:
    """Refuse chunk data followed by two bytes other than CRLF; fewer may still become it."""
    if len(buf) - pos >= 2:
        raise ValueError("chunked body: data not followed by CRLF")


def _check_size_line_length(buf: bytes, pos: int, eol: int) -> None:
    """Refuse an over-long chunk-size line starting at ``pos`` (ending at ``eol``, or
    not yet ended when ``eol`` is -1).

    The same line must be refused however the network splits it: checked once it is
    whole, and before that as soon as it is certainly too long (a trailing CR may still
    be the start of its CRLF).
    """
    if eol < 0:
        n = len(buf)
        length = n - pos - (buf[n - 1] == _CR)
    else:
        length = eol - pos
    if length > _MAX_LINE:
        raise ValueError("chunked body: chunk-size line too long")

"""GGUF value encoding: reading and skipping values in a buffer, and decoding arrays lazily.

A GGUF header is a run of typed values (fixed-width numbers, length-prefixed strings,
arrays of either, arrays of arrays) with no index: finding anything means stepping over
everything before it. :class:`Walker` does that stepping with every length and count
checked against the file size first, so a truncated, corrupt or hostile file raises
:class:`~llamarocm.errors.GGUFError` rather than hanging, exhausting memory or leaking
``struct.error``. Arrays are skipped, not decoded: :class:`GGUFArray` remembers where
its bytes are and decodes elements only when they are asked for.

Strings are decoded as UTF-8 with ``errors="replace"`` (``llamarocm.gguf`` says why);
:meth:`GGUFArray.raw` gives the exact bytes.

The walk of the whole header, which uses these pieces, is in ``_gguf_header``; the
public reader is ``llamarocm.gguf``.
"""

from __future__ import annotations

import operator
import os
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from enum import IntEnum
from itertools import repeat
from typing import Any, Optional

from .errors import GGUFError, ModelNotFoundError


class GGUFValueType(IntEnum):
    """Type codes of GGUF metadata values, as in the GGUF specification."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


STRING = 8
ARRAY = 9
# struct codes and sizes of the fixed-width value types. GGUF's bool is one byte.
FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
INTEGER_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))

# llama.cpp's own limit: ggml tensors have at most 4 dimensions.
MAX_DIMS = 4
# llama.cpp cannot read nested arrays at all; gguf-py can. Any real file nests at most
# once or twice, and the bound keeps a hostile file from recursing without end.
_MAX_ARRAY_DEPTH = 8

# Variable-width arrays (strings, arrays of arrays) remember where every _RUN-th element
# starts, so indexing walks at most _RUN - 1 length prefixes.
_RUN = 256
# String arrays at least this long are skipped with a compiled regular expression (see
# _string_run_pattern); shorter ones are not worth the one-time compile.
_REGEX_MIN_COUNT = 2048
# Arrays whose bytes total at most this are copied out during the walk; bigger ones are
# read back from the file on first use, so an untouched vocabulary costs no memory.
_EAGER_BYTES = 64 * 1024


# --------------------------------------------------------------------------- structs


class Codec:
    """Precompiled structs for one byte order."""

    __slots__ = ("big", "prefix", "u32", "u64", "u32u64", "u64u64", "dims", "scalar", "_run")

    def __init__(self, prefix: str) -> None:
        self.big = prefix == ">"
        self.prefix = prefix
        self.u32 = struct.Struct(prefix + "I")
        self.u64 = struct.Struct(prefix + "Q")
        self.u32u64 = struct.Struct(prefix + "IQ")
        self.u64u64 = struct.Struct(prefix + "QQ")
        self.dims = [struct.Struct(f"{prefix}{n}Q") for n in range(MAX_DIMS + 1)]
        self.scalar = {code: struct.Struct(prefix + c) for code, c in FIXED.items()}
        self._run: Optional[re.Pattern[bytes]] = None

    def string_run(self) -> re.Pattern[bytes]:
        # Compiled on first need only (a few ms), then reused for the process.
        pattern = self._run
        if pattern is None:
            pattern = self._run = _string_run_pattern(self.big)
        return pattern


def _string_run_pattern(big_endian: bool) -> re.Pattern[bytes]:
    """A regex matching exactly _RUN consecutive GGUF strings shorter than 128 bytes.

    Skipping a string array needs every length prefix, one after the other. A Python
    loop pays ~100-200 ns per string; letting the regex engine chase the prefixes in C
    is 2-3x faster, which is what keeps a 262k-token vocabulary inside the time budget.
    Each alternative is "this exact 8-byte length, then that many bytes"; a run with a
    longer string simply does not match and the caller falls back to the Python loop
    for that run, so the result is always exactly the loop's.
    """
    lengths = range(128)
    if big_endian:
        alts = [re.escape(bytes([n])) + (b".{%d}" % n if n else b"") for n in lengths]
        body = b"\x00{7}(?:" + b"|".join(alts) + b")"
    else:
        alts = [re.escape(bytes([n]) + b"\x00" * 7) + (b".{%d}" % n if n else b"") for n in lengths]
        body = b"|".join(alts)
    # A possessive repeat (3.11+) saves the engine from keeping backtracking state.
    possessive = b"+" if sys.version_info >= (3, 11) else b""
    return re.compile(b"(?:" + body + b"){%d}" % _RUN + possessive, re.DOTALL)


LE = Codec("<")
BE = Codec(">")


def new_run_index(element_type: int) -> Optional[list[int]]:
    """An empty run index for an array of variable-width elements, None for fixed-width."""
    return [] if element_type in (STRING, ARRAY) else None


class NeedMore(Exception):
    """The header runs past the bytes read so far (the no-mmap fallback reads more)."""


# --------------------------------------------------------------------------- lazy arrays


class _Blob:
    """Bytes [start, end) of a file, read once on first use.

    Keeping the file mapped instead would pin a descriptor and turn a file truncated
    behind our back into SIGBUS; re-reading a small range costs one open and one read.
    """

    __slots__ = ("_path", "_start", "_end", "_signature", "_data")

    def __init__(self, path: str, start: int, end: int, signature: tuple[int, ...], data: Optional[bytes]) -> None:
        self._path = path
        self._start = start
        self._end = end
        self._signature = signature
        self._data = data

    def data(self) -> bytes:
        data = self._data
        if data is None:
            data = self._data = self._load()
        return data

    def _load(self) -> bytes:
        changed = GGUFError(f"GGUF file {self._path} changed since its metadata was read; read it again")
        try:
            with open(self._path, "rb") as f:
                if file_signature(os.fstat(f.fileno())) != self._signature:
                    raise changed
                f.seek(self._start)
                data = f.read(self._end - self._start)
        except FileNotFoundError:
            raise ModelNotFoundError(f"GGUF file {self._path} disappeared since its metadata was read") from None
        if len(data) != self._end - self._start:
            raise changed
        return data


def file_signature(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another: size, mtime, inode and device."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class GGUFArray(Sequence[Any]):
    """A GGUF array value, decoded on access.

    Supports ``len()``, indexing (negative too), slicing (returns a ``list``), iteration,
    ``==`` against any sequence, and :meth:`tolist`. ``type`` is the element type;
    elements are ``int``, ``float``, ``bool``, ``str`` or, for nested arrays, further
    ``GGUFArray`` objects.

    The bytes are read from the file on first access (small arrays are kept from the
    walk). If the file was modified in between, access raises ``GGUFError``.

    >>> meta = read_metadata("gemma-3-270m-q4_k_m.gguf")  # doctest: +SKIP
    >>> tokens = meta.kv["tokenizer.ggml.tokens"]  # doctest: +SKIP
    >>> len(tokens), tokens[2], tokens[-1], tokens[100:103]  # doctest: +SKIP
    (262144, '<bos>', '<unused6241>', ['<unused94>', '<unused95>', '<unused96>'])
    """

    __slots__ = ("_type", "_count", "_blob", "_off", "_runs", "_codec", "_depth", "_path")

    def __init__(
        self,
        element_type: int,
        count: int,
        blob: _Blob,
        off: int,
        runs: Optional[list[int]],
        codec: Codec,
        depth: int,
        path: str,
    ) -> None:
        self._type = element_type
        self._count = count
        self._blob = blob
        self._off = off  # where element 0 starts, relative to the blob
        self._runs = runs  # variable-width types: start of every _RUN-th element
        self._codec = codec
        self._depth = depth
        self._path = path

    @property
    def type(self) -> GGUFValueType:
        """The element type."""
        return GGUFValueType(self._type)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<GGUFArray {self.type.name}[{self._count}]>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (GGUFArray, list, tuple)):
            return len(other) == self._count and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequences are unhashable

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._slice(index)
        return self._decode(self._checked_index(index), 1)[0]

    def __iter__(self) -> Iterator[Any]:
        step = 4096
        for start in range(0, self._count, step):
            yield from self._decode(start, min(step, self._count - start))

    def tolist(self) -> list[Any]:
        """Every element as a Python list (nested arrays become nested lists).

        >>> read_metadata("model.gguf").kv["general.tags"].tolist()  # doctest: +SKIP
        ['gemma3', 'gemma', 'google', 'text-generation']
        """
        items = self._decode(0, self._count)
        if self._type == ARRAY:
            return [item.tolist() for item in items]
        return items

    def raw(self, index: int) -> bytes:
        """The exact bytes of string element ``index`` (no UTF-8 decoding).

        >>> read_metadata("model.gguf").kv["tokenizer.ggml.tokens"].raw(2)  # doctest: +SKIP
        b'<bos>'
        """
        if self._type != STRING:
            raise TypeError(f"raw() needs a STRING array, this is {self.type.name}")
        i = self._checked_index(index)
        data = self._blob.data()
        off = self._position(data, i)
        n = self._codec.u64.unpack_from(data, off)[0]
        return data[off + 8 : off + 8 + n]

    # -- decoding ---------------------------------------------------------------------

    def _checked_index(self, index: Any) -> int:
        """``index`` as a position in range (negative counts from the end), or IndexError."""
        i = operator.index(index)
        n = self._count
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"GGUF array index {index} out of range for length {n}")
        return i

    def _slice(self, index: slice) -> list[Any]:
        start, stop, step = index.indices(self._count)
        if step == 1:
            return self._decode(start, max(0, stop - start))
        return [self._decode(i, 1)[0] for i in range(start, stop, step)]

    def _decode(self, start: int, count: int) -> list[Any]:
        """Elements [start, start + count), which the caller keeps in range."""
        if count <= 0:
            return []
        data = self._blob.data()
        code = FIXED.get(self._type)
        if code is not None:
            if count == 1:
                scalar = self._codec.scalar[self._type]
                return [scalar.unpack_from(data, self._off + start * scalar.size)[0]]
            size = struct.calcsize(code)
            return list(struct.unpack_from(f"{self._codec.prefix}{count}{code}", data, self._off + start * size))
        off = self._position(data, start)
        out: list[Any] = []
        append = out.append
        if self._type == STRING:
            u64 = self._codec.u64.unpack_from
            for _ in repeat(None, count):
                n = u64(data, off)[0]
                off += 8
                append(data[off : off + n].decode("utf-8", "replace"))
                off += n
            return out
        walker = self._nested_walker(data)
        u32u64 = self._codec.u32u64.unpack_from
        for _ in repeat(None, count):
            element_type, n = u32u64(data, off)
            child_runs = new_run_index(element_type)
            end = walker.skip_array(element_type, n, off + 12, self._depth + 1, child_runs)
            append(
                GGUFArray(element_type, n, self._blob, off + 12, child_runs, self._codec, self._depth + 1, self._path)
            )
            off = end
        return out

    def _position(self, data: bytes, i: int) -> int:
        """Byte offset of variable-width element ``i`` inside ``data``."""
        runs = self._runs
        assert runs is not None  # every variable-width array is built with its index
        off = runs[i // _RUN]
        left = i % _RUN
        if not left:
            return off
        if self._type == STRING:
            u64 = self._codec.u64.unpack_from
            for _ in repeat(None, left):
                off += u64(data, off)[0] + 8
            return off
        walker = self._nested_walker(data)
        u32u64 = self._codec.u32u64.unpack_from
        for _ in repeat(None, left):
            element_type, n = u32u64(data, off)
            off = walker.skip_array(element_type, n, off + 12, self._depth + 1, None)
        return off

    def _nested_walker(self, data: bytes) -> Walker:
        """A walker over the loaded bytes, to step over the elements of nested arrays."""
        return Walker(data, len(data), len(data), self._path, self._codec, lazy=None)


# --------------------------------------------------------------------------- bounded reads


class Walker:
    """Bounds-checked reads from a buffer holding (at least a prefix of) a GGUF file.

    ``limit`` is how many bytes ``buf`` holds, ``size`` how big the file is; they differ
    only in the no-mmap fallback, where running past ``limit`` asks for more bytes.
    ``lazy`` (path, signature) turns arrays into file-backed GGUFArrays; None while
    re-walking bytes already loaded.
    """

    __slots__ = ("buf", "limit", "size", "path", "codec", "lazy")

    def __init__(
        self,
        buf: Any,
        limit: int,
        size: int,
        path: str,
        codec: Codec,
        lazy: Optional[tuple[str, tuple[int, ...]]],
    ) -> None:
        self.buf = buf
        self.limit = limit
        self.size = size
        self.path = path
        self.codec = codec
        self.lazy = lazy

    def error(self, detail: str) -> GGUFError:
        return GGUFError(f"{self.path} is not a valid GGUF file: {detail}")

    def need(self, off: int, n: int, what: str) -> None:
        if off + n > self.limit:
            self.past_end(off + n, what)

    def past_end(self, end: int, what: str) -> None:
        if end > self.size:
            raise self.error(f"{what} runs past the end of the file (needs byte {end}, file has {self.size})")
        raise NeedMore

    def string(self, off: int, what: str) -> tuple[str, int]:
        self.need(off, 8, what)
        n = self.codec.u64.unpack_from(self.buf, off)[0]
        off += 8
        self.need(off, n, what)
        return self.buf[off : off + n].decode("utf-8", "replace"), off + n

    def value(self, value_type: int, off: int, what: str) -> tuple[Any, int]:
        """Decode one metadata value; arrays become GGUFArray."""
        scalar = self.codec.scalar.get(value_type)
        if scalar is not None:
            self.need(off, scalar.size, what)
            return scalar.unpack_from(self.buf, off)[0], off + scalar.size
        if value_type == STRING:
            return self.string(off, what)
        if value_type == ARRAY:
            self.need(off, 12, what)
            element_type, count = self.codec.u32u64.unpack_from(self.buf, off)
            off += 12
            runs = new_run_index(element_type)
            end = self.skip_array(element_type, count, off, 1, runs, what)
            return self.make_array(element_type, count, off, end, runs), end
        raise self.error(f"{what} has unknown value type {value_type}")

    def make_array(self, element_type: int, count: int, start: int, end: int, runs: Optional[list[int]]) -> GGUFArray:
        assert self.lazy is not None
        path, signature = self.lazy
        data = self.buf[start:end] if end - start <= _EAGER_BYTES else None
        if runs is not None:
            runs = [r - start for r in runs]
        blob = _Blob(path, start, end, signature, data)
        return GGUFArray(element_type, count, blob, 0, runs, self.codec, 1, self.path)

    def skip_array(
        self,
        element_type: int,
        count: int,
        off: int,
        depth: int,
        runs: Optional[list[int]],
        what: str = "array",
    ) -> int:
        """Offset just past ``count`` elements starting at ``off``; fills ``runs``."""
        if depth > _MAX_ARRAY_DEPTH:
            raise self.error(f"{what} nests arrays deeper than {_MAX_ARRAY_DEPTH} levels")
        code = FIXED.get(element_type)
        if code is not None:
            n = count * struct.calcsize(code)
            self.need(off, n, what)
            return off + n
        if element_type == STRING:
            return self.skip_strings(count, off, runs, what)
        if element_type == ARRAY:
            # Each element is at least its own 12-byte header: bounds the loop by the file.
            if count * 12 > self.size - off:
                raise self.error(f"{what} declares {count} arrays, more than the file can hold")
            u32u64 = self.codec.u32u64.unpack_from
            for i in range(count):
                if runs is not None and not i % _RUN:
                    runs.append(off)
                self.need(off, 12, what)
                inner_type, inner_count = u32u64(self.buf, off)
                off = self.skip_array(inner_type, inner_count, off + 12, depth + 1, None, what)
            return off
        raise self.error(f"{what} has unknown element type {element_type}")

    def skip_strings(self, count: int, off: int, runs: Optional[list[int]], what: str) -> int:
        # Each string is at least its 8-byte length: bounds the loop by the file.
        if count * 8 > self.size - off:
            raise self.error(f"{what} declares {count} strings, more than the file can hold")
        buf = self.buf
        u64 = self.codec.u64.unpack_from
        match = self.codec.string_run().match if count >= _REGEX_MIN_COUNT else None
        left = count
        start = off
        try:
            while left:
                if runs is not None:
                    runs.append(off)
                if match is not None and left >= _RUN:
                    found = match(buf, off)
                    if found is not None:
                        off = found.end()
                        left -= _RUN
                        continue
                k = _RUN if left >= _RUN else left
                left -= k
                # Out-of-range lengths surface as struct.error / OverflowError on the
                # next read, or fail the check after the loop; no read trusts them.
                for _ in repeat(None, k):
                    off += u64(buf, off)[0] + 8
                if off > self.limit:
                    break
        except (struct.error, OverflowError):
            self.past_end(max(off + 8, start), what)
        if off > self.limit:
            self.past_end(off, what)
        return off

"""Read GGUF model metadata without loading the model: pure Python, standard library only.

``read_metadata(path)`` walks the header of a GGUF v2/v3 file (little- or big-endian):
every key/value pair and every tensor description, never the tensor data. Arrays are not
decoded during the walk; ``kv`` holds lazy :class:`GGUFArray` objects that read their
bytes from the file the first time they are touched, so a 262,144-entry vocabulary costs
one pass over its length prefixes and nothing more until someone asks for a token.

Every length and count in the file is checked against the file size before it is used,
so a truncated, corrupt or hostile file raises :class:`~llamarocm.errors.GGUFError` (a
``ValueError``) rather than hanging, exhausting memory or leaking ``struct.error``.
Strings are decoded as UTF-8 with ``errors="replace"``: GGUF does not promise valid
UTF-8 (some vocabularies hold raw byte pieces) and a model should not become unreadable
because one token is not text. :meth:`GGUFArray.raw` gives the exact bytes when they
matter.

``discover_models(folder)`` lists the models in a folder as :class:`ModelInfo` records,
counting a llama.cpp split model (``name-00001-of-00003.gguf``...) once.

Which objects may be shared across threads: all of them. ``GGUFMetadata``,
``TensorInfo`` and ``ModelInfo`` are immutable; a ``GGUFArray`` loads its bytes at most
once per thread that races to touch it first, and the result is the same either way.
"""

from __future__ import annotations

import logging
import mmap
import operator
import os
import re
import stat
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import repeat
from types import MappingProxyType
from typing import Any, BinaryIO, NamedTuple, Optional, Union

from .errors import GGUFError, ModelNotFoundError

__all__ = [
    "GGUFArray",
    "GGUFMetadata",
    "GGUFValueType",
    "ModelInfo",
    "TensorInfo",
    "check_model_file",
    "discover_models",
    "read_metadata",
]

logger = logging.getLogger("llamarocm")

PathLike = Union[str, "os.PathLike[str]"]


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


_STRING = 8
_ARRAY = 9
# struct codes and sizes of the fixed-width value types. GGUF's bool is one byte.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_INTEGER_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))

# llama.cpp's own limits: ggml tensors have at most 4 dimensions, element counts fit int64.
_MAX_DIMS = 4
_INT64_MAX = 2**63 - 1
# llama.cpp cannot read nested arrays at all; gguf-py can. Any real file nests at most
# once or twice, and the bound keeps a hostile file from recursing without end.
_MAX_ARRAY_DEPTH = 8
_DEFAULT_ALIGNMENT = 32

# Variable-width arrays (strings, arrays of arrays) remember where every _RUN-th element
# starts, so indexing walks at most _RUN - 1 length prefixes.
_RUN = 256
# String arrays at least this long are skipped with a compiled regular expression (see
# _string_run_pattern); shorter ones are not worth the one-time compile.
_REGEX_MIN_COUNT = 2048
# Arrays whose bytes total at most this are copied out during the walk; bigger ones are
# read back from the file on first use, so an untouched vocabulary costs no memory.
_EAGER_BYTES = 64 * 1024

# llama.cpp's names for general.file_type (enum llama_ftype in include/llama.h, without
# the LLAMA_FTYPE_MOSTLY_ / LLAMA_FTYPE_ALL_ prefix). 4-6 and 33-35 were removed upstream.
_FILE_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}

# ggml tensor types: (name, elements per block, bytes per block), from ggml.h /
# gguf-py's GGML_QUANT_SIZES. Used to name tensor types and to check that each tensor's
# data lies inside the file (a truncated download is the commonest broken model).
_GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


# --------------------------------------------------------------------------- structs


class _Codec:
    """Precompiled structs for one byte order."""

    __slots__ = ("big", "prefix", "u32", "u64", "u32u64", "u64u64", "dims", "scalar", "_run")

    def __init__(self, prefix: str) -> None:
        self.big = prefix == ">"
        self.prefix = prefix
        self.u32 = struct.Struct(prefix + "I")
        self.u64 = struct.Struct(prefix + "Q")
        self.u32u64 = struct.Struct(prefix + "IQ")
        self.u64u64 = struct.Struct(prefix + "QQ")
        self.dims = [struct.Struct(f"{prefix}{n}Q") for n in range(_MAX_DIMS + 1)]
        self.scalar = {code: struct.Struct(prefix + c) for code, c in _FIXED.items()}
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


_LE = _Codec("<")
_BE = _Codec(">")


class _NeedMore(Exception):
    """Internal: the header runs past the bytes read so far (non-mmap fallback only)."""


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
                if _signature(os.fstat(f.fileno())) != self._signature:
                    raise changed
                f.seek(self._start)
                data = f.read(self._end - self._start)
        except FileNotFoundError:
            raise ModelNotFoundError(f"GGUF file {self._path} disappeared since its metadata was read") from None
        if len(data) != self._end - self._start:
            raise changed
        return data


def _signature(st: os.stat_result) -> tuple[int, ...]:
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
        codec: _Codec,
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
        i = operator.index(index)
        n = self._count
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"GGUF array index {index} out of range for length {n}")
        return self._decode(i, 1)[0]

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
        if self._type == _ARRAY:
            return [item.tolist() for item in items]
        return items

    def raw(self, index: int) -> bytes:
        """The exact bytes of string element ``index`` (no UTF-8 decoding).

        >>> read_metadata("model.gguf").kv["tokenizer.ggml.tokens"].raw(2)  # doctest: +SKIP
        b'<bos>'
        """
        if self._type != _STRING:
            raise TypeError(f"raw() needs a STRING array, this is {self.type.name}")
        i = operator.index(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"GGUF array index {index} out of range for length {self._count}")
        data = self._blob.data()
        off = self._position(data, i)
        n = self._codec.u64.unpack_from(data, off)[0]
        return data[off + 8 : off + 8 + n]

    # -- decoding ---------------------------------------------------------------------

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
        code = _FIXED.get(self._type)
        if code is not None:
            if count == 1:
                scalar = self._codec.scalar[self._type]
                return [scalar.unpack_from(data, self._off + start * scalar.size)[0]]
            size = struct.calcsize(code)
            return list(struct.unpack_from(f"{self._codec.prefix}{count}{code}", data, self._off + start * size))
        off = self._position(data, start)
        out: list[Any] = []
        append = out.append
        if self._type == _STRING:
            u64 = self._codec.u64.unpack_from
            for _ in repeat(None, count):
                n = u64(data, off)[0]
                off += 8
                append(data[off : off + n].decode("utf-8", "replace"))
                off += n
            return out
        walker = _Walker(data, len(data), len(data), self._path, self._codec, lazy=None)
        u32u64 = self._codec.u32u64.unpack_from
        for _ in repeat(None, count):
            element_type, n = u32u64(data, off)
            child_runs: Optional[list[int]] = [] if element_type in (_STRING, _ARRAY) else None
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
        if self._type == _STRING:
            u64 = self._codec.u64.unpack_from
            for _ in repeat(None, left):
                off += u64(data, off)[0] + 8
            return off
        walker = _Walker(data, len(data), len(data), self._path, self._codec, lazy=None)
        u32u64 = self._codec.u32u64.unpack_from
        for _ in repeat(None, left):
            element_type, n = u32u64(data, off)
            off = walker.skip_array(element_type, n, off + 12, self._depth + 1, None)
        return off


# --------------------------------------------------------------------------- the walk


class _Walker:
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
        codec: _Codec,
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
        raise _NeedMore

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
        if value_type == _STRING:
            return self.string(off, what)
        if value_type == _ARRAY:
            self.need(off, 12, what)
            element_type, count = self.codec.u32u64.unpack_from(self.buf, off)
            off += 12
            runs: Optional[list[int]] = [] if element_type in (_STRING, _ARRAY) else None
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
        code = _FIXED.get(element_type)
        if code is not None:
            n = count * struct.calcsize(code)
            self.need(off, n, what)
            return off + n
        if element_type == _STRING:
            return self.skip_strings(count, off, runs, what)
        if element_type == _ARRAY:
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


def _walk(buf: Any, limit: int, size: int, path: str, signature: tuple[int, ...], tensors: bool) -> GGUFMetadata:
    """Parse the GGUF header in ``buf`` (the first ``limit`` bytes of a ``size``-byte file)."""
    w = _Walker(buf, limit, size, path, _LE, lazy=(os.path.abspath(path), signature))
    if size < 8:
        raise w.error(f"the file is only {size} bytes long")
    w.need(0, 8, "the file header")
    magic = bytes(buf[0:4])
    if magic != b"GGUF":
        raise w.error(_describe_magic(bytes(buf[0:32])))
    version = _LE.u32.unpack_from(buf, 4)[0]
    if version & 0xFFFF == 0 and version:
        # A version that only makes sense byte-swapped: a big-endian file (gguf-py's
        # reader uses the same test). Everything after the magic is then big-endian.
        w.codec = _BE
        version = _BE.u32.unpack_from(buf, 4)[0]
    if version == 1:
        raise GGUFError(
            f"{path} is a GGUF version 1 file, which is not supported (only v2 and v3 are); "
            "convert the model again with a current llama.cpp"
        )
    if version not in (2, 3):
        raise GGUFError(f"{path} has unsupported GGUF version {version} (only v2 and v3 are supported)")
    codec = w.codec
    w.need(8, 16, "the file header")
    tensor_count, kv_count = codec.u64u64.unpack_from(buf, 8)
    off = 24
    # Smallest possible key/value: 8-byte key length, 4-byte type, 1-byte value.
    if kv_count * 13 > size - off:
        raise w.error(f"the header declares {kv_count} metadata keys, more than the file can hold")
    # Smallest possible tensor info: 8-byte name length, n_dims, type, offset.
    if tensor_count * 24 > size - off:
        raise w.error(f"the header declares {tensor_count} tensors, more than the file can hold")

    kv: dict[str, Any] = {}
    kv_types: dict[str, GGUFValueType] = {}
    u32 = codec.u32.unpack_from
    for i in range(kv_count):
        key, off = w.string(off, f"metadata key #{i}")
        w.need(off, 4, f"metadata key {key!r}")
        value_type = u32(buf, off)[0]
        value, off = w.value(value_type, off + 4, f"metadata key {key!r}")
        if key in kv:
            raise w.error(f"metadata key {key!r} appears twice")
        kv[key] = value
        kv_types[key] = GGUFValueType(value_type)

    alignment = _DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        alignment = kv["general.alignment"]
        # llama.cpp's rules: a uint32 power of two.
        if kv_types["general.alignment"] != GGUFValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise w.error(f"general.alignment must be a uint32 power of two, not {alignment!r}")

    tensor_infos: Optional[tuple[TensorInfo, ...]] = None
    parameters: Optional[int] = None
    data_offset: Optional[int] = None
    if tensors:
        tensor_infos, parameters, off = _walk_tensors(w, off, tensor_count)
        data_offset = off + (-off % alignment)
        _check_tensor_data(w, tensor_infos, data_offset)

    return _make_metadata(
        path, version, codec.big, kv, kv_types, tensor_count, tensor_infos, parameters, size, data_offset, alignment
    )


def _walk_tensors(w: _Walker, off: int, tensor_count: int) -> tuple[tuple[TensorInfo, ...], int, int]:
    buf = w.buf
    codec = w.codec
    u32 = codec.u32.unpack_from
    u32u64 = codec.u32u64.unpack_from
    dims_structs = codec.dims
    infos = []
    names: set[str] = set()
    parameters = 0
    for i in range(tensor_count):
        name, off = w.string(off, f"tensor info #{i}")
        what = f"tensor info {name!r}"
        w.need(off, 4, what)
        n_dims = u32(buf, off)[0]
        if n_dims > _MAX_DIMS:
            raise w.error(f"tensor {name!r} has {n_dims} dimensions (ggml allows at most {_MAX_DIMS})")
        dims = dims_structs[n_dims]
        w.need(off, 4 + dims.size + 12, what)
        shape = dims.unpack_from(buf, off + 4)
        off += 4 + dims.size
        ggml_type, offset = u32u64(buf, off)
        off += 12
        elements = 1
        for d in shape:
            elements *= d
        if elements > _INT64_MAX:
            raise w.error(f"tensor {name!r} has shape {shape}, more elements than int64 can count")
        if name in names:
            raise w.error(f"tensor {name!r} appears twice")
        names.add(name)
        parameters += elements
        infos.append(TensorInfo(name, shape, ggml_type, offset))
    return tuple(infos), parameters, off


def _check_tensor_data(w: _Walker, infos: tuple[TensorInfo, ...], data_offset: int) -> None:
    if not infos:
        return
    available = w.size - data_offset
    if available < 0:
        raise w.error(f"tensor data would start at byte {data_offset}, past the end of the file (truncated?)")
    for t in infos:
        known = _GGML_TYPES.get(t.type)
        if known is None:
            # A type newer than this table: the size is unknown, check the start only.
            if t.offset > available:
                raise w.error(f"tensor {t.name!r} starts past the end of the file (truncated download?)")
            continue
        type_name, block, block_bytes = known
        if t.shape and t.shape[0] % block:
            raise w.error(
                f"tensor {t.name!r}: {t.shape[0]} elements per row is not a multiple of {type_name}'s block of {block}"
            )
        if t.offset + t.n_elements // block * block_bytes > available:
            raise w.error(f"tensor {t.name!r} runs past the end of the file (truncated download?)")


def _describe_magic(head: bytes) -> str:
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model itself (run `git lfs pull`)"
    if head[:4] in (b"ggml", b"ggmf", b"ggjt", b"lmgg", b"fmgg", b"tjgg"):
        return "it is an old GGML/GGJT model; convert it to GGUF with llama.cpp"
    if head.lstrip()[:1] == b"<":
        return "it looks like an HTML/XML page (a failed download?)"
    return f"it starts with {head[:4]!r} instead of b'GGUF'"


# --------------------------------------------------------------------------- public types


class TensorInfo(NamedTuple):
    """One tensor's description from the GGUF header (its data is never read).

    ``shape`` is in GGUF order (fastest-varying dimension first, like ggml's ``ne``);
    ``type`` is the ggml type code; ``offset`` is relative to ``GGUFMetadata.data_offset``.

    >>> t = TensorInfo("output_norm.weight", (640,), 0, 0)
    >>> t.type_name, t.n_elements, t.nbytes
    ('F32', 640, 2560)
    """

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int

    @property
    def n_elements(self) -> int:
        """Number of elements: the product of the shape."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> Optional[str]:
        """ggml's name for ``type`` (``"Q4_K"``...), None for a type this module does not know."""
        known = _GGML_TYPES.get(self.type)
        return known[0] if known else None

    @property
    def nbytes(self) -> Optional[int]:
        """Size of the tensor's data in bytes, None for an unknown type."""
        known = _GGML_TYPES.get(self.type)
        if known is None:
            return None
        return self.n_elements // known[1] * known[2]


@dataclass(frozen=True, eq=False)
class GGUFMetadata:
    """Everything in a GGUF file's header. Build one with :func:`read_metadata`.

    The well-known fields are ``None`` when the file does not have them (or has them
    with an unexpected type); ``kv`` has every key as read. For architectures that store
    one value per layer (an array), ``head_count``/``head_count_kv`` are the largest.
    ``tensors``, ``parameters`` and ``data_offset`` are ``None`` when read with
    ``tensors=False``.
    """

    path: str
    version: int
    byte_order: str  # "little" or "big"
    architecture: Optional[str]
    name: Optional[str]
    context_length: Optional[int]
    block_count: Optional[int]
    embedding_length: Optional[int]
    head_count: Optional[int]
    head_count_kv: Optional[int]
    file_type: Optional[int]
    quantization: Optional[str]
    size_label: Optional[str]
    parameters: Optional[int]
    chat_template: Optional[str]
    tensor_count: int
    kv: Mapping[str, Any]
    kv_types: Mapping[str, GGUFValueType]
    tensors: Optional[tuple[TensorInfo, ...]]
    file_size: int
    data_offset: Optional[int]
    alignment: int

    def __repr__(self) -> str:
        return (
            f"GGUFMetadata(path={self.path!r}, architecture={self.architecture!r}, name={self.name!r}, "
            f"quantization={self.quantization!r}, parameters={self.parameters!r}, "
            f"context_length={self.context_length!r}, tensor_count={self.tensor_count}, keys={len(self.kv)})"
        )

    def model_info(self) -> ModelInfo:
        """The :class:`ModelInfo` summary of this file (see :meth:`ModelInfo.from_metadata`).

        >>> read_metadata("gemma-3-270m-q4_k_m.gguf").model_info().quantization  # doctest: +SKIP
        'Q4_K_M'
        """
        return ModelInfo.from_metadata(self)


def _make_metadata(
    path: str,
    version: int,
    big: bool,
    kv: dict[str, Any],
    kv_types: dict[str, GGUFValueType],
    tensor_count: int,
    tensors: Optional[tuple[TensorInfo, ...]],
    parameters: Optional[int],
    size: int,
    data_offset: Optional[int],
    alignment: int,
) -> GGUFMetadata:
    def text(key: str) -> Optional[str]:
        value = kv.get(key)
        return value if isinstance(value, str) else None

    def integer(key: str) -> Optional[int]:
        value = kv.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # Per-layer values (e.g. OpenELM's head counts) are arrays; the largest is the
        # safe number for sizing anything.
        if isinstance(value, GGUFArray) and value._type in _INTEGER_TYPES and len(value):
            return max(value)
        return None

    arch = text("general.architecture")
    prefix = f"{arch}." if arch else "\0"  # "\0" matches no key
    file_type = kv.get("general.file_type")
    if not isinstance(file_type, int) or isinstance(file_type, bool):
        file_type = None
    return GGUFMetadata(
        path=path,
        version=version,
        byte_order="big" if big else "little",
        architecture=arch,
        name=text("general.name"),
        context_length=integer(prefix + "context_length"),
        block_count=integer(prefix + "block_count"),
        embedding_length=integer(prefix + "embedding_length"),
        head_count=integer(prefix + "attention.head_count"),
        head_count_kv=integer(prefix + "attention.head_count_kv"),
        file_type=file_type,
        quantization=_FILE_TYPE_NAMES.get(file_type) if file_type is not None else None,
        size_label=text("general.size_label"),
        parameters=parameters,
        chat_template=text("tokenizer.chat_template"),
        tensor_count=tensor_count,
        kv=MappingProxyType(kv),
        kv_types=MappingProxyType(kv_types),
        tensors=tensors,
        file_size=size,
        data_offset=data_offset,
        alignment=alignment,
    )


@dataclass(frozen=True)
class ModelInfo:
    """A one-line summary of a model file, as :func:`discover_models` lists them.

    For a split model, ``path`` is the first shard and ``file_size`` / ``parameters``
    cover all shards. ``parameters`` is ``None`` when the metadata was read with
    ``tensors=False``.

    >>> info = ModelInfo("m.gguf", "gemma3", "Gemma 3 270m", "Q4_K_M", "270M", 268098176, 253113024, 32768)
    >>> info.quantization
    'Q4_K_M'
    """

    path: str
    architecture: Optional[str]
    name: Optional[str]
    quantization: Optional[str]
    size_label: Optional[str]
    parameters: Optional[int]
    file_size: int
    context_length: Optional[int]

    @classmethod
    def from_metadata(cls, metadata: GGUFMetadata) -> ModelInfo:
        """Summarise ``metadata``; for the first shard of a split model, read the others.

        The other shards are found by llama.cpp's naming
        (``name-00002-of-00003.gguf``...) beside the first; a missing one raises
        ``ModelNotFoundError``, a broken one ``GGUFError``.

        >>> ModelInfo.from_metadata(read_metadata("model.gguf")).architecture  # doctest: +SKIP
        'gemma3'
        """
        return _model_info(metadata, {})


# --------------------------------------------------------------------------- entry points


def _open_model_file(path: str) -> BinaryIO:
    """Open ``path`` for reading as a model file: the one place that refuses a missing
    file (``ModelNotFoundError``), a folder (``IsADirectoryError``) and anything that is
    not a regular file (``GGUFError``), with the same words for every caller."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"GGUF model file not found: {path}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a directory, not a GGUF model file")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO would block forever; a device is no model either.
        raise GGUFError(f"{path} is not a regular file, so not a GGUF model file")
    try:
        return open(path, "rb")
    except FileNotFoundError:  # removed since the stat
        raise ModelNotFoundError(f"GGUF model file not found: {path}") from None


def check_model_file(path: PathLike) -> None:
    """Refuse what cannot be a GGUF model (see :func:`read_metadata` for the errors)
    reading only its first four bytes: the cheap check before a process is spawned.

    >>> check_model_file("README.md")  # doctest: +SKIP
    Traceback (most recent call last):
    llamarocm.errors.GGUFError: README.md is not a GGUF file (it starts with b'# ll')
    """
    path = os.fsdecode(os.fspath(path))
    with _open_model_file(path) as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r})")


def read_metadata(path: PathLike, *, tensors: bool = True) -> GGUFMetadata:
    """Read a GGUF file's metadata and tensor descriptions (never its tensor data).

    ``tensors=False`` is the cheap path for callers that only want header fields
    (architecture, context length, chat template...): the tensor descriptions are not
    walked, and ``tensors``, ``parameters`` and ``data_offset`` are ``None``. The
    key/value section is always read in full, because GGUF is sequential and keys such
    as the chat template sit after the vocabulary.

    Raises ``ModelNotFoundError`` (a ``FileNotFoundError``) for a missing file,
    ``IsADirectoryError`` for a folder, ``PermissionError`` when it cannot be opened, and
    ``GGUFError`` (a ``ValueError``) for anything that is not a readable GGUF v2/v3 file.

    >>> meta = read_metadata("gemma-3-270m-q4_k_m.gguf")  # doctest: +SKIP
    >>> meta.architecture, meta.context_length, meta.quantization, meta.parameters  # doctest: +SKIP
    ('gemma3', 32768, 'Q4_K_M', 268098176)
    >>> read_metadata("gemma-3-270m-q4_k_m.gguf", tensors=False).tensors is None  # doctest: +SKIP
    True
    """
    path = os.fsdecode(os.fspath(path))
    with _open_model_file(path) as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        signature = _signature(st)
        if size < 8:
            raise GGUFError(f"{path} is not a valid GGUF file: the file is only {size} bytes long")
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            mapped = None
        if mapped is not None:
            try:
                # The mapping's length is the truth if the file changed since fstat().
                return _walk(mapped, len(mapped), len(mapped), path, signature, tensors)
            finally:
                mapped.close()
        # No mmap (an odd filesystem): read a growing prefix until the header fits.
        want = 1 << 20
        while True:
            f.seek(0)
            head = f.read(want)
            if len(head) < want:
                size = len(head)  # the whole file, even if it changed since fstat()
            try:
                return _walk(head, len(head), size, path, signature, tensors)
            except _NeedMore:
                # Never raised once head is the whole file: past its end is an error.
                want *= 4


def _model_info(meta: GGUFMetadata, cache: dict[str, GGUFMetadata]) -> ModelInfo:
    file_size = meta.file_size
    parameters = meta.parameters
    split_count = meta.kv.get("split.count")
    split_no = meta.kv.get("split.no", 0)
    if isinstance(split_count, int) and split_count > 1 and split_no == 0:
        for shard in _shard_paths(meta.path, split_count)[1:]:
            key = os.path.abspath(shard)
            part = cache.get(key)
            if part is None:
                if meta.tensors is None:
                    # The caller skipped tensors: sizes are enough, no need to read shards.
                    try:
                        file_size += os.stat(shard).st_size
                    except FileNotFoundError:
                        raise ModelNotFoundError(f"{meta.path} is split, but shard {shard} is missing") from None
                    continue
                try:
                    part = read_metadata(shard)
                except ModelNotFoundError:
                    raise ModelNotFoundError(f"{meta.path} is split, but shard {shard} is missing") from None
                cache[key] = part
            file_size += part.file_size
            if parameters is not None and part.parameters is not None:
                parameters += part.parameters
    return ModelInfo(
        path=meta.path,
        architecture=meta.architecture,
        name=meta.name,
        quantization=meta.quantization,
        size_label=meta.size_label,
        parameters=parameters,
        file_size=file_size,
        context_length=meta.context_length,
    )


def _shard_paths(first: str, count: int) -> list[str]:
    """All shard paths of a split model, by llama.cpp's llama_split_path naming."""
    folder, base = os.path.split(first)
    m = _SPLIT_NAME.match(base)
    if m is None or int(m["no"]) != 1 or int(m["count"]) != count:
        raise GGUFError(
            f"{first} is the first of {count} GGUF shards but is not named "
            f"<name>-00001-of-{count:05d}.gguf, so the other shards cannot be found"
        )
    return [os.path.join(folder, f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def discover_models(folder: PathLike, recursive: bool = False) -> list[ModelInfo]:
    """Every GGUF model in ``folder`` (and below it with ``recursive=True``), sorted by path.

    Files named ``*.gguf`` that cannot be read as GGUF are skipped with a warning on the
    ``llamarocm`` logger. A split model is listed once, under its first shard, with the
    size and parameters of all shards; the other shards are not listed. Raises
    ``ModelNotFoundError`` if ``folder`` does not exist and ``NotADirectoryError`` if it
    is a file.

    >>> for info in discover_models("~/models"):  # doctest: +SKIP
    ...     print(info.path, info.architecture, info.quantization, info.file_size)
    /home/me/models/gemma-3-270m-q4_k_m.gguf gemma3 Q4_K_M 253113024
    """
    root = os.path.expanduser(os.fspath(folder))
    if not isinstance(root, str):
        root = os.fsdecode(root)
    if not os.path.exists(root):
        raise ModelNotFoundError(f"model folder not found: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root} is a file, not a folder of models; use read_metadata() for one file")

    candidates = sorted(_gguf_files(root, recursive))
    cache: dict[str, GGUFMetadata] = {}
    metas: list[GGUFMetadata] = []
    for path in candidates:
        key = os.path.abspath(path)
        meta = cache.get(key)
        if meta is None:
            try:
                meta = read_metadata(path)
            except (GGUFError, OSError) as exc:
                logger.warning("skipping %s: %s", path, exc)
                continue
            cache[key] = meta
        metas.append(meta)

    models = []
    for meta in metas:
        split_count = meta.kv.get("split.count")
        split_no = meta.kv.get("split.no", 0)
        if isinstance(split_count, int) and split_count > 1 and split_no != 0:
            # Counted with its first shard; say so only if that shard is not there.
            m = _SPLIT_NAME.match(os.path.basename(meta.path))
            if m is not None:
                first = os.path.join(os.path.dirname(meta.path), f"{m['prefix']}-00001-of-{m['count']}.gguf")
                if os.path.abspath(first) not in cache:
                    logger.warning(
                        "skipping %s: shard %s of a split model whose first shard is missing", meta.path, split_no + 1
                    )
            continue
        try:
            models.append(_model_info(meta, cache))
        except (GGUFError, OSError) as exc:
            logger.warning("skipping %s: %s", meta.path, exc)
    models.sort(key=lambda info: info.path)
    return models


def _gguf_files(root: str, recursive: bool) -> Iterator[str]:
    def is_gguf(name: str) -> bool:
        return name.lower().endswith(".gguf")

    if not recursive:
        with os.scandir(root) as entries:
            for entry in entries:
                if is_gguf(entry.name) and entry.is_file():
                    yield entry.path
        return

    def unreadable(exc: OSError) -> None:
        logger.warning("skipping %s: %s", exc.filename, exc)

    for dirpath, _dirnames, filenames in os.walk(root, onerror=unreadable):
        for name in filenames:
            if is_gguf(name):
                path = os.path.join(dirpath, name)
                if os.path.isfile(path):
                    yield path

"""The walk over a GGUF file's header: preamble, key/value section, tensor descriptions.

A GGUF file starts with the magic ``GGUF``, a version, the number of tensors and of
metadata keys; then every key with its typed value; then every tensor's name, shape,
type and offset; then, aligned, the tensor data, which is never read here. Only v2 and
v3 are read (v1 used 32-bit lengths and is long gone), in either byte order: a
big-endian file is told by its version, which only makes sense byte-swapped.

Every count is checked against the file size before a loop trusts it, and so is each
tensor's data once the descriptions are read: a truncated download (the commonest
broken model) fails here, with the name of the first tensor that does not fit.

Values are read and skipped by ``_gguf_values``; ``llamarocm.gguf`` turns the
:class:`Header` into the public ``GGUFMetadata``.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

from ._gguf_values import BE, LE, MAX_DIMS, GGUFValueType, Walker
from .errors import GGUFError

# Element counts must fit int64, as in llama.cpp.
_INT64_MAX = 2**63 - 1
# Where tensor data starts, as a multiple, when general.alignment does not say.
_DEFAULT_ALIGNMENT = 32
# The preamble: magic, version, tensor count, key count.
_PREAMBLE_BYTES = 24

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


class Header(NamedTuple):
    """What :func:`read_header` found; the tensor fields are None when not walked."""

    version: int
    big_endian: bool
    kv: dict[str, Any]
    kv_types: dict[str, GGUFValueType]
    tensor_count: int
    tensors: Optional[tuple[TensorInfo, ...]]
    parameters: Optional[int]
    data_offset: Optional[int]
    alignment: int


def read_header(buf: Any, limit: int, size: int, path: str, signature: tuple[int, ...], tensors: bool) -> Header:
    """Parse the GGUF header in ``buf`` (the first ``limit`` bytes of a ``size``-byte file).

    Raises ``GGUFError`` for a file that is not valid GGUF, and ``NeedMore`` when the
    header runs past ``limit`` but not past ``size``. ``signature`` identifies this
    version of the file, so that arrays read later can tell that it changed.
    """
    w = Walker(buf, limit, size, path, LE, lazy=(os.path.abspath(path), signature))
    version, tensor_count, kv_count = _read_preamble(w)
    kv, kv_types, off = _read_key_values(w, _PREAMBLE_BYTES, kv_count)
    alignment = _alignment(w, kv, kv_types)
    if not tensors:
        return Header(version, w.codec.big, kv, kv_types, tensor_count, None, None, None, alignment)
    tensor_infos, parameters, off = _read_tensor_infos(w, off, tensor_count)
    data_offset = off + (-off % alignment)
    _check_tensor_data(w, tensor_infos, data_offset)
    return Header(version, w.codec.big, kv, kv_types, tensor_count, tensor_infos, parameters, data_offset, alignment)


def _read_preamble(w: Walker) -> tuple[int, int, int]:
    """Version, tensor count and key count, each checked; switches ``w`` to the file's byte order."""
    if w.size < 8:
        raise w.error(f"the file is only {w.size} bytes long")
    w.need(0, 8, "the file header")
    magic = bytes(w.buf[0:4])
    if magic != b"GGUF":
        raise w.error(_describe_magic(bytes(w.buf[0:32])))
    version = _read_version(w)
    w.need(8, 16, "the file header")
    tensor_count, kv_count = w.codec.u64u64.unpack_from(w.buf, 8)
    room = w.size - _PREAMBLE_BYTES
    # Smallest possible key/value: 8-byte key length, 4-byte type, 1-byte value.
    if kv_count * 13 > room:
        raise w.error(f"the header declares {kv_count} metadata keys, more than the file can hold")
    # Smallest possible tensor info: 8-byte name length, n_dims, type, offset.
    if tensor_count * 24 > room:
        raise w.error(f"the header declares {tensor_count} tensors, more than the file can hold")
    return version, tensor_count, kv_count


def _read_version(w: Walker) -> int:
    """The format version, 2 or 3; a big-endian file switches ``w`` to big-endian."""
    version = LE.u32.unpack_from(w.buf, 4)[0]
    if version & 0xFFFF == 0 and version:
        # A version that only makes sense byte-swapped: a big-endian file (gguf-py's
        # reader uses the same test). Everything after the magic is then big-endian.
        w.codec = BE
        version = BE.u32.unpack_from(w.buf, 4)[0]
    if version == 1:
        raise GGUFError(
            f"{w.path} is a GGUF version 1 file, which is not supported (only v2 and v3 are); "
            "convert the model again with a current llama.cpp"
        )
    if version not in (2, 3):
        raise GGUFError(f"{w.path} has unsupported GGUF version {version} (only v2 and v3 are supported)")
    return int(version)


def _read_key_values(w: Walker, off: int, kv_count: int) -> tuple[dict[str, Any], dict[str, GGUFValueType], int]:
    """Every key with its value and value type, and the offset just past them."""
    buf = w.buf
    kv: dict[str, Any] = {}
    kv_types: dict[str, GGUFValueType] = {}
    u32 = w.codec.u32.unpack_from
    for i in range(kv_count):
        key, off = w.string(off, f"metadata key #{i}")
        w.need(off, 4, f"metadata key {key!r}")
        value_type = u32(buf, off)[0]
        value, off = w.value(value_type, off + 4, f"metadata key {key!r}")
        if key in kv:
            raise w.error(f"metadata key {key!r} appears twice")
        kv[key] = value
        kv_types[key] = GGUFValueType(value_type)
    return kv, kv_types, off


def _alignment(w: Walker, kv: dict[str, Any], kv_types: dict[str, GGUFValueType]) -> int:
    """The alignment of the tensor data: ``general.alignment`` if set, else GGUF's default."""
    if "general.alignment" not in kv:
        return _DEFAULT_ALIGNMENT
    alignment = kv["general.alignment"]
    # llama.cpp's rules: a uint32 power of two.
    if kv_types["general.alignment"] != GGUFValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1):
        raise w.error(f"general.alignment must be a uint32 power of two, not {alignment!r}")
    return int(alignment)


def _read_tensor_infos(w: Walker, off: int, tensor_count: int) -> tuple[tuple[TensorInfo, ...], int, int]:
    """Every tensor's description, the total parameter count, and the offset just past them."""
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
        if n_dims > MAX_DIMS:
            raise w.error(f"tensor {name!r} has {n_dims} dimensions (ggml allows at most {MAX_DIMS})")
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


def _check_tensor_data(w: Walker, infos: tuple[TensorInfo, ...], data_offset: int) -> None:
    """Refuse a file too short for the tensor data its descriptions promise."""
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
    """Why a file that does not start with ``GGUF`` is not a model, for the error message."""
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model itself (run `git lfs pull`)"
    if head[:4] in (b"ggml", b"ggmf", b"ggjt", b"lmgg", b"fmgg", b"tjgg"):
        return "it is an old GGML/GGJT model; convert it to GGUF with llama.cpp"
    if head.lstrip()[:1] == b"<":
        return "it looks like an HTML/XML page (a failed download?)"
    return f"it starts with {head[:4]!r} instead of b'GGUF'"

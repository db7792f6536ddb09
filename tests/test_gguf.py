"""Tests for llamarocm.gguf: the GGUF metadata reader and model discovery.

Most files are written at test time by the small struct-based writer below, so corrupt
and hostile inputs need no third-party code. The real Gemma 3 270M file is compared
field by field against gguf-py's ``GGUFReader``.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import logging
import math
import os
import random
import struct
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest

import llamarocm._gguf_header as gguf_header_module
import llamarocm._gguf_values as gguf_values_module
import llamarocm.gguf as gguf_module
from llamarocm.errors import GGUFError, ModelNotFoundError
from llamarocm.gguf import (
    GGUFArray,
    GGUFMetadata,
    GGUFValueType,
    ModelInfo,
    TensorInfo,
    discover_models,
    read_metadata,
)

pytestmark = pytest.mark.timeout(60)

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parents[1]

T = GGUFValueType
_FMT: dict[int, str] = {
    T.UINT8: "B",
    T.INT8: "b",
    T.UINT16: "H",
    T.INT16: "h",
    T.UINT32: "I",
    T.INT32: "i",
    T.FLOAT32: "f",
    T.BOOL: "?",
    T.UINT64: "Q",
    T.INT64: "q",
    T.FLOAT64: "d",
}


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- a tiny writer


def enc_str(value: Any, e: str = "<") -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return struct.pack(e + "Q", len(raw)) + raw


def enc_value(vtype: int, value: Any, e: str = "<") -> bytes:
    if vtype in _FMT:
        return struct.pack(e + _FMT[vtype], value)
    if vtype == T.STRING:
        return enc_str(value, e)
    if vtype == T.ARRAY:
        etype, items = value
        return struct.pack(e + "IQ", etype, len(items)) + b"".join(enc_value(etype, x, e) for x in items)
    raise AssertionError(vtype)


def build_gguf(
    kvs: Sequence[tuple[str, int, Any]],
    tensors: tuple[tuple[str, tuple[int, ...], int, bytes], ...] = (),
    *,
    version: int = 3,
    e: str = "<",
    alignment: int = 32,
) -> bytes:
    """A GGUF file; tensor data padded between tensors but not after the last one."""
    out = bytearray(b"GGUF" + struct.pack(e + "I", version) + struct.pack(e + "QQ", len(tensors), len(kvs)))
    for key, vtype, value in kvs:
        out += enc_str(key, e) + struct.pack(e + "I", vtype) + enc_value(vtype, value, e)
    offset = 0
    for name, shape, ttype, data in tensors:
        out += enc_str(name, e) + struct.pack(f"{e}I{len(shape)}QIQ", len(shape), *shape, ttype, offset)
        offset += len(data) + (-len(data) % alignment)
    out += bytes(-len(out) % alignment)
    for i, (_name, _shape, _ttype, data) in enumerate(tensors):
        out += data
        if i < len(tensors) - 1:
            out += bytes(-len(data) % alignment)
    return bytes(out)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


INVALID_UTF8 = b"\xff\xfe abc \xc3"
ALL_TYPES_KVS: list[tuple[str, int, Any]] = [
    ("general.architecture", T.STRING, "llama"),
    ("general.name", T.STRING, "Tiny Test"),
    ("general.size_label", T.STRING, "1K"),
    ("general.file_type", T.UINT32, 15),
    ("llama.context_length", T.UINT32, 4096),
    ("llama.block_count", T.UINT64, 2),
    ("llama.embedding_length", T.INT32, 8),
    ("llama.attention.head_count", T.UINT32, 4),
    ("llama.attention.head_count_kv", T.ARRAY, (T.INT32, [1, 2])),
    ("t.u8", T.UINT8, 255),
    ("t.i8", T.INT8, -128),
    ("t.u16", T.UINT16, 65535),
    ("t.i16", T.INT16, -32768),
    ("t.u32", T.UINT32, 2**32 - 1),
    ("t.i32", T.INT32, -(2**31)),
    ("t.u64", T.UINT64, 2**64 - 1),
    ("t.i64", T.INT64, -(2**63)),
    ("t.f32", T.FLOAT32, 1.5),
    ("t.f64", T.FLOAT64, math.pi),
    ("t.true", T.BOOL, True),
    ("t.false", T.BOOL, False),
    ("t.str", T.STRING, "hello"),
    ("t.empty_str", T.STRING, ""),
    ("t.unicode.ключ.🔑", T.STRING, "värde 値 🎉"),
    ("t.bad_utf8", T.STRING, INVALID_UTF8),
    ("t.empty_arr", T.ARRAY, (T.STRING, [])),
    ("t.empty_int_arr", T.ARRAY, (T.UINT8, [])),
    ("t.arr.u8", T.ARRAY, (T.UINT8, [0, 1, 255])),
    ("t.arr.i8", T.ARRAY, (T.INT8, [-1, 0, 1])),
    ("t.arr.u16", T.ARRAY, (T.UINT16, [1, 65535])),
    ("t.arr.i16", T.ARRAY, (T.INT16, [-2, 2])),
    ("t.arr.u32", T.ARRAY, (T.UINT32, [7, 2**32 - 1])),
    ("t.arr.i32", T.ARRAY, (T.INT32, [-7, 7])),
    ("t.arr.u64", T.ARRAY, (T.UINT64, [2**64 - 1])),
    ("t.arr.i64", T.ARRAY, (T.INT64, [-(2**63), 5])),
    ("t.arr.f32", T.ARRAY, (T.FLOAT32, [0.25, -2.0])),
    ("t.arr.f64", T.ARRAY, (T.FLOAT64, [math.e])),
    ("t.arr.bool", T.ARRAY, (T.BOOL, [True, False, True])),
    ("t.arr.str", T.ARRAY, (T.STRING, ["a", "", "ü", INVALID_UTF8])),
    (
        "t.arr.nested",
        T.ARRAY,
        (T.ARRAY, [(T.STRING, ["x", "y"]), (T.UINT8, []), (T.ARRAY, [(T.INT16, [-3])])]),
    ),
    ("tokenizer.chat_template", T.STRING, "{{ messages }}"),
]
# 4x3 F32 (48 bytes) then 64x2 Q4_0 (2 blocks of 18 bytes per row: 72 bytes).
TENSORS = (
    ("a.weight", (4, 3), 0, bytes(range(48))),
    ("b.weight", (64, 2), 2, bytes(72)),
)
EXPECTED = {
    "t.u8": 255,
    "t.i8": -128,
    "t.u16": 65535,
    "t.i16": -32768,
    "t.u32": 2**32 - 1,
    "t.i32": -(2**31),
    "t.u64": 2**64 - 1,
    "t.i64": -(2**63),
    "t.f32": 1.5,
    "t.f64": math.pi,
    "t.true": True,
    "t.false": False,
    "t.str": "hello",
    "t.empty_str": "",
    "t.unicode.ключ.🔑": "värde 値 🎉",
    "t.bad_utf8": INVALID_UTF8.decode("utf-8", "replace"),
    "t.empty_arr": [],
    "t.empty_int_arr": [],
    "t.arr.u8": [0, 1, 255],
    "t.arr.i8": [-1, 0, 1],
    "t.arr.u16": [1, 65535],
    "t.arr.i16": [-2, 2],
    "t.arr.u32": [7, 2**32 - 1],
    "t.arr.i32": [-7, 7],
    "t.arr.u64": [2**64 - 1],
    "t.arr.i64": [-(2**63), 5],
    "t.arr.f32": [0.25, -2.0],
    "t.arr.f64": [math.e],
    "t.arr.bool": [True, False, True],
    "t.arr.str": ["a", "", "ü", INVALID_UTF8.decode("utf-8", "replace")],
    "t.arr.nested": [["x", "y"], [], [[-3]]],
}


def sample_file(tmp_path: Path, name: str = "sample.gguf", **kwargs: Any) -> str:
    return write(tmp_path / name, build_gguf(ALL_TYPES_KVS, TENSORS, **kwargs))


def check_sample(meta: GGUFMetadata) -> None:
    for key, expected in EXPECTED.items():
        value = meta.kv[key]
        if isinstance(value, GGUFArray):
            assert value.tolist() == expected, key
        else:
            assert value == expected, key
            assert type(value) is type(expected), key
    assert meta.kv_types["t.f32"] is T.FLOAT32
    assert meta.kv_types["t.arr.nested"] is T.ARRAY
    assert meta.kv["t.arr.nested"].type is T.ARRAY
    assert meta.kv["t.arr.bool"].type is T.BOOL
    assert [k for k in meta.kv if k != "blob"] == [k for k, _t, _v in ALL_TYPES_KVS]
    assert meta.architecture == "llama"
    assert meta.name == "Tiny Test"
    assert meta.size_label == "1K"
    assert meta.file_type == 15
    assert meta.quantization == "Q4_K_M"
    assert meta.context_length == 4096
    assert meta.block_count == 2
    assert meta.embedding_length == 8
    assert meta.head_count == 4
    assert meta.head_count_kv == 2  # per-layer array: the largest
    assert meta.chat_template == "{{ messages }}"
    assert meta.tensor_count == 2


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_every_value_type(tmp_path: Path, version: int, endian: str) -> None:
    path = sample_file(tmp_path, version=version, e=endian)
    meta = read_metadata(path)
    check_sample(meta)
    assert meta.version == version
    assert meta.byte_order == ("big" if endian == ">" else "little")
    assert meta.path == path
    assert meta.file_size == os.path.getsize(path)


def test_pathlike_and_repr(tmp_path: Path) -> None:
    path = Path(sample_file(tmp_path))
    meta = read_metadata(path)
    assert meta.path == str(path)
    assert "llama" in repr(meta) and "Q4_K_M" in repr(meta)
    assert repr(meta.kv["t.arr.str"]) == "<GGUFArray STRING[4]>"
    with pytest.raises(TypeError):
        meta.kv["new"] = 1  # type: ignore[index]


def test_tensors_parameters_and_alignment(tmp_path: Path) -> None:
    meta = read_metadata(sample_file(tmp_path))
    assert meta.tensors == (
        TensorInfo("a.weight", (4, 3), 0, 0),
        TensorInfo("b.weight", (64, 2), 2, 64),
    )
    assert meta.parameters == 12 + 128
    assert meta.alignment == 32
    assert meta.data_offset is not None and meta.data_offset % 32 == 0
    a, b = meta.tensors
    assert (a.type_name, a.n_elements, a.nbytes) == ("F32", 12, 48)
    assert (b.type_name, b.nbytes) == ("Q4_0", 72)
    assert TensorInfo("x", (1,), 9999, 0).type_name is None
    assert TensorInfo("x", (1,), 9999, 0).nbytes is None
    with open(meta.path, "rb") as f:
        f.seek(meta.data_offset + a.offset)
        assert f.read(48) == bytes(range(48))


@pytest.mark.parametrize("alignment", [1, 8, 64, 4096])
def test_custom_alignment(tmp_path: Path, alignment: int) -> None:
    kvs = [("general.architecture", T.STRING, "x"), ("general.alignment", T.UINT32, alignment)]
    path = write(tmp_path / "a.gguf", build_gguf(kvs, TENSORS, alignment=alignment))
    meta = read_metadata(path)
    assert meta.alignment == alignment
    assert meta.data_offset is not None and meta.data_offset % alignment == 0
    assert meta.tensors is not None and meta.tensors[1].offset % alignment == 0
    with open(path, "rb") as f:
        f.seek(meta.data_offset)
        assert f.read(48) == bytes(range(48))


@pytest.mark.parametrize(
    "vtype, value",
    [(T.UINT32, 0), (T.UINT32, 3), (T.UINT32, 48), (T.UINT64, 32), (T.INT32, 32), (T.STRING, "32")],
)
def test_bad_alignment(tmp_path: Path, vtype: int, value: Any) -> None:
    path = write(tmp_path / "a.gguf", build_gguf([("general.alignment", vtype, value)]))
    with pytest.raises(GGUFError, match="alignment"):
        read_metadata(path)


def test_missing_and_odd_fields(tmp_path: Path) -> None:
    kvs = [
        ("general.architecture", T.STRING, "gemma3"),
        ("gemma3.context_length", T.STRING, "lots"),  # wrong type: None, still in kv
        ("gemma3.block_count", T.BOOL, True),  # bool is not a count
        ("gemma3.attention.head_count", T.ARRAY, (T.UINT32, [])),
        ("general.file_type", T.UINT32, 1000),  # unknown to llama.cpp's table
    ]
    meta = read_metadata(write(tmp_path / "m.gguf", build_gguf(kvs)))
    assert meta.architecture == "gemma3"
    assert meta.kv["gemma3.context_length"] == "lots"
    assert meta.context_length is None
    assert meta.block_count is None
    assert meta.head_count is None
    assert meta.file_type == 1000 and meta.quantization is None
    assert (meta.name, meta.size_label, meta.chat_template, meta.embedding_length) == (None, None, None, None)
    assert meta.tensors == () and meta.parameters == 0

    empty = read_metadata(write(tmp_path / "e.gguf", build_gguf([])))
    assert empty.architecture is None and empty.context_length is None and empty.quantization is None
    assert empty.kv == {} and empty.tensor_count == 0


@pytest.mark.parametrize(
    "ftype, name",
    [(0, "F32"), (1, "F16"), (2, "Q4_0"), (7, "Q8_0"), (10, "Q2_K"), (15, "Q4_K_M"), (18, "Q6_K")]
    + [(21, "Q2_K_S"), (30, "IQ4_XS"), (32, "BF16"), (36, "TQ1_0"), (38, "MXFP4_MOE"), (4, None), (1024, None)],
)
def test_quantization_names(tmp_path: Path, ftype: int, name: Optional[str]) -> None:
    path = write(tmp_path / "q.gguf", build_gguf([("general.file_type", T.UINT32, ftype)]))
    assert read_metadata(path).quantization == name


def test_header_only_path(tmp_path: Path) -> None:
    path = sample_file(tmp_path)
    full = read_metadata(path)
    head = read_metadata(path, tensors=False)
    assert head.tensors is None and head.parameters is None and head.data_offset is None
    assert head.tensor_count == full.tensor_count == 2
    for field in ("architecture", "context_length", "chat_template", "quantization", "name", "head_count_kv"):
        assert getattr(head, field) == getattr(full, field)
    assert head.model_info().parameters is None
    # Tensor infos are not even looked at: garbage after the key/values goes unnoticed.
    data = bytearray(build_gguf(ALL_TYPES_KVS, TENSORS))
    tensor_start = data.index(b"a.weight") - 8
    data[tensor_start : tensor_start + 8] = struct.pack("<Q", 2**60)
    broken = write(tmp_path / "broken.gguf", bytes(data))
    assert read_metadata(broken, tensors=False).chat_template == "{{ messages }}"
    with pytest.raises(GGUFError):
        read_metadata(broken)


def test_model_info(tmp_path: Path) -> None:
    meta = read_metadata(sample_file(tmp_path))
    info = meta.model_info()
    assert info == ModelInfo.from_metadata(meta)
    assert info == ModelInfo(
        path=meta.path,
        architecture="llama",
        name="Tiny Test",
        quantization="Q4_K_M",
        size_label="1K",
        parameters=140,
        file_size=meta.file_size,
        context_length=4096,
    )
    with pytest.raises(AttributeError):
        info.path = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- lazy arrays


def _strings(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.02:
            length = rng.choice([127, 128, 129, 255, 256, 300, 5000])  # around the regex's limit
        elif roll < 0.05:
            length = 0
        else:
            length = rng.randint(1, 12)
        if i % 97 == 0:
            out.append(f"ü{i}✓".encode())
        elif i % 101 == 0:
            out.append(b"\x80\xff" * (length // 2))  # not UTF-8
        else:
            out.append(bytes(rng.randrange(256) for _ in range(length)))
    return out


@pytest.mark.parametrize("endian", ["<", ">"])
def test_big_string_array(tmp_path: Path, endian: str) -> None:
    raw = _strings(6000)
    kvs = [("tokens", T.ARRAY, (T.STRING, raw)), ("after", T.STRING, "still here")]
    meta = read_metadata(write(tmp_path / "v.gguf", build_gguf(kvs, e=endian)))
    assert meta.kv["after"] == "still here"
    tokens = meta.kv["tokens"]
    expected = [r.decode("utf-8", "replace") for r in raw]
    assert len(tokens) == 6000
    assert tokens.tolist() == expected
    assert list(tokens) == expected
    assert tokens == expected and tokens == tuple(expected) and tokens != expected[:-1]
    rng = random.Random(2)
    for i in [0, 1, 255, 256, 257, 511, 512, 5999] + [rng.randrange(6000) for _ in range(200)]:
        assert tokens[i] == expected[i]
        assert tokens.raw(i) == raw[i]
        assert tokens[i - 6000] == expected[i]
    assert tokens[-1] == expected[-1]
    assert tokens[250:700] == expected[250:700]
    assert tokens[5990:7000] == expected[5990:]
    assert tokens[::-37] == expected[::-37]
    assert tokens[10:0] == []
    for bad in (6000, -6001, 2**70):
        with pytest.raises(IndexError):
            tokens[bad]
    with pytest.raises(TypeError):
        tokens["1"]
    with pytest.raises(TypeError):
        meta.kv["tokens"].raw("x")  # type: ignore[arg-type]


def test_numeric_and_nested_arrays(tmp_path: Path) -> None:
    floats = [i / 4 for i in range(5000)]
    nested = [(T.STRING, [f"s{i}", "t"]) if i % 2 else (T.INT16, [i, -i]) for i in range(700)]
    kvs = [("f", T.ARRAY, (T.FLOAT32, floats)), ("n", T.ARRAY, (T.ARRAY, nested))]
    meta = read_metadata(write(tmp_path / "n.gguf", build_gguf(kvs)))
    f = meta.kv["f"]
    assert f[0] == 0.0 and f[-1] == 4999 / 4 and f[100:103] == [25.0, 25.25, 25.5]
    assert f.tolist() == floats and list(f) == floats and f[::1000] == floats[::1000]
    with pytest.raises(TypeError):
        f.raw(0)
    n = meta.kv["n"]
    assert len(n) == 700
    assert n[0].type is T.INT16 and n[0].tolist() == [0, 0]
    assert n[301].tolist() == ["s301", "t"] and n[-1][0] == "s699"
    assert n[300:302] == [[300, -300], ["s301", "t"]]
    assert n.tolist()[698] == [698, -698]


def test_arrays_stay_lazy_until_touched(tmp_path: Path) -> None:
    raw = [b"tok%d" % i for i in range(20000)]  # ~250 KB: read back on first touch
    path = write(
        tmp_path / "lazy.gguf", build_gguf([("tokens", T.ARRAY, (T.STRING, raw)), ("small", T.ARRAY, (T.UINT8, [1]))])
    )
    meta = read_metadata(path)
    tokens = meta.kv["tokens"]
    small = meta.kv["small"]
    assert tokens._blob._data is None  # nothing decoded or even read yet
    assert tokens[19999] == "tok19999"
    # Rewriting the file behind an untouched array is noticed, never misread.
    meta2 = read_metadata(path)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(GGUFError, match="changed"):
        meta2.kv["tokens"][0]
    assert tokens[5] == "tok5"  # already loaded: unaffected
    assert small[0] == 1  # small arrays were kept from the walk
    meta3 = read_metadata(path)
    os.remove(path)
    with pytest.raises(ModelNotFoundError):
        meta3.kv["tokens"][0]


def test_mmap_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without mmap the header is read in growing pieces; results must be identical."""
    big = [("blob", T.STRING, "z" * 3_000_000)] + ALL_TYPES_KVS
    path = write(tmp_path / "big.gguf", build_gguf(big, TENSORS))
    expected = read_metadata(path)

    def no_mmap(*args: Any, **kwargs: Any) -> Any:
        raise OSError("mmap not supported here")

    monkeypatch.setattr(gguf_module.mmap, "mmap", no_mmap)
    meta = read_metadata(path)
    check_sample(meta)
    assert meta.tensors == expected.tensors and meta.data_offset == expected.data_offset
    assert len(meta.kv["blob"]) == 3_000_000
    data = Path(path).read_bytes()
    for cut in (2_000_000, 3_000_030, len(data) - 1):
        truncated = write(tmp_path / "cut.gguf", data[:cut])
        with pytest.raises(GGUFError):
            read_metadata(truncated)
    for case, content in HOSTILE.items():
        with pytest.raises(GGUFError):
            read_metadata(write(tmp_path / f"{case}.gguf", content))


# --------------------------------------------------------------------------- refusals


def test_missing_file_directory_and_special_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        read_metadata(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "nope.gguf")
    with pytest.raises(IsADirectoryError):
        read_metadata(tmp_path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.gguf"
        os.mkfifo(fifo)
        with pytest.raises(GGUFError, match="regular file"):
            read_metadata(fifo)  # must not block waiting for a writer


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "only 0 bytes"),
        (b"GGUF", "only 4 bytes"),
        (b"GGUF\x03\x00\x00\x00", "header"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "Git LFS"),
        (b"<!DOCTYPE html><html>" + bytes(40), "HTML"),
        (b"ggjt" + bytes(40), "GGML"),
        (b"PK\x03\x04" + bytes(40), "instead of b'GGUF'"),
    ],
)
def test_not_gguf(tmp_path: Path, content: bytes, match: str) -> None:
    path = write(tmp_path / "x.gguf", content)
    with pytest.raises(GGUFError, match=match) as info:
        read_metadata(path)
    assert path in str(info.value) and "GGUF" in str(info.value)


def test_version_1_and_unknown_versions(tmp_path: Path) -> None:
    v1 = write(tmp_path / "v1.gguf", b"GGUF" + struct.pack("<III", 1, 0, 0) + bytes(32))
    with pytest.raises(GGUFError, match="version 1 .*not supported"):
        read_metadata(v1)
    v1be = write(tmp_path / "v1be.gguf", b"GGUF" + struct.pack(">III", 1, 0, 0) + bytes(32))
    with pytest.raises(GGUFError, match="version 1"):
        read_metadata(v1be)
    for version in (0, 4, 99, 2**32 - 1):
        path = write(tmp_path / f"v{version}.gguf", build_gguf([], version=version))
        with pytest.raises(GGUFError, match="version"):
            read_metadata(path)


def _header(tensor_count: int, kv_count: int, e: str = "<") -> bytes:
    return b"GGUF" + struct.pack(e + "IQQ", 3, tensor_count, kv_count)


HUGE = 2**63
HOSTILE = {
    "kv_count": _header(0, HUGE) + bytes(64),
    "tensor_count": _header(HUGE, 0) + bytes(64),
    "u64_max_counts": _header(2**64 - 1, 2**64 - 1) + bytes(64),
    "key_length": _header(0, 1) + struct.pack("<Q", HUGE) + bytes(64),
    "string_length": _header(0, 1) + enc_str("k") + struct.pack("<IQ", T.STRING, HUGE) + bytes(64),
    "fixed_array_count": _header(0, 1) + enc_str("k") + struct.pack("<IIQ", T.ARRAY, T.UINT64, HUGE) + bytes(64),
    "string_array_count": _header(0, 1) + enc_str("k") + struct.pack("<IIQ", T.ARRAY, T.STRING, HUGE) + bytes(64),
    "nested_array_count": _header(0, 1) + enc_str("k") + struct.pack("<IIQ", T.ARRAY, T.ARRAY, HUGE) + bytes(64),
    "string_in_array": _header(0, 1)
    + enc_str("k")
    + struct.pack("<IIQ", T.ARRAY, T.STRING, 3)
    + enc_str("a")
    + struct.pack("<Q", HUGE)
    + bytes(64),
    "string_in_big_array": _header(0, 1)
    + enc_str("k")
    + struct.pack("<IIQ", T.ARRAY, T.STRING, 5000)
    + enc_str("a") * 4000
    + struct.pack("<Q", 2**64 - 1)
    + enc_str("a") * 999,
    "tensor_name": _header(1, 0) + struct.pack("<Q", HUGE) + bytes(64),
    "n_dims": _header(1, 0) + enc_str("t") + struct.pack("<I", 2**31) + bytes(64),
    "dims_product": _header(1, 0) + enc_str("t") + struct.pack("<I4QIQ", 4, 2**40, 2**40, 2**40, 1, 0, 0) + bytes(64),
    "tensor_offset": _header(1, 0) + enc_str("t") + struct.pack("<I1QIQ", 1, 4, 0, HUGE) + bytes(64),
    "tensor_size": _header(1, 0) + enc_str("t") + struct.pack("<I1QIQ", 1, 2**62, 0, 0) + bytes(64),
    "block_multiple": _header(1, 0) + enc_str("t") + struct.pack("<I1QIQ", 1, 33, 2, 0) + bytes(64),
    "unknown_type_tensor_start": _header(1, 0) + enc_str("t") + struct.pack("<I1QIQ", 1, 1, 999, 2**40) + bytes(64),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_lengths_and_counts(tmp_path: Path, case: str) -> None:
    path = write(tmp_path / f"{case}.gguf", HOSTILE[case])
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(GGUFError) as info:
            read_metadata(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2
    assert peak < 1_000_000, f"{case} allocated {peak} bytes"
    assert path in str(info.value) and "GGUF" in str(info.value)


@pytest.mark.parametrize("code", [13, 100, 2**31, 2**32 - 1])
def test_unknown_value_types(tmp_path: Path, code: int) -> None:
    scalar = write(tmp_path / "s.gguf", _header(0, 1) + enc_str("k") + struct.pack("<I", code) + bytes(64))
    with pytest.raises(GGUFError, match="unknown value type"):
        read_metadata(scalar)
    element = write(
        tmp_path / "e.gguf", _header(0, 1) + enc_str("k") + struct.pack("<IIQ", T.ARRAY, code, 1) + bytes(64)
    )
    with pytest.raises(GGUFError, match="unknown element type"):
        read_metadata(element)


def test_nesting_depth_is_bounded(tmp_path: Path) -> None:
    def nest(depth: int) -> tuple[int, Any]:
        value: tuple[int, Any] = (T.UINT8, [1])
        for _ in range(depth - 1):
            value = (T.ARRAY, [value])
        return value

    ok = read_metadata(write(tmp_path / "ok.gguf", build_gguf([("k", T.ARRAY, nest(8))])))
    inner = ok.kv["k"]
    for _ in range(7):
        inner = inner[0]
    assert inner.tolist() == [1]
    deep = write(tmp_path / "deep.gguf", build_gguf([("k", T.ARRAY, nest(9))]))
    with pytest.raises(GGUFError, match="deeper"):
        read_metadata(deep)
    hostile = (
        _header(0, 1)
        + enc_str("k")
        + struct.pack("<I", T.ARRAY)
        + struct.pack("<IQ", T.ARRAY, 1) * 5000
        + struct.pack("<IQ", T.UINT8, 0)
    )
    with pytest.raises(GGUFError, match="deeper"):
        read_metadata(write(tmp_path / "hostile.gguf", hostile))


def test_duplicates_are_refused(tmp_path: Path) -> None:
    dup_key = write(tmp_path / "k.gguf", build_gguf([("a", T.UINT8, 1), ("a", T.UINT8, 2)]))
    with pytest.raises(GGUFError, match="twice"):
        read_metadata(dup_key)
    dup_tensor = write(tmp_path / "t.gguf", build_gguf([], (TENSORS[0], TENSORS[0])))
    with pytest.raises(GGUFError, match="twice"):
        read_metadata(dup_tensor)


def test_truncated_tensor_data(tmp_path: Path) -> None:
    data = build_gguf(ALL_TYPES_KVS, TENSORS)
    path = write(tmp_path / "t.gguf", data[:-1])
    with pytest.raises(GGUFError, match="truncated"):
        read_metadata(path)
    assert read_metadata(path, tensors=False).architecture == "llama"


def test_every_truncation_is_a_gguf_error(tmp_path: Path) -> None:
    data = build_gguf(ALL_TYPES_KVS, TENSORS)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    check_sample(read_metadata(path))
    # Shrink one file in place: rewriting it each time costs ext4 a flush per prefix.
    for cut in reversed(range(len(data))):
        os.truncate(path, cut)
        with pytest.raises(GGUFError) as info:
            read_metadata(path)
        assert str(path) in str(info.value), cut


@pytest.mark.parametrize("endian", ["<", ">"])
def test_random_byte_flips(tmp_path: Path, endian: str) -> None:
    """Corruption anywhere gives GGUFError or a readable result, never anything else."""
    data = build_gguf(ALL_TYPES_KVS, TENSORS, e=endian)
    rng = random.Random(1234)
    path = tmp_path / "flip.gguf"
    path.write_bytes(data)
    outcomes = {"ok": 0, "GGUFError": 0}
    for _ in range(300):
        corrupt = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4])):
            pos = rng.randrange(len(corrupt))
            corrupt[pos] = rng.choice([rng.randrange(256), corrupt[pos] ^ (1 << rng.randrange(8)), 0xFF, 0])
        with open(path, "r+b") as f:  # same size, in place: no truncation, no ext4 flush
            f.write(corrupt)
        try:
            meta = read_metadata(path)
        except GGUFError:
            outcomes["GGUFError"] += 1
            continue
        outcomes["ok"] += 1
        for value in meta.kv.values():  # everything the walk accepted must decode
            if isinstance(value, GGUFArray):
                value.tolist()
                if len(value):
                    value[-1]
        meta.model_info()
    assert outcomes["ok"] and outcomes["GGUFError"], outcomes


# --------------------------------------------------------------------------- gguf-py's writer


def test_reads_what_gguf_py_writes(tmp_path: Path) -> None:
    gguf = _import_gguf()
    np = pytest.importorskip("numpy")
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Writer Test")
    writer.add_context_length(2048)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_token_list(["<s>", "ü", "b"])
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_chat_template("{{ x }}")
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("v", np.ones(5, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    meta = read_metadata(path)
    reader = gguf.GGUFReader(str(path))
    assert meta.tensors is not None and meta.data_offset is not None
    assert meta.architecture == "llama" and meta.name == "Writer Test" and meta.context_length == 2048
    assert meta.quantization == "Q8_0" and meta.chat_template == "{{ x }}"
    assert meta.kv["tokenizer.ggml.tokens"].tolist() == ["<s>", "ü", "b"]
    assert meta.kv["test.ints"].tolist() == [1, 2, 3]
    assert meta.parameters == 17
    assert [(t.name, t.shape, t.type) for t in meta.tensors] == [("w", (4, 3), 0), ("v", (5,), 1)]
    for ours, theirs in zip(meta.tensors, reader.tensors, strict=True):
        assert meta.data_offset + ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes


# --------------------------------------------------------------------------- discovery


def _model(
    path: Path, arch: str = "llama", extra: Optional[Sequence[tuple[str, int, Any]]] = None, tensors: Any = TENSORS
) -> Path:
    kvs = [("general.architecture", T.STRING, arch), ("general.file_type", T.UINT32, 7), *(extra or [])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_gguf(kvs, tensors))
    return path


def _split(folder: Path, stem: str, count: int, missing: tuple[int, ...] = ()) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"{stem}-{i + 1:05d}-of-{count:05d}.gguf"
        split_kv = [
            ("split.no", T.UINT16, i),
            ("split.count", T.UINT16, count),
            ("split.tensors.count", T.INT32, count),
        ]
        tensor = ((f"t{i}", (4, i + 1), 0, bytes(16 * (i + 1))),)
        if i == 0:
            _model(path, "qwen2", split_kv, tensor)
        else:
            path.write_bytes(build_gguf(split_kv, tensor))
        paths.append(path)
    for i in missing:
        paths[i].unlink()
    return paths


def test_discover_sorted_and_skips_junk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _model(tmp_path / "b.gguf", "gemma3")
    _model(tmp_path / "a.gguf", "llama")
    _model(tmp_path / "sub" / "c.gguf", "qwen3")
    (tmp_path / "junk.gguf").write_text("<html>not a model</html>")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "dir.gguf").mkdir()
    _model(tmp_path / "other.bin")
    (tmp_path / "notes.txt").write_text("hi")
    with caplog.at_level(logging.WARNING, logger="llamarocm"):
        models = discover_models(tmp_path)
    assert [Path(m.path).name for m in models] == ["a.gguf", "b.gguf"]
    assert [m.architecture for m in models] == ["llama", "gemma3"]
    assert models[0].quantization == "Q8_0" and models[0].parameters == 140
    assert models[0].file_size == os.path.getsize(tmp_path / "a.gguf")
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "llamarocm")
    assert "junk.gguf" in warned and "empty.gguf" in warned
    assert "dir.gguf" not in warned and "other.bin" not in warned

    deep = discover_models(str(tmp_path), recursive=True)
    assert [os.path.relpath(m.path, tmp_path) for m in deep] == ["a.gguf", "b.gguf", os.path.join("sub", "c.gguf")]
    assert discover_models(tmp_path / "sub") == [deep[2]]


def test_discover_split_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parts = _split(tmp_path, "big", 3)
    _split(tmp_path, "broken", 2, missing=(1,))
    _split(tmp_path, "orphan", 2, missing=(0,))
    _model(tmp_path / "solo.gguf")
    with caplog.at_level(logging.WARNING, logger="llamarocm"):
        models = discover_models(tmp_path)
    assert [Path(m.path).name for m in models] == ["big-00001-of-00003.gguf", "solo.gguf"]
    big = models[0]
    assert big.file_size == sum(p.stat().st_size for p in parts)
    assert big.parameters == 4 * 1 + 4 * 2 + 4 * 3
    assert big.architecture == "qwen2" and big.quantization == "Q8_0"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "broken-00001-of-00002.gguf" in warned and "missing" in warned
    assert "orphan-00002-of-00002.gguf" in warned

    # The same numbers straight from the first shard's metadata.
    meta = read_metadata(parts[0])
    assert meta.model_info() == big
    quick = read_metadata(parts[0], tensors=False).model_info()
    assert quick.file_size == big.file_size and quick.parameters is None
    with pytest.raises(ModelNotFoundError, match="missing"):
        read_metadata(tmp_path / "broken-00001-of-00002.gguf").model_info()


def test_split_shard_renamed(tmp_path: Path) -> None:
    first = _split(tmp_path, "m", 2)[0]
    renamed = first.rename(tmp_path / "renamed.gguf")
    with pytest.raises(GGUFError, match="00001-of-00002"):
        read_metadata(renamed).model_info()


def test_discover_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        discover_models(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        discover_models(_model(tmp_path / "a.gguf"))
    assert discover_models(tmp_path / ".") != []


def test_discover_with_gguf_py_split(tmp_path: Path) -> None:
    """Shards written by gguf-py's own splitter are grouped the same way."""
    gguf = _import_gguf()
    np = pytest.importorskip("numpy")
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama", split_max_tensors=1)
    writer.add_context_length(512)
    for i in range(3):
        writer.add_tensor(f"t{i}", np.zeros((2, i + 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(tmp_path.glob("*.gguf"))
    assert len(shards) == 3
    (model,) = discover_models(tmp_path)
    assert model.path == str(shards[0]) and model.path.endswith("-00001-of-00003.gguf")
    assert model.file_size == sum(p.stat().st_size for p in shards)
    assert model.parameters == 2 + 4 + 6 and model.context_length == 512


# --------------------------------------------------------------------------- docs and benchmark


@pytest.mark.parametrize("module", [gguf_module, gguf_header_module, gguf_values_module])
def test_doctests(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_names() -> None:
    for name in gguf_module.__all__:
        assert getattr(gguf_module, name).__doc__, name
    assert issubclass(GGUFError, ValueError) and issubclass(ModelNotFoundError, FileNotFoundError)


def test_benchmark_smoke(tmp_path: Path) -> None:
    _import_gguf()
    spec = importlib.util.spec_from_file_location("bench_gguf", REPO / "benchmarks" / "bench_gguf.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = sample_file(tmp_path)
    out = tmp_path / "results" / "gguf.json"
    result = bench.main([model, "--repeat", "2", "--reader-repeat", "1", "--output", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["timings_ms"]) == {"full", "header_only", "gguf_reader"}
    assert result["model"]["tensor_count"] == 2


# --------------------------------------------------------------------------- the real model


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        _unavailable("the gguf package (gguf-py) is not installed")
    return gguf


@pytest.fixture(scope="session")
def gemma_path(model_path: str) -> str:
    # The suite's shared copy of the embedded model (see conftest.model_path).
    return model_path


@pytest.fixture(scope="session")
def gemma_reader(gemma_path: str) -> Any:
    # GGUFReader needs ~10-30 s for the 262k-entry vocabulary: build it once.
    return _import_gguf().GGUFReader(gemma_path)


@pytest.mark.timeout(300)  # GGUFReader itself is the slow part (see gemma_reader)
def test_gemma_matches_gguf_reader(gemma_path: str, gemma_reader: Any) -> None:
    gguf = _import_gguf()
    reader = gemma_reader
    meta = read_metadata(gemma_path)
    assert meta.tensors is not None and meta.data_offset is not None

    assert meta.architecture == reader.fields["general.architecture"].contents() == "gemma3"
    assert meta.context_length == reader.fields["gemma3.context_length"].contents()
    assert meta.version == reader.fields["GGUF.version"].contents()
    assert meta.tensor_count == len(meta.tensors) == len(reader.tensors) == 236
    assert meta.data_offset == reader.data_offset
    assert meta.quantization == "Q4_K_M" and meta.size_label == "270M" and meta.name == "Gemma 3 270m"

    for ours, theirs in zip(meta.tensors, reader.tensors, strict=True):
        assert ours.name == theirs.name
        assert ours.shape == tuple(int(d) for d in theirs.shape)
        assert ours.type == int(theirs.tensor_type)
        assert meta.data_offset + ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes
    assert meta.parameters == sum(int(t.n_elements) for t in reader.tensors)

    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(meta.kv) == list(fields)
    rng = random.Random(7)
    for key, field in fields.items():
        value = meta.kv[key]
        assert meta.kv_types[key] == int(field.types[0]), key
        if field.types[0] != gguf.GGUFValueType.ARRAY:
            assert value == field.contents(), key
            continue
        assert isinstance(value, GGUFArray)
        assert value.type == int(field.types[-1]), key
        assert len(value) == len(field.data), key
        n = len(value)
        sample = sorted({0, n - 1, 255, 256, 257, *(rng.randrange(n) for _ in range(300))} & set(range(n)))
        for i in sample:
            assert value[i] == field.contents(i), (key, i)
        if n > 600:
            assert value[300:600] == field.contents(slice(300, 600)), key


@pytest.mark.timeout(120)
def test_gemma_fast_and_complete(gemma_path: str) -> None:
    best = min(_timed(read_metadata, gemma_path) for _ in range(3))
    # The budget is 50 ms; this loose bound only catches an accidental slow path.
    assert best < 0.5
    meta = read_metadata(gemma_path)
    tokens = meta.kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 262144 and tokens[2] == "<bos>" and tokens[105] == "<start_of_turn>"
    assert tokens.tolist()[-1] == tokens[-1]
    assert len(meta.kv["tokenizer.ggml.scores"]) == 262144
    info = meta.model_info()
    assert info.parameters == 268098176 and info.file_size == os.path.getsize(gemma_path)
    head = read_metadata(gemma_path, tensors=False)
    assert (head.architecture, head.context_length, head.chat_template) == ("gemma3", 32768, None)


def _timed(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

"""Property-based tests of the GGUF reader against corrupt, hostile and truncated files.

A model file comes from a download that may have been cut short, a disk that flipped a
bit, or someone who wants to crash whatever reads it. Whatever happens to the bytes,
``read_metadata`` must raise ``GGUFError`` (naming the file) or return metadata whose
every value can be touched, and either way within a small, fixed budget of time and
memory: a length field claiming 2**60 bytes must be refused, never allocated or looped
over.

The seed files are small valid GGUF files with every value type, nested arrays, a chat
template and tensors; one is written by gguf-py's own ``GGUFWriter``. gguf-py's reader
locates every length, count and type field in them, so mutations can aim at exactly the
fields a hostile file would lie in. The real model file is never used here.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, NamedTuple, Union

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

# The all-types sample and its writer are shared with the example-based tests.
from test_gguf import ALL_TYPES_KVS, TENSORS, T, build_gguf

import llamarocm.gguf as gguf_module
from llamarocm.errors import GGUFError
from llamarocm.gguf import GGUFArray, GGUFMetadata, read_metadata

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(120)

# Example counts are kept small: these run in every test session on two shared cores.
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Budgets per read of a seed-sized file (<= ~30 KB). A real read takes about a
# millisecond and well under 1 MB; these leave room for a loaded machine and tracemalloc,
# while an attempt to allocate or walk what a hostile length claims would blow them.
TIME_BUDGET = 2.0
MEMORY_BUDGET = 4 * 1024 * 1024


class Seed(NamedTuple):
    data: bytes
    endian: str  # struct prefix of the file's byte order
    lengths: tuple[int, ...]  # offsets of u64 length/count/shape/offset fields
    types: tuple[int, ...]  # offsets of u32 value-type, element-type, n_dims and ggml-type fields
    folder: Path


def _writer_file(path: Path) -> None:
    """A small file as gguf-py writes it: every scalar type, arrays, nested arrays, tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Writer Seed")
    w.add_context_length(128)
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -3)
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -7)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float32("t.f32", 1.5)
    w.add_float64("t.f64", 2.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 🎉")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "ü", ""])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.nested_str", [["x"], ["y", "z"]])
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("v", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ~2,100 short tokens: enough strings for the reader's regex fast path (>= 2048), with
# one token too long for it, so both ways of skipping a string array are exercised. The
# file ends in a numeric array with no tensors after it, so a count that overshoots the
# file is caught by the array's own check and not by whatever would come next.
VOCAB = [b"tok%d" % i for i in range(2100)]
VOCAB[1500] = b"L" * 200
VOCAB_KVS = [
    ("tokenizer.ggml.tokens", T.ARRAY, (T.STRING, VOCAB)),
    *ALL_TYPES_KVS[:3],
    ("tokenizer.ggml.token_type", T.ARRAY, (T.INT32, list(range(-3, 40)))),
]
BUILT: dict[str, Callable[[], bytes]] = {
    "all_types_le": lambda: build_gguf([*ALL_TYPES_KVS, ("general.alignment", T.UINT32, 32)], TENSORS),
    "all_types_be": lambda: build_gguf([*ALL_TYPES_KVS, ("general.alignment", T.UINT32, 16)], TENSORS, e=">"),
    "vocab_le": lambda: build_gguf(VOCAB_KVS),
    "vocab_be": lambda: build_gguf(VOCAB_KVS, e=">"),
}
SEEDS = ["gguf_writer", *BUILT]


def _int_fields(reader: Any) -> tuple[list[int], list[int]]:
    """Offsets of the structural u64 and u32 fields, as gguf-py's reader parsed the file.

    A field's ``parts`` lie back to back from its offset; the parts listed in ``data``
    are values (a u64 value may legitimately be huge), the rest are structure.
    """
    lengths, types = [8, 16], []  # the header's tensor and key/value counts
    records = [(f.offset, f.parts, set(f.data)) for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    # Every part of a tensor description is structure: name length, dims, type, offset.
    records += [(t.field.offset, t.field.parts, set()) for t in reader.tensors]
    for offset, parts, data in records:
        for i, part in enumerate(parts):
            if i not in data and part.dtype.kind == "u" and part.dtype.itemsize in (4, 8):
                target = lengths if part.dtype.itemsize == 8 else types
                target += [offset + k * part.dtype.itemsize for k in range(part.size)]
            offset += part.nbytes
    return lengths, types


@pytest.fixture(scope="module", params=SEEDS)
def seed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Seed:
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / "seed.gguf"
    if request.param == "gguf_writer":
        _writer_file(path)
    else:
        path.write_bytes(BUILT[request.param]())
    data = path.read_bytes()
    meta = read_metadata(path)
    # Guard against a seed that silently lost what the mutations are meant to hit.
    assert meta.chat_template or "tokenizer.ggml.tokens" in meta.kv
    assert any(isinstance(v, GGUFArray) for v in meta.kv.values())
    assert meta.tensors is not None and meta.kv_types
    reader = gguf.GGUFReader(str(path))
    assert [meta.data_offset + t.offset for t in meta.tensors] == [t.data_offset for t in reader.tensors]
    lengths, types = _int_fields(reader)
    endian = ">" if meta.byte_order == "big" else "<"
    # The offsets really are the fields: sane lengths, counts and offsets; small type codes.
    for off in lengths:
        assert struct.unpack_from(endian + "Q", data, off)[0] <= len(data) * 8, off
    for off in types:
        assert struct.unpack_from(endian + "I", data, off)[0] < 64, off
    return Seed(data, endian, tuple(lengths), tuple(types), folder)


# --------------------------------------------------------------------------- mutations


HUGE = [2**63, 2**64 - 1, 2**60, 2**62 + 1, 2**32, 2**32 + 1, 2**31, 2**16 + 1]
Mutation = tuple[str, int, Union[int, bytes]]

_type_codes = st.integers(0, 14) | st.sampled_from([2**31, 2**32 - 1, 65536])
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.integers(0, 2**20), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)),
    # Aimed lies, listed twice to be drawn more often: a length/count field set to
    # something huge or just past the file, a type code set to anything.
    *[st.tuples(st.just("length"), st.integers(0, 2**16), st.sampled_from(HUGE) | st.integers(0, 2**64 - 1))] * 2,
    *[st.tuples(st.just("length"), st.integers(0, 2**16), st.integers(0, 70_000))] * 2,
    *[st.tuples(st.just("type"), st.integers(0, 2**16), _type_codes)] * 2,
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 2**20), st.just(0)),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


def _mutate(seed: Seed, ops: list[Mutation]) -> bytes:
    """Apply ``ops`` in turn; positions wrap around so any integer names some place."""
    data = bytearray(seed.data)
    for kind, where, what in ops:
        n = len(data)
        if kind == "flip" and n:
            data[where % n] ^= 1 << int(what)
        elif kind == "byte" and n:
            data[where % n] = int(what)
        elif kind in ("length", "type"):
            targets = seed.lengths if kind == "length" else seed.types
            fmt = seed.endian + ("Q" if kind == "length" else "I")
            pos = targets[where % len(targets)]
            if pos + struct.calcsize(fmt) <= n:  # an earlier op may have cut it off
                struct.pack_into(fmt, data, pos, int(what))
        elif kind == "insert":
            assert isinstance(what, bytes)
            pos = where % (n + 1)
            data[pos:pos] = what
        elif kind == "delete" and n:
            del data[where % n : where % n + int(what)]
        elif kind == "truncate":
            del data[where % (n + 1) :]
    return bytes(data)


_names = itertools.count()


def _write(seed: Seed, data: bytes) -> Path:
    # A fresh name per example: rewriting one file in place would make ext4 flush it.
    path = seed.folder / f"m{next(_names)}.gguf"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- outcomes


def _plain(value: Any) -> Any:
    """A value with its arrays turned into lists, compared by repr so NaN equals NaN."""
    return repr(value.tolist()) if isinstance(value, GGUFArray) else repr(value)


def _touch_everything(meta: GGUFMetadata) -> None:
    """Decode every value the walk accepted, the way a caller might, by every route."""
    for value in meta.kv.values():
        if isinstance(value, GGUFArray):
            _touch_array(value)
    for t in meta.tensors or ():
        assert t.n_elements >= 0 and (t.nbytes is None) == (t.type_name is None)
    assert meta.model_info().path == meta.path
    assert repr(meta)


def _touch_array(array: GGUFArray) -> None:
    items = array.tolist()
    assert len(items) == len(array)
    if not items:
        return
    # Indexing walks from the nearest remembered run start, a different route from tolist.
    middle = len(items) // 2
    assert _plain(array[-1]) == repr(items[-1])
    assert [_plain(x) for x in array[middle : middle + 3]] == [repr(x) for x in items[middle : middle + 3]]
    if array.type is T.STRING:
        assert array.raw(-1).decode("utf-8", "replace") == items[-1]
    if array.type is T.ARRAY:
        for inner in array:
            _touch_array(inner)


class Measured(NamedTuple):
    outcome: Union[GGUFMetadata, GGUFError]
    seconds: float
    peak: int


@contextmanager
def _tracing() -> Iterator[None]:
    # Started once around many reads: starting and stopping tracemalloc costs more than
    # reading a small file.
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _measured_read(path: Path, **kwargs: Any) -> Measured:
    """Read and touch everything; catch only GGUFError, so any other exception fails.

    Must run inside _tracing(); the peak is what this read added on top of what was
    already allocated.
    """
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        outcome: Union[GGUFMetadata, GGUFError] = read_metadata(path, **kwargs)
        _touch_everything(outcome)
    except GGUFError as exc:
        outcome = exc
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - before
    return Measured(outcome, seconds, peak)


def _check_bounded(path: Path, measured: Measured) -> None:
    assert measured.seconds < TIME_BUDGET, f"{measured.seconds:.2f} s"
    assert measured.peak < MEMORY_BUDGET, f"peak {measured.peak} bytes"
    if isinstance(measured.outcome, GGUFError):
        assert str(path) in str(measured.outcome)  # the message must say which file


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(ops=mutations)
@example(ops=[("length", 2, 2**60)])  # the first key's length claims 2**60 bytes
@example(ops=[("length", 0, 2**64 - 1), ("truncate", 100, 0)])  # absurd tensor count, cut file
def test_mutated_file_gives_gguf_error_or_usable_metadata(seed: Seed, ops: list[Mutation]) -> None:
    path = _write(seed, _mutate(seed, ops))
    try:
        with _tracing():
            full = _measured_read(path)
            header = _measured_read(path, tensors=False)
    finally:
        os.remove(path)
    _check_bounded(path, full)
    _check_bounded(path, header)
    # Shown by --hypothesis-show-statistics: both outcomes must be common.
    event(f"full read: {type(full.outcome).__name__}, header only: {type(header.outcome).__name__}")
    # The header-only read walks a prefix of what the full read walks: it can succeed
    # where the full read fails (a broken tensor section), never the other way round.
    if isinstance(full.outcome, GGUFMetadata):
        assert isinstance(header.outcome, GGUFMetadata), header.outcome
        assert {k: _plain(v) for k, v in header.outcome.kv.items()} == {
            k: _plain(v) for k, v in full.outcome.kv.items()
        }
        assert header.outcome.tensors is None and header.outcome.tensor_count == full.outcome.tensor_count


def _summary(meta: GGUFMetadata) -> tuple[Any, ...]:
    return (
        meta.version,
        meta.byte_order,
        {k: _plain(v) for k, v in meta.kv.items()},
        dict(meta.kv_types),
        meta.tensors,
        meta.parameters,
        meta.data_offset,
        meta.alignment,
    )


def _walk(data: bytes, limit: int) -> Union[tuple[Any, ...], str]:
    """The walk over the first ``limit`` bytes of ``data``, as the no-mmap fallback does it.

    That path (for filesystems without mmap) reads a growing prefix of the file and
    relies on the walker to tell "past what was read" (_NeedMore: read more) from "past
    the end of the file" (GGUFError). It needs a header over 1 MiB to run for real, so
    the private walker is called directly here.
    """
    try:
        meta = gguf_module._walk(data[:limit], limit, len(data), "prefix.gguf", (0, 0, 0, 0), True)
    except gguf_module._NeedMore:
        return "need more"
    except GGUFError as exc:
        return f"GGUFError: {exc}"
    return _summary(meta)


@SETTINGS
@given(ops=mutations, limit=st.integers(0, 2**16))
def test_reading_a_prefix_asks_for_more_or_agrees_with_the_whole(seed: Seed, ops: list[Mutation], limit: int) -> None:
    data = _mutate(seed, ops)
    limit %= len(data) + 1
    whole = _walk(data, len(data))
    prefix = _walk(data, limit)
    event("prefix read: " + ("need more" if prefix == "need more" else "same result"))
    assert whole != "need more"  # the whole file is never too short for itself
    assert prefix in ("need more", whole)


def _read_with(seed: Seed, fmt: str, off: int, value: int) -> Measured:
    """Read the seed with one field at ``off`` overwritten, checking the budgets."""
    data = bytearray(seed.data)
    struct.pack_into(seed.endian + fmt, data, off, value)
    path = _write(seed, bytes(data))
    try:
        if tracemalloc.is_tracing():
            measured = _measured_read(path)
        else:
            with _tracing():
                measured = _measured_read(path)
    finally:
        os.remove(path)
    _check_bounded(path, measured)
    return measured


def test_every_length_field_set_past_the_end_is_refused(seed: Seed) -> None:
    # Exhaustive over the seed's structural u64 fields (thinned out in the vocabulary):
    # each is a length, count, dimension or offset that the file cannot hold as large as
    # its own size, let alone 2**60.
    lengths = seed.lengths if len(seed.lengths) < 200 else seed.lengths[::59] + seed.lengths[-3:]
    with _tracing():
        for off in lengths:
            for value in (len(seed.data), 2**60, 2**63, 2**64 - 1):
                outcome = _read_with(seed, "Q", off, value).outcome
                assert isinstance(outcome, GGUFError), (off, value)


# One seed per writer and byte order is enough here: type codes are read the same way
# in both orders, and the mutation properties above cover every seed.
@pytest.mark.parametrize("seed", ["gguf_writer", "all_types_le", "vocab_be"], indirect=True)
def test_every_type_field_set_to_any_code_is_handled(seed: Seed) -> None:
    # Exhaustive over the u32 value-type, element-type, n_dims and ggml-type fields:
    # every known value-type code, the first unknown one and the largest.
    with _tracing():
        for off in seed.types:
            for value in [*range(14), 2**32 - 1]:
                _read_with(seed, "I", off, value)


def test_mutations_reach_both_outcomes(seed: Seed) -> None:
    # The properties above only mean something if the mutations produce readable files
    # as well as refused ones; a seed where every mutation fails would test nothing.
    readable = _read_with(seed, "B", len(seed.data) - 1, seed.data[-1] ^ 1)
    refused = _read_with(seed, "Q", seed.lengths[0], 2**63)
    assert isinstance(readable.outcome, GGUFMetadata) and isinstance(refused.outcome, GGUFError)

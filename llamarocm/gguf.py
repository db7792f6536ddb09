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

This module is the public face: opening files, the metadata and summary records, and
discovery. The format itself is decoded by ``_gguf_values`` (values, lazy arrays) and
``_gguf_header`` (the header walk, ``TensorInfo``).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, BinaryIO, Optional, Union

from ._gguf_header import Header, TensorInfo, read_header
from ._gguf_values import INTEGER_TYPES, GGUFArray, GGUFValueType, file_signature
from ._gguf_values import NeedMore as _NeedMore
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

# Defined in private modules, documented (and imported) as this module's.
for _public in (GGUFArray, GGUFValueType, TensorInfo):
    _public.__module__ = __name__

logger = logging.getLogger("llamarocm")

PathLike = Union[str, "os.PathLike[str]"]

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

_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


# --------------------------------------------------------------------------- public types


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


def _make_metadata(path: str, size: int, header: Header) -> GGUFMetadata:
    """The public record of a header: the well-known keys picked out and type-checked."""
    kv = header.kv

    def text(key: str) -> Optional[str]:
        value = kv.get(key)
        return value if isinstance(value, str) else None

    def integer(key: str) -> Optional[int]:
        value = kv.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # Per-layer values (e.g. OpenELM's head counts) are arrays; the largest is the
        # safe number for sizing anything.
        if isinstance(value, GGUFArray) and value.type in INTEGER_TYPES and len(value):
            return int(max(value))
        return None

    arch = text("general.architecture")
    prefix = f"{arch}." if arch else "\0"  # "\0" matches no key
    file_type = kv.get("general.file_type")
    if not isinstance(file_type, int) or isinstance(file_type, bool):
        file_type = None
    return GGUFMetadata(
        path=path,
        version=header.version,
        byte_order="big" if header.big_endian else "little",
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
        parameters=header.parameters,
        chat_template=text("tokenizer.chat_template"),
        tensor_count=header.tensor_count,
        kv=MappingProxyType(kv),
        kv_types=MappingProxyType(header.kv_types),
        tensors=header.tensors,
        file_size=size,
        data_offset=header.data_offset,
        alignment=header.alignment,
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
    """Refuse what cannot be a GGUF model (see :func:`~llamarocm.read_metadata` for the errors)
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
        signature = file_signature(st)
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


def _walk(buf: Any, limit: int, size: int, path: str, signature: tuple[int, ...], tensors: bool) -> GGUFMetadata:
    """Parse the GGUF header in ``buf`` (the first ``limit`` bytes of a ``size``-byte file)."""
    return _make_metadata(path, size, read_header(buf, limit, size, path, signature, tensors))


def _model_info(meta: GGUFMetadata, cache: dict[str, GGUFMetadata]) -> ModelInfo:
    file_size = meta.file_size
    parameters = meta.parameters
    split = _split_shard(meta)
    if split is not None and split[0] == 0:
        for shard in _shard_paths(meta.path, split[1])[1:]:
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


def _split_shard(meta: GGUFMetadata) -> Optional[tuple[Any, int]]:
    """(``split.no``, ``split.count``) of a shard of a split model, None for a whole model."""
    count = meta.kv.get("split.count")
    if isinstance(count, int) and count > 1:
        return meta.kv.get("split.no", 0), count
    return None


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
    root = _model_folder(folder)
    cache: dict[str, GGUFMetadata] = {}
    models = []
    for meta in _read_models(sorted(_gguf_files(root, recursive)), cache):
        split = _split_shard(meta)
        if split is not None and split[0] != 0:
            _warn_if_first_shard_missing(meta, split[0], cache)
            continue  # counted with its first shard
        try:
            models.append(_model_info(meta, cache))
        except (GGUFError, OSError) as exc:
            logger.warning("skipping %s: %s", meta.path, exc)
    models.sort(key=lambda info: info.path)
    return models


def _model_folder(folder: PathLike) -> str:
    """``folder`` as a string path, refused unless it is an existing folder."""
    root = os.path.expanduser(os.fspath(folder))
    if not isinstance(root, str):
        root = os.fsdecode(root)
    if not os.path.exists(root):
        raise ModelNotFoundError(f"model folder not found: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root} is a file, not a folder of models; use read_metadata() for one file")
    return root


def _read_models(paths: list[str], cache: dict[str, GGUFMetadata]) -> list[GGUFMetadata]:
    """The metadata of each file that reads as GGUF, also kept in ``cache`` by absolute
    path; the others are skipped with a warning."""
    metas: list[GGUFMetadata] = []
    for path in paths:
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
    return metas


def _warn_if_first_shard_missing(meta: GGUFMetadata, split_no: Any, cache: dict[str, GGUFMetadata]) -> None:
    """A later shard is listed with its first one; say so if that one was not read."""
    m = _SPLIT_NAME.match(os.path.basename(meta.path))
    if m is None:
        return
    first = os.path.join(os.path.dirname(meta.path), f"{m['prefix']}-00001-of-{m['count']}.gguf")
    if os.path.abspath(first) not in cache:
        logger.warning("skipping %s: shard %s of a split model whose first shard is missing", meta.path, split_no + 1)


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

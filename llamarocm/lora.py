"""LoRA adapters: which files a model is loaded with, how a request names them, and
the ``lora`` field every request of such a model carries.

llama-server loads the adapters once (``--lora FILE``, one per adapter, numbered from 0
in that order) and applies them per request with scales: the request field
``"lora": [{"id": 0, "scale": 0.5}, ...]``. What it does with a request that leaves the
field out, or leaves an adapter out of it, has changed between its versions (the global
scale, or 0), and ``--lora-init-without-apply`` did not keep an adapter out of such a
request. So every request of a model with adapters carries the scale of *every*
adapter: the request's own where it names one, the model's default otherwise.

An adapter is named, in a request and in :meth:`~llamarocm.Model.set_lora`, by the path
it was loaded with (as given, or any spelling of the same absolute path) or by its file
name when no other adapter of the model has that file name.

No HTTP, no process: the file checks read GGUF headers, the rest is bookkeeping.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .config import FLOAT32_MAX, check_float
from .errors import GGUFError
from .gguf import read_metadata

__all__ = ["LoraAdapter", "LoraAdapters", "parse_lora", "check_adapter_file"]

PathLike = Union[str, "os.PathLike[str]"]
#: What ``load_model(lora=...)`` takes for one adapter: a path (scale 1.0) or ``(path, scale)``.
LoraSpec = Union[PathLike, Tuple[PathLike, float]]


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter of a loaded model: its ``id`` on the server (its position in
    ``load_model(lora=[...])``), the ``name`` it was given there, its absolute ``path``,
    and the scale it was loaded with."""

    id: int
    name: str
    path: str
    scale: float


def parse_lora(value: Any) -> List[Tuple[str, str, float]]:
    """``load_model(lora=...)`` as ``(name, absolute path, scale)`` triples, in order.

    Takes one path or a list of paths and ``(path, scale)`` pairs; a ``~`` is expanded.
    Refuses a path llama-server's ``--lora`` would cut (a comma separates adapters
    there) and the same file twice. The files are checked by :func:`check_adapter_file`.

    >>> parse_lora([("/a/x.gguf", 0.5), "/a/y.gguf"])
    [('/a/x.gguf', '/a/x.gguf', 0.5), ('/a/y.gguf', '/a/y.gguf', 1.0)]
    """
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"lora must be a list of adapter paths or (path, scale) pairs, not {type(value).__name__}")
    parsed: List[Tuple[str, str, float]] = []
    seen: Dict[str, int] = {}
    for i, spec in enumerate(value):
        given, scale = _spec(i, spec)
        path = os.path.abspath(os.path.expanduser(given))
        if "," in path:
            raise ValueError(f"lora[{i}]: llama-server cannot load an adapter whose path has a comma: {given!r}")
        if "\0" in path:
            raise ValueError(f"lora[{i}]: a path must not contain NUL characters")
        if path in seen:
            raise ValueError(f"lora[{i}]: {given!r} is already lora[{seen[path]}]")
        seen[path] = i
        parsed.append((given, path, scale))
    return parsed


def _spec(i: int, spec: Any) -> Tuple[str, float]:
    if isinstance(spec, (str, os.PathLike)):
        path: Any = spec
        scale: Any = 1.0
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)) and len(spec) == 2:
        path, scale = spec
    else:
        raise TypeError(f"lora[{i}] must be a path or a (path, scale) pair, got {spec!r:.80}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"lora[{i}]'s path must be a str or path, not {type(path).__name__}")
    given = os.fspath(path)
    if not isinstance(given, str) or not given:
        raise TypeError(f"lora[{i}]'s path must be a non-empty str path")
    check_float(f"lora[{i}]'s scale", scale, -FLOAT32_MAX, FLOAT32_MAX)
    return given, float(scale)


def check_adapter_file(path: str, architecture: Optional[str]) -> int:
    """Refuse what llama-server could not load as a LoRA adapter of a model of
    ``architecture``: a missing file (:class:`~llamarocm.ModelNotFoundError`), one that
    is not GGUF, not a LoRA adapter, or made for another architecture
    (:class:`~llamarocm.GGUFError`). Returns the file's size in bytes."""
    metadata = read_metadata(path, tensors=False)
    kind = metadata.kv.get("general.type")
    if kind != "adapter":
        raise GGUFError(f"{path} is not a LoRA adapter: its general.type is {kind!r}, not 'adapter'")
    adapter_type = metadata.kv.get("adapter.type")
    if adapter_type != "lora":
        raise GGUFError(f"{path} is not a LoRA adapter: its adapter.type is {adapter_type!r}, not 'lora'")
    if metadata.architecture != architecture:
        raise GGUFError(
            f"{path} is a LoRA adapter for {metadata.architecture!r} models, "
            f"but the model's architecture is {architecture!r}"
        )
    return metadata.file_size


class LoraAdapters:
    """The adapters of one model and their default scales, which
    :meth:`~llamarocm.Model.set_lora` changes; shared by threads (a lock guards the
    scales)."""

    def __init__(self, adapters: Sequence[LoraAdapter]) -> None:
        self.adapters: Tuple[LoraAdapter, ...] = tuple(adapters)
        self._lock = threading.Lock()
        self._scales = [adapter.scale for adapter in self.adapters]
        #: Held by a change of the defaults from its reading to its :meth:`commit`, so
        #: two changes at once cannot undo each other.
        self.change_lock = threading.Lock()

    @classmethod
    def from_parsed(cls, parsed: Sequence[Tuple[str, str, float]]) -> "LoraAdapters":
        return cls([LoraAdapter(i, name, path, scale) for i, (name, path, scale) in enumerate(parsed)])

    @classmethod
    def from_server(cls, listing: Any) -> "LoraAdapters":
        """The adapters a running server lists (``GET /lora-adapters``), named by the
        paths it reports; anything unexpected in the listing counts as no adapters."""
        adapters = []
        for i, item in enumerate(listing if isinstance(listing, list) else []):
            if not isinstance(item, dict):
                return cls(())
            path, scale = item.get("path"), item.get("scale", 1.0)
            if not isinstance(path, str) or item.get("id") != i or not isinstance(scale, (int, float)):
                return cls(())
            adapters.append(LoraAdapter(i, path, os.path.abspath(path), float(scale)))
        return cls(adapters)

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def server_args(self) -> List[str]:
        """llama-server's arguments: ``--lora FILE`` per adapter, in id order."""
        return [arg for adapter in self.adapters for arg in ("--lora", adapter.path)]

    def id_of(self, name: str) -> int:
        """The id of the adapter ``name`` names (see the module's docstring), or a
        ``ValueError`` listing the names there are."""
        for adapter in self.adapters:
            if name == adapter.name:
                return adapter.id
        absolute = os.path.abspath(os.path.expanduser(name))
        for adapter in self.adapters:
            if absolute == adapter.path:
                return adapter.id
        by_file_name = [a for a in self.adapters if os.path.basename(a.path) == name]
        if len(by_file_name) == 1:
            return by_file_name[0].id
        if not self.adapters:
            raise ValueError(f"no LoRA adapter {name!r}: this model was loaded without adapters (load_model(lora=...))")
        if by_file_name:
            raise ValueError(f"LoRA adapter name {name!r} is ambiguous: name it by its path, one of "
                             f"{', '.join(repr(a.name) for a in by_file_name)}")
        known = ", ".join(repr(a.name) for a in self.adapters)
        raise ValueError(f"no LoRA adapter {name!r} in this model; its adapters are {known}")

    def _by_id(self, scales: Optional[Mapping[str, float]]) -> Dict[int, float]:
        return {self.id_of(name): scale for name, scale in (scales or {}).items()}

    def request_field(self, scales: Optional[Mapping[str, float]] = None) -> List[Dict[str, Any]]:
        """The ``lora`` field of a request: every adapter's scale, ``scales`` (by name)
        over the defaults. Raises ``ValueError`` for an unknown name, before sending."""
        overrides = self._by_id(scales)
        with self._lock:
            current = list(self._scales)
        return [{"id": i, "scale": overrides.get(i, scale)} for i, scale in enumerate(current)]

    def commit(self, field: Sequence[Mapping[str, Any]]) -> None:
        """Make ``field``'s scales (one per adapter, in id order) the defaults."""
        with self._lock:
            self._scales = [float(entry["scale"]) for entry in field]

    def defaults(self) -> Dict[str, float]:
        """The default scale of each adapter, by the name it was loaded with."""
        with self._lock:
            return {adapter.name: scale for adapter, scale in zip(self.adapters, self._scales, strict=True)}

"""Validated settings for loading a model and for one generation request.

Both classes are frozen dataclasses that check every field when they are built, so a
bad value raises ``TypeError`` / ``ValueError`` in the caller's thread before a
process is spawned or a request is sent.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["GenerateConfig", "LoadConfig"]

# Fields the stream itself sets and reads back; overriding one would break it.
_RESERVED_FIELDS = frozenset({"prompt", "stream", "return_tokens", "messages"})

# Server flags llamarocm sets itself; llama-server lets the last one win, so one of
# these in extra_args would silently undo a guarantee (loopback only, our key, ...).
_MANAGED_FLAGS = {
    "--host": "the server listens on 127.0.0.1 only",
    "--port": "the port is chosen (and retried) by llamarocm",
    "-m": "pass the model as load_model's path",
    "--model": "pass the model as load_model's path",
    "--api-key": "each server gets a fresh key from llamarocm",
    "--api-key-file": "each server gets a fresh key from llamarocm",
    "-c": "use context_length= (per slot)",
    "--ctx-size": "use context_length= (per slot)",
    "-np": "use parallel=",
    "--parallel": "use parallel=",
}

#: Generous default for ``timeout=``: a stream that sends nothing for this long is dead.
DEFAULT_STREAM_TIMEOUT = 300.0
DEFAULT_STARTUP_TIMEOUT = 120.0


def _check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> None:
    # bool is an int subclass; True as a token count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_float(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    *,
    exclusive_min: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if exclusive_min and value <= minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_optional(check, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
    if value is not None:
        check(name, value, *args, **kwargs)


def _string_tuple(name: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a string or a sequence of strings, not {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{name} must contain only strings, found {type(item).__name__}")
    return tuple(value)


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling and limits for one ``generate()`` / ``chat()`` call.

    ``None`` leaves a setting to the server's default. ``json_schema`` (a JSON Schema
    dict) or ``grammar`` (GBNF text) constrain the output through llama-server's
    constrained decoding; ``logprobs=N`` fills each token's ``logprob`` and its ``N``
    most likely alternatives (as the server reports them: before constraints and
    sampling). ``extra`` is merged into the
    request body as-is (like openai's ``extra_body``), for server options this class
    does not name. ``timeout`` is the longest silence, in seconds, before the stream
    raises :class:`~llamarocm.StreamTimeoutError` and is cancelled.

    >>> GenerateConfig(max_tokens=16, temperature=0.0).max_tokens
    16
    """

    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    json_schema: Optional[Mapping[str, Any]] = None
    grammar: Optional[str] = None
    logprobs: Optional[int] = None
    timeout: float = DEFAULT_STREAM_TIMEOUT
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_optional(_check_int, "max_tokens", self.max_tokens, 1)
        _check_optional(_check_float, "temperature", self.temperature, 0.0, 100.0)
        _check_optional(_check_int, "top_k", self.top_k, 0)
        _check_optional(_check_float, "top_p", self.top_p, 0.0, 1.0)
        _check_optional(_check_float, "min_p", self.min_p, 0.0, 1.0)
        _check_optional(_check_float, "repeat_penalty", self.repeat_penalty, 0.0, exclusive_min=True)
        # llama-server takes any 32-bit seed; -1 (0xFFFFFFFF) means "random".
        _check_optional(_check_int, "seed", self.seed, 0, 2**32 - 2)
        stop = _string_tuple("stop", self.stop)
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", stop)
        if self.json_schema is not None:
            if not isinstance(self.json_schema, Mapping):
                raise TypeError(f"json_schema must be a dict, not {type(self.json_schema).__name__}")
            object.__setattr__(self, "json_schema", dict(self.json_schema))
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise TypeError(f"grammar must be a str (GBNF), not {type(self.grammar).__name__}")
            if not self.grammar.strip():
                raise ValueError("grammar must not be empty")
            if self.json_schema is not None:
                raise ValueError("pass json_schema or grammar, not both")
        _check_optional(_check_int, "logprobs", self.logprobs, 0, 20)
        _check_float("timeout", self.timeout, 0.0, exclusive_min=True)
        if not isinstance(self.extra, Mapping):
            raise TypeError(f"extra must be a mapping, not {type(self.extra).__name__}")
        for key in self.extra:
            if not isinstance(key, str):
                raise TypeError("extra's keys must be strings")
            if key in _RESERVED_FIELDS:
                raise ValueError(f"extra must not set {key!r}: the stream depends on it")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra must be plain JSON (no NaN, no objects): {exc}") from None
        object.__setattr__(self, "extra", dict(self.extra))

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "GenerateConfig":
        """Build from keyword arguments, naming any unknown one in a ``TypeError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unexpected argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                "(pass other server fields through extra={...})"
            )
        return cls(**kwargs)

    def sampling_fields(self) -> dict:
        """The request fields for llama-server's native ``/completion``, set ones only."""
        body: dict = {}
        for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.stop:
            body["stop"] = list(self.stop)
        if self.json_schema is not None:
            body["json_schema"] = self.json_schema
        if self.grammar is not None:
            body["grammar"] = self.grammar
        if self.logprobs:
            body["n_probs"] = self.logprobs
        return body


GpuLayers = Union[None, int, str]


@dataclass(frozen=True)
class LoadConfig:
    """How to start ``llama-server`` for one model.

    ``context_length`` is the context of *each* slot; llama-server divides ``-c``
    between its ``parallel`` slots, so the server is started with
    ``-c context_length * parallel``. ``gpu_layers``: ``None`` leaves it to the
    server (``-ngl auto``: fit to memory), ``"all"`` offloads every layer, an int
    offloads that many.

    >>> LoadConfig("model.gguf", parallel=4).parallel
    4
    """

    model_path: Union[str, "os.PathLike[str]"]
    context_length: Optional[int] = None
    gpu_layers: GpuLayers = None
    parallel: int = 1
    threads: Optional[int] = None
    devices: Optional[Tuple[int, ...]] = None
    server_path: Optional[Union[str, "os.PathLike[str]"]] = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    extra_args: Tuple[str, ...] = ()
    rpc: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, (str, os.PathLike)):
            raise TypeError(f"model path must be a str or os.PathLike, not {type(self.model_path).__name__}")
        object.__setattr__(self, "model_path", os.fspath(self.model_path))
        if not self.model_path:
            raise ValueError("model path must not be empty")
        # 16 tokens is below anything useful, but keeps the check about types and sanity.
        _check_optional(_check_int, "context_length", self.context_length, 16, 2**24)
        if self.gpu_layers is not None and not (isinstance(self.gpu_layers, str) and self.gpu_layers == "all"):
            _check_int("gpu_layers", self.gpu_layers, 0, 100_000)
        _check_int("parallel", self.parallel, 1, 256)
        _check_optional(_check_int, "threads", self.threads, 1, 4096)
        if self.devices is not None:
            if isinstance(self.devices, (str, bytes)) or not isinstance(self.devices, Sequence):
                raise TypeError("devices must be a sequence of device indices")
            for device in self.devices:
                _check_int("device index", device, 0, 1023)
            if not self.devices:
                raise ValueError("devices must name at least one device (or be None)")
            object.__setattr__(self, "devices", tuple(self.devices))
        if self.server_path is not None:
            if not isinstance(self.server_path, (str, os.PathLike)):
                raise TypeError("server_path must be a str or os.PathLike")
            object.__setattr__(self, "server_path", os.fspath(self.server_path))
        _check_float("startup_timeout", self.startup_timeout, 0.0, exclusive_min=True)
        extra_args = _string_tuple("extra_args", self.extra_args)
        for arg in extra_args:
            flag = arg.split("=", 1)[0]
            if flag in _MANAGED_FLAGS:
                raise ValueError(f"extra_args must not contain {flag}: {_MANAGED_FLAGS[flag]}")
        object.__setattr__(self, "extra_args", extra_args)
        rpc = _string_tuple("rpc", self.rpc)
        for address in rpc:
            if "," in address:
                raise ValueError(f"rpc takes one address per item: rpc={address.split(',')!r}, not {address!r}")
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"rpc addresses must be 'host:port', got {address!r}")
            if ":" in host:
                # llama.cpp splits the endpoint at its first colon and resolves IPv4 only.
                raise ValueError(f"rpc workers are reached over IPv4 (a name or a dotted address), got {address!r}")
        object.__setattr__(self, "rpc", rpc)

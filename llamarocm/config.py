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
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["GenerateConfig", "LoadConfig"]

# Fields the stream itself sets and reads back; overriding one would break it.
_RESERVED_FIELDS = frozenset({"prompt", "stream", "return_tokens", "messages"})

# Server flags llamarocm sets itself; llama-server lets the last one win, so one of
# these in extra_args would silently undo a guarantee (loopback only, our key, ...).
# Every spelling llama-server accepts is listed, short aliases included; long ones are
# compared after normalise_flag().
_MANAGED_FLAGS: Dict[str, str] = {
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
    # Not guarantees, but settings load_model passes itself: a second copy would win
    # silently, and --rpc would skip the probe of each worker and the placement check.
    "--rpc": "use rpc= (each worker is probed before the load and checked after it)",
    "-ngl": "use gpu_layers=",
    "--gpu-layers": "use gpu_layers=",
    "--n-gpu-layers": "use gpu_layers=",
    "-t": "use threads=",
    "--threads": "use threads=",
    "-cram": "use cache_ram= (MiB)",
    "--cache-ram": "use cache_ram= (MiB)",
    # A second path would win, and saved sessions would look for slot files in ours.
    "--slot-save-path": "use sessions=True (slot files go to a private directory)",
    # Adapters given here would shift the ids of those given as lora=.
    "--lora": "use lora= (each adapter is checked, and requests name it)",
    "--lora-scaled": "use lora=[(path, scale)]",
}

#: Generous default for ``timeout=``: a stream that sends nothing for this long is dead.
DEFAULT_STREAM_TIMEOUT = 300.0
DEFAULT_STARTUP_TIMEOUT = 120.0
#: How long a plain call (tokenize, embed, apply-template...) waits for its answer.
DEFAULT_REQUEST_TIMEOUT = 30.0

#: The longest ``timeout`` / ``startup_timeout`` accepted, in seconds (about 31 years:
#: "never" in practice). Python keeps socket and thread timeouts as signed 64-bit
#: nanoseconds, so ``socket.settimeout`` overflows just above 9.2e9 s, and a deadline
#: computed as "now + timeout" must fit too; 1e9 s leaves that margin, and also stays
#: below the 2**31 s a 32-bit ``time_t`` holds.
MAX_TIMEOUT = 1e9

# llama-server reads n_predict, top_k and n_probs into int32 fields: a larger value
# wraps, often to a negative one, which it takes as "unlimited" or "disabled".
INT32_MAX = 2**31 - 1
# The seed is a uint32, and 0xFFFFFFFF (also what -1 becomes) means "a random seed".
SEED_MAX = 2**32 - 2
# Sampling settings are 32-bit floats in llama-server: anything larger becomes infinity.
FLOAT32_MAX = 3.4028234663852886e38


def normalise_flag(arg: str) -> str:
    """The option ``arg`` names, spelled the way llama.cpp compares options.

    llama.cpp's parsers read ``_`` as ``-`` in long options (``--ctx_size`` is
    ``--ctx-size``). The ``--flag=value`` form is cut at ``=`` as well: llama.cpp does
    not take that form today, but a build that does would obey it, so it is checked.

    >>> normalise_flag("--api_key_file=keys.txt")
    '--api-key-file'
    >>> normalise_flag("-np")
    '-np'
    """
    flag = arg.split("=", 1)[0]
    if flag.startswith("--"):
        flag = flag.replace("_", "-")
    return flag


def check_extra_args(name: str, value: Any, managed: Mapping[str, str]) -> Tuple[str, ...]:
    """``value`` as a tuple of strings, refusing any flag of ``managed`` (normalised
    flag -> what to do instead) and NUL characters, which no argv can carry."""
    args = _string_tuple(name, value)
    for arg in args:
        if "\0" in arg:
            raise ValueError(f"{name} must not contain NUL characters, got {arg!r}")
        flag = normalise_flag(arg)
        if flag in managed:
            raise ValueError(f"{name} must not contain {arg!r}: {managed[flag]}")
    return args


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> None:
    # bool is an int subclass; True as a token count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {shown(value)}")


def check_float(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    *,
    exclusive_min: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    # An int is always finite, and math.isfinite() would convert it to a float, which
    # overflows beyond 1e308; comparisons between int and float are exact instead.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if exclusive_min and value <= minimum:
            raise ValueError(f"{name} must be > {minimum}, got {shown(value)}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {shown(value)}")


def shown(value: Any) -> str:
    """``value`` for an error message. A huge int is described, not spelled out: its
    digits would flood the message, and past 4300 of them ``str()`` refuses."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"{'a negative' if value < 0 else 'an'} int of {value.bit_length()} bits"
    return repr(value)


def check_optional(check: Callable[..., None], name: str, value: Any, *args: Any, **kwargs: Any) -> None:
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


def check_timeout(name: str, value: Any) -> None:
    check_float(name, value, 0.0, MAX_TIMEOUT, exclusive_min=True)


def check_devices(value: Any) -> Optional[Tuple[int, ...]]:
    """GPU indices as a non-empty tuple, or ``None`` (every GPU the environment allows)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        raise TypeError(f"devices must be a sequence of device indices, not {type(value).__name__}")
    for device in value:
        check_int("device index", device, 0, 1023)
    if not value:
        raise ValueError("devices must name at least one device (or be None)")
    return tuple(value)


def check_lora_scales(name: str, value: Any) -> Optional[Dict[str, float]]:
    """``value`` (``{adapter name: scale}``) as a dict of floats, ``None`` for ``None``
    or an empty mapping. Whether the names exist is for the model to check."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of {{adapter name: scale}}, not {type(value).__name__}")
    scales: Dict[str, float] = {}
    for key, scale in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name}'s keys must be adapter names (non-empty strings), got {key!r:.80}")
        check_float(f"{name}[{key!r}]", scale, -FLOAT32_MAX, FLOAT32_MAX)
        scales[key] = float(scale)
    return scales or None


def _check_json(name: str, value: Any) -> None:
    """Refuse what cannot go into a request body: llama-server parses strict JSON."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be plain JSON (no NaN, no objects): {exc}") from None
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be sent as JSON") from None


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling and limits for one ``generate()`` / ``chat()`` call.

    ``None`` leaves a setting to the server's default. ``json_schema`` (a JSON Schema
    dict) or ``grammar`` (GBNF text) constrain the output through llama-server's
    constrained decoding; ``logprobs=N`` fills each token's ``logprob`` and its ``N``
    most likely alternatives (as the server reports them: before constraints and
    sampling). ``lora`` (``{adapter name: scale}``) sets this request's scale of
    adapters the model was loaded with (see :meth:`~llamarocm.Model.set_lora`);
    an empty dict is ``None``. ``extra`` is merged into the
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
    lora: Optional[Mapping[str, float]] = None

    def __post_init__(self) -> None:
        self._check_numbers()
        object.__setattr__(self, "lora", check_lora_scales("lora", self.lora))
        stop = _string_tuple("stop", self.stop)
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", stop)
        if self.json_schema is not None:
            if not isinstance(self.json_schema, Mapping):
                raise TypeError(f"json_schema must be a dict, not {type(self.json_schema).__name__}")
            _check_json("json_schema", self.json_schema)
            object.__setattr__(self, "json_schema", dict(self.json_schema))
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise TypeError(f"grammar must be a str (GBNF), not {type(self.grammar).__name__}")
            if not self.grammar.strip():
                raise ValueError("grammar must not be empty")
            if self.json_schema is not None:
                raise ValueError("pass json_schema or grammar, not both")
        if not isinstance(self.extra, Mapping):
            raise TypeError(f"extra must be a mapping, not {type(self.extra).__name__}")
        for key in self.extra:
            if not isinstance(key, str):
                raise TypeError("extra's keys must be strings")
            if key in _RESERVED_FIELDS:
                raise ValueError(f"extra must not set {key!r}: the stream depends on it")
        _check_json("extra", self.extra)
        object.__setattr__(self, "extra", dict(self.extra))

    def _check_numbers(self) -> None:
        # Each bound is what llama-server's field can hold, so a value is never
        # silently wrapped or turned into infinity on the way.
        check_optional(check_int, "max_tokens", self.max_tokens, 1, INT32_MAX)
        check_optional(check_float, "temperature", self.temperature, 0.0, 100.0)
        check_optional(check_int, "top_k", self.top_k, 0, INT32_MAX)
        check_optional(check_float, "top_p", self.top_p, 0.0, 1.0)
        check_optional(check_float, "min_p", self.min_p, 0.0, 1.0)
        check_optional(check_float, "repeat_penalty", self.repeat_penalty, 0.0, FLOAT32_MAX, exclusive_min=True)
        # A seed is set to be reproducible: the "random" value is refused.
        check_optional(check_int, "seed", self.seed, 0, SEED_MAX)
        check_optional(check_int, "logprobs", self.logprobs, 0, 20)
        check_timeout("timeout", self.timeout)

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

    @classmethod
    def arguments_of(cls, call: Mapping[str, Any]) -> Dict[str, Any]:
        """The fields' values among a call's arguments (a method's ``locals()`` whose
        keyword parameters are named after the fields); ``extra=None`` is ``{}``."""
        values = {f.name: call[f.name] for f in fields(cls)}
        if values["extra"] is None:
            values["extra"] = {}
        return values

    @classmethod
    def from_arguments(cls, call: Mapping[str, Any]) -> "GenerateConfig":
        """Build from a call's arguments (see :meth:`arguments_of`)."""
        return cls(**cls.arguments_of(call))

    def sampling_fields(self) -> Dict[str, Any]:
        """The request fields for llama-server's native ``/completion``, set ones only."""
        body: Dict[str, Any] = {}
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
    ``-c context_length * parallel``. ``gpu_layers``: ``None`` or ``"auto"`` leaves
    it to the server (``-ngl auto``: fit to memory), ``"all"`` or ``-1`` (as
    llama-cpp-python writes it) offloads every layer, an int offloads that many; the
    two spellings are stored as ``None`` and ``"all"``. A ``~`` in ``model_path`` or
    ``server_path`` is expanded. ``request_timeout`` bounds each plain call (tokenize,
    embed, apply-template...), in seconds.

    >>> LoadConfig("model.gguf", parallel=4).parallel
    4
    """

    model_path: Union[str, "os.PathLike[str]"]
    context_length: Optional[int] = None
    gpu_layers: GpuLayers = None
    parallel: int = 1
    threads: Optional[int] = None
    devices: Optional[Sequence[int]] = None
    server_path: Optional[Union[str, "os.PathLike[str]"]] = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    extra_args: Sequence[str] = ()
    rpc: Sequence[str] = ()
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    def __post_init__(self) -> None:
        model_path = os.path.expanduser(_check_path("model path", self.model_path))
        if not model_path:
            raise ValueError("model path must not be empty")
        object.__setattr__(self, "model_path", model_path)
        self._check_numbers()
        object.__setattr__(self, "devices", check_devices(self.devices))
        if self.server_path is not None:
            object.__setattr__(self, "server_path", os.path.expanduser(_check_path("server_path", self.server_path)))
        object.__setattr__(self, "extra_args", check_extra_args("extra_args", self.extra_args, _MANAGED_FLAGS))
        object.__setattr__(self, "rpc", tuple(_check_rpc_address(a) for a in _string_tuple("rpc", self.rpc)))

    def _check_numbers(self) -> None:
        # 16 tokens is below anything useful, but keeps the check about types and sanity.
        check_optional(check_int, "context_length", self.context_length, 16, 2**24)
        object.__setattr__(self, "gpu_layers", _check_gpu_layers(self.gpu_layers))
        check_int("parallel", self.parallel, 1, 256)
        check_optional(check_int, "threads", self.threads, 1, 4096)
        check_timeout("startup_timeout", self.startup_timeout)
        check_timeout("request_timeout", self.request_timeout)
        # The server gets -c context_length * parallel, which it reads as an int32.
        if self.context_length is not None and self.context_length * self.parallel > INT32_MAX:
            raise ValueError(
                f"context_length * parallel must be <= {INT32_MAX} (llama-server's -c), "
                f"got {self.context_length} * {self.parallel}"
            )


def _check_gpu_layers(value: Any) -> GpuLayers:
    """``gpu_layers`` in its stored form: ``None`` (auto), ``"all"`` or a count."""
    if isinstance(value, str):
        if value in ("auto", "all"):
            return None if value == "auto" else "all"
        raise TypeError(f'gpu_layers must be an int (-1: all), "auto" or "all", not {value!r}')
    if value is None:
        return None
    check_int("gpu_layers", value, -1, 100_000)
    return "all" if value == -1 else value


def _check_path(name: str, value: Any) -> str:
    """``value`` (a str or a path-like object naming a str path) as a str."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, not {type(value).__name__}")
    path = os.fspath(value)  # raises TypeError for a __fspath__ that returns no path
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a str path, not {type(path).__name__}")
    if "\0" in path:
        raise ValueError(f"{name} must not contain NUL characters, got {path!r}")
    return path


def _check_rpc_address(address: str) -> str:
    if "," in address:
        raise ValueError(f"rpc takes one address per item: rpc={address.split(',')!r}, not {address!r}")
    host, _, port = address.rpartition(":")
    # isdigit() alone admits digits of every script ("²", "٣"), which llama.cpp cannot read.
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"rpc addresses must be 'host:port', got {address!r}")
    if ":" in host:
        # llama.cpp splits the endpoint at its first colon and resolves IPv4 only.
        raise ValueError(f"rpc workers are reached over IPv4 (a name or a dotted address), got {address!r}")
    return address


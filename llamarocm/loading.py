"""``load_model()``: validate the file, read its header, size the context, start the
server, and hand back a :class:`~llamarocm.Model`.

Every check that can fail without a process happens before one is spawned.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from ._slot_state import PrivateDirectory
from .chat_templates import template_args
from .client import Client
from .config import DEFAULT_REQUEST_TIMEOUT, INT32_MAX, LoadConfig, check_int, check_timeout
from .devices import check_fits, list_devices
from .errors import DeviceError, GGUFError, RequestError
from .gguf import ModelInfo, read_metadata
from .lora import LoraAdapters, LoraSpec, check_adapter_file, parse_lora
from .model import Model
from .rpc import LOG_VERBOSITY_ARGS, check_placement, probe_worker, rpc_placement
from .server import LOG_LINES, ProgressCallback, Server

__all__ = ["load_model", "connect", "estimate_memory", "DEFAULT_CONTEXT_CAP"]

#: llama-server's ``--pooling`` choices.
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")

log = logging.getLogger("llamarocm")

#: Without an explicit ``context_length``, each slot gets the model's trained
#: context, capped here: a 128k context would cost gigabytes of KV cache by default.
DEFAULT_CONTEXT_CAP = 4096


def load_model(
    path: Union[str, "os.PathLike[str]"],
    *,
    context_length: Optional[int] = None,
    gpu_layers: Union[None, int, str] = None,
    parallel: int = 1,
    threads: Optional[int] = None,
    devices: Optional[Sequence[int]] = None,
    server_path: Optional[Union[str, "os.PathLike[str]"]] = None,
    startup_timeout: float = LoadConfig.startup_timeout,
    extra_args: Sequence[str] = (),
    chat_template: Optional[str] = None,
    embeddings: bool = False,
    pooling: Optional[str] = None,
    rpc: Sequence[Any] = (),
    strict: bool = False,
    progress: Optional[ProgressCallback] = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    lora: Sequence[LoraSpec] = (),
    cache_ram: Optional[int] = None,
    sessions: bool = False,
) -> Model:
    """Start ``llama-server`` on the GGUF file at ``path`` and return the loaded model.

    ``context_length`` is per slot (default: the model's own, at most 4096);
    ``parallel`` is how many requests run at once, each with the full context
    (the server is started with ``-c context_length * parallel``).
    ``gpu_layers``: ``None`` lets the server fit layers to memory, ``"all"`` or an int.
    ``startup_timeout`` is the longest the load may go without progress.
    ``chat_template`` overrides the template ``chat()`` uses: a llama.cpp built-in name
    (``"gemma"``, ``"chatml"``...), a Jinja file, or a Jinja string. Without it the
    file's own template is used, or for a file without one its architecture's
    built-in template; failing both, ``chat()`` raises instead of guessing.
    ``embeddings=True`` enables :meth:`Model.embed` (with ``pooling``, default
    ``"mean"``: many models declare none, which the embeddings endpoint refuses);
    generation keeps working.
    ``rpc``: llama.cpp RPC workers (``"host:port"`` strings or
    :class:`~llamarocm.RpcWorker` objects) to offload layers to; each must answer
    before the server is started.
    ``strict=True`` raises :class:`~llamarocm.DeviceError` when the model file plus its
    KV cache cannot fit in the chosen GPUs' free memory (or there is no GPU at all);
    by default a shortfall is only logged, and the server spills to system memory.
    ``progress(fraction, message)`` is called while the model loads.
    ``request_timeout`` bounds each plain call (``tokenize``, ``embed``, a chat's
    template rendering...): past it they raise
    :class:`~llamarocm.RequestTimeoutError`. A ``~`` in ``path`` or ``server_path`` is
    expanded; ``gpu_layers=-1`` and ``"auto"`` are accepted as in llama-cpp-python and
    llama-server.
    ``lora``: LoRA adapter files, each a path (scale 1.0) or a ``(path, scale)`` pair;
    each must be a LoRA GGUF file for the model's architecture. A request's
    ``lora={name: scale}`` and :meth:`Model.set_lora` change the scales.
    ``cache_ram`` is the host memory, in MiB, the server keeps evicted prompts in and
    restores them from while it runs (``--cache-ram``; ``None``: the server's default,
    8192; ``0`` disables it, ``-1`` sets no limit). ``sessions=True`` lets
    :class:`~llamarocm.ChatSession` save and load KV state (see :doc:`/sessions`): the
    server gets a private directory for slot files, removed at ``close()``, and a
    full-size sliding-window cache (``--swa-full``, more KV memory on models such as
    Gemma 3), without which a restored slot is not reused.

    >>> import llamarocm
    >>> with llamarocm.load_model("gemma.gguf", parallel=2) as model:  # doctest: +SKIP
    ...     for token in model.generate("Once upon a time", max_tokens=16):
    ...         print(token.text, end="", flush=True)
    """
    cfg, adapters = check_load_arguments(locals())
    model_path = os.path.abspath(cfg.model_path)
    metadata = read_metadata(model_path)  # a missing, unreadable or corrupt file stops here
    adapter_bytes = sum(check_adapter_file(a.path, metadata.architecture) for a in adapters.adapters)
    info = ModelInfo.from_metadata(metadata)
    ctx = _context_length(cfg.context_length, metadata.context_length)
    template_flags, template = template_args(chat_template, metadata.chat_template, metadata.architecture)
    if cfg.gpu_layers != 0:
        _check_memory(metadata, ctx * cfg.parallel, cfg.devices, strict, adapter_bytes)
    # Model.rpc_placement is this very dict, filled anew by every start (restarts too).
    placement: Dict[str, float] = {}
    before_start, on_ready = _rpc_checks(cfg.rpc, placement) if cfg.rpc else (None, None)
    if adapters:
        on_ready = _with_lora_defaults(on_ready, adapters)
    embedding_flags = ["--embeddings", "--pooling", pooling or "mean"] if embeddings else []
    slot_dir = PrivateDirectory() if sessions else None
    try:
        server = Server(
            model_path,
            _server_args(cfg, ctx) + template_flags + embedding_flags + adapters.server_args()
            + _cache_args(cache_ram, slot_dir),
            server_path=None if cfg.server_path is None else os.fspath(cfg.server_path),
            devices=cfg.devices,
            startup_timeout=cfg.startup_timeout,
            progress=progress,
            before_start=before_start,
            on_ready=on_ready,
            request_timeout=cfg.request_timeout,
        )
    except BaseException:
        if slot_dir is not None:
            slot_dir.remove()
        raise
    assert server.client is not None
    no_template = None
    if template is None:
        no_template = (
            f"{os.path.basename(model_path)} has no chat template and none is known for its "
            f"architecture {metadata.architecture!r}: load it with chat_template=... "
            "(a llama.cpp built-in name, a Jinja file or string), or use generate()"
        )
    return Model(
        server.client,
        server,
        info,
        context_length=ctx,
        parallel=cfg.parallel,
        chat_template_source=template,
        no_chat_template_reason=no_template,
        embeddings=embeddings,
        rpc_placement=placement,
        lora=adapters,
        slot_dir=slot_dir,
    )


def check_load_arguments(call: Mapping[str, Any]) -> Tuple[LoadConfig, LoraAdapters]:
    """:func:`load_model`'s arguments (its ``locals()`` on entry, or the same names
    bound by a caller such as :class:`~llamarocm.ModelPool`) checked as far as they can
    be without reading the model file: ``TypeError`` / ``ValueError`` otherwise."""
    rpc = call["rpc"]
    if isinstance(rpc, (str, bytes)):
        rpc = [rpc]
    rpc_addresses = tuple(getattr(worker, "address", worker) for worker in rpc)
    cfg = LoadConfig(
        call["path"],
        context_length=call["context_length"],
        gpu_layers=call["gpu_layers"],
        parallel=call["parallel"],
        threads=call["threads"],
        devices=call["devices"],
        server_path=call["server_path"],
        startup_timeout=call["startup_timeout"],
        extra_args=call["extra_args"],
        rpc=rpc_addresses,
        request_timeout=call["request_timeout"],
    )
    _check_options(
        cfg, strict=call["strict"], embeddings=call["embeddings"], pooling=call["pooling"], progress=call["progress"]
    )
    _check_cache_options(call["cache_ram"], call["sessions"])
    return cfg, LoraAdapters.from_parsed(parse_lora(call["lora"]))


def _check_cache_options(cache_ram: Any, sessions: Any) -> None:
    if cache_ram is not None:
        check_int("cache_ram", cache_ram, -1, INT32_MAX)  # MiB; llama-server reads an int
    if not isinstance(sessions, bool):
        raise TypeError("sessions must be True or False")


def _cache_args(cache_ram: Optional[int], slot_dir: Optional[PrivateDirectory]) -> "list[str]":
    """The server's prompt-cache size and, for saved sessions, where slot files go."""
    args = [] if cache_ram is None else ["--cache-ram", str(cache_ram)]
    if slot_dir is not None:
        # Without --swa-full a model with sliding-window attention (Gemma 3) keeps only
        # the window's KV: a restored slot is then evaluated again from the start.
        args += ["--slot-save-path", slot_dir.path, "--swa-full"]
    return args


def _check_options(
    cfg: LoadConfig, *, strict: Any, embeddings: Any, pooling: Any, progress: Any
) -> None:
    """The checks of load_model's arguments that LoadConfig does not hold."""
    if not isinstance(strict, bool):
        raise TypeError("strict must be True or False")
    if not isinstance(embeddings, bool):
        raise TypeError("embeddings must be True or False")
    if pooling is not None:
        if not embeddings:
            raise ValueError("pooling is only meaningful with embeddings=True")
        if pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, got {pooling!r}")
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable(fraction, message)")
    if cfg.rpc and cfg.gpu_layers == 0:
        # To llama-server a worker is one more GPU: with no GPU layers it would get nothing.
        raise ValueError("gpu_layers=0 puts no layers on the rpc workers; leave gpu_layers unset or > 0")


def _rpc_checks(
    addresses: Sequence[str], placement: Dict[str, float]
) -> "tuple[Callable[[], None], Callable[[Server], None]]":
    """The start hooks of a server with RPC workers: probe each worker before every
    start (restarts too), and after it check where the weights went, into ``placement``."""

    def probe_workers() -> None:
        placement.clear()  # what a stopped server had placed is no longer anywhere
        for address in addresses:
            probe_worker(address)

    def check_workers(server: Server) -> None:
        found = rpc_placement(server.stderr_tail(LOG_LINES))
        check_placement(addresses, found, server.stderr_tail())
        placement.update(found)  # emptied by probe_workers, which ran before this start

    return probe_workers, check_workers


def _with_lora_defaults(
    on_ready: Optional[Callable[[Server], None]], adapters: LoraAdapters
) -> Callable[[Server], None]:
    """``on_ready`` followed by setting the server's own adapter scales to the model's
    defaults at every start (restarts too), so ``GET /lora-adapters`` tells the truth."""

    def ready(server: Server) -> None:
        if on_ready is not None:
            on_ready(server)
        assert server.client is not None
        server.client.post_json("/lora-adapters", adapters.request_field())

    return ready


def _context_length(requested: Optional[int], trained: Optional[int]) -> int:
    if requested is None:
        if trained is None:
            return DEFAULT_CONTEXT_CAP
        if not isinstance(trained, int) or trained < 1:
            raise GGUFError(f"GGUF file declares an invalid context length: {trained!r}")
        return min(trained, DEFAULT_CONTEXT_CAP)
    if trained is not None and requested > trained:
        log.warning(
            "context_length %d exceeds the model's trained context %d; quality may degrade",
            requested,
            trained,
        )
    return requested


def _server_args(cfg: LoadConfig, ctx: int) -> "list[str]":
    # -c is the total KV cache the server divides between its slots; passing both it
    # and --parallel (and a split cache) keeps the server's own defaults (automatic
    # slot count, unified cache) from sizing the slots differently.
    args = ["-c", str(ctx * cfg.parallel), "--parallel", str(cfg.parallel), "--no-kv-unified"]
    if cfg.gpu_layers == "all":
        args += ["-ngl", "all"]
    elif cfg.gpu_layers is None:
        args += ["-ngl", "auto"]
    else:
        args += ["-ngl", str(cfg.gpu_layers)]
    if cfg.threads is not None:
        args += ["--threads", str(cfg.threads)]
    if cfg.rpc:
        # Verbose enough to log where each device's weights went (checked after load).
        args += ["--rpc", ",".join(cfg.rpc), *LOG_VERBOSITY_ARGS]
    args.extend(cfg.extra_args)
    return args


def estimate_memory(
    path: Union[str, "os.PathLike[str]"],
    *,
    context_length: Optional[int] = None,
    parallel: int = 1,
    lora: Sequence[LoraSpec] = (),
) -> int:
    """Bytes a model loaded with these options needs, as ``strict=True`` counts them:
    the model file, an f16 KV cache for ``context_length * parallel`` tokens, and the
    adapter files. Reads the GGUF header (so a missing or corrupt file raises here)."""
    cfg = LoadConfig(path, context_length=context_length, parallel=parallel)  # the same checks
    metadata = read_metadata(cfg.model_path, tensors=False)
    ctx = _context_length(cfg.context_length, metadata.context_length)
    adapters = 0
    for _, adapter_path, _ in parse_lora(lora):
        try:
            adapters += os.path.getsize(adapter_path)
        except OSError:
            pass  # load_model names a missing adapter file
    return int(metadata.file_size + _kv_cache_bytes(metadata, ctx * cfg.parallel) + adapters)


def _kv_cache_bytes(metadata: Any, total_context: int) -> int:
    """A KV-cache estimate: K and V, f16, every layer, every context position."""
    layers = metadata.block_count or 0
    heads, kv_heads = metadata.head_count or 0, metadata.head_count_kv or metadata.head_count or 0
    width = (metadata.embedding_length or 0) // heads * kv_heads if heads else 0
    return 2 * 2 * layers * width * total_context


def _check_memory(
    metadata: Any, total_context: int, devices: Optional[Sequence[int]], strict: bool, adapter_bytes: int = 0
) -> None:
    required = metadata.file_size + _kv_cache_bytes(metadata, total_context) + adapter_bytes
    if strict and not list_devices():
        raise DeviceError("strict=True but no AMD GPU was found (sysfs lists none)")
    check_fits(required, devices, env=os.environ, strict=strict)


def connect(url: str, api_key: Optional[str] = None, *, request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Model:
    """Use a llama-server this process did not start (no process ownership).

    ``close()`` then closes connections only; ``model.server`` is ``None``;
    ``request_timeout`` bounds each plain call, as for :func:`load_model`;
    ``model.info`` comes from the server's ``/props`` and ``/v1/models``; a lost
    connection raises :class:`~llamarocm.RequestError` (we cannot see its process).
    The server's LoRA adapters (``GET /lora-adapters``) are named by the paths it
    reports, with its current scales as the defaults.

    >>> model = llamarocm.connect("http://127.0.0.1:8080", api_key="...")  # doctest: +SKIP
    """
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url must be an http(s) URL, got {url!r}")
    if api_key is not None and not isinstance(api_key, str):
        raise TypeError("api_key must be a str")
    check_timeout("request_timeout", request_timeout)
    client = Client(url, api_key, request_timeout)
    try:
        status = client.health(timeout=5.0)
        if status != "ok":
            raise RequestError(
                f"no ready llama-server at {url} ({status or 'nothing answers there'})", None
            )
        props = client.props()
        meta: Dict[str, Any] = {}
        try:
            models = client.get_json("/v1/models").get("data") or []
            meta = (models[0].get("meta") or {}) if models else {}
        except RequestError:
            pass  # older servers: /props alone
        try:
            lora = LoraAdapters.from_server(client.get_json("/lora-adapters"))
        except RequestError:
            lora = LoraAdapters(())  # a server without the endpoint has no adapters
    except BaseException:
        client.close()
        raise
    path = props.get("model_path") or ""
    info = ModelInfo(
        path=path,
        architecture=None,
        name=os.path.basename(path) or None,
        quantization=None,
        size_label=None,
        parameters=meta.get("n_params"),
        file_size=meta.get("size") or 0,
        context_length=meta.get("n_ctx_train"),
    )
    settings = props.get("default_generation_settings") or {}
    return Model(
        client,
        None,
        info,
        context_length=settings.get("n_ctx"),
        parallel=props.get("total_slots") or 1,
        chat_template_source="reported by the server" if props.get("chat_template") else None,
        lora=lora,
    )

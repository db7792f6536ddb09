"""The ``llamarocm`` command: a thin layer over the public API.

Exit codes: 0 ok, 1 runtime error (message on stderr; traceback only with
``--debug``) or, for ``batch``, items that failed, 2 usage error, 130 interrupted.
Option values are checked with the library's own validation before a model is found
or a process started, so a value the API would refuse is a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, TextIO, Tuple, TypeAlias, Union

import llamarocm

from ._binaries import SOURCE_BUILD_REQUIREMENT, find_binary
from ._default_model import default_model_path
from .batch import BatchItem, BatchResult, Resume, read_back, run_items
from .checkpoint import Checkpoint
from .config import GenerateConfig, LoadConfig
from .lora import parse_lora
from .messages import check_messages
from .rpc import DEFAULT_STARTUP_TIMEOUT as WORKER_STARTUP_TIMEOUT
from .rpc import check_worker_arguments
from .tools import check_tools

#: Each command's examples, shown at the end of its ``--help`` (all of them in ``llamarocm --help``).
EXAMPLES: Dict[str, Tuple[str, ...]] = {
    "generate": (
        'llamarocm generate "Once upon a time" --max-tokens 64',
        'llamarocm generate "A person, as JSON:" --json-schema person.json --max-tokens 128 --temperature 0',
    ),
    "chat": (
        "llamarocm chat --model ~/models/qwen2.5-1.5b-instruct-q4_k_m.gguf --gpu-layers all --devices 0",
        "llamarocm chat --model ~/models/qwen2.5-1.5b-instruct-q4_k_m.gguf --tools mytools:get_weather,mytools:now",
    ),
    "batch": (
        "llamarocm batch prompts.jsonl results.jsonl --max-tokens 128 --temperature 0 --parallel 4",
        "llamarocm batch prompts.jsonl results.jsonl --model /models/m.gguf --ray auto --replicas 8 --parallel 4",
    ),
    "models": ("llamarocm models ~/models --recursive",),
    "info": ("llamarocm info ~/models/gemma-3-270m-q4_k_m.gguf --json",),
    "vram": ("llamarocm vram --json",),
    "rpc-worker": ("llamarocm rpc-worker --port 50052",),
    "bench": ("llamarocm bench --model ~/models/gemma-3-4b-it-Q4_K_M.gguf --gpu-layers all",),
    "setup": ("llamarocm setup",),
}

# Only the llamarocm loggers go to stderr: with --debug, llama-server's output
# (llamarocm.server) and each request (llamarocm.http), without every other library's
# debug output that a DEBUG root logger would add.
_LOGGER = "llamarocm"
_LOG_FORMAT = "%(name)s: %(message)s"

# llama.cpp's own build runs one compiler per core with no limit unless told;
# each takes up to ~1 GB, so the source build is capped.
_BUILD_JOBS_CAP = 4
_SOURCE_BUILD_CMAKE_ARGS = (
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
    "-DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_RPC=ON"
)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The command's log handler; a class of its own so that a second ``main()`` in the
    same process (tests, an embedding program) replaces it instead of adding another.

    It writes to ``sys.stderr`` as it is at each record, as the logging module's own
    last-resort handler does: a program that swaps or closes its stderr after
    ``main()`` returns must not find the handler writing to the old one.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would pin a stream

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def _configure_logging(debug: bool) -> None:
    """Warnings of the ``llamarocm`` loggers on stderr, or with ``debug`` everything."""
    logger = logging.getLogger(_LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)


_ProgressDisplay = Callable[[float, str], None]


def _load_progress() -> Optional[_ProgressDisplay]:
    """A one-line progress display on stderr while a model loads, when stderr is a
    terminal (nothing when it is a pipe or a file: logs stay clean)."""
    if not sys.stderr.isatty():
        return None

    def show(fraction: float, message: str) -> None:
        if message == "ready":
            sys.stderr.write("\r\033[K")
        else:
            bar = "#" * int(fraction * 20)
            sys.stderr.write(f"\r{message} [{bar:<20}] {fraction:4.0%}")
        sys.stderr.flush()

    return show


def _model_path(given: Optional[str]) -> str:
    return given if given is not None else default_model_path(notify=_stderr)


# LoadConfig needs a model path, but the embedded model's is known only once the model
# is assembled (253 MB, on first use): the other loading options are checked with this
# stand-in, so a usage error never waits for that.
_EMBEDDED_MODEL_STAND_IN = "embedded-model.gguf"

# generate() / chat() settings passed only when given, so the library's (and the
# server's) defaults apply otherwise.
_OPTIONAL_SETTINGS = ("temperature", "top_k", "top_p", "seed", "json_schema")


def _device_list(text: str) -> List[int]:
    """``--devices``: comma-separated GPU indices (ranges are checked with the rest)."""
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices such as 0,1, got {text!r}") from None
    return devices


def _gpu_layers(text: str) -> Union[int, str]:
    """``--gpu-layers``: ``auto``, ``all`` or a number of layers (-1: all, as llama.cpp
    writes it); the number's range is checked by LoadConfig with the other options."""
    if text in ("auto", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, all or a number of layers (-1: all), got {text!r}") from None


def _lora_spec(text: str) -> Tuple[str, float]:
    """``--lora PATH[:SCALE]``: an adapter and its scale (1.0 when none is given; a
    path with a colon of its own takes one, as in ``a:b.gguf:1``)."""
    path, colon, tail = text.rpartition(":")
    if colon and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _tool_functions(text: str) -> List[Callable[..., Any]]:
    """``--tools module:function,...``: the functions, imported (the current directory
    first on the path, as ``python -m`` has it) and checked while the command line is
    parsed, so a bad spec is a usage error before any model loads."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    functions = []
    for spec in filter(None, (item.strip() for item in text.split(","))):
        module_name, colon, name = spec.partition(":")
        if not colon or not module_name or not name:
            raise argparse.ArgumentTypeError(f"{spec!r} is not module:function")
        try:
            function = getattr(importlib.import_module(module_name), name)
        except Exception as exc:  # ImportError, AttributeError, or the module's own error
            raise argparse.ArgumentTypeError(f"cannot import {spec}: {type(exc).__name__}: {exc}") from None
        try:
            check_tools([function])
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{spec} cannot be a tool: {exc}") from None
        functions.append(function)
    if not functions:
        raise argparse.ArgumentTypeError("name at least one module:function")
    return functions


def _refuse_constant(name: str) -> NoReturn:
    # json accepts NaN and Infinity, which are not JSON and which llama-server refuses.
    raise ValueError(f"{name} is not a JSON value")


def _json_schema_file(path: str) -> Dict[str, Any]:
    """``--json-schema FILE``: the JSON Schema object in ``path``. Read while the command
    line is parsed, so a missing, unreadable or malformed file is a usage error naming it."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as file:
            schema = json.load(file, parse_constant=_refuse_constant)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8 are both ValueErrors
        raise argparse.ArgumentTypeError(f"{path!r} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{path!r} must hold a JSON object (a JSON Schema), not {schema!r:.40}")
    return schema


def _rpc_addresses(args: argparse.Namespace) -> List[str]:
    # llama-server's own syntax (one comma-separated list) is accepted too.
    return [address for item in args.rpc or () for address in item.split(",") if address]


def _generation_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``generate()`` / ``chat()`` keyword arguments from the command line."""
    options: Dict[str, Any] = {"max_tokens": args.max_tokens}
    options.update({name: getattr(args, name) for name in _OPTIONAL_SETTINGS if getattr(args, name) is not None})
    if args.stop:
        options["stop"] = list(args.stop)
    return options


def _load_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``load_model()`` keyword arguments from the command line, but the model path and
    the progress display; ``None`` is each option's default."""
    options: Dict[str, Any] = {
        "context_length": args.context_length,
        "gpu_layers": args.gpu_layers,
        "devices": args.devices,
        "server_path": args.server,
        "rpc": _rpc_addresses(args),
        "lora": args.lora,
    }
    # Only batch has --parallel: generate and chat run one request at a time.
    if getattr(args, "parallel", None) is not None:
        options["parallel"] = args.parallel
    return options


def _check_generation_options(args: argparse.Namespace) -> None:
    """Build the configs ``generate`` and ``chat`` will use, so a bad option is a usage
    error before a model is found, assembled or loaded."""
    GenerateConfig.from_kwargs(_generation_options(args))
    options = _load_options(args)
    parse_lora(options.pop("lora"))  # the files are checked by load_model, once the model is known
    LoadConfig(args.model if args.model is not None else _EMBEDDED_MODEL_STAND_IN, **options)


def _check_worker_options(args: argparse.Namespace) -> None:
    check_worker_arguments(
        args.host, args.port, args.devices, WORKER_STARTUP_TIMEOUT, args.threads, (), args.allow_remote
    )


def _load(args: argparse.Namespace) -> llamarocm.Model:
    """The model of ``generate`` and ``chat``: their shared loading options."""
    return llamarocm.load_model(_model_path(args.model), progress=_load_progress(), **_load_options(args))


def cmd_generate(args: argparse.Namespace) -> int:
    with _load(args) as model:
        with model.generate(args.prompt, **_generation_options(args)) as stream:
            for token in stream:
                sys.stdout.write(token.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        metrics = stream.metrics
        if args.verbose and metrics is not None:
            _stderr(
                f"[{metrics.generated_tokens} tokens, first after {metrics.time_to_first_token or 0:.3f} s, "
                f"{metrics.decode_tokens_per_second or 0:.1f} tok/s, finish: {stream.finish_reason}]"
            )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    with _load(args) as model:
        if interactive:
            _stderr("Type a message; /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
        chat_loop(
            model,
            lambda: input("> " if interactive else ""),
            sys.stdout,
            system=args.system,
            tools=[function for functions in args.tools or () for function in functions],
            **_generation_options(args),
        )
    return 0


def chat_loop(
    model: "llamarocm.Model",
    read_line: Callable[[], str],
    out: TextIO,
    *,
    system: Optional[str] = None,
    tools: Sequence[Callable[..., Any]] = (),
    **options: Any,
) -> List[Dict[str, Any]]:
    """The REPL: read a line, stream the reply, keep the history; return the history.

    ``/reset`` clears the history (keeping the system message), ``/exit`` or end of
    input quits, Ctrl-C during a reply stops that reply only. With ``tools``, each
    reply is :meth:`~llamarocm.Model.act`'s: the calls are shown as they were run,
    then the answer.
    """
    history: List[Dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    kept = len(history)
    while True:
        try:
            text = read_line().strip()
        except (EOFError, KeyboardInterrupt):
            return history
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return history
        if text == "/reset":
            del history[kept:]
            continue
        history.append({"role": "user", "content": text})
        if tools:
            history[:] = _act_reply(model, history, tools, out, options)
            continue
        reply = []
        stream = model.chat(history, **options)
        try:
            for token in stream:
                reply.append(token.text)
                out.write(token.text)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        finally:
            stream.close()
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(reply)})


def _act_reply(
    model: "llamarocm.Model", history: List[Dict[str, Any]], tools: Sequence[Callable[..., Any]], out: TextIO,
    options: Dict[str, Any],
) -> List[Dict[str, Any]]:
    """One turn of the REPL with tools: the history after it (the user's line dropped
    if Ctrl-C stopped the turn)."""
    try:
        result = model.act(history, tools, **options)
    except KeyboardInterrupt:
        out.write(" [stopped]\n")
        out.flush()
        return history[:-1]
    for message in result.messages[len(history):]:
        if message["role"] == "tool":
            out.write(f"[{message.get('name')} -> {message['content']}]\n")
        for call in message.get("tool_calls") or ():
            out.write(f"[call {call['function']['name']}({call['function']['arguments']})]\n")
    if not result.finished:
        out.write(f"[stopped after {result.rounds} rounds with calls pending]\n")
    out.write(result.text + "\n")
    out.flush()
    return result.messages


# -- batch -------------------------------------------------------------------------

# What an input line of ``batch`` may hold besides the GenerateConfig fields.
_ITEM_KEYS = frozenset({"id", "prompt", "messages"})
_SETTING_KEYS = frozenset(f.name for f in dataclasses.fields(GenerateConfig))


def _batch_item(raw: bytes, options: Dict[str, Any]) -> BatchItem:
    """One input line of ``batch`` as an item; its own settings override ``options``."""
    obj = json.loads(raw, parse_constant=_refuse_constant)
    if not isinstance(obj, dict):
        raise ValueError('expected a JSON object such as {"id": 1, "prompt": "..."}')
    unknown = sorted(set(obj) - _ITEM_KEYS - _SETTING_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)}; a line has an id, a prompt or messages, "
            f"and any of {', '.join(sorted(_SETTING_KEYS))}"
        )
    if "id" not in obj:
        raise ValueError("no id: every line needs an id, a string or an integer")
    item_id = obj["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise ValueError(f"the id must be a string or an integer, not {json.dumps(item_id)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("give either a prompt or messages")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("the prompt must be a string (a chat goes in messages)")
    else:
        prompt = check_messages(obj["messages"])
    settings = {key: value for key, value in obj.items() if key in _SETTING_KEYS}
    if not settings:
        return BatchItem(prompt, options, item_id)  # the shared options: hashed once
    merged = {**options, **settings}
    GenerateConfig.from_kwargs(merged)
    return BatchItem(prompt, merged, item_id)


def read_batch_input(path: str, options: Dict[str, Any]) -> List[BatchItem]:
    """The items of a ``batch`` input file (JSON lines; blank lines are skipped), or a
    ``ValueError`` naming the file and line: a bad line, a missing or repeated id."""
    try:
        with open(os.path.expanduser(path), "rb") as file:
            lines = file.read().split(b"\n")
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    items: List[BatchItem] = []
    seen: Dict[Tuple[bool, Any], int] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = _batch_item(raw, options)
        except (TypeError, ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8 and bad values
            raise ValueError(f"{path} line {number}: {exc}") from None
        key = (isinstance(item.id, str), item.id)  # the id 1 and the id "1" differ
        if key in seen:
            raise ValueError(f"{path} line {number}: the id {json.dumps(item.id)} is already on line {seen[key]}")
        seen[key] = number
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _check_batch_options(args: argparse.Namespace) -> None:
    """The options, then the whole input file: a bad line is a usage error before the
    output file is touched or a model loads. The items are kept for the run."""
    _check_generation_options(args)
    _check_ray_options(args)
    if os.path.exists(args.output) and os.path.exists(args.input) and os.path.samefile(args.input, args.output):
        raise ValueError("INPUT and OUTPUT must be different files")
    args.batch_items = read_batch_input(args.input, _generation_options(args))


def _ray_load_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Each replica's ``load_model()`` options: those given (Ray chooses the devices)."""
    options = _load_options(args)
    return {name: value for name, value in options.items() if value not in (None, []) and name != "devices"}


def _check_ray_options(args: argparse.Namespace) -> None:
    """``--ray`` and its options, with the library's checks; Ray is imported only here,
    and only with ``--ray``."""
    if args.ray is None:
        given = [flag for flag, value in (("--replicas", args.replicas), ("--gpus-per-replica", args.gpus_per_replica))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --ray")
        return
    if not args.ray.strip():
        raise ValueError("--ray needs auto or the address of a Ray cluster (HOST:PORT)")
    if args.devices is not None:
        raise ValueError("--devices does not go with --ray: Ray chooses each replica's GPUs (--gpus-per-replica)")
    if args.rpc:
        raise ValueError("--rpc does not go with --ray: each replica runs the whole model on its own node")
    try:
        import llamarocm.ray
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray, which does not import here ({exc}): pip install 'llamarocm[ray]'") from None
    llamarocm.ray.check_pool_arguments(
        args.model if args.model is not None else _EMBEDDED_MODEL_STAND_IN,
        _ray_load_options(args),
        **_ray_pool_options(args),
    )


def _ray_pool_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options of ``--ray``'s replica pool that were given (the pool's defaults otherwise)."""
    options = {"replicas": args.replicas, "gpus_per_replica": args.gpus_per_replica}
    return {name: value for name, value in options.items() if value is not None}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _BatchTally:
    """What a ``batch`` run has done, and its progress line on a terminal: done/total,
    tokens per second, time left; redrawn at most ten times a second."""

    def __init__(self, total: int, resumed: int, show: bool) -> None:
        self.total, self.resumed, self.show = total, resumed, show
        self.ran = self.failed = self.tokens = 0
        self.done = resumed
        self.started = time.monotonic()
        self._drawn_at = 0.0

    def result(self, result: BatchResult) -> None:
        self.ran += 1
        self.failed += not result.ok
        self.done += result.ok
        if result.metrics is not None:
            self.tokens += result.metrics.generated_tokens

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def progress(self, finished: int, total: int) -> None:
        now = time.monotonic()
        if not self.show or (now - self._drawn_at < 0.1 and finished < total):
            return
        self._drawn_at = now
        elapsed = now - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        parts = [f"{finished}/{total} finished"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.ran:
            parts += [f"{rate:.1f} tok/s", f"{_duration((total - finished) * elapsed / self.ran)} left"]
        sys.stderr.write("\r\033[K" + ", ".join(parts))
        sys.stderr.flush()

    def clear(self) -> None:
        if self.show:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def summary(self, args: argparse.Namespace) -> Dict[str, Any]:
        seconds = self.seconds
        return {
            "input": args.input,
            "output": args.output,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "resumed": self.resumed,
            "ran": self.ran,
            "seconds": round(seconds, 3),
            "generated_tokens": self.tokens,
            "tokens_per_second": round(self.tokens / seconds, 2) if self.ran and seconds > 0 else None,
        }


def _run_batch_on_ray(args: argparse.Namespace, items: List[BatchItem], resume: Resume, tally: _BatchTally) -> None:
    """The batch over a pool of replicas on the Ray cluster ``--ray`` names; the output
    file stays on this machine, written as each item comes back."""
    import ray

    import llamarocm.ray

    # A program that calls main() already connected keeps its connection (and Ray
    # refuses a second init); otherwise this command connects, and disconnects after.
    connect = not ray.is_initialized()
    if connect:
        # log_to_driver=False: the workers' output must not mix with --json on stdout.
        try:
            ray.init(address=args.ray, log_to_driver=False,
                     logging_level=logging.INFO if args.debug else logging.WARNING)
        except ConnectionError as exc:  # Ray's message names its own flags: say it in ours
            raise ConnectionError(
                f"cannot connect to a Ray cluster (--ray {args.ray}): {exc} Start one with 'ray start --head', "
                "or give its head's HOST:PORT"
            ) from exc
    try:
        with llamarocm.ray.ReplicaPool(
            _model_path(args.model), load_options=_ray_load_options(args), **_ray_pool_options(args)
        ) as pool:
            tally.started = time.monotonic()  # the rate leaves Ray's connection out
            pool.run_items(items, progress=tally.progress, on_result=tally.result, resume=resume)
    finally:
        if connect:
            ray.shutdown()


def _run_batch(args: argparse.Namespace, items: List[BatchItem], resume: Resume, tally: _BatchTally) -> None:
    if args.ray is not None:
        _run_batch_on_ray(args, items, resume, tally)
        return
    with _load(args) as model:
        tally.started = time.monotonic()  # the rate and the time left leave the load out
        run_items(
            model.generate, model.chat, items, max_workers=args.parallel,
            progress=tally.progress, on_result=tally.result, resume=resume,
        )


def cmd_batch(args: argparse.Namespace) -> int:
    items: List[BatchItem] = args.batch_items
    # Opened (and locked) before the model loads: a second run on the file is refused at once.
    with Checkpoint(args.output) as checkpoint:
        resume = read_back(items, checkpoint)
        tally = _BatchTally(len(items), len(items) - resume.pending, sys.stderr.isatty())
        try:
            if resume.pending:  # else all is done already: no model to load
                _run_batch(args, items, resume, tally)
        except KeyboardInterrupt:
            tally.clear()
            _stderr(f"interrupted: {tally.done} of {tally.total} items are done in {args.output}; "
                    "run the same command again to resume")
            return 130
    tally.clear()
    summary = tally.summary(args)
    if args.json:
        _print_json(summary)
    elif tally.show:
        _stderr(f"{summary['done']} of {summary['total']} done ({summary['resumed']} from an earlier run), "
                f"{summary['failed']} failed, {_duration(summary['seconds'])}, "
                f"{summary['tokens_per_second'] or 0:.1f} tok/s")
    if tally.failed:
        _stderr(f"{tally.failed} of {tally.total} items failed (their errors are in {args.output}); "
                "run the same command again to retry them")
        return 1
    return 0


def _size(size: Optional[int]) -> str:
    if size is None:
        return "-"
    n = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def cmd_models(args: argparse.Namespace) -> int:
    found = llamarocm.discover_models(args.folder, recursive=args.recursive)
    if args.json:
        _print_json([dataclasses.asdict(info) for info in found])
        return 0
    if not found:
        _stderr(f"no GGUF models in {args.folder}")
        return 0
    rows = [("PATH", "ARCH", "QUANT", "SIZE", "PARAMS", "CONTEXT")] + [
        (
            os.path.relpath(m.path, args.folder),
            m.architecture or "-",
            m.quantization or "-",
            _size(m.file_size),
            m.size_label or (f"{m.parameters / 1e6:.0f}M" if m.parameters else "-"),
            str(m.context_length or "-"),
        )
        for m in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    meta = llamarocm.read_metadata(_model_path(args.model))
    fields = {
        "path": meta.path,
        "gguf_version": meta.version,
        "architecture": meta.architecture,
        "name": meta.name,
        "quantization": meta.quantization,
        "file_type": meta.file_type,
        "size_label": meta.size_label,
        "parameters": meta.parameters,
        "file_size": meta.file_size,
        "context_length": meta.context_length,
        "block_count": meta.block_count,
        "embedding_length": meta.embedding_length,
        "head_count": meta.head_count,
        "head_count_kv": meta.head_count_kv,
        "tensor_count": meta.tensor_count,
        "has_chat_template": meta.chat_template is not None,
    }
    if args.json:
        _print_json(fields)
        return 0
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        shown = _size(meta.file_size) if key == "file_size" else ("-" if value is None else value)
        print(f"{key.ljust(width)}  {shown}")
    return 0


def cmd_vram(args: argparse.Namespace) -> int:
    gpus = llamarocm.list_devices()
    if args.json:
        _print_json([dict(dataclasses.asdict(g), memory=g.memory._asdict()) for g in gpus])
        return 0
    if not gpus:
        _stderr("no AMD GPU found (sysfs lists none); llama-server will run on the CPU")
        return 0
    for g in gpus:
        kind = "integrated" if g.is_integrated else "discrete"
        mem = g.memory
        print(f"{g.index}: {g.name} ({kind}) {_size(mem.used)} used of {_size(mem.total)}, {_size(mem.free)} free")
    return 0


def cmd_rpc_worker(args: argparse.Namespace) -> int:
    with llamarocm.RpcWorker(
        host=args.host,
        port=args.port,
        devices=args.devices,
        server_path=args.server,
        threads=args.threads,
        allow_remote=args.allow_remote,
    ) as worker:
        _stderr(f"RPC worker listening on {worker.address} (pid {worker.pid}); Ctrl-C to stop")
        code = worker.wait()
        _stderr(f"the worker exited with code {code}:\n{worker.output_tail()}")
        return 1


def _server_works(server_path: Optional[str]) -> "tuple[bool, str]":
    """Start the found server on the embedded model once: does it run on this CPU?"""
    try:
        binary = find_binary("server", server_path)
        model = default_model_path(notify=_stderr)
        with llamarocm.Server(model, ["-c", "256", "--parallel", "1"], server_path=binary.path):
            return True, f"{binary.path} ({binary.source}) runs on this machine"
    except llamarocm.LlamaRocmError as exc:
        return False, str(exc)


def cmd_setup(args: argparse.Namespace) -> int:
    ok, message = _server_works(args.server)
    _stderr(message)
    if ok:
        return 0
    if args.check or "SIGILL" not in message:
        return 1
    jobs = str(min(os.cpu_count() or 1, _BUILD_JOBS_CAP))
    _stderr(
        f"building llama-server from source for this CPU ({SOURCE_BUILD_REQUIREMENT}, {jobs} jobs); "
        "this takes a while once, pip caches the result..."
    )
    env = dict(os.environ)
    env.setdefault("LLAMA_CPP_BUILD_JOBS", jobs)
    env.setdefault("CMAKE_ARGS", _SOURCE_BUILD_CMAKE_ARGS)
    pip = [sys.executable, "-m", "pip", "install", SOURCE_BUILD_REQUIREMENT]
    if subprocess.call(pip, env=env) != 0:
        _stderr("the source build failed; see pip's output above")
        return 1
    ok, message = _server_works(args.server)
    _stderr(message)
    return 0 if ok else 1


_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_command(
    sub: _Subparsers, name: str, help_text: str, *, server: Optional[str] = "llama-server"
) -> argparse.ArgumentParser:
    """A subcommand with its examples and ``--debug``; ``--server PATH`` only when it runs
    a ``server`` binary (a command that would ignore the option refuses it)."""
    examples = EXAMPLES[name]
    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=("Example:" if len(examples) == 1 else "Examples:") + "".join(f"\n  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also accepted after the command. SUPPRESS: left out, it must not reset the value
    # that ``llamarocm --debug COMMAND`` set on the main parser.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="log details and show tracebacks")
    if server is not None:
        p.add_argument("--server", metavar="PATH", help=f"{server} binary (default: searched)")
    # Usage errors name the subcommand's own usage.
    p.set_defaults(usage_parser=p, check_options=None)
    return p


def _add_generation_options(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """The loading and sampling options ``generate`` and ``chat`` share."""
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: the embedded Gemma 3 270M)")
    p.add_argument("--context-length", type=int, metavar="N", help="tokens of context (default: the model's, <= 4096)")
    p.add_argument("--gpu-layers", type=_gpu_layers, metavar="N|all|auto",
                   help="layers to put on the GPU: a number, all (or -1), or auto to fit memory (default)")
    p.add_argument("--devices", type=_device_list, metavar="LIST",
                   help="GPU indices to use, e.g. 0,1 (default: every discrete GPU)")
    p.add_argument("--rpc", action="append", metavar="HOST:PORT",
                   help="an RPC worker (llamarocm rpc-worker) to put layers on; repeat, or list with commas")
    p.add_argument("--lora", action="append", type=_lora_spec, metavar="PATH[:SCALE]",
                   help="a LoRA adapter (GGUF) to apply, at SCALE (default 1); repeat for several")
    p.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"at most N tokens (default {max_tokens})")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0: the likeliest token)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample among the likeliest tokens totalling P (0 to 1)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed, for repeatable sampling")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text; repeat for several")
    p.add_argument("--json-schema", type=_json_schema_file, metavar="FILE",
                   help="a JSON Schema file the output must follow")
    p.set_defaults(check_options=_check_generation_options)


def _add_generate(sub: _Subparsers) -> None:
    gen = _add_command(sub, "generate", "Stream a completion of PROMPT to stdout.")
    gen.add_argument("prompt")
    _add_generation_options(gen, max_tokens=64)
    gen.add_argument("-v", "--verbose", action="store_true", help="print metrics on stderr")
    gen.set_defaults(func=cmd_generate)


def _add_chat(sub: _Subparsers) -> None:
    chat = _add_command(sub, "chat", "Chat with a model in the terminal, keeping the conversation's history.")
    _add_generation_options(chat, max_tokens=256)
    chat.add_argument("--system", metavar="TEXT", help="a system message to start with")
    chat.add_argument("--tools", action="append", type=_tool_functions, metavar="MODULE:FUNCTION,...",
                      help="Python functions the model may call (each reply runs the tool loop); "
                      "repeat, or list with commas")
    chat.set_defaults(func=cmd_chat)


def _add_batch(sub: _Subparsers) -> None:
    batch = _add_command(sub, "batch", "Run every prompt of INPUT, appending each result to OUTPUT as it finishes.")
    batch.description = (
        "Run every prompt of INPUT, appending each result to OUTPUT (JSON lines) the moment it "
        "finishes; the same command again skips what OUTPUT holds and redoes what failed. "
        'Each INPUT line is {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}, '
        "with optional settings of its own (max_tokens, temperature, json_schema...) that "
        "override the command line's. Exit status: 0 when every item is done, 1 when some "
        "failed (their errors are in OUTPUT), 2 for a usage error or a bad INPUT line, "
        "130 when interrupted. With --ray, the prompts run on replicas of the model on a "
        "Ray cluster (--parallel slots each), and OUTPUT is written on this machine."
    )
    batch.add_argument("input", metavar="INPUT", help="prompts, one JSON object a line")
    batch.add_argument("output", metavar="OUTPUT", help="results, one JSON object a line (appended to)")
    _add_generation_options(batch, max_tokens=256)
    batch.add_argument("--parallel", type=int, default=4, metavar="N",
                       help="requests the server (each replica's, with --ray) runs at once (default 4)")
    batch.add_argument("--json", action="store_true", help="print a summary as JSON at the end")
    ray = batch.add_argument_group("on a Ray cluster (the ray extra)")
    ray.add_argument("--ray", metavar="auto|ADDRESS",
                     help="run on replicas on a Ray cluster: auto (RAY_ADDRESS, or the cluster this machine "
                          "runs) or the head's HOST:PORT; the model path must be valid on every node")
    ray.add_argument("--replicas", type=int, metavar="N", help="replicas, each its own llama-server (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, metavar="G",
                     help="GPUs Ray gives each replica (default 1; 0.5: two share one; 0: the CPU)")
    batch.set_defaults(func=cmd_batch, check_options=_check_batch_options)


def _add_file_commands(sub: _Subparsers) -> None:
    """The commands that only read files or sysfs: no server, so no ``--server``."""
    models = _add_command(sub, "models", "List the GGUF models in FOLDER (default: the current folder).", server=None)
    models.add_argument("folder", nargs="?", default=".")
    models.add_argument("-r", "--recursive", action="store_true", help="look in subfolders too")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=cmd_models)

    info = _add_command(sub, "info", "Print a GGUF file's metadata (default: the embedded model).", server=None)
    info.add_argument("model", nargs="?", metavar="FILE")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    vram = _add_command(sub, "vram", "Show the AMD GPUs and their memory (from sysfs).", server=None)
    vram.add_argument("--json", action="store_true", help="print JSON")
    vram.set_defaults(func=cmd_vram)


def _add_rpc_worker(sub: _Subparsers) -> None:
    rpc = _add_command(
        sub,
        "rpc-worker",
        "Run a llama.cpp RPC worker (ggml-rpc-server) that a model on another machine can "
        "offload layers to (load_model(..., rpc=['HOST:PORT'])). It has no authentication.",
        server="ggml-rpc-server",
    )
    rpc.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    rpc.add_argument("--port", type=int, default=50052, help="port (default 50052; 0 picks a free one)")
    rpc.add_argument("--devices", type=_device_list, metavar="LIST", help="GPU indices, e.g. 0,1")
    rpc.add_argument("--threads", type=int, metavar="N")
    rpc.add_argument("--allow-remote", action="store_true",
                     help="listen on a non-loopback address (trusted networks only: no authentication)")
    rpc.set_defaults(func=cmd_rpc_worker, check_options=_check_worker_options)


def _add_bench(sub: _Subparsers) -> None:
    bench = _add_command(sub, "bench", "Measure what llamarocm adds on top of llama-server (the bench extra helps).")
    # Only the bench command line: its measuring modules load when it runs.
    from .bench import command as bench_command

    bench_command.add_arguments(bench, server=False)
    bench.set_defaults(func=bench_command.run_args)


def _add_setup(sub: _Subparsers) -> None:
    setup = _add_command(
        sub,
        "setup",
        "Check that llama-server runs on this machine; if the prebuilt build cannot "
        "(SIGILL on this CPU), build one from source with pip.",
    )
    setup.add_argument("--check", action="store_true", help="only check, never build")
    setup.set_defaults(func=cmd_setup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamarocm",
        description="Run GGUF models through llama.cpp's llama-server.",
        epilog="Examples:\n  " + "\n  ".join(e for examples in EXAMPLES.values() for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llamarocm {llamarocm.__version__}")
    parser.add_argument("--debug", action="store_true", help="log details and show tracebacks (also after COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_generate, _add_chat, _add_batch, _add_file_commands, _add_rpc_worker, _add_bench, _add_setup):
        add(sub)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """Refuse bad option values as usage errors (exit 2) before anything runs: the
    library's own checks, so the command accepts exactly what the API accepts."""
    if args.check_options is None:
        return
    try:
        args.check_options(args)
    except (TypeError, ValueError) as exc:
        args.usage_parser.error(str(exc))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    _check_options(args)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        _stderr("interrupted")
        return 130
    except (llamarocm.LlamaRocmError, ValueError, TypeError, OSError) as exc:
        if args.debug:
            raise
        _stderr(f"error: {exc}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

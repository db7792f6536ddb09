"""The ``llamarocm`` command: a thin layer over the public API.

Exit codes: 0 ok, 1 runtime error (message on stderr; traceback only with
``--debug``), 2 usage error, 130 interrupted. Option values are checked with the
library's own validation before a model is found or a process started, so a value
the API would refuse is a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

import llamarocm

from ._binaries import SOURCE_BUILD_REQUIREMENT, find_binary
from ._default_model import default_model_path
from .config import GenerateConfig, LoadConfig
from .rpc import DEFAULT_STARTUP_TIMEOUT as WORKER_STARTUP_TIMEOUT
from .rpc import check_worker_arguments

EXAMPLES = {
    "generate": 'llamarocm generate "Once upon a time" --max-tokens 64',
    "chat": "llamarocm chat --model ~/models/qwen2.5-1.5b-instruct-q4_k_m.gguf",
    "models": "llamarocm models ~/models --recursive",
    "info": "llamarocm info ~/models/gemma-3-270m-q4_k_m.gguf --json",
    "vram": "llamarocm vram --json",
    "rpc-worker": "llamarocm rpc-worker --port 50052",
    "bench": "llamarocm bench --model ~/models/gemma-3-4b-it-Q4_K_M.gguf --gpu-layers all",
    "setup": "llamarocm setup",
}

# llama.cpp's own build runs one compiler per core with no limit unless told;
# each takes up to ~1 GB, so the source build is capped.
_BUILD_JOBS_CAP = 4
_SOURCE_BUILD_CMAKE_ARGS = (
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
    "-DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_RPC=ON"
)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_progress():
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


def _rpc_addresses(args: argparse.Namespace) -> List[str]:
    # llama-server's own syntax (one comma-separated list) is accepted too.
    return [address for item in args.rpc or () for address in item.split(",") if address]


def _generation_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``generate()`` / ``chat()`` keyword arguments from the command line."""
    options: Dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.seed is not None:
        options["seed"] = args.seed
    return options


def _check_generation_options(args: argparse.Namespace) -> None:
    """Build the configs ``generate`` and ``chat`` will use, so a bad option is a usage
    error before a model is found, assembled or loaded."""
    GenerateConfig.from_kwargs(_generation_options(args))
    LoadConfig(
        args.model if args.model is not None else _EMBEDDED_MODEL_STAND_IN,
        context_length=args.context_length,
        server_path=args.server,
        rpc=tuple(_rpc_addresses(args)),
    )


def _check_worker_options(args: argparse.Namespace) -> None:
    check_worker_arguments(
        args.host, args.port, args.devices, WORKER_STARTUP_TIMEOUT, args.threads, (), args.allow_remote
    )


def _load(args: argparse.Namespace) -> llamarocm.Model:
    """The model of ``generate`` and ``chat``: their shared loading options."""
    return llamarocm.load_model(
        _model_path(args.model),
        server_path=args.server,
        context_length=args.context_length,
        rpc=_rpc_addresses(args),
        progress=_load_progress(),
    )


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
            **_generation_options(args),
        )
    return 0


def chat_loop(model: "llamarocm.Model", read_line, out, *, system: Optional[str] = None, **options) -> List[dict]:
    """The REPL: read a line, stream the reply, keep the history; return the history.

    ``/reset`` clears the history (keeping the system message), ``/exit`` or end of
    input quits, Ctrl-C during a reply stops that reply only.
    """
    history: List[dict] = [{"role": "system", "content": system}] if system else []
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


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
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
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
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
        shown = _size(value) if key == "file_size" else ("-" if value is None else value)
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


def _device_list(text: str) -> List[int]:
    """``--devices``: comma-separated GPU indices (ranges are checked with the rest)."""
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices such as 0,1, got {text!r}") from None
    return devices


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamarocm",
        description="Run GGUF models through llama.cpp's llama-server.",
        epilog="Examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llamarocm {llamarocm.__version__}")
    parser.add_argument("--debug", action="store_true", help="log details and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str, program: str = "llama-server") -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"Example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--server", metavar="PATH", help=f"{program} binary (default: searched)")
        # Usage errors name the subcommand's own usage.
        p.set_defaults(usage_parser=p, check_options=None)
        return p

    def add_loading(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", metavar="PATH", help="GGUF file (default: the embedded Gemma 3 270M)")
        p.add_argument("--context-length", type=int, metavar="N")
        p.add_argument("--rpc", action="append", metavar="HOST:PORT",
                       help="an RPC worker (llamarocm rpc-worker) to put layers on; repeat, or list with commas")

    gen = add("generate", "Stream a completion of PROMPT to stdout.")
    gen.add_argument("prompt")
    add_loading(gen)
    gen.add_argument("--max-tokens", type=int, default=64, metavar="N")
    gen.add_argument("--temperature", type=float, metavar="T")
    gen.add_argument("--seed", type=int)
    gen.add_argument("-v", "--verbose", action="store_true", help="print metrics on stderr")
    gen.set_defaults(func=cmd_generate, check_options=_check_generation_options)

    chat = add("chat", "Chat with a model in the terminal, keeping the conversation's history.")
    add_loading(chat)
    chat.add_argument("--system", metavar="TEXT", help="a system message to start with")
    chat.add_argument("--max-tokens", type=int, default=256, metavar="N", help="longest reply (default 256)")
    chat.add_argument("--temperature", type=float, metavar="T")
    chat.add_argument("--seed", type=int)
    chat.set_defaults(func=cmd_chat, check_options=_check_generation_options)

    models = add("models", "List the GGUF models in FOLDER (default: the current folder).")
    models.add_argument("folder", nargs="?", default=".")
    models.add_argument("-r", "--recursive", action="store_true", help="look in subfolders too")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=cmd_models)

    info = add("info", "Print a GGUF file's metadata (default: the embedded model).")
    info.add_argument("model", nargs="?", metavar="FILE")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    vram = add("vram", "Show the AMD GPUs and their memory (from sysfs).")
    vram.add_argument("--json", action="store_true", help="print JSON")
    vram.set_defaults(func=cmd_vram)

    rpc = add(
        "rpc-worker",
        "Run a llama.cpp RPC worker (ggml-rpc-server) that a model on another machine can "
        "offload layers to (load_model(..., rpc=['HOST:PORT'])). It has no authentication.",
        program="ggml-rpc-server",
    )
    rpc.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    rpc.add_argument("--port", type=int, default=50052, help="port (default 50052; 0 picks a free one)")
    rpc.add_argument("--devices", type=_device_list, metavar="LIST", help="GPU indices, e.g. 0,1")
    rpc.add_argument("--threads", type=int, metavar="N")
    rpc.add_argument("--allow-remote", action="store_true",
                     help="listen on a non-loopback address (trusted networks only: no authentication)")
    rpc.set_defaults(func=cmd_rpc_worker, check_options=_check_worker_options)

    bench = add("bench", "Measure what llamarocm adds on top of llama-server (the bench extra helps).")
    # Only the bench command line: its measuring modules load when it runs.
    from .bench import command as bench_command

    bench_command.add_arguments(bench, server=False)
    bench.set_defaults(func=bench_command.run_args)

    setup = add(
        "setup",
        "Check that llama-server runs on this machine; if the prebuilt build cannot "
        "(SIGILL on this CPU), build one from source with pip.",
    )
    setup.add_argument("--check", action="store_true", help="only check, never build")
    setup.set_defaults(func=cmd_setup)
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
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="llamarocm: %(message)s")
    _check_options(args)
    try:
        return args.func(args)
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

"""The command line: the argparse tree with each command's options, help and
examples, the option checks made before anything runs, and ``main``."""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Tuple, TypeAlias

import llamarocm

from .arguments import device_list, gpu_layers, json_schema_file, lora_spec, tool_functions
from .batch import check_batch_options, cmd_batch
from .chat import check_chat_options, cmd_chat
from .console import configure_logging, print_stderr
from .files import cmd_info, cmd_models, cmd_vram
from .generate import cmd_generate
from .options import check_generation_options
from .system import check_worker_options, cmd_rpc_worker, cmd_setup

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
    p.add_argument("--gpu-layers", type=gpu_layers, metavar="N|all|auto",
                   help="layers to put on the GPU: a number, all (or -1), or auto to fit memory (default)")
    p.add_argument("--devices", type=device_list, metavar="LIST",
                   help="GPU indices to use, e.g. 0,1 (default: every discrete GPU)")
    p.add_argument("--rpc", action="append", metavar="HOST:PORT",
                   help="an RPC worker (llamarocm rpc-worker) to put layers on; repeat, or list with commas")
    p.add_argument("--lora", action="append", type=lora_spec, metavar="PATH[:SCALE]",
                   help="a LoRA adapter (GGUF) to apply, at SCALE (default 1); repeat for several")
    p.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"at most N tokens (default {max_tokens})")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0: the likeliest token)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample among the likeliest tokens totalling P (0 to 1)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed, for repeatable sampling")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text; repeat for several")
    p.add_argument("--json-schema", type=json_schema_file, metavar="FILE",
                   help="a JSON Schema file the output must follow")
    p.set_defaults(check_options=check_generation_options)


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
    chat.add_argument("--tools", action="append", type=tool_functions, metavar="MODULE:FUNCTION,...",
                      help="Python functions the model may call (each reply runs the tool loop); "
                      "repeat, or list with commas")
    chat.add_argument("--parallel-tool-calls", action="store_true",
                      help="let one reply call several tools at once (with --tools)")
    chat.set_defaults(func=cmd_chat, check_options=check_chat_options)


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
    batch.set_defaults(func=cmd_batch, check_options=check_batch_options)


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
    rpc.add_argument("--devices", type=device_list, metavar="LIST", help="GPU indices, e.g. 0,1")
    rpc.add_argument("--threads", type=int, metavar="N")
    rpc.add_argument("--allow-remote", action="store_true",
                     help="listen on a non-loopback address (trusted networks only: no authentication)")
    rpc.set_defaults(func=cmd_rpc_worker, check_options=check_worker_options)


def _add_bench(sub: _Subparsers) -> None:
    bench = _add_command(sub, "bench", "Measure what llamarocm adds on top of llama-server (the bench extra helps).")
    # Only the bench command line: its measuring modules load when it runs.
    from ..bench import command as bench_command

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
    configure_logging(args.debug)
    _check_options(args)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print_stderr("interrupted")
        return 130
    except (llamarocm.LlamaRocmError, ValueError, TypeError, OSError) as exc:
        if args.debug:
            raise
        print_stderr(f"error: {exc}")
        return 1

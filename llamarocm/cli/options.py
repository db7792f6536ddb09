"""From the parsed command line to the library's arguments: the ``generate()`` /
``chat()`` and ``load_model()`` keyword arguments, their checks, and the model that
``generate``, ``chat`` and ``batch`` load."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import llamarocm

from .._default_model import default_model_path
from ..config import GenerateConfig, LoadConfig
from ..lora import parse_lora
from .console import load_progress, print_stderr

# LoadConfig needs a model path, but the embedded model's is known only once the model
# is assembled (253 MB, on first use): the other loading options are checked with this
# stand-in, so a usage error never waits for that.
EMBEDDED_MODEL_STAND_IN = "embedded-model.gguf"

# generate() / chat() settings passed only when given, so the library's (and the
# server's) defaults apply otherwise.
_OPTIONAL_SETTINGS = ("temperature", "top_k", "top_p", "seed", "json_schema")


def model_path(given: Optional[str]) -> str:
    """``--model``, or the embedded model (assembled on first use)."""
    return given if given is not None else default_model_path(notify=print_stderr)


def _rpc_addresses(args: argparse.Namespace) -> List[str]:
    # llama-server's own syntax (one comma-separated list) is accepted too.
    return [address for item in args.rpc or () for address in item.split(",") if address]


def generation_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``generate()`` / ``chat()`` keyword arguments from the command line."""
    options: Dict[str, Any] = {"max_tokens": args.max_tokens}
    options.update({name: getattr(args, name) for name in _OPTIONAL_SETTINGS if getattr(args, name) is not None})
    if args.stop:
        options["stop"] = list(args.stop)
    return options


def load_options(args: argparse.Namespace) -> Dict[str, Any]:
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


def check_generation_options(args: argparse.Namespace) -> None:
    """Build the configs ``generate`` and ``chat`` will use, so a bad option is a usage
    error before a model is found, assembled or loaded."""
    GenerateConfig.from_kwargs(generation_options(args))
    options = load_options(args)
    parse_lora(options.pop("lora"))  # the files are checked by load_model, once the model is known
    LoadConfig(args.model if args.model is not None else EMBEDDED_MODEL_STAND_IN, **options)


def load(args: argparse.Namespace) -> llamarocm.Model:
    """The model of ``generate`` and ``chat``: their shared loading options."""
    return llamarocm.load_model(model_path(args.model), progress=load_progress(), **load_options(args))

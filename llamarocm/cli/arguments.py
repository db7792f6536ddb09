"""The argument types of the command line: each option's text as a value, or an
``argparse.ArgumentTypeError`` (a usage error) while the command line is parsed."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, NoReturn, Tuple, Union

from ..tools import check_tools


def device_list(text: str) -> List[int]:
    """``--devices``: comma-separated GPU indices (ranges are checked with the rest)."""
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices such as 0,1, got {text!r}") from None
    return devices


def gpu_layers(text: str) -> Union[int, str]:
    """``--gpu-layers``: ``auto``, ``all`` or a number of layers (-1: all, as llama.cpp
    writes it); the number's range is checked by LoadConfig with the other options."""
    if text in ("auto", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, all or a number of layers (-1: all), got {text!r}") from None


def lora_spec(text: str) -> Tuple[str, float]:
    """``--lora PATH[:SCALE]``: an adapter and its scale (1.0 when none is given; a
    path with a colon of its own takes one, as in ``a:b.gguf:1``)."""
    path, colon, tail = text.rpartition(":")
    if colon and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def tool_functions(text: str) -> List[Callable[..., Any]]:
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


def refuse_constant(name: str) -> NoReturn:
    """``parse_constant`` for ``json``: it accepts NaN and Infinity, which are not JSON
    and which llama-server refuses."""
    raise ValueError(f"{name} is not a JSON value")


def json_schema_file(path: str) -> Dict[str, Any]:
    """``--json-schema FILE``: the JSON Schema object in ``path``. Read while the command
    line is parsed, so a missing, unreadable or malformed file is a usage error naming it."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as file:
            schema = json.load(file, parse_constant=refuse_constant)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8 are both ValueErrors
        raise argparse.ArgumentTypeError(f"{path!r} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{path!r} must hold a JSON object (a JSON Schema), not {schema!r:.40}")
    return schema

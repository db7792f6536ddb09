"""``llamarocm bench``: what the SDK costs on top of llama-server, measured from the client.

Each figure (``startup``, ``stream``, ``client``, ``memory``, ``aggregate``, ``gguf``) is
measured next to its baseline in the same run, in alternating order, and reported as
min / median / max and as a ratio or difference against the baseline; docs/benchmarks.md
says what each compares. Needs the ``bench`` extra for the openai, plot and GGUF reader
comparisons (a figure whose package is missing is reported as skipped).

The modules: :mod:`.command` (the command line), :mod:`.options`, :mod:`.runner` (a
whole run), :mod:`.figures` and :mod:`.aggregate` (the measurements),
:mod:`.baselines`, :mod:`.replay` (the replay server), :mod:`.report` (table, plot,
JSON), :mod:`.common`. The names below load their module on first use, so that the
``llamarocm`` command can build its parser without the measuring code.

>>> from llamarocm import bench
>>> bench.main(["--quick", "--output", "/tmp/bench.json"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import importlib
from typing import Any, List

# name -> the module that defines it
_EXPORTS = {
    "main": "command",
    "add_arguments": "command",
    "options_from_args": "command",
    "run_args": "command",
    "run_and_write": "command",
    "FIGURES": "options",
    "Options": "options",
    "default_model": "options",
    "run": "runner",
    "TARGETS": "report",
    "build_table": "report",
    "print_columns": "report",
    "print_table": "report",
    "plot_aggregate": "report",
    "write_json": "report",
    "stats": "common",
    "time_ms": "common",
    "package_version": "common",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # PEP 562: import the defining module on first use, then keep the name here.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""Shared by the benchmark scripts: run some of ``llamarocm bench``'s figures with the
script's own defaults (figures, output file) and every other option of the command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from llamarocm import bench  # noqa: E402


def run_figures(
    figures: Sequence[str], name: str, description: str, argv: Optional[List[str]] = None
) -> Dict[str, Any]:
    """Parse ``argv`` with ``llamarocm bench``'s options, defaulting to ``figures`` and to
    ``benchmarks/results/<name>.json``; run, print the table, write JSON; return the result."""
    parser = argparse.ArgumentParser(description=description)
    bench.add_arguments(parser)
    parser.set_defaults(
        figures=tuple(figures),
        output=str(RESULTS / f"{name}.json"),
        plot=str(RESULTS / "aggregate.png"),
    )
    return bench.run_and_write(parser.parse_args(argv))

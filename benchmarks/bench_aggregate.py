"""Aggregate tok/s over client threads and server slots, llamarocm against raw http.client.

    python benchmarks/bench_aggregate.py [--model PATH] [--server PATH] [--repeat N] [--output FILE] ...

For each parallel= value one server is loaded; for each client thread count both clients
run the same requests, in alternating order. The table compares parallel=HI over
parallel=LO at --threads client threads; the sweep draws benchmarks/results/aggregate.png
(needs matplotlib).

Takes every option of ``llamarocm bench`` (``--help``); writes
benchmarks/results/aggregate.json unless ``--output`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_figures  # noqa: E402

FIGURES = ("aggregate",)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON, and return it as a dict.

    >>> result = main(["--quick"])  # doctest: +SKIP
    >>> sorted(result["figures"])  # doctest: +SKIP
    """
    return run_figures(FIGURES, "aggregate", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()

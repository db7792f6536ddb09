"""Memory: RSS, threads and file descriptors after many streams through one Model, against before.

    python benchmarks/bench_memory.py [--model PATH] [--server PATH] [--repeat N] [--output FILE] ...

Streams go to the replay server (recorded llama-server bytes), so a thousand of them
take seconds; a warm-up of 20 streams is left out of the before figure.

Takes every option of ``llamarocm bench`` (``--help``); writes
benchmarks/results/memory.json unless ``--output`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_figures  # noqa: E402

FIGURES = ("memory",)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON, and return it as a dict.

    >>> result = main(["--quick"])  # doctest: +SKIP
    >>> sorted(result["figures"])  # doctest: +SKIP
    """
    return run_figures(FIGURES, "memory", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()

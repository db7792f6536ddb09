"""Start-up: load_model() until a request can be sent, against a raw llama-server spawn.

    python benchmarks/bench_startup.py [--model PATH] [--server PATH] [--repeat N] [--output FILE] ...

The raw spawn uses the exact binary, arguments and environment of the server load_model()
started (read from /proc), on a fresh port, polled every 5 ms with http.client until
/health answers 200. Pairs alternate which goes first; one warm-up load is left out.

Takes every option of ``llamarocm bench`` (``--help``); writes
benchmarks/results/startup.json unless ``--output`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_figures  # noqa: E402

FIGURES = ("startup",)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON, and return it as a dict.

    >>> result = main(["--quick"])  # doctest: +SKIP
    >>> sorted(result["figures"])  # doctest: +SKIP
    """
    return run_figures(FIGURES, "startup", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()

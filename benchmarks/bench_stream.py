"""Time to first token and single-stream decode tok/s, against raw http.client on the same server.

    python benchmarks/bench_stream.py [--model PATH] [--server PATH] [--repeat N] [--output FILE] ...

Both clients send the same JSON body (greedy, ignore_eos) to the same llama-server, in
alternating order; the prompt is cached in the slot for both after a warm-up request.

Takes every option of ``llamarocm bench`` (``--help``); writes
benchmarks/results/stream.json unless ``--output`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_figures  # noqa: E402

FIGURES = ("stream",)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON, and return it as a dict.

    >>> result = main(["--quick"])  # doctest: +SKIP
    >>> sorted(result["figures"])  # doctest: +SKIP
    """
    return run_figures(FIGURES, "stream", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()

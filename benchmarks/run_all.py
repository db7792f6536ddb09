"""Every figure of the benchmark suite in one run: the same as ``llamarocm bench``.

    python benchmarks/run_all.py [--model PATH] [--server PATH] [--quick] [--output FILE] ...

Writes benchmarks/results/bench.json and benchmarks/results/aggregate.png. For the GGUF
figure's fuller version (header-only walk, first-call cost) run bench_gguf.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_figures  # noqa: E402

from llamarocm.bench import FIGURES  # noqa: E402


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run every figure, print the table, write the JSON, and return it as a dict."""
    return run_figures(FIGURES, "bench", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()

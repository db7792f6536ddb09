"""Client cost per token: llamarocm, raw http.client + json.loads, and the openai client on a replay server.

    python benchmarks/bench_client.py [--model PATH] [--server PATH] [--repeat N] [--output FILE] ...

A real llama-server stream of /completion and of /v1/completions is recorded once (the
raw HTTP response, chunked framing included) and served byte for byte by a replay server
in a child process, as fast as loopback allows; each client's wall time per token is
its cost. The openai figure needs ``pip install openai``.

Takes every option of ``llamarocm bench`` (``--help``); writes
benchmarks/results/client.json unless ``--output`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_figures  # noqa: E402

FIGURES = ("client",)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table, write the JSON, and return it as a dict.

    >>> result = main(["--quick"])  # doctest: +SKIP
    >>> sorted(result["figures"])  # doctest: +SKIP
    """
    return run_figures(FIGURES, "client", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()

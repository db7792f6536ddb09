"""The ``llamarocm`` command: a thin layer over the public API.

Exit codes: 0 ok, 1 runtime error (message on stderr; traceback only with
``--debug``) or, for ``batch``, items that failed, 2 usage error, 130 interrupted.
Option values are checked with the library's own validation before a model is found
or a process started, so a value the API would refuse is a usage error.

One module a job: ``parser`` (the command line and ``main``), a module per command or
group of commands, and what they share (``options``, ``arguments``, ``console``).
"""

from __future__ import annotations

from .batch_input import read_batch_input
from .chat import chat_loop
from .parser import EXAMPLES, build_parser, main

__all__ = ["EXAMPLES", "build_parser", "chat_loop", "main", "read_batch_input"]

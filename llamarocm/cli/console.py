"""What the command shows besides its output: messages and logs on stderr, the load
progress line, JSON on stdout."""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable, Optional, TextIO

# Only the llamarocm loggers go to stderr: with --debug, llama-server's output
# (llamarocm.server) and each request (llamarocm.http), without every other library's
# debug output that a DEBUG root logger would add.
_LOGGER = "llamarocm"
_LOG_FORMAT = "%(name)s: %(message)s"


def print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The command's log handler; a class of its own so that a second ``main()`` in the
    same process (tests, an embedding program) replaces it instead of adding another.

    It writes to ``sys.stderr`` as it is at each record, as the logging module's own
    last-resort handler does: a program that swaps or closes its stderr after
    ``main()`` returns must not find the handler writing to the old one.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would pin a stream

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def configure_logging(debug: bool) -> None:
    """Warnings of the ``llamarocm`` loggers on stderr, or with ``debug`` everything."""
    logger = logging.getLogger(_LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)


ProgressDisplay = Callable[[float, str], None]


def load_progress() -> Optional[ProgressDisplay]:
    """A one-line progress display on stderr while a model loads, when stderr is a
    terminal (nothing when it is a pipe or a file: logs stay clean)."""
    if not sys.stderr.isatty():
        return None

    def show(fraction: float, message: str) -> None:
        if message == "ready":
            sys.stderr.write("\r\033[K")
        else:
            bar = "#" * int(fraction * 20)
            sys.stderr.write(f"\r{message} [{bar:<20}] {fraction:4.0%}")
        sys.stderr.flush()

    return show

"""What a benchmark run measures and how hard: the figure names, the options, the default model.

Kept free of the measuring code so that the command line can be built from it without
loading the figures.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .._default_model import default_model_path

#: Every figure, in the order a run measures them.
FIGURES = ("startup", "stream", "client", "memory", "aggregate", "gguf")

#: The options that count something and so must be at least 1.
_COUNTS = ("repeat", "startup_repeat", "ttft_repeat", "decode_tokens", "replay_tokens", "replay_repeat",
           "memory_streams", "threads", "agg_tokens", "agg_requests", "agg_repeat")


@dataclass
class Options:
    """Everything a run needs but the list of figures (see ``llamarocm bench --help``)."""

    model: str
    server: Optional[str] = None
    context_length: Optional[int] = None
    gpu_layers: Any = None
    server_threads: Optional[int] = None
    repeat: int = 5
    startup_repeat: int = 20
    ttft_repeat: int = 10
    decode_tokens: int = 128
    replay_tokens: int = 256
    replay_repeat: int = 30
    memory_streams: int = 1000
    threads: int = 8
    slots: Tuple[int, int] = (1, 4)
    agg_tokens: int = 32
    agg_requests: int = 8
    agg_repeat: int = 5
    agg_budget: float = 300.0
    sweep_slots: Tuple[int, ...] = (1, 2, 4)
    sweep_threads: Tuple[int, ...] = (1, 2, 4, 8)
    fresh_prompt: bool = False
    plot: Optional[str] = None

    def load_kwargs(self, parallel: int = 1) -> Dict[str, Any]:
        """The ``load_model()`` keyword arguments of every server the run starts."""
        kw: Dict[str, Any] = {"parallel": parallel, "server_path": self.server}
        if self.context_length is not None:
            kw["context_length"] = self.context_length
        if self.gpu_layers is not None:
            kw["gpu_layers"] = self.gpu_layers
        if self.server_threads is not None:
            kw["threads"] = self.server_threads
        return kw

    def make_quick(self) -> None:
        """Shrink every count to a run that only checks everything works (``--quick``)."""
        self.repeat = self.startup_repeat = self.ttft_repeat = self.agg_repeat = 1
        self.decode_tokens, self.replay_tokens, self.replay_repeat = 8, 16, 3
        self.memory_streams = 20
        self.threads, self.slots, self.agg_tokens, self.agg_requests = 2, (1, 2), 4, 2
        self.sweep_slots, self.sweep_threads = (1, 2), (2,)

    def check(self) -> None:
        """Raise ``ValueError`` naming the command-line option of a value a run cannot use."""
        for name in _COUNTS:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.decode_tokens < 2:
            raise ValueError("--decode-tokens must be at least 2 (a rate needs two tokens)")


def default_model() -> str:
    """The embedded Gemma 3 270M file, assembled into the cache on first use (said on stderr)."""
    return default_model_path(notify=lambda message: print(message, file=sys.stderr, flush=True))

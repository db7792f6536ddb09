"""Where llama-server put the model's weights: proof that RPC workers are really used.

Reachable workers are not enough: llama-server decides the split itself (``-ngl``,
``--tensor-split``, each device's free memory), and a worker it gives nothing to costs
a connection and helps no one. The server says what it placed where only in its load
log, one line per device, and only at log verbosity 4::

    load_tensors: RPC0[127.0.0.1:50052] model buffer size =   199.34 MiB

so a server with workers is started with ``-lv 4`` (a couple of hundred lines at load,
about twenty a request after that) and the lines are read once it is ready.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, Sequence

from .errors import ServerStartError

__all__ = ["LOG_VERBOSITY_ARGS", "rpc_placement", "check_placement"]

log = logging.getLogger("llamarocm")

#: Server arguments that make it log each device's model buffer.
LOG_VERBOSITY_ARGS = ["-lv", "4"]

_BUFFER_LINE = re.compile(r"load_tensors:\s+RPC\d*\[(?P<address>[^\]]+)\] model buffer size =\s*(?P<mib>[0-9.]+) MiB")


def rpc_placement(log_text: str) -> Dict[str, float]:
    """MiB of model weights on each RPC worker, by the address the server was given.

    >>> rpc_placement("load_tensors: RPC0[127.0.0.1:50052] model buffer size =   199.34 MiB")
    {'127.0.0.1:50052': 199.34}
    """
    placement: Dict[str, float] = {}
    for match in _BUFFER_LINE.finditer(log_text):
        address = match.group("address")
        placement[address] = placement.get(address, 0.0) + float(match.group("mib"))
    return placement


def check_placement(addresses: Sequence[str], placement: Dict[str, float], log_tail: str) -> None:
    """Raise :class:`ServerStartError` naming every worker that holds no weights.

    An empty ``placement`` means the log said nothing about devices at all (its
    verbosity lowered in ``extra_args``, or another build's wording): that cannot be
    checked, which is logged, not raised.
    """
    if not placement:
        log.warning(
            "could not verify that llama-server placed layers on the RPC workers: its log has no "
            "'model buffer size' lines (is -lv lowered in extra_args?)"
        )
        return
    unused = [address for address in addresses if placement.get(address, 0.0) <= 0.0]
    if unused:
        raise ServerStartError(
            f"llama-server placed no model layers on RPC worker{'s' if len(unused) > 1 else ''} "
            f"{', '.join(unused)} (placed: {_describe(placement)}); check gpu_layers and any "
            "--tensor-split in extra_args, or use fewer workers for a model this small",
            log_tail,
        )


def _describe(placement: Dict[str, float]) -> str:
    return ", ".join(f"{address} {mib:.1f} MiB" for address, mib in placement.items()) or "nothing"

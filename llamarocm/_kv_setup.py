"""What a saved KV state depends on besides the model file and the server build: the
LoRA adapters (each file's identity and its scale) and the server's flags that change
what the KV cache holds; and the check of a saved setup against a model's.

KV values are computed by the model *with* its adapters at their scales: the same
tokens under another adapter, or the same adapter at another scale, give other values,
and the server would restore them without a word. The flags change the cache's layout
or contents: the number of slots and whether they share one cache (``--parallel``,
``--kv-unified``), its data types (``--cache-type-k/-v``), the V layout that flash attention
uses (``--flash-attn``), the positions RoPE encodes (``--rope-*``, ``--yarn-*``), the
metadata the model is built from (``--override-kv``), the control vectors added to its
hidden states, and the full-size sliding-window cache saved sessions need
(``--swa-full``). Some of these the server refuses at restore (a different data type);
the others it would take silently, so all are compared before the restore.

Only the flags as given are compared (a control vector by its path, not its bytes;
the ``LLAMA_ARG_*`` environment variables are not read): two spellings of one setup
(``-ctk f16`` and no flag) count as different, which refuses a file that would have
worked, never the other way round.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from ._slot_state import StateFile, model_identity
from .config import normalise_flag
from .errors import SessionMismatchError

__all__ = ["kv_flags", "adapter_setup", "check_setup"]

# Each flag by every spelling, as (its long name, how many values follow it).
# None: one optional value, taken when it is one of _FLASH_ATTN_VALUES.
_FLAG_SPECS: Dict[Tuple[str, ...], Tuple[str, Any]] = {
    # The number of slots, and whether they share one cache: a slot's state names its
    # cache streams, and the server refuses it in a server with another count
    # (measured: saved with parallel=2, refused with 1 and with 4).
    ("-np", "--parallel"): ("--parallel", 1),
    ("-kvu", "--kv-unified"): ("--kv-unified", 0),
    ("-no-kvu", "--no-kv-unified"): ("--no-kv-unified", 0),
    ("-ctk", "--cache-type-k"): ("--cache-type-k", 1),
    ("-ctv", "--cache-type-v"): ("--cache-type-v", 1),
    ("-fa", "--flash-attn"): ("--flash-attn", None),
    ("--swa-full",): ("--swa-full", 0),
    ("--rope-scaling",): ("--rope-scaling", 1),
    ("--rope-scale",): ("--rope-scale", 1),
    ("--rope-freq-base",): ("--rope-freq-base", 1),
    ("--rope-freq-scale",): ("--rope-freq-scale", 1),
    ("--yarn-orig-ctx",): ("--yarn-orig-ctx", 1),
    ("--yarn-ext-factor",): ("--yarn-ext-factor", 1),
    ("--yarn-attn-factor",): ("--yarn-attn-factor", 1),
    ("--yarn-beta-slow",): ("--yarn-beta-slow", 1),
    ("--yarn-beta-fast",): ("--yarn-beta-fast", 1),
    ("--override-kv",): ("--override-kv", 1),
    ("--control-vector",): ("--control-vector", 1),
    ("--control-vector-scaled",): ("--control-vector-scaled", 1),
    ("--control-vector-layer-range",): ("--control-vector-layer-range", 2),
}
_FLAGS = {spelling: spec for spellings, spec in _FLAG_SPECS.items() for spelling in spellings}
_FLASH_ATTN_VALUES = ("on", "off", "auto", "1", "0", "true", "false", "enabled", "disabled")


def kv_flags(args: Sequence[str]) -> List[List[str]]:
    """The KV-affecting flags among llama-server's ``args``, each as ``[long name,
    values...]``, in their order.

    >>> kv_flags(["-c", "512", "-ctk", "q8_0", "--swa-full", "-fa"])
    [['--cache-type-k', 'q8_0'], ['--swa-full'], ['--flash-attn']]
    """
    found: List[List[str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        spec = _FLAGS.get(normalise_flag(arg))
        if spec is None:
            continue
        name, count = spec
        values = [arg.split("=", 1)[1]] if "=" in arg and arg.startswith("--") else []
        if count is None:
            if not values and i < len(args) and args[i] in _FLASH_ATTN_VALUES:
                values.append(args[i])
                i += 1
        else:
            missing = max(0, count - len(values))
            values += list(args[i : i + missing])
            i += missing
        found.append([name, *values])
    return found


def adapter_setup(adapters: Any) -> List[Dict[str, Any]]:
    """Each adapter of a model (its :class:`~llamarocm.lora.LoraAdapters`), in id
    order: its file's identity and its current default scale."""
    scales = adapters.defaults()
    return [dict(model_identity(a.path), scale=scales[a.name]) for a in adapters.adapters]


def check_setup(state: StateFile, adapters: List[Dict[str, Any]], flags: List[List[str]]) -> None:
    """Refuse ``state`` unless it was saved with these adapters at these scales and
    these KV-cache flags."""
    saved_adapters = state.header["adapters"]
    if len(saved_adapters) != len(adapters):
        _refuse(state, f"was saved with {len(saved_adapters)} LoRA adapter(s), this model has {len(adapters)}")
    for i, (saved, current) in enumerate(zip(saved_adapters, adapters, strict=True)):
        if any(saved.get(key) != current[key] for key in ("file_size", "header_sha256")):
            _refuse(state, f"was saved with another LoRA adapter file as adapter {i} "
                           f"({saved.get('file_size')} bytes, header sha256 {str(saved.get('header_sha256'))[:12]}...)")
        if saved.get("scale") != current["scale"]:
            _refuse(state, f"was saved with LoRA adapter {i} at scale {saved.get('scale')!r}, this model's "
                           f"default scale is {current['scale']!r} (set_lora() can set it back)")
    if state.header["kv_flags"] != flags:
        _refuse(state, f"was saved with the KV-cache flags {_shown(state.header['kv_flags'])}, "
                       f"this server has {_shown(flags)}")


def _shown(flags: List[List[str]]) -> str:
    return " ".join(" ".join(flag) for flag in flags) or "none"


def _refuse(state: StateFile, why: str) -> None:
    raise SessionMismatchError(f"{state.path} {why}: its KV state is refused", state.path, state.messages)

"""Which GPUs the server may use, expressed as the child's environment.

ROCm numbers devices as ``HIP_VISIBLE_DEVICES`` presents them; the Vulkan build reads
``GGML_VK_VISIBLE_DEVICES``. No HTTP, no processes.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

from .errors import DeviceError

__all__ = ["device_environment"]

DEFAULT_DEVICES = "0"


def _parse(value: str) -> "list[str]":
    return [part.strip() for part in value.split(",") if part.strip()]


def device_environment(base: Mapping[str, str], devices: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """Variables to set on the child so it sees only the allowed devices.

    With ``devices=None`` a ``HIP_VISIBLE_DEVICES`` the user already set is kept as is,
    and otherwise device ``0`` is chosen (so an integrated GPU listed later never takes
    part). With ``devices`` given and the variable already set, only devices in both
    are kept: the user's variable is a limit we must not widen.

    >>> device_environment({}, None)
    {'HIP_VISIBLE_DEVICES': '0'}
    >>> device_environment({"HIP_VISIBLE_DEVICES": "1,2"}, [2, 3])
    {'HIP_VISIBLE_DEVICES': '2'}
    """
    current = base.get("HIP_VISIBLE_DEVICES")
    if devices is None:
        chosen = current if current is not None else DEFAULT_DEVICES
    else:
        wanted = [str(d) for d in devices]
        if current is not None:
            allowed = set(_parse(current))
            kept = [d for d in wanted if d in allowed]
            if not kept:
                raise DeviceError(
                    f"devices {list(devices)} are all outside HIP_VISIBLE_DEVICES={current!r}"
                )
            wanted = kept
        chosen = ",".join(wanted)
    return {"HIP_VISIBLE_DEVICES": chosen}

"""Which AMD GPUs exist, how much memory they have, and which ones the server may use.

Everything here is read from sysfs (no HTTP, no processes, no ROCm libraries), so it
works before anything is installed and costs a few small file reads per call. How sysfs
is read, and why the numbers are what they are, is told in ``_gpu_topology``; this
module presents what it finds and decides with it: the GPUs' memory, the visible-device
variables a server is started with, and whether a model fits.

Numbering (the ``index`` of :class:`GPUDevice`, ``devices=[...]`` and
``HIP_VISIBLE_DEVICES``) is HIP's: the order of the GPU nodes of ROCm's KFD topology,
not the order of the DRM ``cardN`` devices. Without a KFD topology (no ROCm kernel
support) AMD cards are numbered in ``cardN`` order.

An APU's carve-out is not its real memory: the GPU also allocates from the GTT pool
(``mem_info_gtt_total``), system memory mapped for it. For an integrated GPU the memory
reported by :func:`vram_info` and :attr:`GPUDevice.memory` is therefore carve-out plus
GTT; for a discrete GPU it is VRAM only.

Every sysfs file may be missing, unreadable (containers, cgroups) or hold garbage: such
a GPU is skipped, never a ``ValueError`` or ``OSError``. A GPU whose memory files cannot
be read is left out of :func:`list_devices` but keeps its place in the numbering.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ._gpu_topology import Gpu, Topology, scan, vulkan_indices
from .config import check_devices
from .errors import DeviceError

__all__ = [
    "GPUDevice",
    "VRAMInfo",
    "check_fits",
    "device_environment",
    "list_devices",
    "vram_info",
]

log = logging.getLogger("llamarocm")

DEFAULT_DEVICES = "0"
MIB = 1 << 20
GIB = 1 << 30


class VRAMInfo(NamedTuple):
    """GPU memory in bytes. ``free`` is ``total - used``, never below 0.

    >>> VRAMInfo(16 * GIB, 4 * GIB, 12 * GIB).free // GIB
    12
    """

    total: int
    used: int
    free: int


@dataclass(frozen=True)
class GPUDevice:
    """One AMD GPU as sysfs describes it.

    ``index`` is the HIP device index (what ``devices=[...]`` and
    ``HIP_VISIBLE_DEVICES`` take). ``vram_*`` are the kernel's VRAM figures as they
    are, ``gtt_*`` its GTT (system memory mapped for the GPU); :attr:`memory` is what
    the GPU can really use. ``name`` is the board's product name when the kernel knows
    it (server cards), else the ``gfx`` target, else the PCI id.

    >>> gpu = GPUDevice(0, "gfx1101", "gfx1101", False, 16 * GIB, GIB, 32 * GIB, 0, None)
    >>> gpu.memory.free // GIB
    15
    """

    index: int
    name: str
    gfx_target: Optional[str]
    is_integrated: bool
    vram_total: int
    vram_used: int
    gtt_total: int
    gtt_used: int
    pci_address: Optional[str]

    @property
    def memory(self) -> VRAMInfo:
        """VRAM for a discrete GPU; carve-out plus GTT for an integrated one."""
        total, used = self.vram_total, self.vram_used
        if self.is_integrated:
            total, used = total + self.gtt_total, used + self.gtt_used
        return VRAMInfo(total, used, max(0, total - used))


# -- presenting the GPUs -----------------------------------------------------------


def _public(gpu: Gpu) -> Optional[GPUDevice]:
    """What the user sees of ``gpu``; None when its memory cannot be read."""
    if gpu.memory is None:
        return None
    vram_total, vram_used, gtt_total, gtt_used = gpu.memory
    return GPUDevice(
        index=gpu.index,
        name=gpu.name,
        gfx_target=gpu.gfx_target,
        is_integrated=gpu.is_integrated,
        vram_total=vram_total,
        vram_used=vram_used,
        gtt_total=gtt_total,
        gtt_used=gtt_used,
        pci_address=gpu.pci_address,
    )


def _describe_gpu(gpu: Gpu) -> str:
    """One GPU for an error message: index, name, kind and memory."""
    kind = "integrated" if gpu.is_integrated else "discrete"
    if gpu.memory is None:
        return f"{gpu.index}: {gpu.name} ({kind}, memory unreadable)"
    vram_total, _, gtt_total, _ = gpu.memory
    if gpu.is_integrated:
        return f"{gpu.index}: {gpu.name} ({kind}, {_size(vram_total)} carve-out + {_size(gtt_total)} GTT)"
    return f"{gpu.index}: {gpu.name} ({kind}, {_size(vram_total)} VRAM)"


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n // MIB} MiB"


# -- choosing devices --------------------------------------------------------------


def _parse(value: str) -> List[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _distinct(devices: Any) -> List[int]:
    """Checked device indices, each once, in the order given."""
    checked = check_devices(devices)
    assert checked is not None
    return list(dict.fromkeys(checked))


def _describe(topology: Topology) -> str:
    count = len(topology.gpus)
    listing = "; ".join(_describe_gpu(gpu) for gpu in topology.gpus)
    return f"this machine has {count} AMD GPU{'s' if count != 1 else ''}: {listing}"


def _require(topology: Topology, wanted: Sequence[int]) -> None:
    known = {gpu.index for gpu in topology.gpus}
    missing = [d for d in wanted if d not in known]
    if missing:
        names = ", ".join(str(d) for d in missing)
        raise DeviceError(f"no GPU with index {names}: {_describe(topology)}")


def _default_choice(topology: Topology) -> List[int]:
    # Integrated GPUs crash ROCm (llama.cpp #8618) or drag a split model down to
    # system-memory speed; they are used only when there is nothing else.
    discrete = [gpu.index for gpu in topology.gpus if not gpu.is_integrated]
    return discrete or [gpu.index for gpu in topology.gpus]


def _choose(
    base: Mapping[str, str], devices: Optional[Sequence[int]], topology: Topology
) -> Tuple[Optional[str], Optional[List[int]]]:
    """The ``HIP_VISIBLE_DEVICES`` value to set and the sysfs indices it stands for.

    Either may be ``None``: no value to set (the user's ``ROCR_VISIBLE_DEVICES``
    stands), or indices that cannot be tied to sysfs.
    """
    current = base.get("HIP_VISIBLE_DEVICES")
    # ROCR_VISIBLE_DEVICES filters the devices before HIP numbers them, so HIP indices
    # are then positions in the user's list, not in the KFD topology.
    sysfs_numbering = bool(topology.gpus) and base.get("ROCR_VISIBLE_DEVICES") is None
    if devices is None:
        if current is not None:
            parts = _parse(current)
            numeric = all(p.isdigit() for p in parts)
            indices = [int(p) for p in parts] if sysfs_numbering and numeric and parts else None
            if indices:
                # The user's list is filtered, never widened: an integrated GPU in it is
                # dropped when a discrete one is listed too (the ROCm iGPU crash).
                known = {gpu.index: gpu for gpu in topology.gpus}
                integrated = [i for i in indices if i in known and known[i].is_integrated]
                if integrated and any(i in known and not known[i].is_integrated for i in indices):
                    kept = [i for i in indices if i not in integrated]
                    return ",".join(map(str, kept)), kept
            return current, indices
        if base.get("ROCR_VISIBLE_DEVICES") is not None:
            return None, None
        if not topology.gpus:
            return DEFAULT_DEVICES, None
        chosen = _default_choice(topology)
        return ",".join(map(str, chosen)), chosen
    wanted = _distinct(devices)
    if sysfs_numbering:
        _require(topology, wanted)
    if current is not None:
        allowed = set(_parse(current))
        kept = [d for d in wanted if str(d) in allowed]
        if not kept:
            raise DeviceError(f"devices {list(devices)} are all outside HIP_VISIBLE_DEVICES={current!r}")
        wanted = kept
    return ",".join(map(str, wanted)), wanted if sysfs_numbering else None


# -- public API --------------------------------------------------------------------


def list_devices(*, sysfs_root: str = "/") -> List[GPUDevice]:
    """The AMD GPUs of this machine, in HIP order.

    ``sysfs_root`` is the directory holding ``sys/`` and ``dev/`` (a fake tree in
    tests). An empty list means sysfs shows no usable AMD GPU. A GPU whose memory
    cannot be read is left out, without renumbering the others.

    >>> list_devices(sysfs_root="/nonexistent")
    []
    """
    topology = scan(sysfs_root)
    return [device for device in (_public(gpu) for gpu in topology.gpus) if device is not None]


def vram_info(device: Optional[int] = None, *, sysfs_root: str = "/") -> VRAMInfo:
    """GPU memory in bytes, from amdgpu's sysfs files.

    ``device`` is a HIP index. With ``None``, the sum over the GPUs the server uses by
    default: all discrete GPUs, or the integrated ones if there is no discrete GPU
    (``HIP_VISIBLE_DEVICES`` is not consulted: pass ``device`` for one GPU, or see
    :func:`check_fits`). An integrated GPU counts its carve-out plus its GTT pool.
    ``free`` is clamped at 0. Raises :class:`~llamarocm.DeviceError` when there is
    no such GPU or its memory cannot be read.

    >>> vram_info(sysfs_root="/nonexistent")
    Traceback (most recent call last):
    ...
    llamarocm.errors.DeviceError: no AMD GPU found under /nonexistent/sys/class/drm
    """
    topology = scan(sysfs_root)
    if not topology.gpus:
        raise DeviceError(f"no AMD GPU found under {os.path.join(sysfs_root, 'sys', 'class', 'drm')}")
    if device is None:
        chosen = _default_choice(topology)
    else:
        chosen = _distinct([device])
        _require(topology, chosen)
    devices = [_public(gpu) for gpu in topology.gpus if gpu.index in chosen]
    known = [d for d in devices if d is not None]
    if not known:
        raise DeviceError(f"the memory of GPU {', '.join(map(str, chosen))} cannot be read: {_describe(topology)}")
    return _sum(d.memory for d in known)


def _sum(infos: Iterable[VRAMInfo]) -> VRAMInfo:
    total = used = free = 0
    for info in infos:
        total, used, free = total + info.total, used + info.used, free + info.free
    return VRAMInfo(total, used, free)


def device_environment(
    base: Mapping[str, str], devices: Optional[Sequence[int]] = None, *, sysfs_root: str = "/"
) -> Dict[str, str]:
    """Variables to set on the child so it sees only the allowed GPUs.

    ``HIP_VISIBLE_DEVICES``:

    * a value the user set is a limit never widened: with ``devices=None`` it is kept,
      less any integrated GPU when a discrete one is listed too; intersected with
      ``devices`` otherwise (:class:`~llamarocm.DeviceError` if
      nothing is left);
    * not set and ``devices=None``: the discrete GPUs sysfs shows, hiding integrated
      ones (they crash ROCm or slow it), or the integrated ones if there is nothing
      else, or ``"0"`` when sysfs shows no AMD GPU at all;
    * ``devices`` naming an index sysfs does not list raises ``DeviceError`` with the
      list of GPUs that do exist (not checked when sysfs shows none);
    * with ``ROCR_VISIBLE_DEVICES`` set, HIP numbers only the GPUs it lets through, so
      sysfs indices mean nothing: ``devices`` is passed on unchecked and, without it,
      nothing is added.

    ``GGML_VK_VISIBLE_DEVICES`` (the Vulkan build's variable, numbered the Vulkan way)
    is set to the same GPUs unless the user set it, when their Vulkan numbers can be
    derived from sysfs; otherwise it is left to the server, whose own default already
    prefers discrete GPUs. It is never set to a guess: index 0 of a GPU-less Vulkan
    list is the CPU rasterizer.

    >>> device_environment({}, None, sysfs_root="/nonexistent")
    {'HIP_VISIBLE_DEVICES': '0'}
    >>> device_environment({"HIP_VISIBLE_DEVICES": "1,2"}, [2, 3], sysfs_root="/nonexistent")
    {'HIP_VISIBLE_DEVICES': '2'}
    """
    topology = scan(sysfs_root)
    hip, chosen = _choose(base, devices, topology)
    env: Dict[str, str] = {}
    if hip is not None:
        env["HIP_VISIBLE_DEVICES"] = hip
    if chosen and "GGML_VK_VISIBLE_DEVICES" not in base:
        numbers = vulkan_indices(topology, base)
        by_index = {gpu.index: gpu for gpu in topology.gpus}
        vulkan = [numbers.get(by_index[i].path or "") if i in by_index else None for i in chosen]
        if all(number is not None for number in vulkan):
            env["GGML_VK_VISIBLE_DEVICES"] = ",".join(str(number) for number in vulkan)
    return env


def check_fits(
    required_bytes: int,
    devices: Optional[Sequence[int]] = None,
    *,
    env: Optional[Mapping[str, str]] = None,
    strict: bool = True,
    sysfs_root: str = "/",
) -> Optional[VRAMInfo]:
    """Whether ``required_bytes`` fit in the free memory of the GPUs the server will use.

    The GPUs are chosen exactly as ``device_environment()`` chooses them for ``env``
    (default: no variables set) and ``devices``; their free memory is summed, since
    llama-server splits a model across them. When it is short, ``strict=True`` raises
    :class:`~llamarocm.DeviceError` and ``strict=False`` logs a warning; either way
    before anything is started. ``load_model(..., strict=True)`` calls this with the
    model file's size plus its KV cache.

    Returns the memory counted, or ``None`` when it cannot be measured (sysfs shows no
    AMD GPU, ``ROCR_VISIBLE_DEVICES`` renumbers them, or a chosen GPU's memory is
    unreadable and the others are not enough): a check that cannot be made never
    blocks a load.

    >>> check_fits(4 * GIB, sysfs_root="/nonexistent") is None
    True
    """
    if isinstance(required_bytes, bool) or not isinstance(required_bytes, int):
        raise TypeError("required_bytes must be an int")
    if required_bytes < 0:
        raise ValueError(f"required_bytes must be >= 0, got {required_bytes}")
    topology = scan(sysfs_root)
    _, chosen = _choose(env or {}, devices, topology)
    if not chosen:
        log.debug("cannot measure GPU memory for this device choice; not checking that the model fits")
        return None
    by_index = {gpu.index: gpu for gpu in topology.gpus}
    gpus = [by_index[i] for i in chosen if i in by_index]
    known = [_public(gpu) for gpu in gpus]
    info = _sum(d.memory for d in known if d is not None)
    if info.free >= required_bytes:
        return info
    if len(gpus) < len(chosen) or any(d is None for d in known):
        log.warning("cannot read the memory of every chosen GPU; not checking that the model fits")
        return None
    where = "; ".join(
        f"{_describe_gpu(gpu)}, {_size(d.memory.free)} free" for gpu, d in zip(gpus, known, strict=True) if d
    )
    message = f"the model needs {_size(required_bytes)} of GPU memory but only {_size(info.free)} is free ({where})"
    if strict:
        raise DeviceError(message)
    log.warning("%s", message)
    return info

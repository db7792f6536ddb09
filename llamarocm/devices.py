"""Which AMD GPUs exist, how much memory they have, and which ones the server may use.

Everything here is read from sysfs (no HTTP, no processes, no ROCm libraries), so it
works before anything is installed and costs a few small file reads per call.

Numbering (the ``index`` of :class:`GPUDevice`, ``devices=[...]`` and
``HIP_VISIBLE_DEVICES``) is HIP's: ROCm's thunk walks the KFD topology
(``/sys/class/kfd/kfd/topology/nodes/<n>``) in node order, keeps the GPU nodes
(``gpu_id`` not 0, ``simd_count`` > 0) whose properties it may read and whose
``/dev/dri/renderD<drm_render_minor>`` exists, and HIP numbers those from 0. DRM
``cardN`` numbers are *not* HIP indices; a GPU node is tied to its DRM device through
``drm_render_minor`` (``/sys/class/drm/renderD<minor>/device``) or, failing that, its
PCI address (``domain`` and ``location_id``). Without a KFD topology (no ROCm kernel
support) AMD cards are numbered in ``cardN`` order.

Integrated GPUs (APUs) are told apart by, in order:

1. the KFD node also has CPU cores (``cpu_cores_count`` > 0): the HSA definition of an
   APU node, used by the kernel's own "Add APU node" log and by ROCm's thunk;
2. its ``gfx`` target (from ``gfx_target_version``) is an APU in LLVM's AMDGPU processor
   table (gfx801, gfx810, gfx902, gfx909, gfx90c, gfx1013, gfx1033, gfx1035, gfx1036,
   gfx1103, gfx115x...): recent kernels give APUs a GPU node of their own with no CPU
   cores, so rule 1 alone misses them;
3. ``mem_info_vram_total`` under 1 GiB: an APU's "VRAM" is a BIOS carve-out of system
   memory, typically 512 MiB (Ollama uses the same 1 GiB line); no ROCm-capable
   discrete card is that small.

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
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

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
# Below this a "VRAM" size is a BIOS carve-out, not a graphics card's memory.
INTEGRATED_VRAM_LIMIT = 1 * GIB

AMD_VENDOR = 0x1002
INTEL_VENDOR = 0x8086
NVIDIA_VENDOR = 0x10DE

# The processors LLVM's AMDGPU processor table lists as "APU" (llvm/docs/AMDGPUUsage.rst).
APU_TARGETS = frozenset(
    {
        "gfx700",
        "gfx703",
        "gfx705",
        "gfx801",
        "gfx810",
        "gfx902",
        "gfx909",
        "gfx90c",
        "gfx1013",
        "gfx1033",
        "gfx1035",
        "gfx1036",
        "gfx1103",
        "gfx1150",
        "gfx1151",
        "gfx1152",
        "gfx1210",
    }
)

# Variables that change which Vulkan devices exist or which comes first; with any of
# them set, the Vulkan numbering cannot be predicted from sysfs.
_VULKAN_SELECTION_VARIABLES = (
    "DRI_PRIME",
    "MESA_VK_DEVICE_SELECT",
    "MESA_VK_DEVICE_SELECT_FORCE_DEFAULT_DEVICE",
    "VK_LOADER_DEVICE_SELECT",
    "VK_ICD_FILENAMES",
    "VK_DRIVER_FILES",
    "VK_ADD_DRIVER_FILES",
    "VK_LOADER_DRIVERS_SELECT",
    "VK_LOADER_DRIVERS_DISABLE",
)

_CARD = re.compile(r"card(\d+)")
_RENDER = re.compile(r"renderD(\d+)")
_PCI_ADDRESS = re.compile(r"([0-9a-fA-F]{4,}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")
# sysfs attribute files are at most a page; anything longer is not what we expect.
_MAX_READ = 65536

PciAddress = Tuple[int, int, int, int]


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


# -- reading sysfs ---------------------------------------------------------------


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_READ)
    except (OSError, ValueError):
        return None
    return data.decode("utf-8", errors="replace").strip()


def _parse_int(text: Optional[str]) -> Optional[int]:
    if not text:
        return None
    try:
        value = int(text, 16) if text[:2].lower() == "0x" else int(text, 10)
    except ValueError:
        return None
    return value if value >= 0 else None


def _read_int(path: str) -> Optional[int]:
    return _parse_int(_read_text(path))


def _read_properties(path: str) -> Optional[Dict[str, int]]:
    """A KFD ``properties`` file: one ``name value`` pair per line, values integers."""
    text = _read_text(path)
    if text is None:
        return None
    props: Dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            value = _parse_int(parts[1])
            if value is not None:
                props[parts[0]] = value
    return props


def _realpath(path: str) -> Optional[str]:
    try:
        return os.path.realpath(path) if os.path.isdir(path) else None
    except (OSError, ValueError):
        return None


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except (OSError, ValueError):
        return []


def _pci_address(device_path: str) -> Optional[PciAddress]:
    # A DRM device's `device` link resolves to its PCI function, named by address.
    match = _PCI_ADDRESS.fullmatch(os.path.basename(device_path))
    if match is None:
        return None
    domain, bus, dev, fn = match.groups()
    return int(domain, 16), int(bus, 16), int(dev, 16), int(fn)


def _format_pci(address: Optional[PciAddress]) -> Optional[str]:
    if address is None:
        return None
    domain, bus, dev, fn = address
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{fn:x}"


@dataclass
class _Card:
    """A DRM ``cardN`` backed by a PCI device (connectors such as ``card0-DP-1`` are not)."""

    path: str  # the device directory, resolved
    vendor: int
    pci: Optional[PciAddress]
    render_minor: Optional[int]
    boot_vga: bool
    amdgpu: bool


@dataclass
class _Gpu:
    """An AMD GPU in HIP order, with memory ``None`` when its files cannot be read."""

    index: int
    path: Optional[str]
    card: Optional[_Card]
    gfx_target: Optional[str]
    cpu_cores: int
    memory: Optional[Tuple[int, int, int, int]]  # vram total, vram used, gtt total, gtt used
    name: str
    is_integrated: bool = False

    def public(self) -> Optional[GPUDevice]:
        if self.memory is None:
            return None
        vram_total, vram_used, gtt_total, gtt_used = self.memory
        pci = _format_pci(self.card.pci if self.card else _pci_address(self.path or ""))
        return GPUDevice(
            index=self.index,
            name=self.name,
            gfx_target=self.gfx_target,
            is_integrated=self.is_integrated,
            vram_total=vram_total,
            vram_used=vram_used,
            gtt_total=gtt_total,
            gtt_used=gtt_used,
            pci_address=pci,
        )

    def describe(self) -> str:
        kind = "integrated" if self.is_integrated else "discrete"
        if self.memory is None:
            return f"{self.index}: {self.name} ({kind}, memory unreadable)"
        vram_total, _, gtt_total, _ = self.memory
        if self.is_integrated:
            return f"{self.index}: {self.name} ({kind}, {_size(vram_total)} carve-out + {_size(gtt_total)} GTT)"
        return f"{self.index}: {self.name} ({kind}, {_size(vram_total)} VRAM)"


@dataclass
class _Topology:
    gpus: List[_Gpu]
    cards: List[_Card]
    root: str


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n // MIB} MiB"


def _gfx_target(version: Optional[int]) -> Optional[str]:
    # KFD encodes gfx1101 as 110001 and gfx90c as 90012: major, minor and stepping in
    # decimal pairs, while the gfx name writes minor and stepping as hex digits.
    if not version:
        return None
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    if minor > 15 or stepping > 15:
        return None
    return f"gfx{major}{minor:x}{stepping:x}"


def _read_memory(device_path: Optional[str]) -> Optional[Tuple[int, int, int, int]]:
    if device_path is None:
        return None
    vram_total = _read_int(os.path.join(device_path, "mem_info_vram_total"))
    vram_used = _read_int(os.path.join(device_path, "mem_info_vram_used"))
    if vram_total is None or vram_used is None:
        return None
    # GTT is optional: only integrated GPUs count it, and old kernels lack the files.
    gtt_total = _read_int(os.path.join(device_path, "mem_info_gtt_total")) or 0
    gtt_used = _read_int(os.path.join(device_path, "mem_info_gtt_used")) or 0
    return vram_total, vram_used, gtt_total, gtt_used


def _is_integrated(cpu_cores: int, gfx_target: Optional[str], vram_total: Optional[int]) -> bool:
    if cpu_cores > 0 or gfx_target in APU_TARGETS:
        return True
    return vram_total is not None and 0 < vram_total < INTEGRATED_VRAM_LIMIT


def _read_cards(root: str) -> Tuple[List[_Card], Dict[int, str]]:
    """The PCI-backed DRM cards, in card order, and where each render node points."""
    drm = os.path.join(root, "sys", "class", "drm")
    render_paths: Dict[int, str] = {}
    card_entries: List[Tuple[int, str]] = []
    for entry in _listdir(drm):
        render = _RENDER.fullmatch(entry)
        if render is not None:
            path = _realpath(os.path.join(drm, entry, "device"))
            if path is not None:
                render_paths[int(render.group(1))] = path
            continue
        card = _CARD.fullmatch(entry)
        if card is not None:
            card_entries.append((int(card.group(1)), entry))
    minor_of = {path: minor for minor, path in render_paths.items()}
    cards: List[_Card] = []
    seen = set()
    for _, entry in sorted(card_entries):
        device = os.path.join(drm, entry, "device")
        path = _realpath(device)
        vendor = _read_int(os.path.join(device, "vendor"))
        if path is None or vendor is None or path in seen:
            continue
        seen.add(path)
        driver = _realpath(os.path.join(device, "driver"))
        amdgpu = (driver is not None and os.path.basename(driver) == "amdgpu") or os.path.exists(
            os.path.join(device, "mem_info_vram_total")
        )
        cards.append(
            _Card(
                path=path,
                vendor=vendor,
                pci=_pci_address(path),
                render_minor=minor_of.get(path),
                boot_vga=_read_text(os.path.join(device, "boot_vga")) == "1",
                amdgpu=amdgpu,
            )
        )
    return cards, render_paths


def _render_node_exists(root: str, minor: Optional[int]) -> bool:
    return minor is not None and os.path.exists(os.path.join(root, "dev", "dri", f"renderD{minor}"))


def _name(path: Optional[str], gfx_target: Optional[str], vendor: int, device_id: Optional[int]) -> str:
    product = _read_text(os.path.join(path, "product_name")) if path else None
    if product:
        return product
    if gfx_target:
        return gfx_target
    return f"AMD GPU [{vendor:04x}:{device_id or 0:04x}]"


def _kfd_gpus(root: str, cards: List[_Card], render_paths: Dict[int, str]) -> List[_Gpu]:
    nodes_dir = os.path.join(root, "sys", "class", "kfd", "kfd", "topology", "nodes")
    by_path = {card.path: card for card in cards}
    by_pci = {card.pci: card for card in cards if card.pci is not None}
    gpus: List[_Gpu] = []
    for node in sorted((n for n in _listdir(nodes_dir) if n.isdigit()), key=int):
        node_dir = os.path.join(nodes_dir, node)
        gpu_id = _read_int(os.path.join(node_dir, "gpu_id"))
        props = _read_properties(os.path.join(node_dir, "properties"))
        # ROCm's thunk skips a node it may not read (cgroup: EPERM) or whose render node
        # is absent from /dev (a container given only some GPUs); HIP never numbers it.
        if not gpu_id or props is None or props.get("simd_count", 0) <= 0:
            continue
        minor = props.get("drm_render_minor")
        if minor is None or not _render_node_exists(root, minor):
            continue
        path = render_paths.get(minor)
        card = by_path.get(path) if path else None
        if card is None:
            location = props.get("location_id")
            if location is not None:
                pci = (props.get("domain", 0), location >> 8, (location >> 3) & 0x1F, location & 0x7)
                card = by_pci.get(pci)
                path = path or (card.path if card else None)
        gfx = _gfx_target(props.get("gfx_target_version"))
        gpus.append(
            _Gpu(
                index=len(gpus),
                path=path,
                card=card,
                gfx_target=gfx,
                cpu_cores=props.get("cpu_cores_count", 0),
                memory=_read_memory(path),
                name=_name(path, gfx, props.get("vendor_id", AMD_VENDOR), props.get("device_id")),
            )
        )
    return gpus


def _drm_gpus(cards: List[_Card]) -> List[_Gpu]:
    # No KFD topology: HIP cannot run, but VRAM and the Vulkan build still can.
    gpus: List[_Gpu] = []
    for card in cards:
        if card.vendor != AMD_VENDOR or not card.amdgpu:
            continue
        device_id = _read_int(os.path.join(card.path, "device"))
        gpus.append(
            _Gpu(
                index=len(gpus),
                path=card.path,
                card=card,
                gfx_target=None,
                cpu_cores=0,
                memory=_read_memory(card.path),
                name=_name(card.path, None, AMD_VENDOR, device_id),
            )
        )
    return gpus


def _scan(root: str) -> _Topology:
    cards, render_paths = _read_cards(root)
    gpus = _kfd_gpus(root, cards, render_paths) or _drm_gpus(cards)
    for gpu in gpus:
        gpu.is_integrated = _is_integrated(gpu.cpu_cores, gpu.gfx_target, gpu.memory[0] if gpu.memory else None)
    return _Topology(gpus, cards, root)


# -- Vulkan numbering --------------------------------------------------------------


_UNKNOWN = -1


def _vulkan_kind(card: _Card, topology: _Topology) -> Optional[int]:
    """0 for a discrete GPU, 1 for an integrated one, None if Vulkan will not list it.

    ``_UNKNOWN`` when it cannot be told, which makes every Vulkan number uncertain.
    """
    if card.vendor not in (AMD_VENDOR, INTEL_VENDOR, NVIDIA_VENDOR):
        return None  # BMC and virtual adapters (ASPEED, Matrox...) have no Vulkan driver
    if card.render_minor is None or card.pci is None:
        return _UNKNOWN
    if not _render_node_exists(topology.root, card.render_minor):
        return None  # Vulkan drivers open the render node: without it, no device
    if card.vendor == AMD_VENDOR:
        if not card.amdgpu:
            return None  # radeon-driven cards have no Vulkan driver
        for gpu in topology.gpus:
            if gpu.path == card.path:
                return 1 if gpu.is_integrated else 0
        memory = _read_memory(card.path)
        return 1 if _is_integrated(0, None, memory[0] if memory else None) else 0
    if card.vendor == INTEL_VENDOR:
        # Intel's integrated GPU always sits on the root bus (00:02.0); Arc cards do not.
        return 1 if card.pci is not None and card.pci[1] == 0 else 0
    return 0  # NVIDIA


def _vulkan_indices(topology: _Topology, env: Mapping[str, str]) -> Dict[str, int]:
    """The Vulkan device number of each card path, or {} when it cannot be predicted.

    The Vulkan loader sorts devices on Linux by type (discrete before integrated), then
    by PCI address; Mesa's device-select layer then moves the default device (the
    display's GPU, else the boot VGA device) to the front. The boot VGA device stands in
    for the display's GPU here, which it is on nearly every machine.
    """
    if any(env.get(name) for name in _VULKAN_SELECTION_VARIABLES):
        return {}
    ranked = []
    for card in topology.cards:
        kind = _vulkan_kind(card, topology)
        if kind == _UNKNOWN:
            return {}
        if kind is not None and card.pci is not None:
            ranked.append((kind, card.pci, card))
    order = [card for _, _, card in sorted(ranked, key=lambda item: (item[0], item[1]))]
    boot = [card for card in order if card.boot_vga]
    if len(boot) == 1 and not env.get("NODEVICE_SELECT"):
        order.remove(boot[0])
        order.insert(0, boot[0])
    return {card.path: number for number, card in enumerate(order)}


# -- choosing devices --------------------------------------------------------------


def _parse(value: str) -> List[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _distinct(devices: Any) -> List[int]:
    """Checked device indices, each once, in the order given."""
    checked = check_devices(devices)
    assert checked is not None
    return list(dict.fromkeys(checked))


def _describe(topology: _Topology) -> str:
    count = len(topology.gpus)
    listing = "; ".join(gpu.describe() for gpu in topology.gpus)
    return f"this machine has {count} AMD GPU{'s' if count != 1 else ''}: {listing}"


def _require(topology: _Topology, wanted: Sequence[int]) -> None:
    known = {gpu.index for gpu in topology.gpus}
    missing = [d for d in wanted if d not in known]
    if missing:
        names = ", ".join(str(d) for d in missing)
        raise DeviceError(f"no GPU with index {names}: {_describe(topology)}")


def _default_choice(topology: _Topology) -> List[int]:
    # Integrated GPUs crash ROCm (llama.cpp #8618) or drag a split model down to
    # system-memory speed; they are used only when there is nothing else.
    discrete = [gpu.index for gpu in topology.gpus if not gpu.is_integrated]
    return discrete or [gpu.index for gpu in topology.gpus]


def _choose(
    base: Mapping[str, str], devices: Optional[Sequence[int]], topology: _Topology
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
    topology = _scan(sysfs_root)
    return [device for device in (gpu.public() for gpu in topology.gpus) if device is not None]


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
    topology = _scan(sysfs_root)
    if not topology.gpus:
        raise DeviceError(f"no AMD GPU found under {os.path.join(sysfs_root, 'sys', 'class', 'drm')}")
    if device is None:
        chosen = _default_choice(topology)
    else:
        chosen = _distinct([device])
        _require(topology, chosen)
    devices = [gpu.public() for gpu in topology.gpus if gpu.index in chosen]
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
    topology = _scan(sysfs_root)
    hip, chosen = _choose(base, devices, topology)
    env: Dict[str, str] = {}
    if hip is not None:
        env["HIP_VISIBLE_DEVICES"] = hip
    if chosen and "GGML_VK_VISIBLE_DEVICES" not in base:
        numbers = _vulkan_indices(topology, base)
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

    The GPUs are chosen exactly as :func:`device_environment` chooses them for ``env``
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
    topology = _scan(sysfs_root)
    _, chosen = _choose(env or {}, devices, topology)
    if not chosen:
        log.debug("cannot measure GPU memory for this device choice; not checking that the model fits")
        return None
    by_index = {gpu.index: gpu for gpu in topology.gpus}
    gpus = [by_index[i] for i in chosen if i in by_index]
    known = [gpu.public() for gpu in gpus]
    info = _sum(d.memory for d in known if d is not None)
    if info.free >= required_bytes:
        return info
    if len(gpus) < len(chosen) or any(d is None for d in known):
        log.warning("cannot read the memory of every chosen GPU; not checking that the model fits")
        return None
    where = "; ".join(f"{gpu.describe()}, {_size(d.memory.free)} free" for gpu, d in zip(gpus, known) if d)
    message = f"the model needs {_size(required_bytes)} of GPU memory but only {_size(info.free)} is free ({where})"
    if strict:
        raise DeviceError(message)
    log.warning("%s", message)
    return info

"""The AMD GPUs of this machine as sysfs shows them, in HIP's order, and the Vulkan order.

Everything here is read from sysfs (no HTTP, no processes, no ROCm libraries), so it
works before anything is installed and costs a few small file reads per call.

Numbering (the ``index`` of ``llamarocm.GPUDevice``, ``devices=[...]`` and
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

The Vulkan build numbers devices its own way: :func:`vulkan_indices` derives that order
from the same scan, or says it cannot be predicted.

Every sysfs file may be missing, unreadable (containers, cgroups) or hold garbage: such
a GPU is skipped, never a ``ValueError`` or ``OSError``. A GPU whose memory files cannot
be read keeps its place in the numbering, with ``memory`` None.

What the user sees of these GPUs, and which of them a server gets, is decided in
``llamarocm.devices``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

# Below this a "VRAM" size is a BIOS carve-out, not a graphics card's memory.
INTEGRATED_VRAM_LIMIT = 1 << 30  # 1 GiB

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
class Card:
    """A DRM ``cardN`` backed by a PCI device (connectors such as ``card0-DP-1`` are not)."""

    path: str  # the device directory, resolved
    vendor: int
    pci: Optional[PciAddress]
    render_minor: Optional[int]
    boot_vga: bool
    amdgpu: bool


@dataclass
class Gpu:
    """An AMD GPU in HIP order, with memory ``None`` when its files cannot be read."""

    index: int
    path: Optional[str]
    card: Optional[Card]
    gfx_target: Optional[str]
    cpu_cores: int
    memory: Optional[Tuple[int, int, int, int]]  # vram total, vram used, gtt total, gtt used
    name: str
    is_integrated: bool = False

    @property
    def pci_address(self) -> Optional[str]:
        """The PCI address as ``lspci -D`` writes it, None when sysfs does not show it."""
        return _format_pci(self.card.pci if self.card else _pci_address(self.path or ""))


@dataclass
class Topology:
    """What one scan of sysfs found: the AMD GPUs in HIP order, every PCI-backed card."""

    gpus: List[Gpu]
    cards: List[Card]
    root: str


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


def _read_cards(root: str) -> Tuple[List[Card], Dict[int, str]]:
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
    cards: List[Card] = []
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
            Card(
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


def _kfd_gpus(root: str, cards: List[Card], render_paths: Dict[int, str]) -> List[Gpu]:
    nodes_dir = os.path.join(root, "sys", "class", "kfd", "kfd", "topology", "nodes")
    by_path = {card.path: card for card in cards}
    by_pci = {card.pci: card for card in cards if card.pci is not None}
    gpus: List[Gpu] = []
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
            Gpu(
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


def _drm_gpus(cards: List[Card]) -> List[Gpu]:
    # No KFD topology: HIP cannot run, but VRAM and the Vulkan build still can.
    gpus: List[Gpu] = []
    for card in cards:
        if card.vendor != AMD_VENDOR or not card.amdgpu:
            continue
        device_id = _read_int(os.path.join(card.path, "device"))
        gpus.append(
            Gpu(
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


def scan(root: str) -> Topology:
    """The GPUs and cards under ``root``, the directory holding ``sys/`` and ``dev/``."""
    cards, render_paths = _read_cards(root)
    gpus = _kfd_gpus(root, cards, render_paths) or _drm_gpus(cards)
    for gpu in gpus:
        gpu.is_integrated = _is_integrated(gpu.cpu_cores, gpu.gfx_target, gpu.memory[0] if gpu.memory else None)
    return Topology(gpus, cards, root)


# -- Vulkan numbering --------------------------------------------------------------


_UNKNOWN = -1


def _vulkan_kind(card: Card, topology: Topology) -> Optional[int]:
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


def vulkan_indices(topology: Topology, env: Mapping[str, str]) -> Dict[str, int]:
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

"""GPU discovery, memory and device choice, against fake sysfs trees built in tmp_path.

Each tree has what amdgpu and the KFD really expose: ``sys/devices/.../<pci address>``
with the memory files, ``sys/class/drm/cardN`` and ``renderDN`` whose ``device`` links
resolve to it, connector entries beside them, the KFD topology nodes (a CPU node
first), and the render nodes in ``dev/dri``.
"""

from __future__ import annotations

import doctest
import inspect
import logging
from pathlib import Path
from typing import Dict, Optional

import pytest

import llamarocm.devices as devices_module
from llamarocm.devices import (
    GIB,
    MIB,
    GPUDevice,
    VRAMInfo,
    check_fits,
    device_environment,
    list_devices,
    vram_info,
)
from llamarocm.errors import DeviceError, LlamaRocmError

pytestmark = pytest.mark.timeout(10)

RX_7800_XT = 17163091968  # what amdgpu reports for a 16 GiB Navi 32 card
GFX1101 = 110001  # KFD's gfx_target_version for gfx1101 (RX 7800 XT)
GFX1100 = 110000
GFX1036 = 100306  # Raphael iGPU (Ryzen 7000)
GFX1103 = 110003  # Phoenix iGPU (Ryzen 7040)


class FakeSysfs:
    """Builds a sysfs + /dev tree the way amdgpu and amdkfd lay it out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.drm = root / "sys" / "class" / "drm"
        self.nodes = root / "sys" / "class" / "kfd" / "kfd" / "topology" / "nodes"
        self.drm.mkdir(parents=True)
        (self.drm / "version").write_text("drm 1.1.0 20060810\n")
        (root / "dev" / "dri").mkdir(parents=True)

    def cpu_node(self, node: int = 0) -> None:
        path = self.nodes / str(node)
        path.mkdir(parents=True)
        (path / "gpu_id").write_text("0\n")
        (path / "properties").write_text("cpu_cores_count 16\nsimd_count 0\nmem_banks_count 1\n")

    def gpu(
        self,
        *,
        card: int,
        render: int,
        pci: str,
        vendor: int = 0x1002,
        device_id: int = 0x747E,
        vram_total: Optional[int] = RX_7800_XT,
        vram_used: Optional[int] = GIB,
        gtt_total: int = 32 * GIB,
        gtt_used: int = 100 * MIB,
        node: Optional[int] = None,
        gfx_target_version: int = GFX1101,
        cpu_cores: int = 0,
        boot_vga: Optional[bool] = None,
        render_node_in_dev: bool = True,
        extra_files: Optional[Dict[str, str]] = None,
    ) -> Path:
        """One PCI GPU, its DRM entries and (with ``node``) its KFD topology node."""
        device = self.root / "sys" / "devices" / "pci0000:00" / pci
        device.mkdir(parents=True)
        (device / "vendor").write_text(f"0x{vendor:04x}\n")
        (device / "device").write_text(f"0x{device_id:04x}\n")
        if vendor == 0x1002:
            driver = self.root / "sys" / "bus" / "pci" / "drivers" / "amdgpu"
            driver.mkdir(parents=True, exist_ok=True)
            (device / "driver").symlink_to(driver)
            for name, value in (
                ("mem_info_vram_total", vram_total),
                ("mem_info_vram_used", vram_used),
                ("mem_info_gtt_total", gtt_total),
                ("mem_info_gtt_used", gtt_used),
            ):
                if value is not None:
                    (device / name).write_text(f"{value}\n")
        if boot_vga is not None:
            (device / "boot_vga").write_text("1\n" if boot_vga else "0\n")
        for name, text in (extra_files or {}).items():
            (device / name).write_text(text)
        card_dir = self.drm / f"card{card}"
        card_dir.mkdir()
        (card_dir / "device").symlink_to(device)
        connector = self.drm / f"card{card}-DP-1"
        connector.mkdir()
        (connector / "device").symlink_to(card_dir)  # connectors point at their card
        render_dir = self.drm / f"renderD{render}"
        render_dir.mkdir()
        (render_dir / "device").symlink_to(device)
        if render_node_in_dev:
            (self.root / "dev" / "dri" / f"renderD{render}").write_text("")
        if node is not None:
            domain, bus, dev_fn = pci.split(":")
            dev, fn = dev_fn.split(".")
            location = int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn)
            path = self.nodes / str(node)
            path.mkdir(parents=True)
            (path / "gpu_id").write_text(f"{40000 + node}\n")
            (path / "properties").write_text(
                f"cpu_cores_count {cpu_cores}\n"
                "simd_count 240\n"
                "mem_banks_count 1\n"
                f"gfx_target_version {gfx_target_version}\n"
                f"vendor_id {vendor}\n"
                f"device_id {device_id}\n"
                f"location_id {location}\n"
                f"domain {int(domain, 16)}\n"
                f"drm_render_minor {render}\n"
                "local_mem_size 0\n"
            )
        return device

    def apu(self, *, card: int, render: int, pci: str, node: Optional[int], **kwargs) -> Path:
        """A Ryzen 7000 iGPU: a 512 MiB carve-out and a 30 GiB GTT pool."""
        settings = dict(
            device_id=0x164E,
            vram_total=512 * MIB,
            vram_used=200 * MIB,
            gtt_total=30 * GIB,
            gtt_used=GIB,
            gfx_target_version=GFX1036,
        )
        settings.update(kwargs)
        return self.gpu(card=card, render=render, pci=pci, node=node, **settings)


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "root")


@pytest.fixture(autouse=True)
def _no_vulkan_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    # These would make GGML_VK_VISIBLE_DEVICES unpredictable (tested explicitly below).
    for name in ("DRI_PRIME", "MESA_VK_DEVICE_SELECT", "VK_LOADER_DEVICE_SELECT", "NODEVICE_SELECT"):
        monkeypatch.delenv(name, raising=False)


def one_discrete(fake: FakeSysfs) -> str:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1, boot_vga=True)
    return str(fake.root)


def discrete_and_integrated(fake: FakeSysfs, *, boot_vga_on_igpu: bool = False) -> str:
    # The awkward order: KFD lists the iGPU first, so HIP device 0 is the iGPU, while
    # the dGPU is card1 but sits on the lower PCI bus.
    fake.cpu_node()
    fake.apu(card=0, render=128, pci="0000:10:00.0", node=1, boot_vga=boot_vga_on_igpu)
    fake.gpu(card=1, render=129, pci="0000:03:00.0", node=2, boot_vga=not boot_vga_on_igpu)
    return str(fake.root)


def two_discrete(fake: FakeSysfs) -> str:
    # KFD order differs from PCI order: HIP 0 is the card on bus 0b.
    fake.cpu_node()
    fake.gpu(card=1, render=129, pci="0000:0b:00.0", node=1, gfx_target_version=GFX1100, vram_total=24 * GIB)
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=2, boot_vga=True)
    return str(fake.root)


# -- one discrete GPU ----------------------------------------------------------------


def test_one_discrete_gpu(fake: FakeSysfs) -> None:
    root = one_discrete(fake)
    (gpu,) = list_devices(sysfs_root=root)
    assert gpu == GPUDevice(
        index=0,
        name="gfx1101",
        gfx_target="gfx1101",
        is_integrated=False,
        vram_total=RX_7800_XT,
        vram_used=GIB,
        gtt_total=32 * GIB,
        gtt_used=100 * MIB,
        pci_address="0000:03:00.0",
    )
    expected = VRAMInfo(RX_7800_XT, GIB, RX_7800_XT - GIB)
    assert gpu.memory == expected  # a discrete GPU's GTT is not its memory
    assert vram_info(sysfs_root=root) == expected
    assert vram_info(0, sysfs_root=root) == expected
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": "0"}
    assert device_environment({}, [0], sysfs_root=root) == {
        "HIP_VISIBLE_DEVICES": "0",
        "GGML_VK_VISIBLE_DEVICES": "0",
    }


def test_a_missing_index_lists_what_exists(fake: FakeSysfs) -> None:
    root = one_discrete(fake)
    with pytest.raises(DeviceError) as info:
        device_environment({}, [1], sysfs_root=root)
    message = str(info.value)
    assert "no GPU with index 1" in message
    assert "this machine has 1 AMD GPU: 0: gfx1101 (discrete, 16.0 GiB VRAM)" in message
    with pytest.raises(DeviceError, match="no GPU with index 1"):
        vram_info(1, sysfs_root=root)
    assert isinstance(info.value, LlamaRocmError)


def test_product_name_is_preferred_when_the_kernel_has_it(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1, extra_files={"product_name": "Radeon PRO W7800\n"})
    (gpu,) = list_devices(sysfs_root=str(fake.root))
    assert gpu.name == "Radeon PRO W7800" and gpu.gfx_target == "gfx1101"


def test_used_above_total_gives_zero_free(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1, vram_total=8 * GIB, vram_used=9 * GIB)
    assert vram_info(sysfs_root=str(fake.root)) == VRAMInfo(8 * GIB, 9 * GIB, 0)


# -- discrete + integrated -----------------------------------------------------------


def test_integrated_gpu_is_detected_and_reported_with_its_gtt(fake: FakeSysfs) -> None:
    root = discrete_and_integrated(fake)
    igpu, dgpu = list_devices(sysfs_root=root)
    assert (igpu.index, igpu.gfx_target, igpu.is_integrated, igpu.pci_address) == (0, "gfx1036", True, "0000:10:00.0")
    assert (dgpu.index, dgpu.gfx_target, dgpu.is_integrated, dgpu.pci_address) == (1, "gfx1101", False, "0000:03:00.0")
    assert igpu.vram_total == 512 * MIB  # the kernel's figure, kept as is
    honest = VRAMInfo(512 * MIB + 30 * GIB, 200 * MIB + GIB, 512 * MIB + 30 * GIB - 200 * MIB - GIB)
    assert igpu.memory == honest
    assert vram_info(0, sysfs_root=root) == honest
    # With no device named: the discrete GPU only, the one the server will use.
    assert vram_info(sysfs_root=root) == VRAMInfo(RX_7800_XT, GIB, RX_7800_XT - GIB)


def test_integrated_gpu_is_hidden_by_default(fake: FakeSysfs) -> None:
    root = discrete_and_integrated(fake)
    # HIP numbers the iGPU 0; Vulkan puts the discrete GPU first.
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "1", "GGML_VK_VISIBLE_DEVICES": "0"}


def test_vulkan_numbering_follows_the_boot_display_gpu(fake: FakeSysfs) -> None:
    # Mesa's device-select layer moves the boot VGA device to the front of the list.
    root = discrete_and_integrated(fake, boot_vga_on_igpu=True)
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "1", "GGML_VK_VISIBLE_DEVICES": "1"}
    assert device_environment({"NODEVICE_SELECT": "1"}, sysfs_root=root)["GGML_VK_VISIBLE_DEVICES"] == "0"


def test_integrated_gpu_can_still_be_asked_for(fake: FakeSysfs) -> None:
    root = discrete_and_integrated(fake)
    assert device_environment({}, [0], sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": "1"}
    assert device_environment({}, [1, 0], sysfs_root=root) == {
        "HIP_VISIBLE_DEVICES": "1,0",
        "GGML_VK_VISIBLE_DEVICES": "0,1",
    }


def test_integrated_only_machine_uses_its_apu(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.apu(card=0, render=128, pci="0000:c4:00.0", node=1, gfx_target_version=GFX1103, boot_vga=True)
    root = str(fake.root)
    (gpu,) = list_devices(sysfs_root=root)
    assert gpu.is_integrated and gpu.gfx_target == "gfx1103"
    assert vram_info(sysfs_root=root) == gpu.memory
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": "0"}


def test_apu_with_a_large_carve_out_is_known_by_its_gfx_target(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.apu(card=0, render=128, pci="0000:c4:00.0", node=1, vram_total=8 * GIB, gfx_target_version=GFX1103)
    assert list_devices(sysfs_root=str(fake.root))[0].is_integrated


def test_apu_node_with_cpu_cores_is_integrated_whatever_its_target(fake: FakeSysfs) -> None:
    # Older kernels (IOMMUv2 path) merge an APU's GPU into the CPU node.
    fake.apu(card=0, render=128, pci="0000:00:01.0", node=0, vram_total=2 * GIB, gfx_target_version=90012, cpu_cores=8)
    (gpu,) = list_devices(sysfs_root=str(fake.root))
    assert gpu.is_integrated and gpu.gfx_target == "gfx90c"


def test_without_kfd_an_apu_is_known_by_its_small_carve_out(fake: FakeSysfs) -> None:
    # No ROCm kernel support: DRM card order, and only the memory rule is left.
    fake.apu(card=0, render=128, pci="0000:10:00.0", node=None)
    fake.gpu(card=1, render=129, pci="0000:03:00.0", node=None, boot_vga=True)
    root = str(fake.root)
    igpu, dgpu = list_devices(sysfs_root=root)
    assert (igpu.index, igpu.is_integrated, igpu.gfx_target) == (0, True, None)
    assert (dgpu.index, dgpu.is_integrated, dgpu.name) == (1, False, "AMD GPU [1002:747e]")
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "1", "GGML_VK_VISIBLE_DEVICES": "0"}


# -- two discrete GPUs ---------------------------------------------------------------


def test_two_discrete_gpus_are_both_used(fake: FakeSysfs) -> None:
    root = two_discrete(fake)
    first, second = list_devices(sysfs_root=root)
    assert (first.index, first.gfx_target, first.pci_address) == (0, "gfx1100", "0000:0b:00.0")
    assert (second.index, second.gfx_target, second.pci_address) == (1, "gfx1101", "0000:03:00.0")
    total = 24 * GIB + RX_7800_XT
    assert vram_info(sysfs_root=root) == VRAMInfo(total, 2 * GIB, total - 2 * GIB)
    assert vram_info(0, sysfs_root=root).total == 24 * GIB
    # HIP follows the KFD nodes; Vulkan the PCI addresses.
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0,1", "GGML_VK_VISIBLE_DEVICES": "1,0"}
    assert device_environment({}, [1], sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "1", "GGML_VK_VISIBLE_DEVICES": "0"}


def test_missing_index_on_two_gpus(fake: FakeSysfs) -> None:
    root = two_discrete(fake)
    with pytest.raises(DeviceError) as info:
        device_environment({}, [0, 2, 5], sysfs_root=root)
    assert "no GPU with index 2, 5: this machine has 2 AMD GPUs: 0: gfx1100" in str(info.value)
    assert "1: gfx1101 (discrete, 16.0 GiB VRAM)" in str(info.value)


def test_kfd_nodes_are_ordered_numerically(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=10, gfx_target_version=GFX1101)
    fake.gpu(card=1, render=129, pci="0000:0b:00.0", node=2, gfx_target_version=GFX1100)
    assert [g.gfx_target for g in list_devices(sysfs_root=str(fake.root))] == ["gfx1100", "gfx1101"]


def test_a_gpu_whose_render_node_is_not_in_dev_is_not_numbered(fake: FakeSysfs) -> None:
    # A container given only renderD128: ROCm skips the other GPU and HIP renumbers.
    fake.cpu_node()
    fake.gpu(card=1, render=129, pci="0000:0b:00.0", node=1, render_node_in_dev=False)
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=2)
    root = str(fake.root)
    (gpu,) = list_devices(sysfs_root=root)
    assert (gpu.index, gpu.pci_address) == (0, "0000:03:00.0")
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": "0"}


def test_kfd_node_is_tied_to_its_card_by_pci_address_without_a_render_entry(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:0b:00.0", node=1, gfx_target_version=GFX1100, vram_total=24 * GIB)
    fake.gpu(card=1, render=129, pci="0000:03:00.0", node=2, boot_vga=True)
    for render in (128, 129):  # no renderD entries in sys/class/drm: location_id is used
        (fake.drm / f"renderD{render}" / "device").unlink()
        (fake.drm / f"renderD{render}").rmdir()
    root = str(fake.root)
    first, second = list_devices(sysfs_root=root)
    assert (first.pci_address, first.vram_total) == ("0000:0b:00.0", 24 * GIB)
    assert (second.pci_address, second.vram_total) == ("0000:03:00.0", RX_7800_XT)
    # Which render node each card has is unknown, so Vulkan numbers are not guessed.
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0,1"}


# -- other vendors -------------------------------------------------------------------


def test_nvidia_gpu_is_ignored_but_counted_by_vulkan(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:01:00.0", vendor=0x10DE, device_id=0x2684, boot_vga=True)
    fake.gpu(card=1, render=129, pci="0000:03:00.0", node=1)
    root = str(fake.root)
    (gpu,) = list_devices(sysfs_root=root)
    assert gpu.pci_address == "0000:03:00.0" and gpu.index == 0
    assert vram_info(sysfs_root=root).total == RX_7800_XT
    # The NVIDIA card is Vulkan device 0, so the Radeon is 1.
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": "1"}


def test_intel_igpu_and_bmc_adapter_in_the_vulkan_order(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:00:02.0", vendor=0x8086, device_id=0xA780)  # integrated
    fake.gpu(card=1, render=129, pci="0000:02:00.0", vendor=0x1A03, device_id=0x2000)  # ASPEED: no Vulkan
    fake.gpu(card=2, render=130, pci="0000:03:00.0", node=1, boot_vga=True)
    assert device_environment({}, sysfs_root=str(fake.root))["GGML_VK_VISIBLE_DEVICES"] == "0"


def test_nvidia_only_machine_is_no_amd_gpu(fake: FakeSysfs) -> None:
    fake.gpu(card=0, render=128, pci="0000:01:00.0", vendor=0x10DE, device_id=0x2684, boot_vga=True)
    root = str(fake.root)
    assert list_devices(sysfs_root=root) == []
    with pytest.raises(DeviceError, match="no AMD GPU"):
        vram_info(sysfs_root=root)
    assert device_environment({}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "0"}


# -- no GPU at all -------------------------------------------------------------------


@pytest.mark.parametrize("make_root", ["empty", "missing"])
def test_no_gpu_at_all(tmp_path: Path, make_root: str) -> None:
    root = tmp_path / "root"
    if make_root == "empty":
        root.mkdir()
    assert list_devices(sysfs_root=str(root)) == []
    with pytest.raises(DeviceError, match="no AMD GPU found under"):
        vram_info(sysfs_root=str(root))
    with pytest.raises(DeviceError, match="no AMD GPU"):
        vram_info(0, sysfs_root=str(root))
    # The old default, and no Vulkan variable: index 0 of a GPU-less Vulkan list is
    # the CPU rasterizer, not a GPU.
    assert device_environment({}, sysfs_root=str(root)) == {"HIP_VISIBLE_DEVICES": "0"}
    assert device_environment({}, [3, 1], sysfs_root=str(root)) == {"HIP_VISIBLE_DEVICES": "3,1"}
    assert device_environment({"HIP_VISIBLE_DEVICES": "1,2"}, [2, 3], sysfs_root=str(root)) == {
        "HIP_VISIBLE_DEVICES": "2"
    }
    assert check_fits(100 * GIB, sysfs_root=str(root)) is None


# -- garbage -------------------------------------------------------------------------


def test_garbage_memory_files_leave_the_gpu_out_without_renumbering(fake: FakeSysfs) -> None:
    fake.cpu_node()
    bad = fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1, vram_total=None)
    (bad / "mem_info_vram_total").write_bytes(b"\xff\xfe garbage\x00")
    fake.gpu(card=1, render=129, pci="0000:0b:00.0", node=2, gfx_target_version=GFX1100)
    root = str(fake.root)
    (gpu,) = list_devices(sysfs_root=root)
    assert (gpu.index, gpu.gfx_target) == (1, "gfx1100")
    with pytest.raises(DeviceError, match="the memory of GPU 0 cannot be read"):
        vram_info(0, sysfs_root=root)
    assert vram_info(sysfs_root=root).total == RX_7800_XT  # the readable one
    # It still exists: it can be chosen and is chosen by default.
    assert device_environment({}, [0], sysfs_root=root)["HIP_VISIBLE_DEVICES"] == "0"
    assert device_environment({}, sysfs_root=root)["HIP_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize(
    "file, content",
    [
        ("gpu_id", "not a number\n"),
        ("gpu_id", ""),
        ("properties", "\x00\x01\x02 binary junk"),
        ("properties", "simd_count lots\ndrm_render_minor 128\n"),
        ("properties", "simd_count -5\ndrm_render_minor 128\n"),
    ],
)
def test_garbage_kfd_node_is_skipped(fake: FakeSysfs, file: str, content: str) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1)
    fake.gpu(card=1, render=129, pci="0000:0b:00.0", node=2, gfx_target_version=GFX1100)
    (fake.nodes / "1" / file).write_text(content)
    (gpu,) = list_devices(sysfs_root=str(fake.root))
    assert (gpu.index, gpu.gfx_target) == (0, "gfx1100")


def test_unreadable_files_and_odd_entries_never_raise(fake: FakeSysfs) -> None:
    fake.cpu_node()
    device = fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1, vram_used=None)
    (device / "mem_info_vram_used").mkdir()  # reading a directory raises OSError
    (device / "vendor").write_text("0xzzzz\n")
    (fake.nodes / "junk").mkdir()
    (fake.nodes / "7").mkdir()  # a node with no files at all
    (fake.drm / "card9").mkdir()  # a card without a device link
    (fake.drm / "renderD200").mkdir()
    (fake.drm / "card3").symlink_to(fake.root / "nowhere")  # dangling
    root = str(fake.root)
    assert list_devices(sysfs_root=root) == []  # its memory cannot be read
    with pytest.raises(DeviceError, match="cannot be read"):
        vram_info(sysfs_root=root)
    assert device_environment({}, sysfs_root=root)["HIP_VISIBLE_DEVICES"] == "0"


def test_gtt_files_are_optional(fake: FakeSysfs) -> None:
    fake.cpu_node()
    device = fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1)
    (device / "mem_info_gtt_total").unlink()
    (device / "mem_info_gtt_used").write_text("garbage\n")
    (gpu,) = list_devices(sysfs_root=str(fake.root))
    assert (gpu.gtt_total, gpu.gtt_used, gpu.vram_total) == (0, 0, RX_7800_XT)


# -- the user's variables ------------------------------------------------------------


def test_users_hip_variable_is_kept_and_mirrored_for_vulkan(fake: FakeSysfs) -> None:
    root = discrete_and_integrated(fake)
    assert device_environment({"HIP_VISIBLE_DEVICES": "0"}, sysfs_root=root) == {
        "HIP_VISIBLE_DEVICES": "0",
        "GGML_VK_VISIBLE_DEVICES": "1",
    }
    # A value that names no known GPU is still the user's; Vulkan is then left alone.
    assert device_environment({"HIP_VISIBLE_DEVICES": "GPU-abc"}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "GPU-abc"}
    assert device_environment({"HIP_VISIBLE_DEVICES": "7"}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "7"}


def test_users_hip_variable_is_filtered_of_integrated_gpus(fake: FakeSysfs) -> None:
    root = discrete_and_integrated(fake)
    gpus = list_devices(sysfs_root=root)
    discrete = [g.index for g in gpus if not g.is_integrated]
    integrated = [g.index for g in gpus if g.is_integrated]
    assert discrete and integrated
    both = ",".join(str(i) for i in sorted(discrete + integrated))
    env = device_environment({"HIP_VISIBLE_DEVICES": both}, sysfs_root=root)
    assert env["HIP_VISIBLE_DEVICES"] == ",".join(map(str, discrete))
    # The integrated GPU alone is the user's explicit choice: kept.
    alone = device_environment({"HIP_VISIBLE_DEVICES": str(integrated[0])}, sysfs_root=root)
    assert alone["HIP_VISIBLE_DEVICES"] == str(integrated[0])


def test_users_hip_variable_limits_devices(fake: FakeSysfs) -> None:
    root = two_discrete(fake)
    assert device_environment({"HIP_VISIBLE_DEVICES": "1"}, [0, 1], sysfs_root=root) == {
        "HIP_VISIBLE_DEVICES": "1",
        "GGML_VK_VISIBLE_DEVICES": "0",
    }
    with pytest.raises(DeviceError, match=r"devices \[0\] are all outside HIP_VISIBLE_DEVICES='1'"):
        device_environment({"HIP_VISIBLE_DEVICES": "1"}, [0], sysfs_root=root)


def test_users_vulkan_variable_is_never_touched(fake: FakeSysfs) -> None:
    root = discrete_and_integrated(fake)
    assert device_environment({"GGML_VK_VISIBLE_DEVICES": "1"}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "1"}


def test_rocr_visible_devices_renumbers_so_nothing_is_checked(fake: FakeSysfs) -> None:
    root = discrete_and_integrated(fake)
    assert device_environment({"ROCR_VISIBLE_DEVICES": "1"}, sysfs_root=root) == {}
    assert device_environment({"ROCR_VISIBLE_DEVICES": "0,1"}, [5], sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "5"}
    assert check_fits(GIB, env={"ROCR_VISIBLE_DEVICES": "1"}, sysfs_root=root) is None


@pytest.mark.parametrize("variable", ["DRI_PRIME", "MESA_VK_DEVICE_SELECT", "VK_LOADER_DEVICE_SELECT"])
def test_vulkan_device_selection_variables_stop_the_mirroring(fake: FakeSysfs, variable: str) -> None:
    root = discrete_and_integrated(fake)
    assert device_environment({variable: "1"}, sysfs_root=root) == {"HIP_VISIBLE_DEVICES": "1"}


@pytest.mark.parametrize(
    "devices, error",
    [
        ("0", TypeError),
        (b"0", TypeError),
        ([True], TypeError),
        ([0.0], TypeError),
        ([], ValueError),
        ([-1], ValueError),
    ],
)
def test_bad_devices_argument(fake: FakeSysfs, devices: object, error: type) -> None:
    root = one_discrete(fake)
    with pytest.raises(error):
        device_environment({}, devices, sysfs_root=root)  # type: ignore[arg-type]


def test_repeated_devices_count_once(fake: FakeSysfs) -> None:
    root = two_discrete(fake)
    assert device_environment({}, [1, 1, 0], sysfs_root=root)["HIP_VISIBLE_DEVICES"] == "1,0"


def test_the_servers_call_still_works() -> None:
    # server.py calls device_environment(base_env, devices) positionally.
    params = inspect.signature(device_environment).parameters
    assert [p.kind for p in params.values()][:2] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
    assert params["sysfs_root"].kind is inspect.Parameter.KEYWORD_ONLY and params["sysfs_root"].default == "/"


# -- check_fits ----------------------------------------------------------------------


def test_check_fits_passes_and_returns_what_it_counted(fake: FakeSysfs) -> None:
    root = one_discrete(fake)
    assert check_fits(10 * GIB, sysfs_root=root) == VRAMInfo(RX_7800_XT, GIB, RX_7800_XT - GIB)
    assert check_fits(0, sysfs_root=root) is not None


def test_check_fits_refuses_a_model_too_big(fake: FakeSysfs) -> None:
    root = one_discrete(fake)
    with pytest.raises(DeviceError) as info:
        check_fits(20 * GIB, sysfs_root=root)
    message = str(info.value)
    assert "the model needs 20.0 GiB of GPU memory but only 15.0 GiB is free" in message
    assert "0: gfx1101 (discrete, 16.0 GiB VRAM), 15.0 GiB free" in message


def test_check_fits_not_strict_warns(fake: FakeSysfs, caplog: pytest.LogCaptureFixture) -> None:
    root = one_discrete(fake)
    with caplog.at_level(logging.WARNING, logger="llamarocm"):
        info = check_fits(20 * GIB, strict=False, sysfs_root=root)
    assert info is not None and info.free == RX_7800_XT - GIB
    assert "the model needs 20.0 GiB" in caplog.text


def test_check_fits_sums_the_chosen_gpus_only(fake: FakeSysfs) -> None:
    root = two_discrete(fake)
    assert check_fits(35 * GIB, sysfs_root=root).total == 24 * GIB + RX_7800_XT  # type: ignore[union-attr]
    with pytest.raises(DeviceError, match="only 15.0 GiB is free"):
        check_fits(20 * GIB, [1], sysfs_root=root)
    with pytest.raises(DeviceError, match="only 23.0 GiB is free"):
        check_fits(30 * GIB, env={"HIP_VISIBLE_DEVICES": "0"}, sysfs_root=root)
    with pytest.raises(DeviceError, match="no GPU with index 4"):
        check_fits(GIB, [4], sysfs_root=root)


def test_check_fits_counts_an_apus_gtt(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.apu(card=0, render=128, pci="0000:c4:00.0", node=1, gfx_target_version=GFX1103)
    assert check_fits(20 * GIB, sysfs_root=str(fake.root)) is not None  # far more than the 512 MiB carve-out


def test_check_fits_does_not_block_on_unreadable_memory(fake: FakeSysfs) -> None:
    fake.cpu_node()
    fake.gpu(card=0, render=128, pci="0000:03:00.0", node=1, vram_total=None)
    fake.gpu(card=1, render=129, pci="0000:0b:00.0", node=2)
    root = str(fake.root)
    assert check_fits(GIB, sysfs_root=root) is not None  # the readable GPU alone is enough
    assert check_fits(20 * GIB, sysfs_root=root) is None  # cannot tell


@pytest.mark.parametrize("required, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_check_fits_validates_its_argument(required: object, error: type) -> None:
    with pytest.raises(error):
        check_fits(required, sysfs_root="/nonexistent")  # type: ignore[arg-type]


def test_doctests() -> None:
    result = doctest.testmod(devices_module)
    assert result.failed == 0 and result.attempted > 0

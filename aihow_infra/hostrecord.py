"""A host's recording: what ``host.check`` and the acceleration choice read from sysfs, /proc and
/dev, written as one JSON file (``aihow host.record FILE``), and laid out again as those folders
under a root of its own (``materialize``), so a recorded host is checked by the very code that
checks the live one, with the same verdicts.

The format is the one of shared/fixtures/gpu-host-h200-live.json (a real NVIDIA H200 host):

- ``pci_devices``: every PCI function by address, with its ids (``vendor``, ``device``,
  ``subsystem_vendor``, ``subsystem_device``, hex strings as sysfs writes them), ``class``,
  ``driver`` (None when unbound), ``driver_override``, ``iommu_group`` (None without an IOMMU),
  ``reset_method`` (None when the function has none), ``numa_node``, ``enable``, ``boot_vga``;
- ``iommu_groups``: each group's member addresses; ``dev_vfio``: the names in /dev/vfio (None
  when it is missing); ``dev_kvm``: whether /dev/kvm exists;
- ``modules_loaded``: /proc/modules' names; ``sys_module_kvm``: the names under /sys/module that
  contain kvm, vfio or iommu (a built-in module, kvm_pvm say, shows only there);
- ``hugepages``: ``nr_hugepages`` by page size in KiB; ``cpu_virt_flags``: vmx, svm and
  hypervisor as /proc/cpuinfo has them; ``proc_cmdline``; ``uname``; ``about``: who recorded it;
- ``boot_vfio``: the boot configuration that binds devices to vfio-pci, by path: the lines of
  modprobe.d files that name vfio, and driverctl's overrides (/etc/driverctl.d).

A recording made before ``reset_method`` was a device attribute keeps it in ``gpu_extra``; it is
read from there too.
"""

from __future__ import annotations

import json
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aihow_infra.errors import AihowError
from aihow_infra.files import atomic_write
from aihow_infra.host import MODPROBE_FOLDERS

# The attributes of a PCI function a recording keeps (files of /sys/bus/pci/devices/<address>/).
DEVICE_ATTRIBUTES = ("vendor", "device", "class", "subsystem_vendor", "subsystem_device", "numa_node", "enable",
                     "boot_vga", "driver_override", "reset_method", "revision")
MODULE_NAMES = re.compile(r"kvm|vfio|iommu")
CPU_FLAGS = ("vmx", "svm", "hypervisor")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    return Path(os.readlink(path)).name if path.is_symlink() else None


def _boot_vfio(root: Path) -> dict[str, str]:
    """Boot-time vfio-pci bindings: modprobe.d lines naming vfio, driverctl overrides."""
    found = {}
    for folder in MODPROBE_FOLDERS:
        for conf in sorted((root / folder.lstrip("/")).glob("*.conf")):
            lines = [line for line in (_read(conf) or "").splitlines() if "vfio" in line]
            if lines:
                found[f"{folder}/{conf.name}"] = "\n".join(lines)
    for override in sorted((root / "etc/driverctl.d").glob("pci-*")):
        found[f"/etc/driverctl.d/{override.name}"] = _read(override) or ""
    return found


def record_host(root: Path = Path("/"), about: str = "") -> dict[str, Any]:
    """The recording of the host whose /sys, /proc and /dev are under ``root`` (this machine
    for "/"): a JSON-ready dict in the format above. Reads only; needs no privileges."""
    devices_dir = root / "sys/bus/pci/devices"
    devices: dict[str, dict[str, Any]] = {}
    for dev in sorted(devices_dir.iterdir()) if devices_dir.is_dir() else []:
        attrs: dict[str, Any] = {key: _read(dev / key) for key in DEVICE_ATTRIBUTES}
        attrs["driver"] = _link_name(dev / "driver")
        attrs["iommu_group"] = _link_name(dev / "iommu_group")
        devices[dev.name] = attrs
    groups_dir = root / "sys/kernel/iommu_groups"
    groups = {group.name: sorted(p.name for p in (group / "devices").iterdir())
              for group in sorted(groups_dir.iterdir(), key=lambda p: (len(p.name), p.name))
              if (group / "devices").is_dir()} if groups_dir.is_dir() else {}
    vfio_dir = root / "dev/vfio"
    modules = sorted(line.split()[0] for line in (_read(root / "proc/modules") or "").splitlines() if line.strip())
    module_dir = root / "sys/module"
    pages_dir = root / "sys/kernel/mm/hugepages"
    hugepages = {p.name.removeprefix("hugepages-").removesuffix("kB"): int(_read(p / "nr_hugepages") or 0)
                 for p in sorted(pages_dir.iterdir())} if pages_dir.is_dir() else {}
    flags = set((_read(root / "proc/cpuinfo") or "").split())
    return {
        "about": about or f"recorded by aihow host.record on {platform.node()} at "
                          f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "pci_devices": devices,
        "iommu_groups": groups,
        "dev_vfio": sorted(p.name for p in vfio_dir.iterdir()) if vfio_dir.is_dir() else None,
        "dev_kvm": (root / "dev/kvm").exists(),
        "modules_loaded": modules,
        "sys_module_kvm": sorted(p.name for p in module_dir.iterdir() if MODULE_NAMES.search(p.name))
        if module_dir.is_dir() else [],
        "hugepages": hugepages,
        "cpu_virt_flags": " ".join(f for f in CPU_FLAGS if f in flags),
        # The kernel's own parameters: what follows "--" is init's, which may carry secrets.
        "proc_cmdline": (_read(root / "proc/cmdline") or "").split(" -- ")[0],
        "uname": " ".join(os.uname()) if root == Path("/") else "",
        "boot_vfio": _boot_vfio(root),
    }


def materialize(recording: dict[str, Any], root: Path) -> Path:
    """Lay a recording out as /sys, /proc and /dev under ``root`` (an empty folder), as the live
    host has them for every fact ``host.check`` and the acceleration choice read; returns ``root``."""
    devices = root / "sys/bus/pci/devices"
    drivers = root / "sys/bus/pci/drivers"
    groups = root / "sys/kernel/iommu_groups"
    for folder in (devices, drivers, groups, root / "proc", root / "dev", root / "sys/module"):
        folder.mkdir(parents=True, exist_ok=True)
    extra = recording.get("gpu_extra") or {}
    for address, attrs in recording.get("pci_devices", {}).items():
        dev = devices / address
        dev.mkdir()
        values = {"reset_method": (extra.get(address) or {}).get("reset_method"), **attrs}
        for key in DEVICE_ATTRIBUTES:
            if values.get(key) is not None:
                (dev / key).write_text(f"{values[key]}\n")
        if attrs.get("driver"):
            (drivers / attrs["driver"]).mkdir(exist_ok=True)
            (dev / "driver").symlink_to(f"../../drivers/{attrs['driver']}")
        if attrs.get("iommu_group") is not None:
            (groups / str(attrs["iommu_group"]) / "devices").mkdir(parents=True, exist_ok=True)
            (groups / str(attrs["iommu_group"]) / "devices" / address).symlink_to(dev)
            (dev / "iommu_group").symlink_to(groups / str(attrs["iommu_group"]))
    for group in recording.get("iommu_groups", {}):
        (groups / str(group) / "devices").mkdir(parents=True, exist_ok=True)
    if recording.get("dev_kvm"):
        (root / "dev/kvm").touch()
    if recording.get("dev_vfio") is not None:
        (root / "dev/vfio").mkdir()
        for name in recording["dev_vfio"]:
            (root / "dev/vfio" / name).touch()
    modules = recording.get("modules_loaded", [])
    (root / "proc/modules").write_text("".join(f"{m} 16384 0 - Live 0x0\n" for m in modules))
    for name in {*modules, *recording.get("sys_module_kvm", [])}:
        (root / "sys/module" / name).mkdir(exist_ok=True)
    for kib, pages in (recording.get("hugepages") or {}).items():
        folder = root / f"sys/kernel/mm/hugepages/hugepages-{kib}kB"
        folder.mkdir(parents=True)
        (folder / "nr_hugepages").write_text(f"{pages}\n")
    (root / "proc/cpuinfo").write_text(f"flags\t\t: {recording.get('cpu_virt_flags', '')}\n")
    (root / "proc/cmdline").write_text(f"{recording.get('proc_cmdline', '')}\n")
    for path, text in (recording.get("boot_vfio") or {}).items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(f"{text}\n")
    return root


def load_recording(path: Path) -> dict[str, Any]:
    """A recorded host's JSON; ``AihowError`` naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AihowError(f"--recorded: {path} does not exist; allowed: a recorded host's JSON file") from None
    except IsADirectoryError:
        raise AihowError(f"--recorded: {path} is a folder; allowed: a recorded host's JSON file "
                         "(a folder laid out as /sys and /proc is --sysfs-root)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AihowError(f"--recorded: {path} is not JSON ({exc}); allowed: a recorded host's JSON file") from None
    if not isinstance(data, dict) or not isinstance(data.get("pci_devices"), dict):
        raise AihowError(f"--recorded: {path} has no 'pci_devices' table; allowed: a recorded host's JSON file "
                         "(`aihow host.record FILE` writes one)")
    return data


def write_recording(recording: dict[str, Any], path: Path) -> None:
    """The recording as indented JSON at ``path``, replaced whole (``AihowError`` naming the path
    when it cannot be written)."""
    atomic_write(path, json.dumps(recording, indent=1) + "\n", "host recording", error=AihowError)

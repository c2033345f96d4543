"""The host as sysfs and /proc show it (under a root folder, so recorded hosts can stand in),
and the choice of acceleration that follows from it."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

VirtType = Literal["kvm", "qemu"]
VFIO_DRIVER = "vfio-pci"  # the host driver a function must be on to be passed through
# Where modprobe reads module options (modprobe.d(5)), e.g. ``options vfio-pci ids=10de:2335``.
MODPROBE_FOLDERS = ("/etc/modprobe.d", "/run/modprobe.d", "/usr/lib/modprobe.d", "/lib/modprobe.d")
# TCG's translation cache a guest (QEMU's default: 1 GiB). When it fills, TCG throws every
# translation away and translates the hot code again: with 128 MiB the Kubernetes control plane
# did so 79 times in one `system.up` (every 3 s while deploying), with 512 MiB 6 times, and that
# deploy took 145 s against 227 s (`info jit`, README "Inside the project"). The cost is memory:
# qemu of a 1 GiB guest about 900 MiB (500 MiB with 128), of the 2 GiB control plane 1.8 GiB.
TCG_CACHE_MIB = 512
# Added to a software-emulated guest's kernel command line. ``no_timer_check``: the kernel's early
# test that the timer interrupt arrives through the IO-APIC fails when an emulated vCPU is starved
# (seen here: a guest booted beside five others panicked "timer doesn't work through
# Interrupt-remapped IO-APIC"); a VM's timer is known to work. Not ``tsc=reliable``, though it makes
# a clock read 0.39x as dear (bench/guest_clock.py): the guest calibrates its TSC against the PM
# timer at boot, a starved vCPU calibrates it wrong, and without the watchdog nothing corrects it
# (measured: a guest's clock 42 minutes ahead after 17, and munge refused every credential).
TCG_CMDLINE = "no_timer_check"


class Host:
    """sysfs and /proc of a host, under ``root`` ("/" for this machine)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, absolute: str) -> Path:
        """``absolute`` (e.g. /sys/...) under the root."""
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        """A file's text, stripped; None when missing or unreadable."""
        try:
            return self.path(absolute).read_text().strip()
        except OSError:
            return None

    def write(self, absolute: str, text: str) -> None:
        """Write ``text`` to a file under the root (a sysfs attribute: one write, no temp file);
        ``OSError`` as the kernel gives it (EBUSY, ENODEV, EINVAL)."""
        with self.path(absolute).open("w") as file:
            file.write(text)

    def load_driver(self, name: str) -> None:
        """Make PCI driver ``name`` available (``modprobe``) on the live host when it is not
        loaded yet; under any other root there is no kernel to ask."""
        if self.root == Path("/") and not self.path(f"/sys/bus/pci/drivers/{name}").is_dir():
            subprocess.run(["modprobe", name], capture_output=True, check=False)

    def device(self, address: str) -> Path:
        """The sysfs folder of a PCI function."""
        return self.path(f"/sys/bus/pci/devices/{address}")

    def driver(self, address: str) -> str | None:
        """The driver a PCI function is bound to (None when unbound)."""
        link = self.device(address) / "driver"
        return Path(str(link.readlink())).name if link.is_symlink() else None

    def iommu_group(self, address: str) -> str | None:
        """The IOMMU group of a PCI function (None without IOMMU)."""
        link = self.device(address) / "iommu_group"
        return Path(str(link.readlink())).name if link.is_symlink() else None

    def group_members(self, group: str) -> list[str]:
        """Every PCI function in an IOMMU group."""
        folder = self.path(f"/sys/kernel/iommu_groups/{group}/devices")
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def reset_methods(self, address: str) -> list[str] | None:
        """How the kernel can reset a PCI function between VMs (sysfs ``reset_method``, Linux 5.15
        and later: ``flr``, ``pm``, ``bus``, ...); empty when it has none; None when unknown (no
        function of this host shows the attribute: an older kernel, or a recording without it)."""
        methods = (self.read(f"/sys/bus/pci/devices/{address}/reset_method") or "").split()
        if methods or any(self.path("/sys/bus/pci/devices").glob("*/reset_method")):
            return methods
        return None

    def modules(self) -> set[str]:
        """Loaded kernel modules, plus built-in ones visible under /sys/module."""
        names = {line.split()[0] for line in (self.read("/proc/modules") or "").splitlines() if line.strip()}
        module_dir = self.path("/sys/module")
        if module_dir.is_dir():
            names |= {p.name for p in module_dir.iterdir()}
        return names


@dataclass(frozen=True)
class VirtChoice:
    """The acceleration a domain gets, and why."""

    virt_type: VirtType
    reason: str


def choose_virt_type(wanted: str, host: Host, kvm_usable: bool) -> VirtChoice:
    """``kvm`` or ``qemu`` (software emulation, TCG) for ``aihow:virtType`` ``wanted``.

    ``auto`` takes KVM only where a real guest kernel can run under it: libvirt must call
    it usable, and it must not be kvm_pvm, under which libvirt calls KVM usable although a
    stock kernel dies of emulation failures (measured: shared/notes/guest-images.md).
    """
    if wanted in ("kvm", "qemu"):
        return VirtChoice(wanted, f"aihow:virtType is {wanted}")  # type: ignore[arg-type]
    modules = host.modules()
    if not kvm_usable:
        return VirtChoice("qemu", "software emulation: libvirt reports KVM unusable on this host")
    if "kvm_pvm" in modules:
        return VirtChoice("qemu", "software emulation: /dev/kvm is kvm_pvm, which cannot run a real guest kernel")
    vendor = next((m for m in ("kvm_intel", "kvm_amd") if m in modules), None)
    return VirtChoice("kvm", f"KVM ({vendor})" if vendor else "KVM (libvirt reports it usable)")


@dataclass(frozen=True)
class SubnetInUse:
    """An IPv4 subnet the host already uses: on an interface, by a route, or by a libvirt network."""

    subnet: str
    where: str  # e.g. "interface eth0", "a route via eth0", "libvirt network 'default' (bridge virbr0)"
    interface: str = ""  # the interface (bridge) it is on, "" when none is known
    network: str = ""  # the libvirt network that holds it, "" for none


def host_subnets() -> list[SubnetInUse]:
    """The subnets of this host's interfaces and routes (``ip -j -4 addr`` and ``route``), default
    route and loopback left out."""
    def ip_json(*args: str) -> list[dict[str, Any]]:
        done = subprocess.run(["ip", "-j", "-4", *args], capture_output=True, text=True, check=False)
        try:
            data = json.loads(done.stdout or "[]")
        except ValueError:
            return []
        return data if isinstance(data, list) else []

    found = []
    for link in ip_json("addr", "show"):
        name = str(link.get("ifname", ""))
        for addr in link.get("addr_info") or []:
            if addr.get("local") and addr.get("prefixlen") is not None and addr.get("scope") != "host":
                net = ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
                found.append(SubnetInUse(str(net), f"interface {name}", name))
    for route in ip_json("route", "show", "table", "all"):
        dst, dev = str(route.get("dst", "")), str(route.get("dev", ""))
        if dst in ("default", "") or route.get("type") in ("local", "broadcast", "multicast"):
            continue
        try:
            net = ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if not net.is_loopback:
            found.append(SubnetInUse(str(net), f"a route via {dev or 'the host'}", dev))
    return found

"""Never hand a device over blind: the checks made just before a VM that passes PCI functions
through starts (the moment libvirt takes them from the host).

- No process of the host holds the device open: its VFIO group (/dev/vfio/<group>), the NVIDIA
  node of a GPU the nvidia driver drives (/dev/nvidia<minor>, the minor from
  /proc/driver/nvidia/gpus/<address>/information), or its sysfs resource and config files (a
  program mapping a BAR). Rebinding a device a process still holds can hang or panic the host
  (reported to LXD); the refusal names the pids and their commands.
- Every other function of its IOMMU group is on vfio-pci or on no driver (VFIO takes a whole
  group: qemu would fail with "group is not viable" after the host lost the others).
- The card at the address is the one first handed over there (vendor, device and subsystem ids,
  and the PCIe serial number where the card has one), as the GPU lease ledger recorded it: a card
  that moved slots, or another card in its slot, is never passed through silently.

Devices are read under a root folder (``Host``), so a test stands in for the live host; processes
are always this machine's (``proc``, /proc).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from aihow_infra.errors import CustodyError
from aihow_infra.gpu.ledger import Ledger
from aihow_infra.host import VFIO_DRIVER, Host

# Drivers a function may keep while its group-mate is passed through: a PCIe port is the bridge
# above it, never handed to a VM.
GROUP_SAFE_DRIVERS = (VFIO_DRIVER, None, "pcieport")


@dataclass(frozen=True)
class OpenFile:
    """A process holding one of a device's files open (or mapped); ``vm`` is the libvirt domain
    when the process is a VM's qemu (its ``-name guest=NAME``)."""

    pid: int
    command: str
    path: str
    vm: str | None = None

    def __str__(self) -> str:
        who = f"{self.command}, the running VM {self.vm}" if self.vm else self.command
        return f"pid {self.pid} ({who}) has {self.path} open"


def _vm_of(cmdline: bytes) -> str | None:
    """The domain name a qemu process was started for (libvirt passes ``-name guest=NAME,...``)."""
    args = cmdline.decode(errors="replace").split("\0")
    for flag, value in itertools.pairwise(args):
        if flag == "-name":
            first = value.split(",")[0]
            return first.removeprefix("guest=")
    return None


def device_files(host: Host, address: str) -> list[Path]:
    """The files through which a host process can hold the PCI function at ``address``, as
    paths of the live host (what /proc/<pid>/fd links name): its VFIO group node, its NVIDIA
    device node, and its sysfs config and resource files."""
    files = []
    group = host.iommu_group(address)
    if group is not None:
        files.append(Path(f"/dev/vfio/{group}"))
    information = host.read(f"/proc/driver/nvidia/gpus/{address}/information") or ""
    minor = re.search(r"^Device Minor:\s*(\d+)", information, re.M)
    if minor:
        files.append(Path(f"/dev/nvidia{minor.group(1)}"))
    device = f"/sys/bus/pci/devices/{address}"
    folder = host.path(device)
    if folder.is_dir():
        files += [Path(device) / p.name for p in sorted(folder.iterdir())
                  if p.name == "config" or p.name.startswith("resource")]
    return files


def _resolved(path: str) -> str:
    """sysfs device folders are links (/sys/bus/pci/devices/X -> /sys/devices/pci.../X): a
    process's link names the resolved path."""
    try:
        return os.path.realpath(path)
    except OSError:
        return path


def open_by(host: Host, paths: Iterable[Path], proc: Path = Path("/proc")) -> list[OpenFile]:
    """Every process of ``proc`` that has one of ``paths`` (live paths, or the same under the
    host's root) open, as a file descriptor or as a memory mapping (a mapped BAR). Processes that
    end while they are read, or whose files this user may not read, are passed over."""
    wanted = {str(p) for p in paths} | {_resolved(str(host.path(str(p)))) for p in paths}
    found: list[OpenFile] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        held: set[str] = set()
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target in wanted:
                    held.add(target)
        except OSError:
            continue
        try:
            for line in (entry / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5] in wanted:
                    held.add(parts[5])
        except OSError:
            pass
        if held:
            try:
                command = (entry / "comm").read_text().strip()
                vm = _vm_of((entry / "cmdline").read_bytes()) if command.startswith("qemu") else None
            except OSError:
                command, vm = "?", None
            found += [OpenFile(int(entry.name), command, path, vm) for path in sorted(held)]
    return sorted(found, key=lambda f: (f.pid, f.path))


# PCI Express extended capabilities start at this offset of the configuration space; the Device
# Serial Number capability (id 3) carries a 64-bit serial after its header.
EXTENDED_CAPABILITIES = 0x100
DEVICE_SERIAL_NUMBER = 0x0003


def serial_number(config: bytes) -> str | None:
    """The PCIe Device Serial Number in a function's configuration space (``config`` as sysfs
    gives it: all 4096 bytes to root, the first 256 to others), as 16 hex digits; None without one."""
    offset, seen = EXTENDED_CAPABILITIES, set()
    while EXTENDED_CAPABILITIES <= offset <= len(config) - 12 and offset not in seen:
        seen.add(offset)
        header = int.from_bytes(config[offset:offset + 4], "little")
        if header in (0, 0xFFFFFFFF):
            return None
        if header & 0xFFFF == DEVICE_SERIAL_NUMBER:
            return f"{int.from_bytes(config[offset + 4:offset + 12], 'little'):016x}"
        offset = (header >> 20) & 0xFFC
    return None


def card_identity(host: Host, address: str) -> dict[str, str]:
    """What names the card at ``address``: vendor, device and subsystem ids as sysfs writes them,
    and ``serial`` when its configuration space carries one."""
    device = f"/sys/bus/pci/devices/{address}"
    found = {key: host.read(f"{device}/{key}") or "" for key in
             ("vendor", "device", "subsystem_vendor", "subsystem_device")}
    try:
        serial = serial_number(host.path(f"{device}/config").read_bytes())
    except OSError:
        serial = None
    return {**found, **({"serial": serial} if serial else {})}


def _describe(card: dict[str, str]) -> str:
    def pair(first: str, second: str) -> str:
        return f"{card.get(first, '?').removeprefix('0x')}:{card.get(second, '?').removeprefix('0x')}"

    serial = f", serial {card['serial']}" if card.get("serial") else ""
    return f"{pair('vendor', 'device')} (subsystem {pair('subsystem_vendor', 'subsystem_device')}{serial})"


def refuse_blind_handover(host: Host, vm: str, addresses: Iterable[str], ledger: Ledger | None = None,
                          proc: Path = Path("/proc")) -> None:
    """``CustodyError`` (one line: the device, what was found, what to do) when a PCI function of
    ``addresses`` cannot be handed to ``vm`` now: a host process holds it open, a function of its
    IOMMU group that ``vm`` does not take is on a host driver, or (with the ``ledger``) the card
    there is not the one recorded at the first hand-over (which records it, when it is the first).
    Nothing else is changed."""
    taking = list(addresses)
    for address in taking:
        holders = open_by(host, device_files(host, address), proc)
        if holders:
            vms = sorted({h.vm for h in holders if h.vm})
            if vms and all(h.vm for h in holders):
                todo = (f"stop {', '.join(vms)} first (`aihow vm.stop NAME`, or `virsh shutdown NAME` for a VM the "
                        "project did not start)")
            else:
                pids = " ".join(str(p) for p in sorted({h.pid for h in holders}))
                todo = f"stop those processes first (`kill {pids}`, or end the program that uses the device)"
            raise CustodyError(
                f"device {address} is held open on the host: {'; '.join(str(h) for h in holders)}; {vm} was not "
                f"started and nothing was changed; allowed: {todo}, then start the VM again")
        group = host.iommu_group(address)
        if group is None:
            continue
        on_host = [m for m in host.group_members(group)
                   if m not in taking and host.driver(m) not in GROUP_SAFE_DRIVERS]
        if on_host:
            drivers = ", ".join(f"{m} (driver {host.driver(m)})" for m in on_host)
            raise CustodyError(
                f"device {address} shares IOMMU group {group} with {drivers}, which the host still drives; {vm} "
                "was not started and nothing was changed; allowed: pass every function of the group through, "
                "or bind them to vfio-pci (`aihow host.check` prints the commands)")
    if ledger is None:
        return
    for address in taking:
        found = card_identity(host, address)
        changed = ledger.known_card(address, found)
        if changed is not None:
            recorded, since = changed
            raise CustodyError(
                f"device {address} is not the card first handed over there: {_describe(recorded)} was recorded "
                f"at {since}, {_describe(found)} is there now; {vm} was not started and nothing was changed; "
                f"allowed: put that card back, or fix pci_address in the cluster files, or, if it was replaced "
                f"on purpose, `aihow gpu.forget {address}` and start the VM again")


def local_host(uri: str) -> Host | None:
    """This machine, when ``uri`` is a libvirt QEMU connection to it (``qemu:///system``,
    ``qemu:///session``): its devices are the ones a VM of that connection takes. None for other
    hosts and drivers (the test driver has no devices; a remote host's sysfs is not here)."""
    parsed = urlparse(uri)
    return Host(Path("/")) if parsed.scheme.split("+")[0] == "qemu" and not parsed.hostname else None

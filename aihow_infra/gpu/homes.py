"""Where a passthrough device lives when no VM holds it: its *home*.

- ``host``: the host's own driver (``nvidia`` for host containers and tools, ``e1000e`` for a NIC),
  or no driver where the host has none for the device. libvirt's managed reattach takes it there
  when the VM stops; the project checks it did, and finishes the job when it did not.
- ``vfio-pci``: kept bound to vfio-pci, ready for the next VM, out of reach of host programs.
  libvirt rebinds it to the host driver when a VM stops; the project binds it back at once.

A device's home is set once per host, in the host's GPU lease ledger (``aihow gpu.home ADDRESS
--to HOME``), for every function of the card together: the same card appears in both clusters'
files, so a cluster file cannot say it. The one other place a home can be set is the kernel's boot
configuration (``vfio-pci.ids=`` on its command line, ``options vfio-pci ids=`` in modprobe.d, a
driverctl override): when that binds a card to vfio-pci and the ledger says ``host``, the two
disagree, and the project says so instead of fighting the kernel after each reboot.

Moving a device is three sysfs writes (``driver_override``, the old driver's ``unbind``,
``drivers_probe``), made only while no process holds the device open: unbinding a driver whose
device a program still has open can hang or panic the host.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aihow_infra.errors import CustodyError
from aihow_infra.gpu.custody import device_files, open_by
from aihow_infra.gpu.ledger import DEFAULT_HOME, HOMES, Home
from aihow_infra.host import MODPROBE_FOLDERS, VFIO_DRIVER, Host

__all__ = ["DEFAULT_HOME", "HOMES", "Home", "Place", "at_home", "boot_conflict", "send_home"]
# Seconds a device may take to reach its home: a driver's probe is quick (the H200's nvidia probe
# is the slowest known, a few seconds); longer means it will not get there by itself.
HOME_BOUND_S = 15.0
_VFIO_OPTIONS = re.compile(r"^\s*options\s+vfio[-_]pci\s+(.*)$")


def parse_home(value: str, key: str = "home") -> Home:
    """``value`` as a ``Home``; ``CustodyError`` naming the key, the value and what is allowed."""
    if value not in HOMES:
        raise CustodyError(f"{key}: {value!r} is not a home; allowed: {', '.join(HOMES)} (the host's own driver, "
                           "or kept on vfio-pci for VMs)")
    return value


def at_home(driver: str | None, home: Home) -> bool:
    """Whether a device bound to ``driver`` (None: no driver) is at ``home``."""
    return driver == VFIO_DRIVER if home == VFIO_DRIVER else driver != VFIO_DRIVER


def describe_driver(driver: str | None) -> str:
    """``on nvidia`` / ``on no driver``."""
    return f"on {driver}" if driver else "on no driver"


def card_functions(host: Host, address: str) -> list[str]:
    """Every function of the card at ``address`` (``DDDD:BB:SS.*``) present on the host; just
    ``address`` when the host does not show it."""
    slot = address.rsplit(".", 1)[0]
    folder = host.path("/sys/bus/pci/devices")
    found = sorted(p.name for p in folder.glob(f"{slot}.*")) if folder.is_dir() else []
    return found or [address]


def _ids(host: Host, address: str) -> str:
    device = f"/sys/bus/pci/devices/{address}"
    vendor = (host.read(f"{device}/vendor") or "").removeprefix("0x")
    return f"{vendor}:{(host.read(f'{device}/device') or '').removeprefix('0x')}"


def boot_binding(host: Host, address: str) -> str | None:
    """Where the host's boot configuration binds the device at ``address`` to vfio-pci, or None:
    ``vfio-pci.ids=`` on the kernel command line, ``options vfio-pci ids=`` in a modprobe.d file,
    or a driverctl override (/etc/driverctl.d/pci-ADDRESS)."""
    ids = _ids(host, address)

    def names(listed: str) -> bool:
        return any(":".join(entry.split(":")[:2]) == ids for entry in listed.split(","))

    for token in (host.read("/proc/cmdline") or "").split():
        option, _eq, value = token.partition("=")
        if option in ("vfio-pci.ids", "vfio_pci.ids") and names(value):
            return f"{option}={value} on the kernel command line (/proc/cmdline)"
    for folder in MODPROBE_FOLDERS:
        directory = host.path(folder)
        for conf in sorted(directory.glob("*.conf")) if directory.is_dir() else []:
            for line in (host.read(f"{folder}/{conf.name}") or "").splitlines():
                options = _VFIO_OPTIONS.match(line)
                for word in options.group(1).split() if options else []:
                    key, _eq, value = word.partition("=")
                    if key == "ids" and names(value):
                        return f"`{line.strip()}` in {folder}/{conf.name}"
    override = f"/etc/driverctl.d/pci-{address}"
    if host.read(override) == VFIO_DRIVER:
        return f"a driverctl override ({override})"
    return None


def boot_conflict(host: Host, address: str, home: Home) -> str | None:
    """One line when the home is ``host`` but the boot configuration binds the device to
    vfio-pci: a home set differently in two places. None when they agree."""
    if home != "host":
        return None
    where = boot_binding(host, address)
    if where is None:
        return None
    return (f"device {address}: its home is the host's driver (the GPU lease ledger) but {where} binds it to "
            f"vfio-pci at boot: a home set differently in two places; allowed: `aihow gpu.home {address} --to "
            "vfio-pci`, or remove that boot setting")


@dataclass(frozen=True)
class Place:
    """Where a device is now, against its home."""

    address: str
    home: Home
    driver: str | None
    holder: str | None  # the VM holding it (its lease, or its qemu having the device open)
    present: bool = True  # False: the host has no such PCI function

    @property
    def at_home(self) -> bool:
        """Present, not held, and at home."""
        return self.present and self.holder is None and at_home(self.driver, self.home)

    @property
    def stuck(self) -> bool:
        """Present, not held and not at home: the host lost the device (home ``host``) or a host
        driver took it (home ``vfio-pci``)."""
        return self.present and self.holder is None and not at_home(self.driver, self.home)

    @property
    def fix(self) -> str:
        """The command that takes a stuck device home ("" when it is not stuck)."""
        return f"aihow gpu.home {self.address}" if self.stuck else ""

    def __str__(self) -> str:
        if not self.present:
            return "not present on this host (check pci_address with `lspci -D`)"
        if self.holder is not None:
            return f"held by {self.holder}"
        if self.stuck and self.driver == VFIO_DRIVER:
            return f"stuck on {VFIO_DRIVER} with no holder (home: the host's driver)"
        if self.stuck:
            return f"away from home: {describe_driver(self.driver)} (home: {VFIO_DRIVER})"
        return f"at home, {describe_driver(self.driver)}"


def place_of(host: Host, address: str, home: Home, holder: str | None, proc: Path = Path("/proc")) -> Place:
    """Where the device is: ``holder`` (the ledger's, when that VM runs) or a VM whose qemu has
    the device open."""
    if not host.device(address).is_dir():
        return Place(address, home, None, holder, present=False)
    if holder is None:
        vms = sorted({f.vm for f in open_by(host, device_files(host, address), proc) if f.vm})
        holder = ", ".join(vms) or None
    return Place(address, home, host.driver(address), holder)


def send_home(host: Host, address: str, home: Home, proc: Path = Path("/proc"), bound: float = HOME_BOUND_S,
              sleep: Callable[[float], None] = time.sleep) -> str | None:
    """Bind the device at ``address`` to its home when it is not there; the driver it is on
    afterwards. ``CustodyError`` (one line: the device, what was found, what to do) when a host
    process holds it open (nothing is written) or it is not home within ``bound`` seconds."""
    driver = host.driver(address)
    if at_home(driver, home):
        return driver
    holders = open_by(host, device_files(host, address), proc)
    if holders:
        raise CustodyError(
            f"device {address} cannot go home ({home}): {'; '.join(str(h) for h in holders)}; it stays "
            f"{describe_driver(driver)} and nothing was changed; allowed: end those first, then "
            f"`aihow gpu.home {address}`")
    base = f"/sys/bus/pci/devices/{address}"
    writes = [(f"{base}/driver_override", VFIO_DRIVER if home == VFIO_DRIVER else "\n"),  # "\n": any driver
              *([(f"/sys/bus/pci/drivers/{driver}/unbind", address)] if driver is not None else []),
              ("/sys/bus/pci/drivers_probe", address)]
    if home == VFIO_DRIVER:
        host.load_driver(VFIO_DRIVER)
    for path, text in writes:
        try:
            host.write(path, text)
        except OSError as exc:
            raise CustodyError(f"device {address} cannot go home ({home}): writing {path} failed ({exc.strerror}); "
                               f"it is {describe_driver(host.driver(address))}; allowed: run as root, or look at "
                               f"`dmesg` for the driver's error, then `aihow gpu.home {address}`") from None
    deadline = time.monotonic() + bound
    while not at_home(now := host.driver(address), home):
        if time.monotonic() >= deadline:
            raise CustodyError(
                f"device {address} did not reach its home ({home}) within {bound:.0f} s: it is "
                f"{describe_driver(now)}; allowed: `aihow gpu.home {address}` again, or look at `dmesg` for the "
                "driver's error")
        sleep(0.2)
    return now

"""The operator's view of GPU leases: which are stale, reclaiming one on purpose, and taking a
device home on purpose.

A lease is *stale* when its holder VM is gone or shut off. Stale leases are
listed, never freed silently: ``reclaim`` is an explicit operator command, and
it refuses while the holder runs unless forced.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from aihow_infra.errors import AihowError, CustodyError
from aihow_infra.gpu.custody import local_host
from aihow_infra.gpu.homes import Place, boot_conflict, card_functions, place_of, send_home
from aihow_infra.gpu.ledger import DEFAULT_HOME, Home, Lease, Ledger, vm_of
from aihow_infra.host import VFIO_DRIVER
from aihow_infra.libvirt.connection import connect, lookup
from aihow_infra.libvirt.power import UNDEFINED, is_live, state_name


@dataclass(frozen=True)
class LeaseRow:
    """A held lease, with its holder VM's state."""

    address: str
    holder: str
    granted_at: str | None
    generation: int
    holder_state: str
    home: Home = DEFAULT_HOME

    @property
    def stale(self) -> bool:
        """True when the holder VM is gone or shut off."""
        return not is_live(self.holder_state)


def holder_state(uri: str, holder: str) -> str:
    """libvirt's state of the holder's VM (``undefined`` when it is gone)."""
    with connect(uri) as conn:
        dom = lookup("looking up domain", conn.lookupByName, vm_of(holder))
        return state_name(dom) if dom is not None else UNDEFINED


def lease_report(ledger: Ledger, uri: str) -> list[LeaseRow]:
    """Every held lease with its holder's state."""
    return [LeaseRow(lease.address, lease.holder, lease.granted_at, lease.generation,
                     holder_state(uri, lease.holder), lease.home)
            for lease in ledger.leases().values() if lease.holder]


def _running_holder(uri: str, lease: Lease | None) -> str | None:
    """The lease's holder when that VM runs (a stale lease holds nothing on the host)."""
    return lease.holder if lease and lease.holder and is_live(holder_state(uri, lease.holder)) else None


def home_report(ledger: Ledger, uri: str) -> list[Place]:
    """Where each device the ledger knows is now, against its home; empty when the host is not
    this machine (its sysfs is not here)."""
    host = local_host(uri)
    if host is None:
        return []
    return [place_of(host, address, lease.home, _running_holder(uri, lease))
            for address, lease in ledger.leases().items()]


def reclaim(ledger: Ledger, uri: str, address: str, force: bool = False) -> str | None:
    """Free the device at ``address`` (every function its holder holds); returns its former
    holder. Refused while the holder runs, unless forced."""
    lease = ledger.holder_of(address)
    if lease is None or lease.holder is None:
        return None
    state = holder_state(uri, lease.holder)
    if is_live(state) and not force:
        raise AihowError(f"GPU {address} is held by {lease.holder}, which is {state}; stop it with "
                         f"`aihow vm.stop {lease.vm}`, or pass --force to reclaim anyway")
    freed = ledger.reclaim(address)
    return freed[0].holder if freed else None


def bring_home(ledger: Ledger, uri: str, address: str, configured: Collection[str],
               to: Home | None = None) -> list[str]:
    """Set the home of the card at ``address`` when ``to`` is given, then take each of its
    functions that no running VM holds to its home now; only functions the cluster files pass
    through (``configured``) are touched, never another device of the host. One line per function
    says where it is. ``CustodyError``, with nothing recorded or moved, when the host is not this
    machine, the address is not one a VM passes through or not on this host, vfio-pci cannot take
    it (no IOMMU group), or the boot configuration disagrees with ``to``; and when a host process
    holds a function open (it stays where it is)."""
    host = local_host(uri)
    if host is None:
        raise CustodyError(f"{uri} is not this machine: a device's home is kept, and its driver changed, on the host "
                           "that has it; allowed: run `aihow gpu.home` there")
    if address not in configured:
        listed = ", ".join(sorted(configured)) or "none"
        raise CustodyError(f"device {address} is not passed through by any VM of the cluster files, so its driver is "
                           f"not the project's to change; allowed: a pcie_passthrough address ({listed})")
    if not host.device(address).is_dir():
        raise CustodyError(f"device {address} is not present on this host; allowed: an address `lspci -D` lists")
    functions = [f for f in card_functions(host, address) if f in configured]
    if to == VFIO_DRIVER and host.iommu_group(address) is None:
        raise CustodyError(f"device {address} has no IOMMU group (the IOMMU is off), so vfio-pci cannot take it; "
                           "nothing was recorded; allowed: turn the IOMMU on (`aihow host.check` says how), then set "
                           "its home")
    if to is not None:
        conflicts = [c for f in functions if (c := boot_conflict(host, f, to))]
        if conflicts:
            raise CustodyError(conflicts[0])
        ledger.set_home(functions, to)
    lines = []
    leases = ledger.leases()
    for function in functions:
        lease = leases.get(function)
        home = lease.home if lease else DEFAULT_HOME
        place = place_of(host, function, home, _running_holder(uri, lease))
        if place.holder is not None:
            lines.append(f"{function}: home {home}; {place}, it goes home when that VM stops")
            continue
        send_home(host, function, home)
        lines.append(f"{function}: home {home}; {place_of(host, function, home, None)}")
    return lines

"""The operator's view of GPU leases: which are stale, and reclaiming one on purpose.

A lease is *stale* when its holder VM is gone or shut off. Stale leases are
listed, never freed silently: ``reclaim`` is an explicit operator command, and
it refuses while the holder runs unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass

from aihow_infra.errors import AihowError
from aihow_infra.gpu.ledger import Ledger, vm_of
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
                     holder_state(uri, lease.holder))
            for lease in ledger.leases().values() if lease.holder]


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

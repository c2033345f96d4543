"""The operator's view of GPU leases: which are stale, and reclaiming one on purpose.

A lease is *stale* when its holder VM is gone or shut off. Stale leases are
listed, never freed silently: ``reclaim`` is an explicit operator command, and
it refuses while the holder runs unless forced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aihow_infra.errors import AihowError
from aihow_infra.settings import DEFAULT_LEDGER
from providers.ledger import Ledger
from providers.libvirt_conn import connect, lookup
from providers.power import state_name

if TYPE_CHECKING:
    from aihow_infra.operations import Operator


def ledger_and_uri(op: Operator) -> tuple[Ledger, str]:
    """The host's ledger and libvirt URI, as the first configured stack names them."""
    stacks = op.configured_stacks()
    if not stacks:
        return Ledger(DEFAULT_LEDGER), "qemu:///system"
    settings = op.settings(stacks[0])
    return Ledger(settings.ledger_path), settings.libvirt_uri


def holder_state(uri: str, holder: str) -> str:
    """libvirt's state of the holder's VM (``undefined`` when it is gone)."""
    vm = holder.split("/", 1)[-1]
    with connect(uri) as conn:
        dom = lookup("looking up domain", conn.lookupByName, vm)
        return state_name(dom) if dom is not None else "undefined"


def lease_report(op: Operator) -> list[dict[str, Any]]:
    """Every held lease with its holder's state and whether it is stale."""
    ledger, uri = ledger_and_uri(op)
    rows = []
    for lease in ledger.leases().values():
        if not lease.holder:
            continue
        state = holder_state(uri, lease.holder)
        rows.append({"address": lease.address, "holder": lease.holder, "granted_at": lease.granted_at,
                     "generation": lease.generation, "holder_state": state,
                     "stale": state not in ("running", "paused", "blocked", "shutdown")})
    return rows


def reclaim(op: Operator, address: str, force: bool = False) -> str | None:
    """Free ``address``; returns its former holder. Refused while the holder runs, unless forced."""
    ledger, uri = ledger_and_uri(op)
    lease = ledger.holder_of(address)
    if lease is None or lease.holder is None:
        return None
    state = holder_state(uri, lease.holder)
    if state in ("running", "paused", "blocked", "shutdown") and not force:
        raise AihowError(f"GPU {address} is held by {lease.holder}, which is {state}; stop it with "
                         f"`invoke vm.stop {lease.vm}`, or pass --force to reclaim anyway")
    freed = ledger.reclaim(address)
    return freed.holder if freed else None

"""Tasks on the GPU lease ledger (``gpu.*``)."""

from __future__ import annotations

import json
from dataclasses import asdict

from invoke.context import Context

from aihow_infra.cli.common import operator, out, task
from aihow_infra.cli.render import homes_table, leases_table
from aihow_infra.errors import AihowError


def _check_address(task: str, address: str) -> str:
    """``address`` as the ledger records PCI functions (lower-case hex); ``AihowError`` when it
    is not one."""
    from aihow_infra.config import PCI_ADDRESS_RE

    if not PCI_ADDRESS_RE.match(address.lower()):
        raise AihowError(f"{task}: address {address!r} is not a PCI function; allowed: domain:bus:slot.function "
                         "in hex, e.g. 0000:01:00.0 (`lspci -D` lists them)")
    return address.lower()


@task(help={"json": "print JSON"})
def gpu_leases(c: Context, json_: bool = False) -> None:
    """Every GPU lease (stale ones marked), and where each device is against its home.

    A lease is stale when its holder VM is gone or shut off."""
    from aihow_infra.gpu.leases import home_report, lease_report

    ledger, uri = operator().host_ledger()
    rows = lease_report(ledger, uri)
    places = home_report(ledger, uri)
    if json_:
        out.print_json(json.dumps({
            "leases": [{**asdict(r), "stale": r.stale} for r in rows],
            "homes": [{**asdict(p), "now": str(p), "at_home": p.at_home, "stuck": p.stuck, "fix": p.fix}
                      for p in places]}))
        return
    if not rows:
        out.print(f"no GPU leases: no VM holds a GPU ({ledger.shown})", highlight=False)
    else:
        out.print(leases_table(rows, ledger.shown))
    if places:
        out.print(homes_table(places))


@task(help={"address": "PCI address of the card, e.g. 0000:01:00.0",
            "to": "set its home first: host (the host's own driver) or vfio-pci (kept ready for VMs)"})
def gpu_home(c: Context, address: str, to: str = "") -> None:
    """Take the card at ADDRESS to its home now; --to sets the home on this host first.

    Every function of the card that a VM passes through and no running VM holds is moved now; the
    home is recorded in the GPU lease ledger, for every stack."""
    from aihow_infra.gpu.homes import parse_home
    from aihow_infra.gpu.leases import bring_home

    address = _check_address("gpu.home", address)
    home = parse_home(to, "--to") if to else None
    op = operator()
    ledger, uri = op.host_ledger()
    configured = {d.pci_address for view in op.views() for vm in view.plan.vms for d in vm.devices}
    for line in bring_home(ledger, uri, address, configured, home):
        out.print(line, highlight=False)


@task(help={"address": "PCI address, e.g. 0000:01:00.0", "force": "reclaim even while the holder runs"})
def gpu_reclaim(c: Context, address: str, force: bool = False) -> None:
    """Free a stale GPU lease; refused while its holder runs unless --force."""
    from aihow_infra.gpu.leases import reclaim

    address = _check_address("gpu.reclaim", address)
    ledger, uri = operator().host_ledger()
    freed = reclaim(ledger, uri, address, force=force)
    out.print(f"[yellow]freed {address} (was held by {freed})[/yellow]" if freed else f"{address} was not held")


@task(help={"address": "PCI address of the card, e.g. 0000:01:00.0"})
def gpu_forget(c: Context, address: str) -> None:
    """Forget the card recorded at ADDRESS (replaced on purpose): the next start records the one there."""
    address = _check_address("gpu.forget", address)
    ledger, _uri = operator().host_ledger()
    card = ledger.forget_card(address)
    if card is None:
        out.print(f"no card was recorded at {address} ({ledger.shown}); nothing to forget", highlight=False)
        return
    out.print(f"[yellow]forgot the card recorded at {address}[/yellow] ({card.get('vendor')}:{card.get('device')}, "
              f"recorded {card.get('recorded_at')}); the next start records the card found there", highlight=False)

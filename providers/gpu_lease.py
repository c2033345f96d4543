"""GpuLease: "this running VM owns these physical GPUs", arbitrated by the host's ledger.

One lease per VM covers every function of every device it passes through, taken in one
ledger transaction: all or nothing. create = acquire as a new grant (refused, with the
holder named, when another VM has any of them); delete = release of exactly the grant this
resource made (its generations), idempotent, so deleting an old lease never frees a newer
one of the same VM. diff and read look at the ledger, so a lease lost or taken over shows
up in refresh and is taken again (or refused) by the next ``pulumi up``.
"""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, Resource, UpdateResult

from aihow_infra.gpu.ledger import LeaseRef, Ledger
from providers.base import Provider


def _held_by(props: dict[str, Any]) -> dict[str, str | None]:
    leases = Ledger(props["ledger"]).leases()
    return {a: (leases[a].holder if a in leases else None) for a in props["addresses"]}


class GpuLeaseProvider(Provider):
    """Acquires and releases a set of PCI functions (one physical GPU) for one holder."""

    INPUTS = LeaseRef
    REPLACE = frozenset({"ledger", "holder", "addresses"})

    def _outs(self, props: dict[str, Any]) -> dict[str, Any]:
        leases = Ledger(props["ledger"]).leases()
        first = leases.get(props["addresses"][0])
        holders = {leases[a].holder if a in leases else None for a in props["addresses"]}
        return {**props, "held": holders == {props["holder"]},
                "generation": first.generation if first else 0,
                "generations": {a: leases[a].generation for a in props["addresses"] if a in leases},
                "granted_at": first.granted_at if first else None,
                "current_holders": sorted(h for h in holders if h)}

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Acquire all addresses or none, as a new grant."""
        Ledger(props["ledger"]).acquire(props["holder"], props["addresses"], renew=True)
        return CreateResult(f"{props['holder']}@{props['addresses'][0]}", self._outs(props))

    def diff(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        """Replace when holder or addresses change; update when the ledger no longer says we hold it."""
        result = super().diff(id_, olds, news)
        if result.changes:
            return result
        lost = any(h != news["holder"] for h in _held_by(news).values())
        return DiffResult(changes=lost, replaces=[], stables=[], delete_before_replace=False)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Take the lease again (after it was lost or reclaimed)."""
        Ledger(news["ledger"]).acquire(news["holder"], news["addresses"])
        return UpdateResult(self._outs(news))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        """Release this grant; a lease already gone, held by another, or granted again since
        is left alone."""
        Ledger(props["ledger"]).release(props["holder"], props["addresses"], props.get("generations"))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """The ledger's view: ``held`` false and ``current_holders`` when it was lost or taken over."""
        return ReadResult(id_, self._outs(props))


class GpuLease(Resource, module="gpu", name="GpuLease"):
    """A VM's lease on the physical GPUs it passes through (every function of each)."""

    held: pulumi.Output[bool]
    generation: pulumi.Output[int]

    def __init__(self, resource_name: str, props: LeaseRef, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(GpuLeaseProvider(), resource_name,
                         {**props, "held": None, "generation": None, "generations": None, "granted_at": None,
                          "current_holders": None}, opts)

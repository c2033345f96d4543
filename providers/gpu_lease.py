"""GpuLease: "this running VM owns this physical GPU", arbitrated by the host's ledger.

create = acquire (refused, with the holder named, when another VM has it);
delete = release, only by the holder, idempotent; diff and read look at the
ledger, so a lease lost or taken over shows up in refresh and is taken again
(or refused) by the next ``pulumi up``.
"""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, Resource, UpdateResult

from aihow_infra.ledger import LeaseRef, Ledger
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
                "granted_at": first.granted_at if first else None,
                "current_holders": sorted(h for h in holders if h)}

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Acquire all addresses or none."""
        Ledger(props["ledger"]).acquire(props["holder"], props["addresses"])
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
        """Release what this holder holds; a lease already gone or held by another is left alone."""
        Ledger(props["ledger"]).release(props["holder"], props["addresses"])

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """The ledger's view: ``held`` false and ``current_holders`` when it was lost or taken over."""
        return ReadResult(id_, self._outs(props))


class GpuLease(Resource, module="gpu", name="GpuLease"):
    """A lease on one physical GPU (all the functions a VM takes from it)."""

    held: pulumi.Output[bool]
    generation: pulumi.Output[int]

    def __init__(self, resource_name: str, props: LeaseRef, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(GpuLeaseProvider(), resource_name,
                         {**props, "held": None, "generation": None, "granted_at": None,
                          "current_holders": None}, opts)

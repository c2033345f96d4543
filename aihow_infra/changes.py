"""What a planned change does to a VM: the domain inputs by effect, and the engine's preview
steps read as the operator's risks (a disk deleted, a VM replaced or rebooted).

The domain provider applies changes by these classes, and the tasks read a preview with the
same classes before they ask for confirmation: one list, two users.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Applied to a running domain live, without a reboot.
DOMAIN_METADATA_KEYS = frozenset({"cluster", "role", "stack"})
DOMAIN_NETWORK_KEYS = frozenset({"network", "network_id"})
# Written into the definition; a running domain takes them at its next boot, so a change
# restarts it.
# ``address`` is not in the definition: it is what the guest's seed says, which cloud-init applies
# at boot (aihow_infra.cloudinit), so a running guest is restarted to take a new one.
DOMAIN_REBOOT_KEYS = frozenset({"vcpus", "memory_mib", "mac", "devices", "acceleration", "mounts", "virt_type",
                                "seed_path", "boot", "console_log", "graphics", "address"})
DOMAIN_DEFINITION_KEYS = DOMAIN_METADATA_KEYS | DOMAIN_NETWORK_KEYS | DOMAIN_REBOOT_KEYS

_TYPE_KINDS = {"Volume": "disk", "Domain": "VM", "Seed": "seed", "Network": "network", "StoragePool": "pool",
               "GpuLease": "GPU lease", "HostImage": "image"}


def changed_keys(olds: Mapping[str, Any], news: Mapping[str, Any], keys: frozenset[str]) -> list[str]:
    """The ``keys`` whose values differ (sorted)."""
    return sorted(k for k in keys if olds.get(k) != news.get(k))


def reboot_keys(olds: Mapping[str, Any], news: Mapping[str, Any]) -> list[str]:
    """The definition keys whose change restarts a domain that runs and should keep running."""
    if not (olds.get("running") and news.get("running")):
        return []
    return changed_keys(olds, news, DOMAIN_REBOOT_KEYS)


@dataclass(frozen=True)
class Risk:
    """A planned step that loses data or interrupts a guest."""

    kind: str
    name: str
    what: str
    urn: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.what}"


def kind_of(urn: str) -> str:
    """What kind of the project's resources a URN names: ``VM``, ``disk``, ``seed``, ``network``,
    ``pool``, ``GPU lease``, ``image``; ``resource`` for anything else."""
    return _TYPE_KINDS.get(urn.split("::")[-2].rsplit(":", 1)[-1], "resource")


def risks(steps: list[dict[str, Any]]) -> list[Risk]:
    """The steps of ``pulumi preview --json`` that delete a disk, replace or delete a VM, or
    reboot a running one; each with the reason."""
    found = []
    for step in steps:
        op, urn = step.get("op"), step.get("urn", "")
        kind = kind_of(urn)
        old = (step.get("oldState") or {}).get("outputs") or {}
        new = (step.get("newState") or {}).get("inputs") or {}
        name = str(old.get("name") or new.get("name") or urn.split("::")[-1])
        replaced_by = ", ".join(step.get("replaceReasons") or []) or "its inputs"
        if kind == "disk" and op in ("delete", "replace", "delete-replaced"):
            what = "deleted with its data" if op == "delete" else f"deleted and made anew (changed: {replaced_by})"
            found.append(Risk(kind, name, what, urn))
        elif kind == "VM" and op in ("delete", "replace", "delete-replaced"):
            what = "removed" if op == "delete" else f"removed and defined anew (changed: {replaced_by})"
            found.append(Risk(kind, name, what, urn))
        elif kind == "VM" and op == "update":
            keys = reboot_keys(old, new)
            if keys:
                found.append(Risk(kind, name, f"restarted to apply {', '.join(keys)}", urn))
    unique = {(r.kind, r.name): r for r in found}
    return list(unique.values())

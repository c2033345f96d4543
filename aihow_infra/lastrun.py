"""The last successful ``up`` of each stack, and the check that nothing changed since: when the
cluster's plan, the stack's settings and power records, the program, the images, and the
stack's state are what they were, and libvirt still holds every object as it should be, the
engine has nothing to do and is not started (it costs seconds; this check, milliseconds).

Anything else goes through the engine: an edited cluster file or setting, a new record, a
changed program, a run of plain ``pulumi`` (the state changes), a VM powered off or started
by hand, a stopped or deleted network or pool, a deleted disk, a lost GPU lease.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aihow_infra.desired import DesiredPower
from aihow_infra.files import atomic_write
from aihow_infra.images import find_image, recipe_for
from aihow_infra.ledger import Ledger, holder_for
from aihow_infra.libvirt.connection import connect, lookup
from aihow_infra.libvirt.inspect import metadata, read_definition
from aihow_infra.plan import ClusterPlan
from aihow_infra.settings import StackSettings

ROOT = Path(__file__).resolve().parent.parent
# What the engine runs: a change here must go through it.
PROGRAM = ("__main__.py", "Pulumi.yaml", "aihow_infra", "providers", "templates")


def program_digest(root: Path = ROOT) -> str:
    """A digest of the program's files (sources and templates)."""
    digest = hashlib.sha256()
    for name in PROGRAM:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".py", ".j2", ".yaml")) \
            if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _file_digest(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode())
        digest.update(path.read_bytes() if path.is_file() else b"(none)")
    return digest.hexdigest()


def run_fingerprint(stack: str, settings: StackSettings, plan: ClusterPlan, power: DesiredPower,
                project_dir: Path, state_files: list[Path]) -> str:
    """Everything the stack's ``up`` depends on, as one digest."""
    images = {role: str(found.folder) if (found := find_image(recipe_for(role))) else "missing"
              for role in sorted({vm.image for vm in plan.vms if vm.image})}
    parts: dict[str, Any] = {
        "stack": stack,
        "settings": settings.model_dump(mode="json"),
        "plan": dataclasses.asdict(plan),
        "power": dataclasses.asdict(power),
        "images": images,
        "program": program_digest(),
        "project": _file_digest([project_dir / "Pulumi.yaml", project_dir / f"Pulumi.{stack}.yaml"]),
        "state": _file_digest(state_files),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def drift(stack: str, settings: StackSettings, plan: ClusterPlan, power: DesiredPower) -> list[str]:
    """What libvirt (and the ledger) hold that differs from what the stack wants: empty when
    every object is there, started as it should be, and every running VM holds its GPUs."""
    found: list[str] = []
    leases = Ledger(settings.ledger_path).leases()
    with connect(settings.libvirt_uri) as conn:
        net = lookup("looking up network", conn.networkLookupByName, plan.network_name)
        pool = lookup("looking up pool", conn.storagePoolLookupByName, plan.pool_name)
        if net is None or not net.isActive():
            found.append(f"network {plan.network_name} is not active")
        if pool is None or not pool.isActive():
            found.append(f"pool {plan.pool_name} is not active")
            return found
        pool.refresh(0)
        volumes = {vol.name() for vol in pool.listAllVolumes()}
        for vm in plan.vms:
            if f"{vm.name}.qcow2" not in volumes:
                found.append(f"disk of {vm.name} is missing")
            dom = lookup("looking up domain", conn.lookupByName, vm.name)
            if dom is None or metadata(dom).get("stack") != stack:
                found.append(f"domain {vm.name} is missing")
                continue
            running = power.wants_running(vm.name, vm.auto_start)
            if bool(dom.isActive()) != running:
                found.append(f"domain {vm.name} is {'off' if running else 'on'}")
            defined = read_definition(dom)
            if (defined["vcpus"], defined["memory_mib"]) != (vm.cpu_cores, vm.memory_gb * 1024):
                found.append(f"domain {vm.name}'s definition was edited")
            holder = holder_for(stack, vm.name)
            if running and any(leases.get(a) is None or leases[a].holder != holder
                               for c in vm.claims for a in c.functions):
                found.append(f"{vm.name} does not hold its GPU lease")
    return found


class LastRuns:
    """The fingerprints of each stack's last successful ``up`` (``.state/runs/<stack>.json``)."""

    def __init__(self, project_dir: Path) -> None:
        self.folder = project_dir / ".state" / "runs"

    def matches(self, stack: str, current: str) -> bool:
        """True when the stack's last successful run had this fingerprint."""
        try:
            return bool(json.loads((self.folder / f"{stack}.json").read_text())["fingerprint"] == current)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def save(self, stack: str, current: str) -> None:
        """Record a successful run."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / f"{stack}.json", json.dumps({"fingerprint": current}) + "\n", "last run")

    def forget(self, stack: str) -> None:
        """Forget a stack's last run (after a destroy, or a failed run)."""
        (self.folder / f"{stack}.json").unlink(missing_ok=True)

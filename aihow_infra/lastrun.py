"""The last successful ``up`` of each stack, and the check that nothing changed since.

After a successful up the tasks record a digest of everything that run read (the stack files,
the cluster file and the environment variables it names, the power records, the stack's
state, the program) and what libvirt and the ledger should hold (every object, started as it
should be, with its vCPUs, memory, disk and GPU lease). When the digest is the same and libvirt
and the ledger still agree, the engine has nothing to do and is not started: it costs seconds,
this check milliseconds. Anything else goes through the engine: an edited cluster file or
setting, a new power record, a changed program, a run of plain ``pulumi`` (the state changes),
a VM powered off or started by hand, a stopped or deleted network or pool, a deleted disk, a
lost GPU lease, a deleted image.

Kept light on purpose (no pydantic, no Pulumi): ``aihow system.up`` runs it before anything
else is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aihow_infra.errors import LeaseError
from aihow_infra.files import atomic_write
from aihow_infra.gpu.ledger import Ledger, holder_for
from aihow_infra.libvirt.connection import connect, lookup
from aihow_infra.libvirt.inspect import metadata, read_definition
from aihow_infra.state.layout import CHECKOUT, ProjectState

# What a run executes: a change here must go through the engine (and the deploy).
PROGRAM = ("__main__.py", "Pulumi.yaml", "aihow_infra", "providers", "templates", "ansible")
NO_RECORD = "no successful run is recorded"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)|\$([A-Za-z_][A-Za-z0-9_]*)")


def program_digest(root: Path = CHECKOUT) -> str:
    """A digest of the program's files (sources, templates, playbooks)."""
    digest = hashlib.sha256()
    for name in PROGRAM:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def inputs_digest(files: list[Path], cluster_file: Path, pwd: Path | None = None, state: str = "") -> str:
    """A digest of ``files`` (absent ones too), the environment variables the cluster file
    names (``PWD`` is ``pwd``: the project folder, as the program sees it), the program, and
    ``state`` (the stack state's stamp, ``Workspace.state_stamp``)."""
    digest = hashlib.sha256(state.encode())
    for path in files:
        digest.update(str(path).encode())
        digest.update(path.read_bytes() if path.is_file() else b"(none)")
    text = cluster_file.read_text(errors="replace") if cluster_file.is_file() else ""
    names = sorted({m.group(1) or m.group(2) for m in _VAR.finditer(text)})
    env = {name: str(pwd or os.getcwd()) if name == "PWD" else os.environ.get(name) for name in names}
    digest.update(json.dumps(env, sort_keys=True).encode())
    digest.update(program_digest().encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ExpectedVm:
    """A VM as libvirt should hold it after the run."""

    name: str
    running: bool
    vcpus: int
    memory_mib: int
    disk: str
    gpu_functions: list[str]
    uri: str | None = None  # the host it runs on, when not the stack's cluster's
    ledger: str | None = None  # that host's GPU lease ledger


@dataclass(frozen=True)
class Expected:
    """What libvirt and the ledger hold after a successful up of a stack."""

    stack: str
    uri: str
    network: str
    pool: str
    ledger: str
    vms: list[ExpectedVm]
    images: list[str]

    @classmethod
    def of(cls, data: dict[str, Any]) -> Expected:
        """From the record's JSON."""
        return cls(**{**data, "vms": [ExpectedVm(**vm) for vm in data["vms"]]})


def drift(expected: Expected) -> list[str]:
    """What libvirt (and the ledger) hold that differs from ``expected``; empty when nothing."""
    found = [f"image {image} is gone" for image in expected.images if not Path(image).is_dir()]
    for uri in dict.fromkeys([expected.uri, *(vm.uri for vm in expected.vms if vm.uri)]):
        found += _host_drift(expected, uri, [vm for vm in expected.vms if (vm.uri or expected.uri) == uri])
    return found


def _host_drift(expected: Expected, uri: str, vms: list[ExpectedVm]) -> list[str]:
    """``drift`` on one host the stack runs on: its network, pool, and the VMs ``vms`` there."""
    found: list[str] = []
    holders: dict[str, str | None] = {}
    for ledger in dict.fromkeys(vm.ledger or expected.ledger for vm in vms):
        try:
            holders |= {address: lease.holder for address, lease in Ledger(ledger).leases().items()}
        except LeaseError as exc:
            found.append(str(exc))  # the engine's run says it again, with what to do
    with connect(uri) as conn:
        net = lookup("looking up network", conn.networkLookupByName, expected.network)
        pool = lookup("looking up pool", conn.storagePoolLookupByName, expected.pool)
        if net is None or not net.isActive():
            found.append(f"network {expected.network} is not active")
        if pool is None or not pool.isActive():
            return [*found, f"pool {expected.pool} is not active"]
        pool.refresh(0)
        volumes = {vol.name() for vol in pool.listAllVolumes()}
        for vm in vms:
            if vm.disk not in volumes:
                found.append(f"disk of {vm.name} is missing")
            dom = lookup("looking up domain", conn.lookupByName, vm.name)
            if dom is None or metadata(dom).get("stack") != expected.stack:
                found.append(f"domain {vm.name} is missing")
                continue
            if bool(dom.isActive()) != vm.running:
                found.append(f"domain {vm.name} is {'off' if vm.running else 'on'}")
            defined = read_definition(dom)
            if (defined["vcpus"], defined["memory_mib"]) != (vm.vcpus, vm.memory_mib):
                found.append(f"the definition of domain {vm.name} was edited")
            holder = holder_for(expected.stack, vm.name)
            if vm.running and any(holders.get(a) != holder for a in vm.gpu_functions):
                found.append(f"{vm.name} does not hold its GPU lease")
    return found


class LastRuns:
    """Each stack's last successful up (``.state/runs/<stack>.json`` in the project folder)."""

    def __init__(self, project_dir: Path) -> None:
        self.project_dir = project_dir
        self.folder = ProjectState(project_dir).runs

    def inputs(self, stack: str, cluster_file: Path) -> list[Path]:
        """The files an up of ``stack`` reads (besides its state and power records: ``state``)."""
        return [self.project_dir / "Pulumi.yaml", self.project_dir / f"Pulumi.{stack}.yaml", cluster_file]

    def save(self, stack: str, cluster_file: Path, state: str, expected: Expected) -> None:
        """Record a successful up (not yet deployed: see ``settle``); ``state`` is the stamp of
        the stack's state it left."""
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = inputs_digest(self.inputs(stack, cluster_file), cluster_file, self.project_dir, state)
        record = {"digest": digest,
                  "cluster_file": str(cluster_file), "expected": asdict(expected), "settled": False}
        atomic_write(self.folder / f"{stack}.json", json.dumps(record) + "\n", "last run")

    def settle(self, stack: str) -> None:
        """The deploy that follows the recorded up is done (or was not needed)."""
        record = self._record(stack)
        if record is not None:
            atomic_write(self.folder / f"{stack}.json", json.dumps({**record, "settled": True}) + "\n", "last run")

    def forget(self, stack: str) -> None:
        """Forget a stack's last run (after a destroy, or a failed run)."""
        (self.folder / f"{stack}.json").unlink(missing_ok=True)

    def _record(self, stack: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads((self.folder / f"{stack}.json").read_text())
        except (OSError, ValueError):
            return None
        return record

    def changes(self, stack: str, state: str, settled: bool = False) -> list[str]:
        """Why ``stack`` needs the engine (or, with ``settled``, a deploy check) since its last
        successful up (``state``: the stamp of its state now); empty when nothing changed and
        libvirt agrees."""
        record = self._record(stack)
        if record is None:
            return [NO_RECORD]
        cluster_file = Path(record["cluster_file"])
        digest = inputs_digest(self.inputs(stack, cluster_file), cluster_file, self.project_dir, state)
        if digest != record["digest"]:
            return ["its files, settings, power records, state or the program changed"]
        if settled and not record.get("settled"):
            return ["its last deploy check did not finish"]
        try:
            return drift(Expected.of(record["expected"]))
        except Exception as exc:  # whatever it is, the engine will say it better
            return [f"libvirt could not be checked ({exc})"]

"""What the operator is shown about VMs and clusters: one set of rows for ``vm.status``,
``system.status``, the topology tree and every ``--json``.

Plain data: ``operations`` fills the rows from libvirt and the ledger, ``topology``
from a cluster file alone (state ``planned``); views only read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from aihow_infra.plan import ClusterPlan, SharedDevice, VmPlan

PLANNED = "planned"


@dataclass(frozen=True)
class GuestState:
    """What the agent says of a guest."""

    agent: bool
    cloud_init: str  # 'none' (no agent), 'running', 'done' or 'error'
    errors: tuple[str, ...] = ()
    addresses: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Agent answers and cloud-init is done without error."""
        return self.agent and self.cloud_init == "done"



@dataclass(frozen=True)
class GpuStatus:
    """A device a VM passes through, and who holds its lease now."""

    address: str
    functions: list[str]
    holder: str | None


@dataclass(frozen=True)
class VmStatus:
    """One VM: what libvirt says (``state``) beside what it should be (``desired``)."""

    name: str
    stack: str
    cluster: str
    role: str
    state: str
    desired: str
    auto_start: bool
    ip: str | None
    vcpus: int
    memory_gb: int
    disk_gb: int
    gpus: list[GpuStatus]
    image: str | None = None
    ready: bool | None = None
    guest: str = ""
    addresses: list[str] = field(default_factory=list)
    workload: str = ""  # what the cluster's software says of the node (SLURM: idle, drained...)

    @classmethod
    def of(cls, vm: VmPlan, stack: str, state: str, wants_running: bool,
           holders: Mapping[str, str | None], guest: GuestState | None = None) -> VmStatus:
        """The row of a planned VM, given its live state, the ledger's holders by address, and
        what its guest agent says (``ready`` is None for a VM with nothing to boot)."""
        return cls(name=vm.name, stack=stack, cluster=vm.cluster_name, role=vm.role, state=state,
                   desired="running" if wants_running else "stopped", auto_start=vm.auto_start, ip=vm.ip,
                   vcpus=vm.cpu_cores, memory_gb=vm.memory_gb, disk_gb=vm.disk_gb,
                   gpus=[GpuStatus(c.address, list(c.functions), holders.get(c.address)) for c in vm.claims],
                   image=vm.image or vm.base_image, ready=bool(guest and guest.ready) if vm.boots else None,
                   guest=_guest_word(guest) if vm.boots else "no image",
                   addresses=[a for found in (guest.addresses if guest else {}).values() for a in found])


def _guest_word(guest: GuestState | None) -> str:
    if guest is None:
        return "-"
    if guest.ready:
        return "ready"
    if guest.cloud_init == "error":
        return "cloud-init failed"
    return "booting" if not guest.agent else "configuring"


@dataclass(frozen=True)
class SharedGpuStatus:
    """A PCI address configured on several VMs, and which one holds it."""

    address: str
    vms: list[str]
    holder: str | None
    conflict: bool

    @classmethod
    def of(cls, device: SharedDevice, holder: str | None) -> SharedGpuStatus:
        """The row of a shared device."""
        return cls(device.address, [vm.name for vm in device.vms], holder, device.conflict)


@dataclass(frozen=True)
class ClusterStatus:
    """One cluster (stack) and its VMs; ``status`` sums the VMs' states up."""

    stack: str
    name: str
    network: str
    cidr: str
    power: str
    status: str
    vms: list[VmStatus]
    health: str = ""  # the workload's own summary (SLURM nodes up)

    @classmethod
    def of(cls, plan: ClusterPlan, stack: str, power: str, vms: list[VmStatus], health: str = "") -> ClusterStatus:
        """The row of a cluster: ``running``, ``stopped``, ``partial`` (or ``planned``)."""
        running = sum(vm.state == "running" for vm in vms)
        if vms and all(vm.state == PLANNED for vm in vms):
            status = PLANNED
        else:
            status = "running" if running == len(vms) else "stopped" if running == 0 else "partial"
        return cls(stack, plan.name, plan.network_name, plan.subnet, power, status, vms, health)


@dataclass(frozen=True)
class SystemStatus:
    """Every cluster, and the GPUs they share."""

    clusters: list[ClusterStatus]
    shared_gpus: list[SharedGpuStatus]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (``--json``)."""
        return asdict(self)


def planned_status(plans: list[ClusterPlan], shared: list[SharedDevice]) -> SystemStatus:
    """What a cluster file describes, before anything exists: every state ``planned``."""
    clusters = [ClusterStatus.of(p, p.key, PLANNED,
                                 [VmStatus.of(vm, p.key, PLANNED, vm.auto_start, {}) for vm in p.vms])
                for p in plans]
    return SystemStatus(clusters, [SharedGpuStatus.of(s, None) for s in shared])

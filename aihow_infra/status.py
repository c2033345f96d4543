"""What the operator is shown about VMs and clusters: one set of rows for ``vm.status``,
``system.status``, the topology tree and every ``--json``.

Plain data: ``operations`` fills the rows from libvirt and the ledger, ``topology``
from a cluster file alone (state ``planned``); views only read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from aihow_infra.libvirt.guest import GuestState
from aihow_infra.plan import ClusterPlan, SharedDevice, VmPlan

PLANNED = "planned"
# Cluster words: nothing of it exists; every VM as it should be (some running / none running);
# some VM not as it should be; its file or settings cannot be read.
NOT_DEPLOYED, RUNNING, STOPPED, DEGRADED, UNREADABLE = "not deployed", "running", "stopped", "degraded", "unreadable"


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
    workload: str = ""  # what the cluster's software says of the node (SLURM: idle; Kubernetes: Ready...)
    disk: str = "-"  # 'present' or 'missing' (libvirt's view of its volume)
    on_demand: bool = False  # `aihow broker` starts and stops it (for SLURM's power saving, or a pending pod)
    host: str | None = None  # the cluster file's host it runs on (None: the stack's aihow:libvirtUri)
    mac: str = ""  # its network interface's, derived from its name (plan.mac_for): DHCP reservations use it

    @property
    def workload_name(self) -> str:
        """Whose word ``workload`` is: SLURM's (HPC nodes) or Kubernetes' (Cloud nodes)."""
        return "SLURM" if self.role in ("controller", "compute") else "Kubernetes"

    @property
    def as_desired(self) -> bool:
        """True when libvirt's state is the desired one (a manual-start VM that is off counts;
        an on-demand VM is as desired running or off: the broker decides)."""
        if self.on_demand:
            return self.state != "undefined"
        return (self.state == "running") == (self.desired == "running") and self.state != "undefined"

    @property
    def state_word(self) -> str:
        """libvirt's state, or ``powered down (on demand)`` for an on-demand VM that is off."""
        return "powered down (on demand)" if self.on_demand and self.state == "shutoff" else self.state

    @classmethod
    def of(cls, vm: VmPlan, stack: str, state: str, wants_running: bool,
           holders: Mapping[str, str | None], guest: GuestState | None = None, disk: str = "-") -> VmStatus:
        """The row of a planned VM, given its live state, the ledger's holders by address, and
        what its guest agent says (``ready`` is None for a VM with nothing to boot)."""
        return cls(name=vm.name, stack=stack, cluster=vm.cluster_name, role=vm.role, state=state,
                   desired="running" if wants_running else "stopped", auto_start=vm.auto_start, ip=vm.ip,
                   vcpus=vm.cpu_cores, memory_gb=vm.memory_gb, disk_gb=vm.disk_gb,
                   gpus=[GpuStatus(c.address, list(c.functions), holders.get(c.address)) for c in vm.claims],
                   image=vm.image or vm.base_image, ready=bool(guest and guest.ready) if vm.boots else None,
                   guest=_guest_word(guest) if vm.boots else "no image",
                   addresses=[a for found in (guest.addresses if guest else {}).values() for a in found],
                   disk=disk, on_demand=vm.on_demand, host=vm.host, mac=vm.mac)


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
    """One cluster (stack) and its VMs; ``status`` sums the VMs' states up (see ``of``)."""

    stack: str
    name: str
    network: str
    cidr: str
    power: str
    status: str
    vms: list[VmStatus]
    health: str = ""  # the workload's own summary (SLURM nodes up)
    network_state: str = "-"  # 'active', 'inactive' or 'missing'
    pool_state: str = "-"  # the same, for its storage pool
    error: str = ""  # why the cluster could not be read (status 'unreadable')
    # The libvirt host it is on: the file's name for it (when it places the cluster), the name
    # libvirt gives it and its URI; planned: the file's name and URI ("" when it names none).
    host: str = ""

    @classmethod
    def of(cls, plan: ClusterPlan, stack: str, power: str, vms: list[VmStatus], health: str = "",
           network_state: str = "-", pool_state: str = "-", host: str = "") -> ClusterStatus:
        """The row of a cluster: ``planned`` (from a file alone), ``not deployed`` (nothing of
        it exists), ``running`` or ``stopped`` (every VM, network and pool as they should be,
        manual-start VMs that are off included), else ``degraded``."""
        if vms and all(vm.state == PLANNED for vm in vms):
            status = PLANNED
        elif all(vm.state == "undefined" for vm in vms) and network_state in ("missing", "-"):
            status = NOT_DEPLOYED
        elif all(vm.as_desired and vm.disk != "missing" for vm in vms) and \
                network_state in ("active", "-") and pool_state in ("active", "-"):
            status = RUNNING if any(vm.state == "running" for vm in vms) else STOPPED
        else:
            status = DEGRADED
        return cls(stack, plan.name, plan.network_name, plan.subnet, power, status, vms, health,
                   network_state, pool_state, host=host)

    @classmethod
    def unreadable(cls, stack: str, error: str) -> ClusterStatus:
        """The row of a stack whose cluster file or settings are invalid."""
        return cls(stack, "?", "?", "?", "?", UNREADABLE, [], error=error)


@dataclass(frozen=True)
class DeviceHome:
    """A passthrough device against its home (gpu/homes.py): ``now`` in words (``held by ...``,
    ``at home, on nvidia``, ``stuck on vfio-pci with no holder ...``), ``fix`` the command that
    takes a stuck one home."""

    address: str
    home: str
    now: str
    stuck: bool
    fix: str


@dataclass(frozen=True)
class SystemStatus:
    """Every cluster, the GPUs they share, and where each passthrough device is against its home
    (empty when the host is not this machine)."""

    clusters: list[ClusterStatus]
    shared_gpus: list[SharedGpuStatus]
    homes: list[DeviceHome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (``--json``)."""
        return asdict(self)


def planned_status(plans: list[ClusterPlan], shared: list[SharedDevice]) -> SystemStatus:
    """What a cluster file describes, before anything exists: every state ``planned``."""
    clusters = [ClusterStatus.of(p, p.key, PLANNED,
                                 [VmStatus.of(vm, p.key, PLANNED, vm.auto_start, {}) for vm in p.vms],
                                 host=f"{p.host} ({p.host_uri})" if p.host else "")
                for p in plans]
    return SystemStatus(clusters, [SharedGpuStatus.of(s, None) for s in shared])


@dataclass(frozen=True)
class StackSummary:
    """One configured stack, for ``stacks``: its cluster file, how many resources its state
    records, and when that state last changed (None: never deployed)."""

    stack: str
    cluster_file: str
    cluster: str
    resources: int
    updated: str | None
    error: str = ""

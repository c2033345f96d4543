"""Facts derived from a cluster file, in one place.

VM names, roles, MAC addresses, the physical devices each VM takes, the libvirt
object names of a cluster, and the report of GPUs configured on more than one VM (the
checks that span several keys are in crosscheck.py). Everything else (the Pulumi program,
tasks, inventories, topology) reads these instead of deriving its own.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from aihow_infra.config import (
    CLUSTER_KEYS,
    RESUME_TIMEOUT,
    SCALE_DOWN_UNNEEDED_TIME,
    SUSPEND_TIME,
    Acceleration,
    CloudCluster,
    ClusterFile,
    ClusterKey,
    HpcCluster,
    ImageRole,
    NodeSpec,
    PciDevice,
    VirtioFsMount,
    WorkerGroups,
)
from aihow_infra.errors import ConfigError
from aihow_infra.libvirt_names import ForwardMode

Role = Literal["controller", "compute", "control-plane", "cpu-worker", "gpu-worker"]


# libvirt gives each tap device the guest's MAC with the first byte set to 0xfe (so the host's bridge
# never takes the guest's address): a guest MAC that starts with fe would equal its own tap's.
TAP_MAC_PREFIX = 0xFE


def mac_for(vm_name: str) -> str:
    """A stable, locally administered unicast MAC for a VM (ai-how's algorithm, so MACs carry over),
    never starting with ``fe`` (libvirt's tap devices): the 1 name in 64 that ai-how maps there gets
    ``7e`` instead, still locally administered and unicast."""
    digest = bytearray(hashlib.md5(vm_name.encode(), usedforsecurity=False).digest()[:6])
    digest[0] = (digest[0] & 0xFE) | 0x02
    if digest[0] == TAP_MAC_PREFIX:
        digest[0] = 0x7E
    return ":".join(f"{b:02x}" for b in digest)


@dataclass(frozen=True)
class DeviceClaim:
    """A physical PCI device (slot ``DDDD:BB:SS``) a VM takes, with the functions it takes from it."""

    slot: str
    functions: tuple[str, ...]
    is_gpu: bool
    vendor_id: str | None = None
    device_id: str | None = None

    @property
    def address(self) -> str:
        """The address that names the device: its lowest function taken, e.g. ``0000:01:00.0``."""
        return self.functions[0]


GPU_VENDORS = {"10de": "nvidia", "1002": "amd", "8086": "intel"}


def gpu_type(vendor_id: str | None, device_id: str | None) -> str:
    """A GPU's type as labels and inventories name it: ``nvidia_2335`` (PCI vendor id to a name,
    ``gpu`` for a vendor not known), the vendor alone without a device id."""
    vendor = GPU_VENDORS.get(vendor_id or "", "gpu")
    return f"{vendor}_{device_id}" if device_id else vendor


@dataclass(frozen=True)
class VmPlan:
    """One VM as it will be created."""

    name: str
    cluster_key: ClusterKey
    cluster_name: str
    role: Role
    short_name: str
    key_path: str
    cpu_cores: int
    memory_gb: int
    disk_gb: int
    ip: str | None  # static, or the address the network's DHCP reserves for the VM (``dhcp``)
    mac: str
    auto_start: bool
    base_image: str | None
    image: ImageRole | None
    devices: tuple[PciDevice, ...]
    claims: tuple[DeviceClaim, ...]
    acceleration: Acceleration
    mounts: tuple[VirtioFsMount, ...] = ()
    cloud_init: dict[str, Any] = field(default_factory=dict)
    pod_subnet: str | None = None  # Cloud: this node's /24 of the cluster's pod subnet
    dhcp: bool = False  # the guest asks DHCP for its address (``ip: DHCP`` or none); ``ip`` is reserved for it
    on_demand: bool = False  # the power broker starts and stops it for work (``auto_start`` is then False)
    host: str | None = None  # the host it runs on (its own ``host``, else its cluster's); None: the stack's
    host_uri: str | None = None  # that host's libvirt URI; None: the stack's ``aihow:libvirtUri``

    @property
    def boots(self) -> bool:
        """True when the VM has something to boot (a project image or the operator's own)."""
        return self.image is not None or self.base_image is not None

    @property
    def waits_ready(self) -> bool:
        """True when ``up`` waits for the VM to be ready: it boots a project image, which has
        the guest agent (an operator's own image may not)."""
        return self.image is not None

    @property
    def gpu_type(self) -> str | None:
        """``<vendor>_<device id>`` of the first GPU it takes (``nvidia_2335``), the vendor alone
        when the file gives no device id; None without a GPU."""
        gpu = next((c for c in self.claims if c.is_gpu), None)
        return None if gpu is None else gpu_type(gpu.vendor_id, gpu.device_id)

    @property
    def gpu_addresses(self) -> list[str]:
        """Addresses of the GPUs this VM takes (``.0`` functions), for outputs and inventories."""
        return [c.address for c in self.claims if c.is_gpu]


@dataclass(frozen=True)
class ClusterPlan:
    """One cluster (one Pulumi stack) as it will be created."""

    key: ClusterKey
    name: str
    subnet: str
    bridge: str
    gateway: str
    netmask: str
    dhcp_start: str
    dhcp_end: str
    forward_mode: ForwardMode
    dns_servers: tuple[str, ...]
    vms: tuple[VmPlan, ...] = field(default_factory=tuple)
    host: str | None = None  # the host the cluster file places the cluster on (``hosts.<name>``)
    host_uri: str | None = None  # that host's libvirt URI; None: the stack's ``aihow:libvirtUri``
    partitions: tuple[str, ...] = ()  # SLURM partitions (HPC), the default one first
    max_job_time: str = "INFINITE"  # SLURM: every partition's MaxTime
    suspend_time: int = SUSPEND_TIME  # SLURM power saving: seconds idle before an on-demand node is powered down
    resume_timeout: int = RESUME_TIMEOUT  # SLURM power saving: seconds an on-demand node may take to come up
    # Kubernetes: seconds with no work before an on-demand worker is stopped
    scale_down_unneeded_time: int = SCALE_DOWN_UNNEEDED_TIME
    pod_subnet: str | None = None  # Kubernetes (Cloud): pods' addresses, one /24 per node
    service_subnet: str | None = None  # Kubernetes (Cloud): services' virtual addresses

    @property
    def network_name(self) -> str:
        """libvirt network name (ai-how's)."""
        return f"{self.name}-network"

    @property
    def dns_domain(self) -> str:
        """The cluster's DNS domain (the network's and every guest's)."""
        return f"{self.name}.local"

    @property
    def pool_name(self) -> str:
        """libvirt storage pool name (ai-how's)."""
        return f"{self.name}-pool"

    @property
    def spread(self) -> bool:
        """Whether its nodes run on more than one host (a node placed off its cluster's host)."""
        return len({vm.host for vm in self.vms}) > 1

    def vm(self, name: str) -> VmPlan:
        """The VM called ``name``; KeyError when this cluster has none."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


def _claims(devices: list[PciDevice]) -> tuple[DeviceClaim, ...]:
    by_slot: dict[str, list[PciDevice]] = defaultdict(list)
    for device in devices:
        by_slot[device.slot].append(device)
    claims = []
    for slot, members in by_slot.items():
        gpu = next((d for d in members if d.device_type.value == "gpu"), None)
        claims.append(DeviceClaim(
            slot=slot,
            functions=tuple(sorted({d.pci_address for d in members})),
            is_gpu=gpu is not None,
            vendor_id=(gpu or members[0]).vendor_id,
            device_id=(gpu or members[0]).device_id,
        ))
    return tuple(sorted(claims, key=lambda c: c.slot))


def node_entries(key: ClusterKey, cluster: HpcCluster | CloudCluster) -> list[tuple[str, NodeSpec, Role, str]]:
    """(key path, node, role, short name) for each node, in file order."""
    prefix = f"clusters.{key}"
    if isinstance(cluster, HpcCluster):
        entries: list[tuple[str, NodeSpec, Role, str]] = [
            (f"{prefix}.controller", cluster.controller, "controller", "controller")
        ]
        entries += [(f"{prefix}.compute_nodes[{i}]", node, "compute", f"compute-{i + 1:02d}")
                    for i, node in enumerate(cluster.compute_nodes)]
        return entries
    entries = [(f"{prefix}.control_plane", cluster.control_plane, "control-plane", "control-plane")]
    if isinstance(cluster.worker_nodes, WorkerGroups):
        located = [(f"{prefix}.worker_nodes.{group}[{i}]", node)
                   for group in ("cpu", "gpu")
                   for i, node in enumerate(getattr(cluster.worker_nodes, group))]
    else:
        located = [(f"{prefix}.worker_nodes[{i}]", node) for i, node in enumerate(cluster.worker_nodes)]
    counters = {"cpu-worker": 0, "gpu-worker": 0}
    for path, node in located:
        role: Role = "gpu-worker" if node.has_gpu else "cpu-worker"
        counters[role] += 1
        entries.append((path, node, role, f"{role}-{counters[role]:02d}"))
    return entries


def _disk_source(node: NodeSpec, cluster: HpcCluster | CloudCluster) -> dict[str, Any]:
    """The node's own image choice, else its cluster's."""
    chosen = node if node.image or node.base_image_path else cluster
    return {"image": chosen.image, "base_image": chosen.base_image_path}


def _merge_user_data(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Cluster user-data, then the node's: lists are joined."""
    return {key: [*first.get(key, []), *then.get(key, [])] for key in sorted({*first, *then})}


def _node_pod_subnet(pods: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Network:
    """The ``index``-th /24 of the pod subnet (nodes in file order, the control plane first):
    adding a node at the end moves no other node's pods."""
    return ipaddress.IPv4Network((int(pods.network_address) + (index << 8), 24))


def _partitions(cluster: HpcCluster | CloudCluster) -> tuple[str, ...]:
    if not isinstance(cluster, HpcCluster):
        return ()
    config = cluster.slurm_config
    first = config.default_partition or (config.partitions[0] if config.partitions else "compute")
    return (first, *[p for p in config.partitions if p != first])


def _reserved_addresses(nodes: list[NodeSpec], gateway: ipaddress.IPv4Address,
                        dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]
                        ) -> list[ipaddress.IPv4Address | None]:
    """Each node's address: its static one, or for a node without one (``ip: DHCP``) the DHCP
    reservation the network makes for it, counted down from the end of the DHCP range in node
    order, past static addresses (so adding a node at the end moves no other node's address).
    None when the range is used up (``_check_addresses`` says so)."""
    taken = {node.ip for node in nodes if node.ip is not None} | {gateway}
    free = (a for a in (ipaddress.IPv4Address(n) for n in range(int(dhcp_range[1]), int(dhcp_range[0]) - 1, -1))
            if a not in taken)
    return [node.ip if node.ip is not None else next(free, None) for node in nodes]


def _host_uri(file: ClusterFile, host: str | None) -> str | None:
    """The libvirt URI of a host the file names (None for none, or one it does not define:
    crosscheck says so)."""
    return file.hosts[host].uri if host is not None and host in file.hosts else None


def plan_cluster(file: ClusterFile, key: ClusterKey, source: str = "cluster file") -> ClusterPlan:
    """The plan of ``clusters.<key>``; ``ConfigError`` when the file has no such cluster."""
    cluster: HpcCluster | CloudCluster | None = getattr(file.clusters, key)
    if cluster is None:
        defined = [k for k in CLUSTER_KEYS if getattr(file.clusters, k) is not None]
        raise ConfigError([f"clusters.{key}: the {source} defines no such cluster; allowed: a stack for a "
                           f"cluster it defines ({', '.join(defined) or 'none'})"], source)
    net = cluster.network
    start, end = net.dhcp_range
    kube = cluster.kubernetes_config if isinstance(cluster, CloudCluster) else None
    entries = node_entries(key, cluster)
    addresses = _reserved_addresses([node for _p, node, _r, _s in entries], net.gateway, (start, end))
    vms = tuple(
        VmPlan(
            name=f"{cluster.name}-{short}",
            cluster_key=key,
            cluster_name=cluster.name,
            role=role,
            short_name=short,
            key_path=path,
            cpu_cores=node.cpu_cores,
            memory_gb=node.memory_gb,
            disk_gb=node.disk_gb,
            ip=str(address) if address else None,
            dhcp=node.ip is None,
            mac=mac_for(f"{cluster.name}-{short}"),
            auto_start=node.auto_start and not node.on_demand,
            on_demand=node.on_demand,
            **_disk_source(node, cluster),
            devices=tuple(node.devices),
            claims=_claims(node.devices),
            acceleration=cluster.hardware.acceleration,
            mounts=tuple(node.virtio_fs_mounts),
            cloud_init=_merge_user_data(cluster.cloud_init.user_data(), node.cloud_init.user_data()),
            pod_subnet=str(_node_pod_subnet(kube.pod_subnet, index)) if kube else None,
            host=node.host or cluster.host,
            host_uri=_host_uri(file, node.host or cluster.host),
        )
        for index, ((path, node, role, short), address) in enumerate(zip(entries, addresses, strict=True))
    )
    return ClusterPlan(
        key=key,
        name=cluster.name,
        subnet=str(net.subnet),
        bridge=net.bridge,
        gateway=str(net.gateway),
        netmask=str(net.subnet.netmask),
        dhcp_start=str(start),
        dhcp_end=str(end),
        forward_mode=net.forward_mode,
        dns_servers=tuple(str(d) for d in net.dns_servers),
        vms=vms,
        host=cluster.host,
        host_uri=_host_uri(file, cluster.host),
        partitions=_partitions(cluster),
        max_job_time=cluster.slurm_config.max_job_time if isinstance(cluster, HpcCluster) else "INFINITE",
        **({"suspend_time": cluster.slurm_config.suspend_time, "resume_timeout": cluster.slurm_config.resume_timeout}
           if isinstance(cluster, HpcCluster) else {}),
        pod_subnet=str(kube.pod_subnet) if kube else None,
        service_subnet=str(kube.service_subnet) if kube else None,
        **({"scale_down_unneeded_time": kube.scale_down_unneeded_time} if kube else {}),
    )


def plan_all(file: ClusterFile) -> list[ClusterPlan]:
    """Plans of every cluster the file defines, HPC first."""
    return [plan_cluster(file, key) for key in CLUSTER_KEYS if getattr(file.clusters, key) is not None]


# --- sharing report ------------------------------------------------------------


@dataclass(frozen=True)
class SharedDevice:
    """A PCI address configured on more than one VM."""

    address: str
    vms: tuple[VmPlan, ...]

    @property
    def clusters(self) -> list[str]:
        """Cluster keys involved, in order."""
        return sorted({vm.cluster_key for vm in self.vms}, key=CLUSTER_KEYS.index)

    @property
    def conflict(self) -> bool:
        """True when VMs of different clusters both start automatically: the second start will fail."""
        return len({vm.cluster_key for vm in self.vms if vm.auto_start}) > 1

    def describe(self) -> str:
        """One line for operators."""
        who = ", ".join(f"{vm.name} ({vm.cluster_key}, {_start_word(vm)})"
                        for vm in self.vms)
        verdict = ("CONFLICT: both start automatically, the second cluster's start will fail"
                   if self.conflict else "ok: at most one starts automatically")
        return f"{self.address}: {who}; {verdict}"


def _start_word(vm: VmPlan) -> str:
    return "auto_start" if vm.auto_start else "on demand" if vm.on_demand else "manual start"


def shared_devices(plans: list[ClusterPlan]) -> list[SharedDevice]:
    """Every PCI address used by more than one VM of one host, across all clusters. Clusters the
    file places on two named hosts have two devices at one address; a cluster on no named host
    (its stack's ``aihow:libvirtUri``) may be on any, so it shares with all."""
    users: dict[str, list[tuple[str | None, VmPlan]]] = defaultdict(list)
    for plan in plans:
        for vm in plan.vms:
            for device in vm.devices:
                users[device.pci_address].append((vm.host, vm))
    shared = []
    for address, found in sorted(users.items()):
        hosts = {host for host, _vm in found}
        groups = [[vm for _h, vm in found]] if None in hosts else \
            [[vm for h, vm in found if h == host] for host in sorted(h for h in hosts if h is not None)]
        shared += [SharedDevice(address, tuple(vms)) for vms in groups if len(vms) > 1]
    return shared

"""Facts derived from a cluster file, in one place.

VM names, roles, MAC addresses, the physical devices each VM takes, the libvirt
object names of a cluster, the checks that span several keys, and the report
of GPUs configured on more than one VM. Everything else (the Pulumi program,
tasks, inventories, topology) reads these instead of deriving its own.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aihow_infra.config import (
    CLUSTER_KEYS,
    IMAGE_ROOT_GB,
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
    forward_mode: Literal["nat", "isolated"]
    dns_servers: tuple[str, ...]
    vms: tuple[VmPlan, ...] = field(default_factory=tuple)
    partitions: tuple[str, ...] = ()  # SLURM partitions (HPC), the default one first
    max_job_time: str = "INFINITE"  # SLURM: every partition's MaxTime
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


def _node_entries(key: ClusterKey, cluster: HpcCluster | CloudCluster) -> list[tuple[str, NodeSpec, Role, str]]:
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
    entries = _node_entries(key, cluster)
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
            auto_start=node.auto_start,
            **_disk_source(node, cluster),
            devices=tuple(node.devices),
            claims=_claims(node.devices),
            acceleration=cluster.hardware.acceleration,
            mounts=tuple(node.virtio_fs_mounts),
            cloud_init=_merge_user_data(cluster.cloud_init.user_data(), node.cloud_init.user_data()),
            pod_subnet=str(_node_pod_subnet(kube.pod_subnet, index)) if kube else None,
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
        partitions=_partitions(cluster),
        max_job_time=cluster.slurm_config.max_job_time if isinstance(cluster, HpcCluster) else "INFINITE",
        pod_subnet=str(kube.pod_subnet) if kube else None,
        service_subnet=str(kube.service_subnet) if kube else None,
    )


def plan_all(file: ClusterFile) -> list[ClusterPlan]:
    """Plans of every cluster the file defines, HPC first."""
    return [plan_cluster(file, key) for key in CLUSTER_KEYS if getattr(file.clusters, key) is not None]


# --- checks that span several keys --------------------------------------------


def _check_worker_types(key: ClusterKey, cluster: HpcCluster | CloudCluster) -> list[str]:
    problems = []
    for path, node, role, _short in _node_entries(key, cluster):
        declared = node.worker_type or (path.split(".")[-1].split("[")[0]
                                        if ".worker_nodes.cpu[" in path or ".worker_nodes.gpu[" in path else None)
        if declared and f"{declared}-worker" != role:
            problems.append(
                f"{path}: declared a {declared} worker but {'has' if node.has_gpu else 'has no'} GPU passthrough; "
                f"allowed: a gpu worker passes through a device_type 'gpu', a cpu worker none"
            )
    return problems


def _check_addresses(plan: ClusterPlan) -> list[str]:
    problems = []
    net = ipaddress.IPv4Network(plan.subnet)
    reserved = {net.network_address: "network address", net.broadcast_address: "broadcast address",
                ipaddress.IPv4Address(plan.gateway): "gateway"}
    seen: dict[str, str] = {}
    for vm in plan.vms:
        if vm.ip is None:
            problems.append(f"{vm.key_path}.ip: DHCP, but the DHCP range {plan.dhcp_start}-{plan.dhcp_end} has no "
                            "address left to reserve for it; allowed: a static address, or a larger range")
            continue
        if vm.dhcp:
            continue
        addr = ipaddress.IPv4Address(vm.ip)
        where = f"{vm.key_path}.ip"
        if addr not in net:
            problems.append(f"{where}: '{addr}' is outside subnet {net}; allowed: a host address of {net}")
        elif addr in reserved:
            problems.append(f"{where}: '{addr}' is the {reserved[addr]} of {net}; "
                            "allowed: a host address other than network, gateway and broadcast")
        if vm.ip in seen:
            problems.append(f"{where}: '{addr}' is already used by {seen[vm.ip]}; allowed: one VM per address")
        seen.setdefault(vm.ip, vm.key_path)
    return problems


def _check_kubernetes_networks(plan: ClusterPlan) -> list[str]:
    if plan.pod_subnet is None or plan.service_subnet is None:
        return []
    prefix = f"clusters.{plan.key}.kubernetes_config"
    nets = {"network.subnet": ipaddress.IPv4Network(plan.subnet),
            "kubernetes_config.pod_subnet": ipaddress.IPv4Network(plan.pod_subnet),
            "kubernetes_config.service_subnet": ipaddress.IPv4Network(plan.service_subnet)}
    problems = [f"clusters.{plan.key}.{b}: '{nets[b]}' overlaps clusters.{plan.key}.{a} '{nets[a]}'; "
                "allowed: disjoint subnets" for i, a in enumerate(nets) for b in list(nets)[i + 1:]
                if nets[a].overlaps(nets[b])]
    room = 1 << (24 - nets["kubernetes_config.pod_subnet"].prefixlen)
    if len(plan.vms) > room:
        problems.append(f"{prefix}.pod_subnet: '{plan.pod_subnet}' has room for {room} nodes, the cluster has "
                        f"{len(plan.vms)}; allowed: a larger pod subnet")
    return problems


def _check_devices(plan: ClusterPlan) -> list[str]:
    problems = []
    holders: dict[str, list[VmPlan]] = defaultdict(list)
    for vm in plan.vms:
        addresses = [d.pci_address for d in vm.devices]
        for address in sorted({a for a in addresses if addresses.count(a) > 1}):
            problems.append(f"{vm.key_path}.pcie_passthrough.devices: '{address}' is listed twice; "
                            "allowed: each PCI function once")
        for address in set(addresses):
            holders[address].append(vm)
    for address, vms in sorted(holders.items()):
        starting = [vm for vm in vms if vm.auto_start]
        if len(starting) > 1:
            names = ", ".join(vm.name for vm in starting)
            problems.append(
                f"{starting[1].key_path}.pcie_passthrough: '{address}' is also taken by {starting[0].name} and "
                f"both start automatically ({names}); allowed: set auto_start: false on all but one"
            )
    return problems


def _check_images(plans: list[ClusterPlan]) -> list[str]:
    problems = []
    for plan in plans:
        for vm in plan.vms:
            root_gb = IMAGE_ROOT_GB[vm.image] if vm.image is not None else 0
            if vm.disk_gb < root_gb:
                problems.append(f"{vm.key_path}.disk_gb: {vm.disk_gb} is smaller than the {vm.image} image's root "
                                f"file system ({root_gb} GiB); allowed: {root_gb} or more")
            for i, mount in enumerate(vm.mounts):
                if not Path(mount.host_path).is_dir():
                    problems.append(f"{vm.key_path}.virtio_fs_mounts[{i}].host_path: '{mount.host_path}' is not a "
                                    "folder on this host; allowed: an existing folder to share")
            if vm.base_image is None:
                continue
            path = Path(vm.base_image)
            if not path.is_file():
                problems.append(f"{vm.key_path}.base_image_path: '{vm.base_image}' does not exist "
                                f"(looked at {path}); allowed: an existing qcow2 image file, or no image "
                                "for a blank disk")
    return problems


# Host folders a cluster file may not hand to a guest (as a base image or a virtio-fs share)
# unless the stack allows it (aihow:allowSystemPaths): the host's own system and secrets.
SYSTEM_PATHS = ("/etc", "/boot", "/root", "/proc", "/sys", "/dev", "/run", "/usr", "/bin", "/sbin", "/lib",
                "/lib32", "/lib64", "/var/lib/aihow", "/var/lib/libvirt/qemu", "/var/run", "/var/log")


def system_path(path: str) -> str | None:
    """The system location ``path`` is in (``/`` itself is one), or None."""
    if Path(path) == Path("/"):
        return "/"
    return next((s for s in SYSTEM_PATHS if Path(path) == Path(s) or Path(s) in Path(path).parents), None)


def _check_host_paths(plans: list[ClusterPlan]) -> list[str]:
    problems = []
    for plan in plans:
        for vm in plan.vms:
            paths = [(f"{vm.key_path}.base_image_path", vm.base_image)] + [
                (f"{vm.key_path}.virtio_fs_mounts[{i}].host_path", m.host_path) for i, m in enumerate(vm.mounts)]
            for key, path in paths:
                where = system_path(path) if path else None
                if where:
                    problems.append(f"{key}: '{path}' is in the host's system location {where}; allowed: a path "
                                    "outside it (or set aihow:allowSystemPaths true for this stack)")
    return problems


def cross_check(file: ClusterFile, *, check_images: bool = True, allow_system_paths: bool = False) -> list[str]:
    """Problems that single keys cannot show: addresses, duplicates, shared devices, images,
    host paths."""
    problems: list[str] = []
    for key in CLUSTER_KEYS:
        cluster = getattr(file.clusters, key)
        if cluster is not None:
            problems += _check_worker_types(key, cluster)
    if problems:
        return problems
    plans = plan_all(file)
    for plan in plans:
        problems += _check_addresses(plan)
        problems += _check_devices(plan)
        problems += _check_kubernetes_networks(plan)

    names: dict[str, str] = {}
    macs: dict[str, str] = {}
    for plan in plans:
        for vm in plan.vms:
            if vm.name in names:
                problems.append(f"{vm.key_path}: VM name '{vm.name}' is also the name of {names[vm.name]}; "
                                "allowed: distinct cluster names")
            elif vm.mac in macs:
                problems.append(f"{vm.key_path}: MAC '{vm.mac}' of '{vm.name}' equals that of {macs[vm.mac]}; "
                                "allowed: distinct VM names")
            names.setdefault(vm.name, vm.key_path)
            macs.setdefault(vm.mac, vm.name)

    if len(plans) == 2:
        hpc, cloud = plans
        if hpc.name == cloud.name:
            problems.append(f"clusters.cloud.name: '{cloud.name}' equals clusters.hpc.name; "
                            "allowed: a different name (it prefixes every libvirt object)")
        if ipaddress.IPv4Network(hpc.subnet).overlaps(ipaddress.IPv4Network(cloud.subnet)):
            problems.append(f"clusters.cloud.network.subnet: '{cloud.subnet}' overlaps clusters.hpc.network.subnet "
                            f"'{hpc.subnet}'; allowed: a subnet disjoint from it")
        if hpc.bridge == cloud.bridge:
            problems.append(f"clusters.cloud.network.bridge: '{cloud.bridge}' equals clusters.hpc.network.bridge; "
                            "allowed: a different bridge name")
    if check_images:
        problems += _check_images(plans)
    if not allow_system_paths:
        problems += _check_host_paths(plans)
    return problems


@dataclass(frozen=True)
class SubnetInUse:
    """An IPv4 subnet the host already uses: on an interface, by a route, or by a libvirt network."""

    subnet: str
    where: str  # e.g. "interface eth0", "a route via eth0", "libvirt network 'default' (bridge virbr0)"
    interface: str = ""  # the interface (bridge) it is on, "" when none is known
    network: str = ""  # the libvirt network that holds it, "" for none


def subnet_collisions(plans: list[ClusterPlan], in_use: list[SubnetInUse]) -> list[str]:
    """Each cluster subnet that overlaps one the host already uses; the cluster's own bridge and
    libvirt network (made by an earlier ``up``) are not a collision."""
    problems = []
    for plan in plans:
        ours = ipaddress.IPv4Network(plan.subnet)
        for used in in_use:
            if plan.bridge == used.interface or plan.network_name == used.network:
                continue
            if ours.overlaps(ipaddress.IPv4Network(used.subnet)):
                problems.append(f"clusters.{plan.key}.network.subnet: '{plan.subnet}' overlaps {used.subnet} of "
                                f"{used.where} on this host; allowed: a subnet no interface, route or libvirt "
                                "network of the host uses")
                break
    return problems


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
        who = ", ".join(f"{vm.name} ({vm.cluster_key}, {'auto_start' if vm.auto_start else 'manual start'})"
                        for vm in self.vms)
        verdict = ("CONFLICT: both start automatically, the second cluster's start will fail"
                   if self.conflict else "ok: at most one starts automatically")
        return f"{self.address}: {who}; {verdict}"


def shared_devices(plans: list[ClusterPlan]) -> list[SharedDevice]:
    """Every PCI address used by more than one VM, across all clusters."""
    users: dict[str, list[VmPlan]] = defaultdict(list)
    for plan in plans:
        for vm in plan.vms:
            for device in vm.devices:
                users[device.pci_address].append(vm)
    return [SharedDevice(address, tuple(vms)) for address, vms in sorted(users.items()) if len(vms) > 1]

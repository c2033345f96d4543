"""ComponentResources: a cluster made of its network, pool and nodes; a node made of its
volume, GPU leases and domain."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi

from aihow_infra.cloudinit import SeedSpec, seed_files
from aihow_infra.config import ImageRole
from aihow_infra.desired import DesiredPower
from aihow_infra.gpu.ledger import LeaseRef, holder_for
from aihow_infra.images import KERNEL_CMDLINE, image_for
from aihow_infra.kinds import kind_of
from aihow_infra.libvirt.guest import console_log_path
from aihow_infra.placement import hosts_of, vm_uri
from aihow_infra.plan import ClusterPlan, VmPlan
from aihow_infra.settings import StackSettings
from providers.domain import Acceleration, Boot, Domain, DomainArgs, HostDevice, Mount
from providers.gpu_lease import GpuLease
from providers.network import DhcpHost, Network, NetworkArgs
from providers.seed import Seed, SeedArgs
from providers.storage import HostImage, HostImageArgs, PoolArgs, StoragePool, Volume, VolumeArgs


@dataclass(frozen=True)
class NodeArgs:
    """What a node needs: its plan, its cluster's, the stack's settings, the login key, and the
    network, pool, image and GPU lease ledger of its cluster on its host."""

    vm: VmPlan
    cluster: ClusterPlan
    settings: StackSettings
    stack: str
    login_key: str
    power: DesiredPower
    network_name: pulumi.Output[str]
    network_id: pulumi.Output[str]
    pool_name: pulumi.Output[str]
    pool_path: str
    ledger: str  # the GPU leases of the node's host (gpu/hosts.py host_ledger)
    uri: str  # the libvirt URI of the node's host
    host_image: HostImage | None = None  # the node's image on its host (copied there when missing)


def seed_spec(vm: VmPlan, plan: ClusterPlan, user: str, key: str) -> SeedSpec:
    """What the VM's cloud-init seed says: its name and address, the login user with ``key``, the
    default route on NAT networks (the host) and host bridges (the LAN's gateway), the name
    servers (libvirt's on the networks it serves, then ``dns_servers``), and an /etc/hosts naming
    every node of the cluster."""
    served = plan.forward_mode != "bridge"  # libvirt's dnsmasq answers at the gateway
    return SeedSpec(
        hostname=vm.name, mac=vm.mac, ip=vm.ip, subnet=plan.subnet,
        gateway=plan.gateway if plan.forward_mode in ("nat", "bridge") else None,
        dns_servers=((plan.gateway,) if served else ()) + plan.dns_servers, domain=plan.dns_domain, user=user,
        ssh_keys=(key,), hosts=tuple((v.ip, v.name) for v in plan.vms if v.ip),
        extra=vm.cloud_init, dhcp=vm.dhcp, mounts=tuple((m.tag, m.mount_point, m.options) for m in vm.mounts),
    )


def network_args(plan: ClusterPlan, uri: str, stack: str) -> NetworkArgs:
    """The cluster's network as the ``Network`` resource takes it: a DHCP reservation per VM with
    an address, except on a host bridge (``forward_mode: bridge``), where libvirt serves no DHCP."""
    return NetworkArgs(
        uri=uri, name=plan.network_name, stack=stack, bridge=plan.bridge, forward_mode=plan.forward_mode,
        dns_domain=plan.dns_domain, dns_servers=list(plan.dns_servers), gateway=plan.gateway, netmask=plan.netmask,
        dhcp_start=plan.dhcp_start, dhcp_end=plan.dhcp_end,
        hosts=[DhcpHost(mac=vm.mac, name=vm.name, ip=vm.ip) for vm in plan.vms
               if vm.ip and plan.forward_mode != "bridge"],
    )


def acceleration_args(vm: VmPlan) -> Acceleration:
    """The domain's ``acceleration`` input from the cluster's ``hardware.acceleration``."""
    accel = vm.acceleration
    return Acceleration(
        cpu_model=accel.cpu_model,
        enable_nested=accel.enable_nested,
        cpu_features=list(accel.cpu_features),
        sockets=accel.cpu_topology.sockets,
        threads=accel.cpu_topology.threads,
        enable_hugepages=accel.performance.enable_hugepages,
        hugepage_size=accel.performance.hugepage_size,
        cpu_pinning=accel.performance.cpu_pinning,
        memory_backing=accel.performance.memory_backing,
    )


class Node(pulumi.ComponentResource):
    """One VM: its disk volume, the GPU lease it holds while it runs, and its domain.

    The domain depends on the lease, so it is taken before the domain starts;
    the lease is dropped from the program when the VM should not run, and
    Pulumi deletes it after the domain update that shut the VM off.
    """

    domain: Domain
    leases: list[GpuLease]

    def __init__(self, name: str, args: NodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("aihow:libvirt:Node", name, None, opts)
        vm, settings = args.vm, args.settings
        child = pulumi.ResourceOptions(parent=self)
        running = args.power.wants_running(vm.name, vm.auto_start)
        holder = holder_for(args.stack, vm.name)

        image = image_for(vm.image) if vm.image else None
        on_host = [args.host_image] if args.host_image else []
        volume = Volume(f"{name}-disk", VolumeArgs(
            uri=args.uri,
            pool=args.pool_name,
            name=f"{vm.name}.qcow2",
            size_gb=vm.disk_gb,
            base_image=str(image.disk) if image else vm.base_image,
        # A disk holds the guest's data: only a destroy, or a change the operator confirmed
        # (the tasks lift the protection then), may delete it.
        ), pulumi.ResourceOptions(parent=self, protect=True, depends_on=on_host))
        seed = Seed(f"{name}-seed", SeedArgs(
            uri=args.uri,
            pool=args.pool_name,
            name=f"{vm.name}-seed.iso",
            files=seed_files(seed_spec(args.vm, args.cluster, args.settings.login_user, args.login_key)),
        ), child) if vm.boots else None

        every_function = [a for c in vm.claims for a in c.functions]
        # Named after the first device: a one-GPU VM keeps the lease of earlier versions.
        self.leases = [
            GpuLease(f"{name}-lease-{vm.claims[0].slot.replace(':', '-')}",
                     LeaseRef(ledger=args.ledger, holder=holder, addresses=every_function), child)
        ] if running and vm.claims else []

        self.domain = Domain(f"{name}-domain", DomainArgs(
            uri=args.uri,
            name=vm.name,
            stack=args.stack,
            cluster=vm.cluster_name,
            role=vm.role,
            vcpus=vm.cpu_cores,
            memory_mib=vm.memory_gb * 1024,
            # Where libvirt puts the volumes of a directory pool, known before they exist: a
            # preview of a growing disk then shows the domain unchanged, not replaced.
            disk_path=f"{args.pool_path}/{vm.name}.qcow2",
            disk_gb=vm.disk_gb,
            seed_path=f"{args.pool_path}/{vm.name}-seed.iso" if seed else None,
            boot=Boot(kernel=str(image.kernel), initrd=str(image.initrd), cmdline=KERNEL_CMDLINE) if image else None,
            console_log=str(console_log_path(vm.name)),
            mac=vm.mac,
            address=vm.ip if seed else None,
            network=args.network_name,
            network_id=args.network_id,
            devices=[HostDevice(address=d.pci_address, type=d.device_type.value) for d in vm.devices],
            acceleration=acceleration_args(vm),
            mounts=[Mount(tag=m.tag, host_path=m.host_path) for m in vm.mounts],
            running=running,
            stop_timeout=settings.stop_timeout,
            virt_type=settings.virt_type,
            graphics=settings.graphics,
            lease=LeaseRef(ledger=args.ledger, holder=holder, addresses=every_function)
            if running and vm.claims else None,
            wait_ready=vm.waits_ready,
            ready_timeout=settings.ready_timeout,
        ), pulumi.ResourceOptions(parent=self, depends_on=[*self.leases, volume, *([seed] if seed else []), *on_host]))

        self.outputs = {
            "name": vm.name,
            "cluster": vm.cluster_name,
            "cluster_key": vm.cluster_key,
            "role": vm.role,
            "short_name": vm.short_name,
            "ip": vm.ip,
            "pod_subnet": vm.pod_subnet,
            "mac": vm.mac,
            "vcpus": vm.cpu_cores,
            "memory_gb": vm.memory_gb,
            "disk_gb": vm.disk_gb,
            "gpus": [{"address": c.address, "functions": list(c.functions), "vendor_id": c.vendor_id,
                      "device_id": c.device_id} for c in vm.claims if c.is_gpu],
            "devices": [d.pci_address for d in vm.devices],
            "auto_start": vm.auto_start,
            "on_demand": vm.on_demand,
            "desired_power": "running" if running else "stopped",
            "power_state": self.domain.state,
            "image": vm.image or vm.base_image,
            "host": vm.host,
            "libvirt_uri": args.uri,
            "login_user": settings.login_user if vm.boots else None,
            "ready": self.domain.ready,
            "addresses": self.domain.addresses,
        }
        self.register_outputs(self.outputs)


@dataclass(frozen=True)
class ClusterArgs:
    """A cluster's plan, the stack's settings, its power records and the GPU lease ledger of each
    host it runs on."""

    plan: ClusterPlan
    settings: StackSettings
    stack: str
    login_key: str
    power: DesiredPower
    ledgers: Mapping[str, str]  # by libvirt URI: that host's GPU leases (gpu/hosts.py host_ledger)


class Cluster(pulumi.ComponentResource):
    """A whole cluster: network (with a reservation per VM), storage pool, and nodes.

    Resource names are logical (``network``, ``compute-01-domain``), not the libvirt
    names, so renaming a cluster or a VM shows up as a replacement, not as a new resource.
    """

    nodes: list[Node]

    def __init__(self, name: str, args: ClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(f"aihow:libvirt:{kind_of(args.plan.key).component_type}", name, None, opts)
        plan, settings = args.plan, args.settings
        child = pulumi.ResourceOptions(parent=self)
        # Per host the cluster runs on (its own first, under the names one host always had): a
        # network, a pool, and each image its nodes boot (found there, or copied through libvirt).
        pool_path = settings.pool_folder(plan.name)
        on_host: dict[str, tuple[Network, StoragePool, dict[ImageRole, HostImage]]] = {}
        for host, uri in hosts_of(plan, settings.libvirt_uri):
            suffix = "" if host == plan.host else f"-{host}"
            network = Network(f"network{suffix}", network_args(plan, uri, args.stack), child)
            pool = StoragePool(f"pool{suffix}", PoolArgs(uri=uri, name=plan.pool_name, path=pool_path), child)
            roles = sorted({vm.image for vm in plan.vms if vm.image and vm_uri(vm, settings.libvirt_uri) == uri})
            images = {role: HostImage(f"image-{role}{suffix}", HostImageArgs(
                uri=uri, name=image.folder.name, source=str(image.folder), folder=str(image.folder),
                files=[f.name for f in image.files]), child) for role, image in ((r, image_for(r)) for r in roles)}
            on_host[uri] = (network, pool, images)
        self.nodes = []
        for vm in plan.vms:
            uri = vm_uri(vm, settings.libvirt_uri)
            network, pool, images = on_host[uri]
            self.nodes.append(Node(vm.short_name, NodeArgs(
                vm=vm, cluster=plan, settings=settings, stack=args.stack, login_key=args.login_key, power=args.power,
                network_name=network.name, network_id=network.uuid, pool_name=pool.name, pool_path=pool_path,
                ledger=args.ledgers[uri], uri=uri, host_image=images[vm.image] if vm.image else None), child))
        self.outputs = {
            "name": plan.name,
            "key": plan.key,
            "network": plan.network_name,
            "cidr": plan.subnet,
            "bridge": plan.bridge,
            "gateway": plan.gateway,
            "libvirt_uri": settings.libvirt_uri,
            "host": plan.host,
            "slurm_partitions": list(plan.partitions),
            "slurm_max_time": plan.max_job_time,
            "slurm_suspend_time": plan.suspend_time,
            "slurm_resume_timeout": plan.resume_timeout,
            "pod_subnet": plan.pod_subnet,
            "service_subnet": plan.service_subnet,
        }
        self.register_outputs(self.outputs)

"""The checks of a cluster file that span several keys (run by ``validate`` and every task
that loads a file, after each key passed its own): worker types, addresses and DHCP ranges,
Kubernetes subnets, passthrough devices, images, host paths, and subnets the host already
uses. Each problem is one line naming the key, the value and what is allowed."""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path

from aihow_infra.config import (
    CLUSTER_KEYS,
    IMAGE_ROOT_GB,
    CloudCluster,
    ClusterFile,
    ClusterKey,
    HpcCluster,
)
from aihow_infra.host import SubnetInUse
from aihow_infra.libvirt_names import runs_here
from aihow_infra.plan import ClusterPlan, VmPlan, node_entries, plan_all


def _check_worker_types(key: ClusterKey, cluster: HpcCluster | CloudCluster) -> list[str]:
    problems = []
    for path, node, role, _short in node_entries(key, cluster):
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
        if vm.dhcp and plan.forward_mode == "bridge":
            problems.append(f"{vm.key_path}.ip: DHCP, but network.forward_mode is 'bridge' (the guests join an "
                            f"existing host bridge, where libvirt serves no DHCP); allowed: a static address in "
                            f"{plan.subnet}")
            continue
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


def _elsewhere(vm: VmPlan) -> bool:
    """Whether the file places the VM on a host that is not this machine."""
    return vm.host_uri is not None and not runs_here(vm.host_uri)


def _on_another_machine(vm: VmPlan) -> list[str]:
    """A node on a host that is not this machine takes only what the project can copy there
    through libvirt (its own images): not a path of that host's files, which it cannot see."""
    why = (f"the node runs on host {vm.host!r} ({vm.host_uri}), whose files this machine cannot see; allowed: "
           "the project's images (image: base, hpc or cloud, copied to each host through libvirt) and no host "
           "folders, or a host on this machine")
    return ([f"{vm.key_path}.base_image_path: '{vm.base_image}': {why}"] if vm.base_image else []) + \
        [f"{vm.key_path}.virtio_fs_mounts[{i}].host_path: '{m.host_path}': {why}" for i, m in enumerate(vm.mounts)]


def _check_spread(plan: ClusterPlan) -> list[str]:
    """A cluster whose nodes run on several hosts needs one layer-2 network across them: a host
    bridge of the same name on each (``forward_mode: bridge``); libvirt's isolated and NAT
    networks end at their host."""
    if not plan.spread or plan.forward_mode == "bridge":
        return []
    first = plan.vms[0]

    def host(vm: VmPlan) -> str:
        return repr(vm.host) if vm.host else "the stack's host (aihow:libvirtUri)"

    return [f"{vm.key_path}.host: {host(vm)} puts the cluster on a second host besides {host(first)} of "
            f"{first.key_path}, but "
            f"clusters.{plan.key}.network.forward_mode is {plan.forward_mode!r}, a network that ends at its host (the "
            "nodes could not reach each other); allowed: forward_mode 'bridge' (a bridge of that name on every host, "
            "joined at layer 2), or one host for the whole cluster"
            for vm in plan.vms if vm.host != first.host]


def _check_images(plans: list[ClusterPlan]) -> list[str]:
    problems = []
    for plan in plans:
        for vm in plan.vms:
            root_gb = IMAGE_ROOT_GB[vm.image] if vm.image is not None else 0
            if vm.disk_gb < root_gb:
                problems.append(f"{vm.key_path}.disk_gb: {vm.disk_gb} is smaller than the {vm.image} image's root "
                                f"file system ({root_gb} GiB); allowed: {root_gb} or more")
            if _elsewhere(vm):
                continue  # its files are refused (_on_another_machine)
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
            named = [(f"clusters.{key}.host", cluster.host)] + [
                (f"{path}.host", node.host) for path, node, _role, _short in node_entries(key, cluster)]
            problems += [f"{where}: {host!r} is not a host of this file; allowed: a name under hosts "
                         f"({', '.join(sorted(file.hosts)) or 'none defined'})"
                         for where, host in named if host is not None and host not in file.hosts]
    if problems:
        return problems
    plans = plan_all(file)
    for plan in plans:
        problems += _check_addresses(plan)
        problems += _check_devices(plan)
        problems += _check_kubernetes_networks(plan)
        problems += [p for vm in plan.vms if _elsewhere(vm) for p in _on_another_machine(vm)]
        problems += _check_spread(plan)

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
        if _one_host(hpc, cloud):
            problems += _check_one_host_networks(hpc, cloud)
    if check_images:
        problems += _check_images(plans)
    if not allow_system_paths:
        problems += _check_host_paths(plans)
    return problems


def _one_host(hpc: ClusterPlan, cloud: ClusterPlan) -> bool:
    """Whether the two clusters may share a host: unless the file places them on two named hosts
    (a host placed by its stack's ``aihow:libvirtUri`` alone may be this one)."""
    return hpc.host == cloud.host or None in (hpc.host, cloud.host)


def _check_one_host_networks(hpc: ClusterPlan, cloud: ClusterPlan) -> list[str]:
    """Two clusters on one host: their bridges and subnets apart, unless both join one host
    bridge (a LAN), where the subnet is shared and only the addresses must differ."""
    problems = []
    one_lan = hpc.forward_mode == cloud.forward_mode == "bridge" and hpc.bridge == cloud.bridge
    if one_lan:
        hpc_ips = {vm.ip: vm.key_path for vm in hpc.vms if vm.ip}
        problems += [f"{vm.key_path}.ip: '{vm.ip}' is already used by {hpc_ips[vm.ip]} on the same bridge "
                     f"'{cloud.bridge}'; allowed: one VM per address" for vm in cloud.vms if vm.ip in hpc_ips]
    elif ipaddress.IPv4Network(hpc.subnet).overlaps(ipaddress.IPv4Network(cloud.subnet)):
        problems.append(f"clusters.cloud.network.subnet: '{cloud.subnet}' overlaps clusters.hpc.network.subnet "
                        f"'{hpc.subnet}'; allowed: a subnet disjoint from it")
    if hpc.bridge == cloud.bridge and not one_lan:
        problems.append(f"clusters.cloud.network.bridge: '{cloud.bridge}' equals clusters.hpc.network.bridge; "
                        "allowed: a different bridge name")
    return problems


def host_words(plan: ClusterPlan, uri: str) -> str:
    """How a message names the host of ``uri`` that ``plan``'s VMs run on: by the cluster file's
    name for it, with its URI; for a cluster on one host the file does not name, ``""``."""
    named = {vm.host for vm in plan.vms if vm.host}
    return f"host {named.pop()!r} ({uri})" if len(named) == 1 else ""


def bridge_problems(plan: ClusterPlan, missing: str | None, host_addresses: Collection[str],
                    host: str = "") -> list[str]:
    """What keeps a cluster on ``forward_mode: bridge`` off its host's bridge, a line each: the
    bridge itself (``missing``: why the host cannot take guests there, as
    ``libvirt.inspect.missing_bridge`` says; None when it can), and each node given one of the
    host's own ``host_addresses`` on it. ``host`` names that host (``host 'gpu2' (URI)``) when
    the cluster file names it."""
    on = f" on {host}" if host else ""
    problems = [] if missing is None else [
        f"clusters.{plan.key}.network.bridge: '{plan.bridge}' is not a bridge the guests can join{on}: {missing}; "
        "allowed: an existing bridge of that host (forward_mode 'bridge' makes none)"]
    return problems + [f"{vm.key_path}.ip: '{vm.ip}' is the host's own address on bridge '{plan.bridge}'; allowed: "
                       f"another address of {plan.subnet}" for vm in plan.vms if vm.ip in host_addresses]


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

"""The topology tree: clusters with their state, networks with their CIDR, VMs with IP,
role, CPU, RAM and GPUs; VMs sharing a GPU are marked, with the one holding it.

Colours: running green, stopped yellow, conflicts red, networks cyan, GPUs magenta.
"""

from __future__ import annotations

from rich.tree import Tree

from aihow_infra.gpu.ledger import vm_of
from aihow_infra.loading import load_cluster_file
from aihow_infra.plan import plan_all, shared_devices
from aihow_infra.status import PLANNED, SystemStatus, planned_status


def planned_topology(cluster_file: str) -> SystemStatus:
    """The tree's data from a cluster file alone (nothing needs to exist)."""
    plans = plan_all(load_cluster_file(cluster_file, check_images=False, allow_system_paths=True))
    return planned_status(plans, shared_devices(plans))


def _state_style(state: str) -> str:
    return {"running": "green", PLANNED: "white"}.get(state, "yellow")


def render_tree(status: SystemStatus) -> Tree:
    """A rich tree of the clusters (live from ``system_status`` or planned)."""
    shared = {s.address: s for s in status.shared_gpus}
    root = Tree("[bold]ai-how infrastructure[/bold]")
    for cluster in status.clusters:
        style = _state_style(cluster.status)
        node = root.add(f"[bold]{cluster.name}[/bold] ({cluster.stack}) [{style}]{cluster.status}[/{style}]")
        if cluster.error:
            node.add(f"[red]{cluster.error}[/red]")
            continue
        state = f" {cluster.network_state}" if cluster.network_state not in ("-", "active") else ""
        net = node.add(f"[cyan]network {cluster.network} {cluster.cidr}{state}[/cyan]")
        for vm in cluster.vms:
            vs = _state_style(vm.state)
            branch = net.add(
                f"[{vs}]{vm.name}[/{vs}] {vm.ip or 'DHCP'} {vm.role} "
                f"{vm.vcpus} vCPU {vm.memory_gb} GiB [{vs}]{vm.state}[/{vs}]"
                + (f" {vm.guest}" if vm.state == "running" and vm.guest not in ("", "-") else "")
                + (f" {vm.workload_name} {vm.workload}" if vm.workload and vm.workload != "answers" else "")
                + ("" if vm.auto_start else " (manual start)"))
            for gpu in vm.gpus:
                label = f"[magenta]GPU {gpu.address}[/magenta]"
                share = shared.get(gpu.address)
                if share:
                    others = [n for n in share.vms if n != vm.name]
                    held = f"held by {vm_of(share.holder)}" if share.holder else "free"
                    colour = "red" if share.conflict or share.holder else "magenta"
                    label += f" [{colour}]shared with {', '.join(others)}; {held}[/{colour}]"
                branch.add(label)
    total = sum(len(c.vms) for c in status.clusters)
    running = sum(vm.state == "running" for c in status.clusters for vm in c.vms)
    root.add(f"{total} VMs, {running} running, {len(status.shared_gpus)} shared GPU address(es)")
    return root

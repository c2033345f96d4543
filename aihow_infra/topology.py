"""The topology tree: clusters with their state, networks with their CIDR, VMs with IP,
role, CPU, RAM and GPUs; VMs sharing a GPU are marked, with the one holding it.

Colours: running green, stopped yellow, conflicts red, networks cyan, GPUs magenta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.tree import Tree

from aihow_infra.config import load_cluster_file
from aihow_infra.plan import plan_all, shared_devices

if TYPE_CHECKING:
    from aihow_infra.operations import Operator


def topology_data(op: Operator, cluster_file: str | None = None) -> dict[str, Any]:
    """The tree as data: from the stacks (live state), or from a cluster file (planned only)."""
    if cluster_file is not None:
        plans = plan_all(load_cluster_file(cluster_file, check_images=False))
        clusters = [{
            "name": p.name, "stack": p.key, "status": "planned", "network": p.network_name, "cidr": p.subnet,
            "vms": [{"name": vm.name, "role": vm.role, "ip": vm.ip, "vcpus": vm.cpu_cores,
                     "memory_gb": vm.memory_gb, "state": "planned", "auto_start": vm.auto_start,
                     "gpus": [{"address": c.address, "functions": list(c.functions), "holder": None}
                              for c in vm.claims]} for vm in p.vms],
        } for p in plans]
        shared = [{"address": s.address, "vms": [vm.name for vm in s.vms], "holder": None,
                   "conflict": s.conflict} for s in shared_devices(plans)]
        return {"clusters": clusters, "shared_gpus": shared}
    return op.system_status()


def _state_style(state: str) -> str:
    return {"running": "green", "planned": "white"}.get(state, "yellow")


def render_tree(data: dict[str, Any]) -> Tree:
    """A rich tree of ``topology_data``."""
    shared = {s["address"]: s for s in data["shared_gpus"]}
    root = Tree("[bold]ai-how infrastructure[/bold]")
    for cluster in data["clusters"]:
        style = _state_style(cluster["status"])
        node = root.add(f"[bold]{cluster['name']}[/bold] ({cluster['stack']}) [{style}]{cluster['status']}[/{style}]")
        net = node.add(f"[cyan]network {cluster['network']} {cluster['cidr']}[/cyan]")
        for vm in cluster["vms"]:
            vs = _state_style(vm["state"])
            branch = net.add(
                f"[{vs}]{vm['name']}[/{vs}] {vm['ip'] or 'DHCP'} {vm['role']} "
                f"{vm['vcpus']} vCPU {vm['memory_gb']} GiB [{vs}]{vm['state']}[/{vs}]"
                + ("" if vm.get("auto_start", True) else " (manual start)"))
            for gpu in vm["gpus"]:
                label = f"[magenta]GPU {gpu['address']}[/magenta]"
                share = shared.get(gpu["address"])
                if share:
                    others = [n for n in share["vms"] if n != vm["name"]]
                    holder = share["holder"]
                    held = f"held by {holder.split('/', 1)[-1]}" if holder else "free"
                    colour = "red" if share["conflict"] or holder else "magenta"
                    label += f" [{colour}]shared with {', '.join(others)}; {held}[/{colour}]"
                branch.add(label)
    total = sum(len(c["vms"]) for c in data["clusters"])
    running = sum(vm["state"] == "running" for c in data["clusters"] for vm in c["vms"])
    root.add(f"{total} VMs, {running} running, {len(data['shared_gpus'])} shared GPU address(es)")
    return root

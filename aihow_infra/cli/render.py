"""How the tasks show things: every table and tree the operator reads, in one place. Each
function takes plain data (status rows, plans, lease rows) and returns a rich renderable; the
tasks print it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.tree import Tree

from aihow_infra.gpu.ledger import vm_of
from aihow_infra.status import PLANNED

if TYPE_CHECKING:
    from aihow_infra.gpu.homes import Place
    from aihow_infra.gpu.leases import LeaseRow
    from aihow_infra.images import Image
    from aihow_infra.plan import ClusterPlan
    from aihow_infra.status import StackSummary, SystemStatus, VmStatus


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    return table


def vm_table(rows: list[VmStatus], title: str, macs: bool = False) -> Table:
    """VMs: state, desired power, guest, the cluster software's word, address (and MAC when
    ``macs``), size, disk and GPUs with their holders; and the host of each when they run on
    more than one."""
    names = sorted({r.workload_name for r in rows if r.workload})
    workload = bool(names)
    spread = len({r.host for r in rows}) > 1
    table = _table(title, "VM", *(["host"] if spread else []), "role", "state", "desired", "guest",
                   *(["/".join(names)] if names else []), "IP", *(["MAC"] if macs else []), "vCPU", "GiB", "disk",
                   "GPUs (holder)")
    for r in rows:
        colour = "green" if r.state == "running" else "yellow"
        guest = f"[green]{r.guest}[/green]" if r.ready else r.guest
        ip = r.ip or (", ".join(r.addresses) if r.addresses else "DHCP")
        gpus = ", ".join(f"{g.address} ({g.holder or 'free'})" for g in r.gpus) or "-"
        table.add_row(r.name, *([r.host or STACK_HOST] if spread else []), r.role,
                      f"[{colour}]{r.state_word}[/{colour}]", r.desired, guest,
                      *([r.workload or "-"] if workload else []), ip, *([r.mac] if macs else []), str(r.vcpus),
                      str(r.memory_gb),
                      f"{r.disk_gb} GiB" if r.disk in ("present", "-") else f"[red]{r.disk}[/red]", gpus)
    return table


def stacks_table(rows: list[StackSummary]) -> Table:
    """The configured stacks: cluster file, cluster (or why it cannot be read), resources, last update."""
    table = _table("stacks", "stack", "cluster file", "cluster", "resources", "last update")
    for r in rows:
        table.add_row(r.stack, r.cluster_file, r.cluster if not r.error else f"[red]{r.error}[/red]",
                      str(r.resources), r.updated or "never deployed")
    return table


def valid_table(path: Path, plans: list[ClusterPlan]) -> Table:
    """A valid cluster file's clusters, with what they add up to (vCPUs, GiB of memory and disk),
    and the host of each when the file places any."""
    placed = any(vm.host for plan in plans for vm in plan.vms)
    table = _table(f"{path}: valid", "cluster", *(["host"] if placed else []), "VMs", "auto-start", "vCPUs",
                   "memory GiB", "disk GiB", "network", "GPUs")
    for plan in plans:
        hosts = dict.fromkeys(f"{vm.host} ({vm.host_uri})" if vm.host else "aihow:libvirtUri" for vm in plan.vms)
        host = [", ".join(hosts)] if placed else []
        table.add_row(plan.name, *host, str(len(plan.vms)), str(sum(vm.auto_start for vm in plan.vms)),
                      str(sum(vm.cpu_cores for vm in plan.vms)), str(sum(vm.memory_gb for vm in plan.vms)),
                      str(sum(vm.disk_gb for vm in plan.vms)), f"{plan.subnet} ({plan.bridge})",
                      str(sum(len(vm.gpu_addresses) for vm in plan.vms)))
    return table


def leases_table(rows: list[LeaseRow], ledger: str) -> Table:
    """Held GPU leases, stale ones marked (holder gone or shut off)."""
    table = _table(f"GPU leases ({ledger})", "address", "holder", "since", "generation", "holder state", "stale")
    for r in rows:
        table.add_row(r.address, r.holder, r.granted_at or "-", str(r.generation),
                      r.holder_state, "[red]stale[/red]" if r.stale else "")
    return table


def homes_table(places: list[Place]) -> Table:
    """Each device the ledger knows: its home, where it is now, and the command that takes a
    stuck one home."""
    table = _table("GPU homes (where each device lives when no VM holds it)", "address", "home", "now", "fix")
    for p in places:
        table.add_row(p.address, p.home, f"[red]{p}[/red]" if p.stuck else str(p), p.fix)
    return table


def images_table(rows: list[tuple[str, Image, bool]]) -> Table:
    """Guest images by role: built now or found in the cache, build time, disk size (MiB), folder."""
    table = _table("guest images", "role", "built now", "build time", "disk", "folder")
    for role, image, built in rows:
        table.add_row(role, "yes" if built else "no (cached)", f"{image.built_seconds:.0f} s",
                      f"{image.disk_bytes / 2**20:.0f} MiB", str(image.folder))
    return table


STACK_HOST = "the stack's host"  # a VM the cluster file places on no host: aihow:libvirtUri's


def _state_style(state: str) -> str:
    return {"running": "green", PLANNED: "white"}.get(state, "yellow")


def topology_tree(status: SystemStatus) -> Tree:
    """The clusters as a tree (live from ``system_status`` or planned): networks with their CIDR,
    VMs with IP, role, CPU, RAM and GPUs; a shared GPU marked with the VM holding it.

    Colours: running green, stopped yellow, conflicts red, networks cyan, GPUs magenta."""
    shared = {s.address: s for s in status.shared_gpus}
    root = Tree("[bold]ai-how infrastructure[/bold]")
    for cluster in status.clusters:
        style = _state_style(cluster.status)
        host = f" on {cluster.host}" if cluster.host else ""
        node = root.add(f"[bold]{cluster.name}[/bold] ({cluster.stack}){host} [{style}]{cluster.status}[/{style}]")
        if cluster.error:
            node.add(f"[red]{cluster.error}[/red]")
            continue
        state = f" {cluster.network_state}" if cluster.network_state not in ("-", "active") else ""
        net = node.add(f"[cyan]network {cluster.network} {cluster.cidr}{state}[/cyan]")
        spread = len({vm.host for vm in cluster.vms}) > 1  # then each VM says its host
        for vm in cluster.vms:
            vs = _state_style(vm.state)
            branch = net.add(
                f"[{vs}]{vm.name}[/{vs}] {vm.ip or 'DHCP'} {vm.role} "
                f"{vm.vcpus} vCPU {vm.memory_gb} GiB [{vs}]{vm.state_word}[/{vs}]"
                + (f" {vm.guest}" if vm.state == "running" and vm.guest not in ("", "-") else "")
                + (f" {vm.workload_name} {vm.workload}" if vm.workload and vm.workload != "answers" else "")
                + (" (on demand)" if vm.on_demand else "" if vm.auto_start else " (manual start)")
                + (f" on {vm.host or STACK_HOST}" if spread else ""))
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

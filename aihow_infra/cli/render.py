"""How the tasks show things: each table the operator reads, in one place (the topology's tree
is topology.py's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from aihow_infra.cli.common import out

if TYPE_CHECKING:
    from aihow_infra.status import VmStatus


def vm_table(rows: list[VmStatus], title: str) -> None:
    """VMs as a table: state, desired power, guest, the cluster software's word, address, size,
    disk and GPUs with their holders."""
    table = Table(title=title, title_justify="left")
    names = sorted({r.workload_name for r in rows if r.workload})
    workload = bool(names)
    for col in ("VM", "role", "state", "desired", "guest", *(["/".join(names)] if names else []), "IP", "vCPU", "GiB",
                "disk", "GPUs (holder)"):
        table.add_column(col)
    for r in rows:
        colour = "green" if r.state == "running" else "yellow"
        guest = f"[green]{r.guest}[/green]" if r.ready else r.guest
        ip = r.ip or (", ".join(r.addresses) if r.addresses else "DHCP")
        gpus = ", ".join(f"{g.address} ({g.holder or 'free'})" for g in r.gpus) or "-"
        table.add_row(r.name, r.role, f"[{colour}]{r.state}[/{colour}]", r.desired, guest,
                      *([r.workload or "-"] if workload else []), ip, str(r.vcpus), str(r.memory_gb),
                      f"{r.disk_gb} GiB" if r.disk in ("present", "-") else f"[red]{r.disk}[/red]", gpus)
    out.print(table)

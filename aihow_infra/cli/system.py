"""Tasks on both clusters (``system.*``) and handing the GPUs over (``switch``)."""

from __future__ import annotations

import json
from dataclasses import asdict

from invoke.context import Context

from aihow_infra.cli.common import YES_HELP, _confirm, _settled, err, operator, out, task
from aihow_infra.cli.render import vm_table


@task(help={"no_deploy": "provision and wait for ready only; do not run the playbooks", "yes": YES_HELP})
def system_up(c: Context, no_deploy: bool = False, yes: bool = False) -> None:
    """Bring up both clusters (at once; HPC first when they share a GPU), and deploy what changed."""
    if _settled(deploy=not no_deploy):
        out.print("[green]system up[/green] (nothing changed since the last run; libvirt agrees)")
        return
    operator(yes).system_up(deploy=not no_deploy)
    out.print("[green]system up[/green]")


@task(help={"yes": YES_HELP})
def system_down(c: Context, yes: bool = False) -> None:
    """Shut down both clusters at once, drained first (VMs stay defined; GPU leases are released)."""
    operator(yes).system_down()
    out.print("[yellow]system down[/yellow]")


@task(help={"json": "print JSON"})
def system_status(c: Context, json_: bool = False) -> None:
    """Both clusters, their VMs, who owns each shared GPU, and the power broker's queue."""
    from aihow_infra.ops.broker import BrokerRecord

    op = operator()
    status = op.system_status()
    broker = BrokerRecord.read(op.state.broker)
    if json_:
        out.print_json(json.dumps({**status.to_dict(), "broker": asdict(broker) if broker else None}))
        return
    for cluster in status.clusters:
        if cluster.error:
            err.print(f"[red]{cluster.stack}: {cluster.error}[/red]", highlight=False, soft_wrap=True)
            continue
        health = f"; {cluster.health}" if cluster.health else ""
        infra = f"; network {cluster.network_state}, pool {cluster.pool_state}"
        host = f" on {cluster.host}" if cluster.host else ""
        title = f"{cluster.name} ({cluster.stack}, {cluster.cidr}){host}: {cluster.status}{health}{infra}"
        out.print(vm_table(cluster.vms, title))
    homes = {h.address: h for h in status.homes}
    for gpu in status.shared_gpus:
        home = homes.get(gpu.address)
        where = f"; home {home.home}, {home.now}" if home and not home.stuck else ""
        out.print(f"[magenta]shared GPU {gpu.address}[/magenta]: {', '.join(gpu.vms)}; "
                  f"held by {gpu.holder or 'nobody'}{where}", highlight=False)
    for home in status.homes:
        if home.stuck:
            out.print(f"[red]device {home.address}: {home.now}[/red]; free it with `{home.fix}`", highlight=False)
    if broker is not None:
        out.print(f"power broker (as of {broker.updated}): {len(broker.waiting)} waiting", highlight=False)
        for h in broker.waiting:
            out.print(f"  [yellow]{h.action} {h.node}[/yellow] since {h.at}: {h.result}", highlight=False,
                      soft_wrap=True)
        for h in broker.recent[-5:]:
            out.print(f"  {h.at} {h.action} {h.node}: {h.result} ({h.seconds:.0f} s)", highlight=False, soft_wrap=True)


@task(help={"yes": "do not ask before destroying"})
def system_destroy(c: Context, yes: bool = False) -> None:
    """Destroy both clusters at once: every VM, disk and network."""
    _confirm("destroy both clusters (every VM, disk and network)?", yes)
    operator().system_destroy()
    out.print("[green]system destroyed[/green]")


@task(help={"to": "the cluster that gets the GPUs: hpc or cloud", "yes": YES_HELP})
def switch(c: Context, to: str, yes: bool = False) -> None:
    """Stop the other cluster's GPU VMs, then start this one's."""
    operator(yes).switch(to)
    out.print(f"[green]GPUs switched to {to}[/green]")

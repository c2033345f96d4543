"""Tasks on the stacks: list, up, preview, destroy, and validate a cluster file."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from invoke.context import Context

from aihow_infra.cli.common import STACK_HELP, YES_HELP, _check_stack, _confirm, _settled, err, operator, out, task
from aihow_infra.cli.render import stacks_table, valid_table


@task(help={"json": "print JSON"})
def stacks(c: Context, json_: bool = False) -> None:
    """The configured stacks: cluster file, cluster, resources in Pulumi's state, last update."""
    rows = operator().stack_summaries()
    if json_:
        out.print_json(json.dumps([asdict(r) for r in rows]))
        return
    if not rows:
        out.print("no stacks: add a Pulumi.hpc.yaml or Pulumi.cloud.yaml naming a cluster file")
        return
    out.print(stacks_table(rows))


@task(help={"stack": STACK_HELP, "yes": YES_HELP})
def up(c: Context, stack: str = "", yes: bool = False) -> None:
    """Create or update one cluster (pulumi up); asks first when a disk or VM would be lost or restarted."""
    _check_stack(stack)
    op = operator(yes)
    summary = op.up(stack)
    out.print(f"[green]{stack}[/green]: {summary}", highlight=False)
    if op.deploy_due(stack):
        out.print(f"[yellow]{stack}: what its deploy uses changed since the last one (addresses, nodes); "
                  f"`aihow deploy --stack {stack}` brings the cluster up to date (system.up deploys by "
                  "itself)[/yellow]", highlight=False)


@task(help={"stack": STACK_HELP + " (default: every configured stack)",
            "diff": "the engine's own preview, with every changed property"})
def preview(c: Context, stack: str = "", diff: bool = False) -> None:
    """Show what `up` would change, and what of it deletes a disk or restarts a VM."""
    if stack:
        _check_stack(stack)
    elif _settled(deploy=False):
        out.print("no changes (nothing changed since the last run; libvirt agrees)")
        return
    op = operator()
    for text in op.preview([stack] if stack else op.configured_stacks(), diff=diff).values():
        out.print(text, highlight=False, soft_wrap=True)


@task(help={"stack": STACK_HELP, "yes": "do not ask before destroying"})
def destroy(c: Context, stack: str = "", yes: bool = False) -> None:
    """Remove one cluster: VMs, disks, pool and network (pulumi destroy)."""
    _check_stack(stack)
    op = operator()
    if not yes:
        plan = op.view(stack).plan
        err.print(f"destroying stack {stack} removes, with everything on the disks:", highlight=False)
        err.print(f"  VMs: {', '.join(vm.name for vm in plan.vms)}", highlight=False, soft_wrap=True)
        err.print(f"  disks: {', '.join(f'{vm.name}.qcow2' for vm in plan.vms)} (and each VM's seed ISO)",
                  highlight=False, soft_wrap=True)
        err.print(f"  storage pool {plan.pool_name}, network {plan.network_name}; GPU leases are freed",
                  highlight=False, soft_wrap=True)
    _confirm(f"destroy stack {stack}?", yes)
    op.destroy(stack)
    out.print(f"[green]{stack} destroyed[/green]")


@task(help={"config": "cluster file to check (default: the one each stack names)"})
def validate(c: Context, config: str = "") -> None:
    """Check a cluster file: a summary, or every error at once."""
    from aihow_infra.hostcheck import check_all, check_hosts, checks_on_hosts
    from aihow_infra.loading import load_cluster_file
    from aihow_infra.plan import plan_all, shared_devices

    op = operator()
    stacks = op.configured_stacks()
    settings = op.settings(stacks[0]) if stacks else None
    uri = settings.libvirt_uri if settings else "qemu:///system"
    if config:  # the user's own path, from the folder they are in
        loaded = [(Path(config), load_cluster_file(config))]
    else:  # each stack's, from the project folder and with its settings, as `up` reads it
        named = {op.cluster_file_path(op.settings(s)): op.settings(s) for s in stacks}
        loaded = [(path, op.cluster_file(settings)) for path, settings in sorted(named.items())]
    for path, cluster_file in loaded:
        plans = plan_all(cluster_file)
        file = str(path)
        check_hosts(plans, file)  # a host that does not answer cannot be checked further
        check_all(checks_on_hosts(plans, uri, settings.virt_type if settings else "auto", file))
        out.print(valid_table(path, plans))
        for shared in shared_devices(plans):
            colour = "red" if shared.conflict else "magenta"
            out.print(f"[{colour}]shared {shared.describe()}[/{colour}]", highlight=False)

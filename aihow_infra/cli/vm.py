"""Tasks on one VM (``vm.*``), and access: ssh_config, deploy, kubectl."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit

from aihow_infra.cli.common import STACK_HELP, YES_HELP, _check_stack, err, operator, out, task
from aihow_infra.cli.render import vm_table
from aihow_infra.errors import AihowError


@task(help={"name": "VM name, e.g. aihow-hpc-compute-01, or compute-01 when one VM has it", "yes": YES_HELP})
def vm_start(c: Context, name: str, yes: bool = False) -> None:
    """Start a VM; its GPU leases are taken first."""
    op = operator(yes)
    name = op.vm_name(name)
    op.vm_start(name)
    out.print(f"[green]{name} running[/green]")


@task(help={"name": "VM name", "force": "power off at once instead of an ACPI shutdown", "yes": YES_HELP})
def vm_stop(c: Context, name: str, force: bool = False, yes: bool = False) -> None:
    """Stop a VM and release its GPU leases."""
    op = operator(yes)
    name = op.vm_name(name)
    op.vm_stop(name, force=force)
    out.print(f"[yellow]{name} stopped[/yellow]")


@task(help={"name": "VM name"})
def vm_restart(c: Context, name: str) -> None:
    """Shut a VM down and start it again; it keeps its GPU leases."""
    op = operator()
    name = op.vm_name(name)
    op.vm_restart(name)
    out.print(f"[green]{name} restarted[/green]")


@task(help={"name": "VM name", "json": "print JSON"})
def vm_status(c: Context, name: str, json_: bool = False) -> None:
    """State, IP, MAC, vCPUs, memory, GPUs and lease holder of a VM."""
    op = operator()
    name = op.vm_name(name)
    row = op.vm_status(name)
    if json_:
        out.print_json(json.dumps(asdict(row)))
        return
    out.print(vm_table([row], title=name, macs=True))


@task(help={"name": "VM name"})
def vm_console(c: Context, name: str) -> None:
    """Attach to a VM's serial console (leave with Ctrl-])."""
    op = operator()
    cmd = op.console_command(op.vm_name(name))
    os.execvp(cmd[0], cmd)


@task(help={"name": "VM name", "command": "run this instead of a login shell"})
def vm_ssh(c: Context, name: str, command: str = "") -> None:
    """Log into a VM over SSH, as the login user with the project's key."""
    op = operator()
    name = op.vm_name(name)
    config = op.write_ssh_config()
    cmd = ["ssh", "-F", str(config), name, *([command] if command else [])]
    os.execvp(cmd[0], cmd)


@task(help={"out": "write to this file instead of printing"})
def ssh_config(c: Context, out_: str = "") -> None:
    """An ssh_config naming every VM that boots (use: ssh -F FILE VM)."""
    text = operator().ssh_config()
    if out_:
        Path(out_).write_text(text)
        err.print(f"wrote {out_}")
    else:
        print(text, end="")


@task(help={"stack": STACK_HELP, "limit": "only these hosts (Ansible's --limit, e.g. compute-02)",
            "playbook": "the operator's own playbook instead of the project's ansible/<stack>.yml"})
def deploy(c: Context, stack: str = "", limit: str = "", playbook: str = "") -> None:
    """Run the stack's playbook on its running VMs (SLURM for hpc, Kubernetes for cloud).

    The inventory is the stack's outputs and the VMs' states as they are now (`aihow inventory`)."""
    _check_stack(stack)
    result = operator().deploy(stack, limit or None, Path(playbook).resolve() if playbook else None)
    out.print(f"[green]{stack} deployed[/green] in {result.seconds:.0f} s, {result.changed} change(s)")


@task(help={"stack": "the Kubernetes stack (default: cloud)"})
def kubectl(c: Context, stack: str = "cloud") -> None:
    """kubectl on the control plane, through its guest agent: aihow kubectl -- get nodes -o wide"""
    import shlex

    # invoke keeps the words after '--' joined by spaces, losing their quoting: take them
    # from the command line itself when it is there.
    args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else shlex.split(c.remainder)
    if not args:
        raise AihowError("no kubectl arguments; allowed: aihow kubectl -- ARGS (e.g. -- get nodes -o wide)")
    code, stdout, stderr = operator().kubectl(stack, args)
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    if code != 0:
        raise Exit(code=code)

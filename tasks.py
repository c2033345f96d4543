"""Operator tasks (``invoke --list``). Thin: parse arguments, call the library, print.

Every task prints one clear line per error and exits non-zero on failure.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.program import Program
from invoke.tasks import Task
from invoke.tasks import task as invoke_task
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from aihow_infra.errors import AihowError, ConfigError  # noqa: E402

if TYPE_CHECKING:
    from aihow_infra.changes import Risk
    from aihow_infra.ops import Operator
    from aihow_infra.status import VmStatus

# Wide enough for the tables when output is piped (rich assumes 80 columns then).
out = Console() if sys.stdout.isatty() else Console(width=160)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
F = TypeVar("F", bound=Callable[..., Any])
STACK_HELP = "the cluster stack: hpc or cloud"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aihow-infra")
    except PackageNotFoundError:
        return "unknown"


def operator(yes: bool = False) -> Operator:
    """The library object behind the tasks (imported late: tasks stay quick to list). A change
    that deletes a disk or replaces or restarts a VM is listed and asked about (``yes``: applied)."""
    from aihow_infra.interrupts import RUNS
    from aihow_infra.ops import Operator, refuse_risks

    def confirm(found: list[Risk]) -> bool:
        err.print("[yellow]These planned changes delete data or interrupt a guest:[/yellow]")
        for risk in found:
            err.print(f"  - {risk}", highlight=False, soft_wrap=True)
        if yes:
            return True
        if not sys.stdin.isatty():
            refuse_risks(found)
        return input("Apply them? [y/N] ").strip().lower() in ("y", "yes")

    # Engines run in sessions of their own, often from worker threads (both stacks at once): the
    # task's main thread takes over SIGINT, SIGTERM and SIGHUP now, so a signal reaches every
    # engine as a clean cancel and none is left running.
    RUNS.install()
    return Operator(progress=lambda msg: err.print(f"[dim]... {msg}[/dim]"), confirm=confirm)


def clean_errors(fn: F) -> F:
    """One red line per error and exit code 1, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            for problem in exc.located():
                err.print(f"[red]error:[/red] {problem}", highlight=False, soft_wrap=True)
            raise Exit(code=1) from None
        except AihowError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise Exit(code=1) from None
        except KeyboardInterrupt:
            # Between engine runs (a wait, a build): what ran is recorded, and every task is
            # idempotent, so the same command again goes on from there.
            err.print("[red]interrupted:[/red] no engine was running; the same command again goes on from "
                      "where this one stopped", highlight=False, soft_wrap=True)
            raise Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def task(help: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Task[Any]]:
    """An invoke task whose errors are one clean line (every operator task is one)."""

    def decorate(fn: Callable[..., Any]) -> Task[Any]:
        made: Task[Any] = invoke_task(help=help or {})(clean_errors(fn))
        return made

    return decorate


def _settled(deploy: bool) -> bool:
    """True when every configured stack is as its last successful run left it (and, with
    ``deploy``, deployed since): checked before the library's heavier imports."""
    from aihow_infra.lastrun import LastRuns
    from aihow_infra.stacks import Workspace

    workspace = Workspace()
    stacks = [s for s in ("hpc", "cloud") if (workspace.project_dir / f"Pulumi.{s}.yaml").exists()]
    runs = LastRuns(workspace.project_dir)
    return bool(stacks) and all(not runs.changes(s, workspace.state_files(s), settled=deploy) for s in stacks)


def _check_stack(stack: str) -> None:
    if not stack:
        raise AihowError("--stack is missing; allowed: --stack hpc or --stack cloud (`stacks` lists them)")
    if stack not in ("hpc", "cloud"):
        raise AihowError(f"--stack {stack!r} is not a cluster stack; allowed: hpc or cloud")


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise AihowError(f"{question} needs confirmation; pass --yes to run without a terminal")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise Exit("cancelled", code=1)


# --- stacks ----------------------------------------------------------------------------------


YES_HELP = "apply changes that delete a disk or replace or restart a VM without asking"


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
    table = Table(title="stacks", title_justify="left")
    for col in ("stack", "cluster file", "cluster", "resources", "last update"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.stack, r.cluster_file, r.cluster if not r.error else f"[red]{r.error}[/red]",
                      str(r.resources), r.updated or "never deployed")
    out.print(table)


@task(help={"stack": STACK_HELP, "yes": YES_HELP})
def up(c: Context, stack: str = "", yes: bool = False) -> None:
    """Create or update one cluster (pulumi up); asks first when a disk or VM would be lost or restarted."""
    _check_stack(stack)
    summary = operator(yes).up(stack)
    out.print(f"[green]{stack}[/green]: {summary}", highlight=False)


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
    from aihow_infra.hostcheck import check_subnets
    from aihow_infra.loading import load_cluster_file
    from aihow_infra.plan import plan_all, shared_devices

    op = operator()
    stacks = op.configured_stacks()
    uri = op.settings(stacks[0]).libvirt_uri if stacks else "qemu:///system"
    if config:  # the user's own path, from the folder they are in
        loaded = [(Path(config), load_cluster_file(config))]
    else:  # each stack's, from the project folder and with its settings, as `up` reads it
        named = {op.cluster_file_path(op.settings(s)): op.settings(s) for s in stacks}
        loaded = [(path, op.cluster_file(settings)) for path, settings in sorted(named.items())]
    for path, cluster_file in loaded:
        plans = plan_all(cluster_file)
        check_subnets(plans, uri, str(path))
        table = Table(title=f"{path}: valid", title_justify="left")
        for col in ("cluster", "VMs", "auto-start", "vCPUs", "memory GiB", "disk GiB", "network", "GPUs"):
            table.add_column(col)
        for plan in plans:
            table.add_row(plan.name, str(len(plan.vms)), str(sum(vm.auto_start for vm in plan.vms)),
                          str(sum(vm.cpu_cores for vm in plan.vms)), str(sum(vm.memory_gb for vm in plan.vms)),
                          str(sum(vm.disk_gb for vm in plan.vms)), f"{plan.subnet} ({plan.bridge})",
                          str(sum(len(vm.gpu_addresses) for vm in plan.vms)))
        out.print(table)
        for shared in shared_devices(plans):
            colour = "red" if shared.conflict else "magenta"
            out.print(f"[{colour}]shared {shared.describe()}[/{colour}]", highlight=False)


# --- one VM --------------------------------------------------------------------------------


@task(help={"name": "VM name, e.g. hpc-cluster-compute-01", "yes": YES_HELP})
def vm_start(c: Context, name: str, yes: bool = False) -> None:
    """Start a VM; its GPU leases are taken first."""
    operator(yes).vm_start(name)
    out.print(f"[green]{name} running[/green]")


@task(help={"name": "VM name", "force": "power off at once instead of an ACPI shutdown", "yes": YES_HELP})
def vm_stop(c: Context, name: str, force: bool = False, yes: bool = False) -> None:
    """Stop a VM and release its GPU leases."""
    operator(yes).vm_stop(name, force=force)
    out.print(f"[yellow]{name} stopped[/yellow]")


@task(help={"name": "VM name"})
def vm_restart(c: Context, name: str) -> None:
    """Shut a VM down and start it again; it keeps its GPU leases."""
    operator().vm_restart(name)
    out.print(f"[green]{name} restarted[/green]")


@task(help={"name": "VM name", "json": "print JSON"})
def vm_status(c: Context, name: str, json_: bool = False) -> None:
    """State, IP, vCPUs, memory, GPUs and lease holder of a VM."""
    row = operator().vm_status(name)
    if json_:
        out.print_json(json.dumps(asdict(row)))
        return
    _vm_table([row], title=name)


def _vm_table(rows: list[VmStatus], title: str) -> None:
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


@task(help={"name": "VM name"})
def vm_console(c: Context, name: str) -> None:
    """Attach to a VM's serial console (leave with Ctrl-])."""
    cmd = operator().console_command(name)
    os.execvp(cmd[0], cmd)


@task(help={"name": "VM name", "command": "run this instead of a login shell"})
def vm_ssh(c: Context, name: str, command: str = "") -> None:
    """Log into a VM over SSH, as the login user with the project's key."""
    op = operator()
    op.find_vm(name)
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
    """Run the stack's playbook on its running VMs (SLURM for hpc), over the live inventory."""
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


# --- guest images ---------------------------------------------------------------------------


@task(help={"role": "base, hpc, cloud, or all of them; gpuhost: the passthrough test's GPU-host simulator",
            "force": "build again even when the cache has it"})
def image_build(c: Context, role: str = "all", force: bool = False) -> None:
    """Build guest images from Debian packages (cached by recipe; kept .debs make rebuilds offline)."""
    from aihow_infra.images import IMAGE_ROLES, ensure_image

    roles = list(IMAGE_ROLES) if role == "all" else [role]
    table = Table(title="guest images", title_justify="left")
    for col in ("role", "built now", "build time", "disk", "folder"):
        table.add_column(col)
    for name in roles:
        image, built = ensure_image(name, force=force, progress=lambda line: err.print(f"[dim]{line}[/dim]",
                                                                                         highlight=False))
        table.add_row(name, "yes" if built else "no (cached)", f"{image.built_seconds:.0f} s",
                      f"{image.disk_bytes / 2**20:.0f} MiB", str(image.folder))
    out.print(table)


@task()
def kubernetes_build(c: Context) -> None:
    """Build Kubernetes, etcd and pause from the Go module proxy (cached; image.build runs it)."""
    from aihow_infra.kubebins import ensure_binaries

    built = ensure_binaries(lambda line: err.print(f"[dim]{line}[/dim]", highlight=False))
    manifest = built.manifest
    sizes = manifest.get("bytes") or {}
    total = sum(sizes.values()) if isinstance(sizes, dict) else 0
    out.print(f"[green]Kubernetes {manifest['kubernetes']}[/green], etcd {manifest['etcd']}, built with "
              f"{manifest['go']}: {total / 2**20:.0f} MiB in {built.folder}")


# --- both clusters ---------------------------------------------------------------------------


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
    """Both clusters, their VMs, and who owns each shared GPU."""
    status = operator().system_status()
    if json_:
        out.print_json(json.dumps(status.to_dict()))
        return
    for cluster in status.clusters:
        if cluster.error:
            err.print(f"[red]{cluster.stack}: {cluster.error}[/red]", highlight=False, soft_wrap=True)
            continue
        health = f"; {cluster.health}" if cluster.health else ""
        infra = f"; network {cluster.network_state}, pool {cluster.pool_state}"
        _vm_table(cluster.vms,
                  title=f"{cluster.name} ({cluster.stack}, {cluster.cidr}): {cluster.status}{health}{infra}")
    for gpu in status.shared_gpus:
        out.print(f"[magenta]shared GPU {gpu.address}[/magenta]: {', '.join(gpu.vms)}; "
                  f"held by {gpu.holder or 'nobody'}", highlight=False)


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


# --- GPU leases ------------------------------------------------------------------------------


@task(help={"json": "print JSON"})
def gpu_leases(c: Context, json_: bool = False) -> None:
    """Every GPU lease in the host's ledger, marking stale ones (holder gone or shut off)."""
    from aihow_infra.leases import lease_report

    ledger, uri = operator().host_ledger()
    rows = lease_report(ledger, uri)
    if json_:
        out.print_json(json.dumps([{**asdict(r), "stale": r.stale} for r in rows]))
        return
    table = Table(title=f"GPU leases ({ledger.path})", title_justify="left")
    for col in ("address", "holder", "since", "generation", "holder state", "stale"):
        table.add_column(col)
    if not rows:
        out.print(f"no GPU leases: no VM holds a GPU ({ledger.path})", highlight=False)
        return
    for r in rows:
        table.add_row(r.address, r.holder, r.granted_at or "-", str(r.generation),
                      r.holder_state, "[red]stale[/red]" if r.stale else "")
    out.print(table)


@task(help={"address": "PCI address, e.g. 0000:01:00.0", "force": "reclaim even while the holder runs"})
def gpu_reclaim(c: Context, address: str, force: bool = False) -> None:
    """Free a stale GPU lease; refused while its holder runs unless --force."""
    from aihow_infra.leases import reclaim

    ledger, uri = operator().host_ledger()
    freed = reclaim(ledger, uri, address, force=force)
    out.print(f"[yellow]freed {address} (was held by {freed})[/yellow]" if freed else f"{address} was not held")


# --- views --------------------------------------------------------------------------------------


@task(help={"json": "print JSON instead of the tree", "config": "show a cluster file instead of the stacks"})
def topology(c: Context, json_: bool = False, config: str = "") -> None:
    """The clusters as a tree: networks, VMs, GPUs; shared GPUs marked."""
    from aihow_infra.topology import planned_topology, render_tree

    status = planned_topology(config) if config else operator().system_status()
    if json_:
        out.print_json(json.dumps(status.to_dict()))
    else:
        out.print(render_tree(status))


@task(help={"stack": STACK_HELP, "out": "write the inventory to this file instead of printing it"})
def inventory(c: Context, stack: str = "", out_: str = "") -> None:
    """An Ansible YAML inventory from the stack's outputs (Kubespray layout for cloud)."""
    from aihow_infra.inventory import to_yaml

    _check_stack(stack)
    text = to_yaml(operator().inventory(stack))
    if out_:
        Path(out_).write_text(text)
        err.print(f"wrote {out_}")
    else:
        print(text, end="")


@task(help={"config": "cluster file whose passthrough devices to check (default: the stacks')",
            "sysfs_root": "read /sys and /proc under this folder instead of the host's",
            "recorded": "check a recorded host (JSON: pci_devices, iommu_groups, dev_kvm, modules_loaded)",
            "json": "print JSON"})
def host_check(c: Context, config: str = "", sysfs_root: str = "/", recorded: str = "", json_: bool = False) -> None:
    """KVM, libvirtd, IOMMU and every passthrough device: ready or what to fix."""
    import tempfile

    from aihow_infra import hostcheck
    from aihow_infra.settings import DEFAULT_LIBVIRT_URI

    op = operator()
    files = [Path(config)] if config else op.cluster_file_paths()
    uris = sorted({op.settings(s).libvirt_uri for s in op.configured_stacks()}) or [DEFAULT_LIBVIRT_URI]
    if recorded and sysfs_root != "/":
        raise AihowError("give --recorded FILE or --sysfs-root DIR, not both")
    with tempfile.TemporaryDirectory(prefix="aihow-host-") as tmp:
        root = (hostcheck.materialize(hostcheck.load_recording(Path(recorded)), Path(tmp)) if recorded
                else hostcheck.sysfs_root(sysfs_root))
        report = hostcheck.check_host(root, files, uris)
    if json_:
        out.print_json(json.dumps(report.to_dict()))
    else:
        marks = {"ok": "[green]ok[/green]", "FAIL": "[red]FAIL[/red]", "WARN": "[yellow]WARN[/yellow]",
                 "not needed": "[dim]not needed[/dim]"}
        for check in report.checks:
            out.print(f"{marks[check.verdict]} {check.name}: {check.detail}", highlight=False)
            if check.verdict in ("FAIL", "WARN") and check.fix:
                # Whole, never wrapped: it is meant to be copied and pasted.
                out.print(f"     fix: {check.fix}", highlight=False, soft_wrap=True)
        out.print("[green]ready for passthrough[/green]" if report.ready else "[red]not ready[/red]")
    if not report.ready:
        raise Exit(code=1)


# --- development ----------------------------------------------------------------------------------


@task(help={"fast": "skip the end-to-end tests (real engine and libvirtd)"})
def test(c: Context, fast: bool = False) -> None:
    """Lint (ruff), type-check (mypy) and run the tests."""
    py = sys.executable
    from aihow_infra.state.layout import CHECKOUT

    with c.cd(str(CHECKOUT)):  # wherever `aihow test` runs
        c.run(f"{py} -m ruff check .", pty=False)
        c.run(f"{py} -m mypy aihow_infra providers tasks.py __main__.py", pty=False)
        marker = "-m 'not e2e'" if fast else ""
        c.run(f"{py} -m pytest -q --durations=12 {marker}", pty=False, env={"PYTHONUNBUFFERED": "1", **os.environ})


vm = Collection("vm")
vm.add_task(vm_start, "start")
vm.add_task(vm_stop, "stop")
vm.add_task(vm_restart, "restart")
vm.add_task(vm_status, "status")
vm.add_task(vm_console, "console")
vm.add_task(vm_ssh, "ssh")
system = Collection("system")
system.add_task(system_up, "up")
system.add_task(system_down, "down")
system.add_task(system_status, "status")
system.add_task(system_destroy, "destroy")
gpu = Collection("gpu")
gpu.add_task(gpu_leases, "leases")
gpu.add_task(gpu_reclaim, "reclaim")
host = Collection("host")
host.add_task(host_check, "check")
image = Collection("image")
image.add_task(image_build, "build")
kube = Collection("kubernetes")
kube.add_task(kubernetes_build, "build")

ns = Collection(stacks, up, preview, destroy, deploy, kubectl, validate, switch, topology, inventory, ssh_config, test,
                vm, system, gpu, host, image, kube)

# `aihow ARGS` (pyproject's console script): the same tasks, from any folder. The project is the
# checkout this file is in (AIHOW_PROJECT_DIR overrides it), never the current folder.
program = Program(namespace=ns, name="aihow", binary="aihow", version=_version())

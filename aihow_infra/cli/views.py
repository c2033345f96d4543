"""Views: the topology, an Ansible inventory, whether the host is ready (``host.check``) and a
recording of it (``host.record``)."""

from __future__ import annotations

import json
from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit

from aihow_infra.cli.common import STACK_HELP, _check_stack, err, operator, out, task
from aihow_infra.errors import AihowError


@task(help={"json": "print JSON instead of the tree", "config": "show a cluster file instead of the stacks"})
def topology(c: Context, json_: bool = False, config: str = "") -> None:
    """The clusters as a tree: networks, VMs, GPUs; shared GPUs marked."""
    from aihow_infra.cli.render import topology_tree
    from aihow_infra.topology import planned_topology

    status = planned_topology(config) if config else operator().system_status()
    if json_:
        out.print_json(json.dumps(status.to_dict()))
        return
    out.print(topology_tree(status))
    if config:  # its keys are checked; the images, host paths and subnets of this host are not
        out.print(f"planned from {config} alone; `aihow validate --config {config}` checks it against this host",
                  highlight=False, soft_wrap=True, markup=False)


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
            "recorded": "check a recorded host (the JSON host.record writes)",
            "json": "print JSON"})
def host_check(c: Context, config: str = "", sysfs_root: str = "/", recorded: str = "", json_: bool = False) -> None:
    """KVM, libvirtd, IOMMU and every passthrough device: ready or what to fix."""
    import tempfile

    from aihow_infra import hostcheck
    from aihow_infra.hostrecord import load_recording, materialize
    from aihow_infra.settings import DEFAULT_LIBVIRT_URI

    op = operator()
    files = [Path(config)] if config else op.cluster_file_paths()
    uris = sorted({op.libvirt_uri(s) for s in op.configured_stacks()}) or [DEFAULT_LIBVIRT_URI]
    if recorded and sysfs_root != "/":
        raise AihowError("give --recorded FILE or --sysfs-root DIR, not both")
    with tempfile.TemporaryDirectory(prefix="aihow-host-") as tmp:
        root = (materialize(load_recording(Path(recorded)), Path(tmp)) if recorded
                else hostcheck.sysfs_root(sysfs_root))
        # The homes are this host's: a recording of another host is checked with the default.
        homes = None if recorded or sysfs_root != "/" else \
            {a: lease.home for a, lease in op.host_ledger()[0].leases().items()}
        report = hostcheck.check_host(root, files, uris, homes)
    if json_:
        out.print_json(json.dumps(report.to_dict()))
    else:
        marks = {"ok": "[green]ok[/green]", "FAIL": "[red]FAIL[/red]", "WARN": "[yellow]WARN[/yellow]",
                 "not needed": "[dim]not needed[/dim]"}
        for check in report.checks:
            # Whole, never wrapped: a grep for FAIL gets the reason with it.
            out.print(f"{marks[check.verdict]} {check.name}: {check.detail}", highlight=False, soft_wrap=True)
            if check.verdict in ("FAIL", "WARN") and check.fix:
                # Whole, never wrapped: it is meant to be copied and pasted.
                out.print(f"     fix: {check.fix}", highlight=False, soft_wrap=True)
        passthrough = any(check.name.startswith("device ") for check in report.checks)
        out.print("[red]not ready[/red]" if not report.ready else "[green]ready for passthrough[/green]"
                  if passthrough else "[green]ready (no passthrough configured)[/green]")
    if not report.ready:
        raise Exit(code=1)


@task(help={"file": "where to write the recording (JSON)",
            "sysfs_root": "record /sys, /proc and /dev under this folder instead of the host's"})
def host_record(c: Context, file: str, sysfs_root: str = "/") -> None:
    """Record this host as host.check reads it, as JSON: `host.check --recorded FILE` then agrees.

    Every PCI function (ids, driver, IOMMU group, reset method), the IOMMU groups, the loaded and
    built-in kernel modules, /dev/kvm and /dev/vfio, the hugepage pools and the CPU's flags."""
    from aihow_infra import hostcheck
    from aihow_infra.hostrecord import record_host, write_recording

    if file.startswith("-"):  # invoke hands `aihow host.record --help` the option as the file name
        raise AihowError(f"host.record: file {file!r} starts with '-'; allowed: a path to write "
                         "(help: aihow --help host.record)")
    recording = record_host(hostcheck.sysfs_root(sysfs_root))
    write_recording(recording, Path(file))
    groups = len(recording["iommu_groups"])
    out.print(f"wrote {file}: {len(recording['pci_devices'])} PCI functions, {groups} IOMMU "
              f"group{'' if groups == 1 else 's'}, /dev/kvm {'present' if recording['dev_kvm'] else 'missing'}",
              highlight=False)

"""The Pulumi program: one cluster of the cluster file per stack (``pulumi up -s hpc``).

It validates the stack settings and the cluster file before creating anything,
builds the cluster's components, and exports what tasks and inventories read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pulumi

from aihow_infra.components import Cluster, ClusterArgs
from aihow_infra.desired import PowerRecords
from aihow_infra.errors import AihowError, ConfigError, StateFileError
from aihow_infra.gpu.hosts import host_ledger
from aihow_infra.hostcheck import checks_on_hosts
from aihow_infra.images import find_image, recipe_for
from aihow_infra.loading import load_cluster_file
from aihow_infra.placement import hosts_of, placed
from aihow_infra.plan import plan_cluster
from aihow_infra.settings import parse_settings
from aihow_infra.sshkeys import login_key
from aihow_infra.state.layout import STATE_ROOT


def main() -> None:
    """Build the stack's cluster; an invalid file or setting stops it with every problem listed."""
    stack = pulumi.get_stack()
    # Every aihow: key the stack sets, so that a misspelt one is an error, not ignored.
    names = {key.partition(":")[2] for key in pulumi.runtime.config.CONFIG.get() if key.startswith("aihow:")}
    config = pulumi.Config("aihow")
    raw = {name: config.get(name) for name in names}
    try:
        settings = parse_settings(raw)
        key = settings.cluster_key(stack)
        file = load_cluster_file(settings.cluster_file, allow_system_paths=settings.allow_system_paths)
        plan = plan_cluster(file, key, f"cluster file {settings.cluster_file}")
        settings = placed(settings, plan)
        key_text = login_key(settings.ssh_public_key, STATE_ROOT).public if any(vm.boots for vm in plan.vms) else ""
    except ConfigError as exc:
        # First line for one-line summaries (the tasks), then every problem.
        raise pulumi.RunError(f"{exc}\n{exc.report()}") from None
    try:
        # Before anything is made, on each host the cluster runs on: a subnet the host already
        # uses would cut it off from its own.
        # (A host bridge is checked by the tasks before the engine starts, and by the network.)
        for check in checks_on_hosts([plan], settings.libvirt_uri, settings.virt_type, settings.cluster_file,
                                     bridges=False):
            check()
    except ConfigError as exc:
        raise pulumi.RunError(f"{exc}\n{exc.report()}") from None
    except AihowError as exc:
        raise pulumi.RunError(str(exc)) from None
    try:
        # The program runs in the project folder, with the engine's backend: where the tasks keep
        # the power records.
        power = PowerRecords(Path.cwd(), stack, os.environ.get("PULUMI_BACKEND_URL"), pulumi.get_project()).read()
    except StateFileError as exc:
        raise pulumi.RunError(str(exc)) from None

    missing = sorted({vm.image for vm in plan.vms if vm.image and find_image(recipe_for(vm.image)) is None})
    if missing:
        raise pulumi.RunError(f"guest image(s) {', '.join(missing)} not built; allowed: build them first with "
                              + " and ".join(f"`invoke image.build --role {role}`" for role in missing))
    try:
        ledgers = {uri: host_ledger(settings.ledger_path, uri) for _host, uri in hosts_of(plan, settings.libvirt_uri)}
    except AihowError as exc:
        raise pulumi.RunError(str(exc)) from None
    cluster = Cluster(plan.key, ClusterArgs(plan=plan, settings=settings, stack=stack, login_key=key_text,
                                            power=power, ledgers=ledgers))
    pulumi.export("cluster", cluster.outputs)
    pulumi.export("nodes", {node.outputs["name"]: node.outputs for node in cluster.nodes})


main()

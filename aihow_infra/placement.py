"""Where a stack's cluster and each of its VMs run: the libvirt host the cluster file places
them on (``clusters.<key>.host``, a node's own ``host``: names under ``hosts``), else the stack's
``aihow:libvirtUri``."""

from __future__ import annotations

from dataclasses import replace

from aihow_infra.errors import ConfigError
from aihow_infra.plan import ClusterPlan, VmPlan
from aihow_infra.settings import StackSettings


def placed(settings: StackSettings, plan: ClusterPlan, source: str = "stack settings") -> StackSettings:
    """``settings`` with ``libvirt_uri`` the one the cluster runs on: its host's URI when the
    cluster file places it on one, else the stack's own. ``ConfigError`` (one line) when the stack
    also sets ``aihow:libvirtUri`` to another URI: two places for one cluster."""
    if plan.host_uri is None:
        return settings
    if "libvirt_uri" in settings.model_fields_set and settings.libvirt_uri != plan.host_uri:
        raise ConfigError([
            f"aihow:libvirtUri: {settings.libvirt_uri!r}, but clusters.{plan.key}.host places the cluster on "
            f"{plan.host!r} ({plan.host_uri}); allowed: one place for a cluster (remove aihow:libvirtUri, or "
            "clusters." + plan.key + ".host)"], source)
    return settings.model_copy(update={"libvirt_uri": plan.host_uri})


def by_host(plans: list[ClusterPlan], default_uri: str) -> dict[str, list[ClusterPlan]]:
    """For each libvirt URI the clusters run on (``default_uri`` for what the file places on no
    host), the plans of the clusters there with only their VMs on that host, in the plans' order."""
    grouped: dict[str, list[ClusterPlan]] = {}
    for plan in plans:
        cluster_uri = plan.host_uri or default_uri
        for _host, uri in hosts_of(plan, cluster_uri):
            on_host = tuple(vm for vm in plan.vms if vm_uri(vm, cluster_uri) == uri)
            grouped.setdefault(uri, []).append(replace(plan, vms=on_host))
    return grouped


def vm_uri(vm: VmPlan, cluster_uri: str) -> str:
    """The libvirt URI a VM runs on: its host's (``host`` on the node, else its cluster's), else
    ``cluster_uri`` (the stack's, as ``placed`` gives it)."""
    return vm.host_uri or cluster_uri


def hosts_of(plan: ClusterPlan, cluster_uri: str) -> list[tuple[str | None, str]]:
    """(host name, libvirt URI) of each host the cluster's VMs run on, the cluster's own first
    (named ``plan.host``, at ``cluster_uri``) when a VM runs there, then the others in node order."""
    found = {vm_uri(vm, cluster_uri): vm.host for vm in plan.vms}
    return sorted(((host, uri) for uri, host in found.items()), key=lambda hu: hu[1] != cluster_uri)

"""Where a stack's cluster runs: the libvirt host the cluster file places it on
(``clusters.<key>.host``, a name under ``hosts``), else the stack's ``aihow:libvirtUri``."""

from __future__ import annotations

from aihow_infra.errors import ConfigError
from aihow_infra.plan import ClusterPlan
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
    """The plans grouped by the libvirt URI each cluster runs on (``default_uri`` for a cluster
    the file places on no host), in the plans' order."""
    grouped: dict[str, list[ClusterPlan]] = {}
    for plan in plans:
        grouped.setdefault(plan.host_uri or default_uri, []).append(plan)
    return grouped

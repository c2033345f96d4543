"""The topology's data from a cluster file alone, nothing deployed (``aihow topology --config``);
the tree itself is drawn by cli/render.py."""

from __future__ import annotations

from aihow_infra.loading import load_cluster_file
from aihow_infra.plan import plan_all, shared_devices
from aihow_infra.status import SystemStatus, planned_status


def planned_topology(cluster_file: str) -> SystemStatus:
    """The tree's data from a cluster file alone (nothing needs to exist)."""
    plans = plan_all(load_cluster_file(cluster_file, check_images=False, allow_system_paths=True))
    return planned_status(plans, shared_devices(plans))

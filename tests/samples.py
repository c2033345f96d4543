"""A small valid cluster file with both clusters, for tests that change one thing of it."""

from __future__ import annotations

from typing import Any

from aihow_infra.loading import parse_cluster_file
from aihow_infra.plan import ClusterPlan, VmPlan, plan_cluster


def base() -> dict[str, Any]:
    """A small valid file with both clusters; each bad case changes one thing."""
    return {
        "version": "1.0",
        "metadata": {"name": "t", "description": "d"},
        "clusters": {
            "hpc": {
                "name": "hpc",
                "network": {"subnet": "10.1.0.0/24", "bridge": "br-hpc"},
                "controller": {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip_address": "10.1.0.10"},
                "compute_nodes": [
                    {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip": "10.1.0.11",
                     "pcie_passthrough": {"enabled": True, "devices": [
                         {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de",
                          "device_id": "2805"},
                         {"pci_address": "0000:01:00.1", "device_type": "audio"}]}},
                ],
            },
            "cloud": {
                "name": "cloud",
                "network": {"subnet": "10.2.0.0/24", "bridge": "br-cloud"},
                "control_plane": {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip_address": "10.2.0.10"},
                "worker_nodes": [
                    {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip": "10.2.0.11"},
                    {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip": "10.2.0.12", "auto_start": False,
                     "pcie_passthrough": {"enabled": True, "devices": [
                         {"pci_address": "0000:01:00.0", "device_type": "gpu"}]}},
                ],
            },
        },
    }


def cloud_plan(idle: int = 60) -> ClusterPlan:
    """The sample's Cloud cluster with both workers on demand (the second has an NVIDIA GPU)."""
    data = base()
    cloud = data["clusters"]["cloud"]
    for worker in cloud["worker_nodes"]:
        worker.pop("auto_start", None)
        worker["on_demand"] = True
    cloud["worker_nodes"][1]["pcie_passthrough"]["devices"][0] |= {"vendor_id": "10de", "device_id": "2335"}
    cloud["kubernetes_config"] = {"scale_down_unneeded_time": idle}
    return plan_cluster(parse_cluster_file(data, env={}), "cloud")


def worker(plan: ClusterPlan, index: int) -> VmPlan:
    """The plan's ``index``-th worker (file order)."""
    return [vm for vm in plan.vms if vm.role != "control-plane"][index]


def node(name: str, ready: bool = True, cordoned: bool = False, **labels: str) -> dict[str, Any]:
    """A Node as ``kubectl get -o json`` lists it: Ready or not, cordoned or not, with ``labels``."""
    return {"kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": True} if cordoned else {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def pod(name: str, phase: str = "Pending", node: str | None = None, unschedulable: bool = True,
        namespace: str = "default", owner: str | None = None, **spec: Any) -> dict[str, Any]:
    """A Pod as ``kubectl get -o json`` lists it: waiting for a node (Unschedulable) unless bound
    or ``unschedulable`` is false; ``owner`` the kind of its controller (DaemonSet, ReplicaSet)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if owner:
        meta["ownerReferences"] = [{"kind": owner, "name": "x"}]
    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}] if unschedulable else []
    return {"kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "c"}], **spec,
                                                       **({"nodeName": node} if node else {})},
            "status": {"phase": phase, "conditions": conditions}}


def hpc_plan(on_demand: bool = False) -> ClusterPlan:
    """The sample's HPC cluster; its compute node (the GPU the Cloud GPU worker shares) on demand
    or always on."""
    data = base()
    if on_demand:
        data["clusters"]["hpc"]["compute_nodes"][0]["on_demand"] = True
    return plan_cluster(parse_cluster_file(data, env={}), "hpc")

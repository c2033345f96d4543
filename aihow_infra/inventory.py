"""Ansible inventories from a stack's outputs.

Cloud follows Kubespray's layout (``kube_control_plane``, ``kube_node``,
``etcd``, with ``k8s_cluster`` as their parent); HPC has ``slurmctld``,
``slurmd`` and ``slurm_gpu``, with GPU count and type as host vars for SLURM
GRES. ``ansible_host`` is the VM's IP and the power state is a host var.
"""

from __future__ import annotations

from typing import Any

import yaml

from aihow_infra.errors import AihowError

GPU_VENDORS = {"10de": "nvidia", "1002": "amd", "8086": "intel"}


def _host_vars(node: dict[str, Any]) -> dict[str, Any]:
    host: dict[str, Any] = {
        "vm_name": node["name"], "node_role": node["role"], "cpu_cores": node["vcpus"],
        "memory_gb": node["memory_gb"], "power_state": node.get("power_state") or "unknown",
        "desired_power": node.get("desired_power"), "mac": node["mac"],
    }
    if node.get("ip"):
        host["ansible_host"] = node["ip"]
    if node.get("login_user"):
        host["ansible_user"] = node["login_user"]
    gpus = node.get("gpus") or []
    host["gpu_count"] = len(gpus)
    if gpus:
        first = gpus[0]
        vendor = GPU_VENDORS.get(first.get("vendor_id") or "", "gpu")
        host["gpu_type"] = f"{vendor}_{first['device_id']}" if first.get("device_id") else vendor
        host["gpu_pci_addresses"] = [g["address"] for g in gpus]
    return host


def build_inventory(outputs: dict[str, Any], stack: str = "STACK", ssh_key: str | None = None) -> dict[str, Any]:
    """The inventory (Ansible's YAML structure) for one stack's outputs; ``ssh_key`` is the
    private key that logs into the guests, when it is known."""
    cluster, nodes = outputs.get("cluster"), outputs.get("nodes") or {}
    if not cluster or not nodes:
        raise AihowError(f"stack {stack} has no outputs yet; run `invoke up --stack {stack}` first")
    hosts = {n["short_name"]: _host_vars(n) for n in nodes.values()}
    by_role: dict[str, list[str]] = {}
    for node in nodes.values():
        by_role.setdefault(node["role"], []).append(node["short_name"])
    common = {"cluster_name": cluster["name"], "ansible_python_interpreter": "/usr/bin/python3"}
    if ssh_key:
        common["ansible_ssh_private_key_file"] = ssh_key

    def group(names: list[str]) -> dict[str, Any]:
        return {"hosts": {n: hosts[n] for n in names}}

    if cluster["key"] == "hpc":
        compute = by_role.get("compute", [])
        gpu_nodes = [n for n in compute if hosts[n]["gpu_count"]]
        children = {"slurmctld": group(by_role.get("controller", [])), "slurmd": group(compute)}
        if gpu_nodes:
            children["slurm_gpu"] = {"hosts": {n: {} for n in gpu_nodes}}
        return {"all": {"vars": common, "children": {"hpc": {"children": children}}}}

    control = by_role.get("control-plane", [])
    workers = by_role.get("cpu-worker", []) + by_role.get("gpu-worker", [])
    return {"all": {"vars": common, "children": {
        "k8s_cluster": {"children": {
            "kube_control_plane": group(control),
            "kube_node": group(workers),
        }},
        "etcd": {"hosts": {n: {} for n in control}},
        "calico_rr": {"hosts": {}},
    }}}


def to_yaml(inventory: dict[str, Any]) -> str:
    """YAML text Ansible reads (``ansible-inventory -i FILE``)."""
    return yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False)

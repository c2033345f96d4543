"""Ansible inventories from a stack's outputs.

Cloud follows Kubespray's layout (``kube_control_plane``, ``kube_node`` and ``calico_rr``
under ``k8s_cluster``, and ``etcd``); HPC has ``slurmctld``, ``slurmd`` and ``slurm_gpu``,
with GPU count and type as host vars for SLURM GRES. Only VMs that run are in these play
groups; the others are in ``stopped``, with their state, so a play never waits on them.

How Ansible reaches a guest is the stack's choice (``Access``): SSH to its address with
the login user and key, or the qemu guest agent through libvirt (no IP path at all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from aihow_infra.errors import AihowError

GPU_VENDORS = {"10de": "nvidia", "1002": "amd", "8086": "intel"}
AGENT_CONNECTION = "community.libvirt.libvirt_qemu"
STOPPED_GROUP = "stopped"
AGENT_REMOTE_TMP = "/var/tmp/.ansible-agent"


@dataclass(frozen=True)
class Access:
    """How Ansible reaches the guests of a stack."""

    kind: Literal["ssh", "agent"] = "ssh"
    libvirt_uri: str = "qemu:///system"
    ssh_key: str | None = None

    def host_vars(self, node: Mapping[str, Any]) -> dict[str, Any]:
        """The connection variables of one guest."""
        if self.kind == "agent":
            return {"ansible_connection": AGENT_CONNECTION, "ansible_host": node["name"],
                    "ansible_libvirt_uri": self.libvirt_uri}
        found: dict[str, Any] = {}
        if node.get("ip"):
            found["ansible_host"] = node["ip"]
        if node.get("login_user"):
            found["ansible_user"] = node["login_user"]
        return found

    def group_vars(self) -> dict[str, Any]:
        """Connection variables every guest shares. The agent runs as root and its file calls
        do not expand '~', so it gets an absolute temporary folder of its own."""
        if self.kind == "agent":
            return {"ansible_remote_tmp": AGENT_REMOTE_TMP}
        return {"ansible_ssh_private_key_file": self.ssh_key} if self.ssh_key else {}


def _host_vars(node: Mapping[str, Any], access: Access, state: str) -> dict[str, Any]:
    host: dict[str, Any] = {
        "vm_name": node["name"], "node_role": node["role"], "cpu_cores": node["vcpus"],
        "memory_gb": node["memory_gb"], "power_state": state,
        "desired_power": node.get("desired_power"), "mac": node["mac"], "ip": node.get("ip"),
        **access.host_vars(node),
    }
    if node.get("pod_subnet"):
        host["pod_subnet"] = node["pod_subnet"]
    gpus = node.get("gpus") or []
    host["gpu_count"] = len(gpus)
    if gpus:
        first = gpus[0]
        vendor = GPU_VENDORS.get(first.get("vendor_id") or "", "gpu")
        host["gpu_type"] = f"{vendor}_{first['device_id']}" if first.get("device_id") else vendor
        host["gpu_pci_addresses"] = [g["address"] for g in gpus]
    return host


def build_inventory(outputs: Mapping[str, Any], stack: str = "STACK", access: Access | None = None,
                    states: Mapping[str, str] | None = None, kube_pki_dir: str = "") -> dict[str, Any]:
    """The inventory (Ansible's YAML structure) for one stack's outputs. ``states`` are the
    VMs' live libvirt states by VM name (the outputs' ``power_state`` is as of the last up);
    ``kube_pki_dir`` is the host folder a Kubernetes cluster's certificates are kept in."""
    cluster, nodes = outputs.get("cluster"), outputs.get("nodes") or {}
    if not cluster or not nodes:
        raise AihowError(f"stack {stack} has no outputs yet; run `aihow up --stack {stack}` first")
    access = access or Access()
    live = {n["short_name"]: (states or {}).get(n["name"]) or n.get("power_state") or "unknown"
            for n in nodes.values()}
    hosts = {n["short_name"]: _host_vars(n, access, live[n["short_name"]]) for n in nodes.values()}
    by_role: dict[str, list[str]] = {}
    for node in nodes.values():
        if live[node["short_name"]] == "running":
            by_role.setdefault(node["role"], []).append(node["short_name"])
    common = {"cluster_name": cluster["name"], "cluster_stack": stack,
              "ansible_python_interpreter": "/usr/bin/python3", **access.group_vars()}
    stopped = {STOPPED_GROUP: {"hosts": {n: hosts[n] for n, state in live.items() if state != "running"}}}

    def group(names: list[str]) -> dict[str, Any]:
        return {"hosts": {n: hosts[n] for n in names}}

    if cluster["key"] == "hpc":
        common["slurm_partitions"] = cluster.get("slurm_partitions") or ["compute"]
        common["slurm_max_time"] = cluster.get("slurm_max_time") or "INFINITE"
        compute = by_role.get("compute", [])
        gpu_nodes = [n for n in compute if hosts[n]["gpu_count"]]
        children = {"slurmctld": group(by_role.get("controller", [])), "slurmd": group(compute)}
        if gpu_nodes:
            children["slurm_gpu"] = {"hosts": {n: {} for n in gpu_nodes}}
        return {"all": {"vars": common, "children": {"hpc": {"children": children}, **stopped}}}

    common["kube_pod_subnet"] = cluster.get("pod_subnet")
    common["kube_service_subnet"] = cluster.get("service_subnet")
    if kube_pki_dir:
        common["kube_pki_dir"] = kube_pki_dir
    control = by_role.get("control-plane", [])
    workers = by_role.get("cpu-worker", []) + by_role.get("gpu-worker", [])
    return {"all": {"vars": common, "children": {
        "k8s_cluster": {"children": {
            "kube_control_plane": group(control),
            "kube_node": group(workers),
            "calico_rr": {"hosts": {}},
        }},
        "etcd": {"hosts": {n: {} for n in control}},
        **stopped,
    }}}


def to_yaml(inventory: dict[str, Any]) -> str:
    """YAML text Ansible reads (``ansible-inventory -i FILE``)."""
    return yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False)

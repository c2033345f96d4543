"""Ansible inventories from a stack's outputs.

Each kind names its own play groups (kinds/: Kubespray's layout for Cloud; ``slurmctld``,
``slurmd`` and ``slurm_gpu`` for HPC, with GPU count and type as host vars for SLURM GRES).
Only VMs that run are in these play groups; the others are in ``stopped``, with their state,
so a play never waits on them.

How Ansible reaches a guest is the stack's choice (``Access``): SSH to its address with
the login user and key, or the qemu guest agent through libvirt (no IP path at all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from aihow_infra.errors import AihowError
from aihow_infra.kinds import kind_of
from aihow_infra.plan import gpu_type

AGENT_CONNECTION = "community.libvirt.libvirt_qemu"
STOPPED_GROUP = "stopped"
AGENT_REMOTE_TMP = "/var/tmp/.ansible-agent"


@dataclass(frozen=True)
class Access:
    """How Ansible reaches the guests of a stack."""

    kind: Literal["ssh", "agent"] = "ssh"
    libvirt_uri: str = "qemu:///system"  # where the guest agent is reached, unless the node's outputs say

    ssh_key: str | None = None

    def host_vars(self, node: Mapping[str, Any]) -> dict[str, Any]:
        """The connection variables of one guest."""
        if self.kind == "agent":
            return {"ansible_connection": AGENT_CONNECTION, "ansible_host": node["name"],
                    "ansible_libvirt_uri": node.get("libvirt_uri") or self.libvirt_uri}
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
        "on_demand": bool(node.get("on_demand")),
        **access.host_vars(node),
    }
    if node.get("pod_subnet"):
        host["pod_subnet"] = node["pod_subnet"]
    gpus = node.get("gpus") or []
    host["gpu_count"] = len(gpus)
    if gpus:
        first = gpus[0]
        host["gpu_type"] = gpu_type(first.get("vendor_id"), first.get("device_id"))
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
    kind_vars, groups = kind_of(cluster["key"]).inventory_groups(cluster, hosts, by_role, kube_pki_dir)
    return {"all": {"vars": {**common, **kind_vars}, "children": {**groups, **stopped}}}


def to_yaml(inventory: dict[str, Any]) -> str:
    """YAML text Ansible reads (``ansible-inventory -i FILE``)."""
    return yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False)

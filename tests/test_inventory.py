"""Ansible inventories from stack outputs, read back by the real ``ansible-inventory``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aihow_infra.errors import AihowError
from aihow_infra.inventory import Access, build_inventory, to_yaml


def node(name: str, short: str, role: str, ip: str, gpus: list[dict[str, Any]] | None = None,
         power: str = "running") -> dict[str, Any]:
    return {"name": name, "short_name": short, "role": role, "ip": ip, "mac": "52:54:00:00:00:01", "vcpus": 4,
            "memory_gb": 8, "gpus": gpus or [], "power_state": power, "desired_power": power, "login_user": "aihow"}


GPU = {"address": "0000:01:00.0", "functions": ["0000:01:00.0", "0000:01:00.1"], "vendor_id": "10de",
       "device_id": "2805"}
HPC = {"cluster": {"name": "hpc-cluster", "key": "hpc"}, "nodes": {n["name"]: n for n in [
    node("hpc-cluster-controller", "controller", "controller", "192.168.100.10"),
    node("hpc-cluster-compute-01", "compute-01", "compute", "192.168.100.11", [GPU]),
    node("hpc-cluster-compute-02", "compute-02", "compute", "192.168.100.12"),
]}}
CLOUD = {"cluster": {"name": "cloud-cluster", "key": "cloud"}, "nodes": {n["name"]: n for n in [
    node("cloud-cluster-control-plane", "control-plane", "control-plane", "192.168.200.10"),
    node("cloud-cluster-cpu-worker-01", "cpu-worker-01", "cpu-worker", "192.168.200.11"),
    node("cloud-cluster-gpu-worker-01", "gpu-worker-01", "gpu-worker", "192.168.200.12", [GPU], "shutoff"),
]}}


def ansible_list(tmp_path: Path, inventory: dict[str, Any]) -> dict[str, Any]:
    tool = shutil.which("ansible-inventory") or str(Path(sys.executable).parent / "ansible-inventory")
    if not Path(tool).exists():
        pytest.fail("ansible-inventory is missing: ansible-core is in requirements.txt; run ./bootstrap")
    path = tmp_path / "inventory.yml"
    path.write_text(to_yaml(inventory))
    proc = subprocess.run([tool, "-i", str(path), "--list"], capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_hpc_inventory_groups_and_gres_vars(tmp_path: Path) -> None:
    data = ansible_list(tmp_path, build_inventory(HPC, "hpc", Access("ssh", ssh_key="/keys/id_ed25519")))
    assert data["hpc"]["children"] == ["slurmctld", "slurmd", "slurm_gpu"]
    assert data["slurmctld"]["hosts"] == ["controller"]
    assert sorted(data["slurmd"]["hosts"]) == ["compute-01", "compute-02"]
    assert data["slurm_gpu"]["hosts"] == ["compute-01"]
    gpu_host = data["_meta"]["hostvars"]["compute-01"]
    assert gpu_host["ansible_host"] == "192.168.100.11"
    assert (gpu_host["ansible_user"], gpu_host["ansible_ssh_private_key_file"]) == ("aihow", "/keys/id_ed25519")
    assert (gpu_host["gpu_count"], gpu_host["gpu_type"]) == (1, "nvidia_2805")
    assert gpu_host["power_state"] == "running" and gpu_host["cluster_name"] == "hpc-cluster"
    assert data["_meta"]["hostvars"]["compute-02"]["gpu_count"] == 0


def test_cloud_inventory_follows_kubespray(tmp_path: Path) -> None:
    data = ansible_list(tmp_path, build_inventory(CLOUD))
    assert sorted(data["k8s_cluster"]["children"]) == ["calico_rr", "kube_control_plane", "kube_node"]
    assert data["kube_control_plane"]["hosts"] == ["control-plane"]
    assert data["etcd"]["hosts"] == ["control-plane"]
    # The GPU worker is shut off: listed with its state, in no play group.
    assert data["kube_node"]["hosts"] == ["cpu-worker-01"]
    assert data["stopped"]["hosts"] == ["gpu-worker-01"]
    worker = data["_meta"]["hostvars"]["gpu-worker-01"]
    assert worker["ansible_host"] == "192.168.200.12" and worker["power_state"] == "shutoff"
    assert worker["gpu_pci_addresses"] == ["0000:01:00.0"]


def test_live_states_decide_the_play_groups(tmp_path: Path) -> None:
    states = {"hpc-cluster-compute-02": "shutoff", "hpc-cluster-compute-01": "running"}
    data = ansible_list(tmp_path, build_inventory(HPC, "hpc", states=states))
    assert data["slurmd"]["hosts"] == ["compute-01"] and data["stopped"]["hosts"] == ["compute-02"]
    assert data["_meta"]["hostvars"]["compute-02"]["power_state"] == "shutoff"


def test_agent_access_needs_no_address(tmp_path: Path) -> None:
    data = ansible_list(tmp_path, build_inventory(HPC, "hpc", Access("agent", "qemu:///system")))
    controller = data["_meta"]["hostvars"]["controller"]
    assert controller["ansible_connection"] == "community.libvirt.libvirt_qemu"
    assert (controller["ansible_host"], controller["ansible_libvirt_uri"]) == ("hpc-cluster-controller",
                                                                              "qemu:///system")
    assert "ansible_user" not in controller
    assert controller["ansible_remote_tmp"] == "/var/tmp/.ansible-agent"  # the agent's calls do not expand '~'


def test_a_stack_without_outputs_is_a_clear_error() -> None:
    with pytest.raises(AihowError, match=r"no outputs yet; run `aihow up --stack"):
        build_inventory({})

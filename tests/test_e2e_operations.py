"""The operator's tasks end to end (real engine, real qemu:///system): the seed's validation
sequences for VM lifecycle (CLOUD-0.2, 0.4), system-wide control with rollback (CLOUD-0.6),
topology with a shared GPU, and inventories from real stack outputs. After each sequence,
``pulumi preview`` of every stack shows no changes: Pulumi stays the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aihow_infra.cli.render import topology_tree
from aihow_infra.errors import AihowError, StackError
from aihow_infra.inventory import build_inventory, to_yaml
from aihow_infra.ops import Operator
from aihow_infra.state.layout import CHECKOUT
from tests.sandbox import E2E, Sandbox, gpu_passthrough

pytestmark = pytest.mark.e2e



def clusters(box: Sandbox) -> dict[str, Any]:
    hpc_net, cloud_net = box.subnet(), box.subnet()
    h, c = list(hpc_net.hosts()), list(cloud_net.hosts())
    return {
        "hpc": box.cluster("hpc", hpc_net, [box.node(str(h[10])), box.node(str(h[11]), auto_start=False,
                                                                             pcie_passthrough=gpu_passthrough())]),
        "cloud": box.cluster("cloud", cloud_net, [box.node(str(c[10])), box.node(str(c[11]), auto_start=False,
                                                                                   pcie_passthrough=gpu_passthrough())]),
    }


def running(box: Sandbox) -> dict[str, bool]:
    return {d.name().removeprefix(box.prefix + "-"): bool(d.isActive())
            for d in box.conn.listAllDomains() if d.name().startswith(box.prefix)}


def no_changes(e2e: E2E) -> None:
    for stack in ("hpc", "cloud"):
        if stack in e2e.workspace.stacks():
            assert e2e.workspace.planned_steps(stack) == {}, stack


def setup(e2e: E2E) -> tuple[Operator, dict[str, Any]]:
    data = clusters(e2e.sandbox)
    path = e2e.write_cluster_file(data)
    for stack in ("hpc", "cloud"):
        e2e.configure(stack, path)
    return Operator(e2e.workspace), data


def test_vm_lifecycle_and_system_sequence(e2e: E2E) -> None:
    box = e2e.sandbox
    op, _data = setup(e2e)
    p = box.prefix

    # CLOUD-0.6: system up starts HPC then Cloud; auto-start VMs run, the others are defined only.
    # Blank disks have nothing to configure: no deploy is tried.
    said: list[str] = []
    op.progress = said.append
    op.system_up()
    assert any(line.startswith("hpc: not deployed (") for line in said), said
    assert running(box) == {"hpc-controller": True, "hpc-compute-01": True, "hpc-compute-02": False,
                            "cloud-control-plane": True, "cloud-cpu-worker-01": True, "cloud-gpu-worker-01": False}
    status = op.system_status()
    # Every VM as it should be (the manual-start ones off): running, not "partial".
    assert [c.status for c in status.clusters] == ["running", "running"]
    assert [(c.network_state, c.pool_state) for c in status.clusters] == [("active", "active")] * 2
    assert {vm.disk for c in status.clusters for vm in c.vms} == {"present"}
    # Blank disks: running, never waited for, and status says why they are not ready.
    head = status.clusters[0].vms[0]
    assert (head.state, head.ready, head.guest) == ("running", None, "no image")
    assert status.shared_gpus[0].vms == [f"{p}-hpc-compute-02", f"{p}-cloud-gpu-worker-01"]
    no_changes(e2e)

    # CLOUD-0.4: stop one VM of a running cluster, start it again, restart it.
    op.vm_stop(f"{p}-hpc-compute-01")
    assert running(box)["hpc-compute-01"] is False
    assert op.vm_status(f"{p}-hpc-compute-01").desired == "stopped"
    no_changes(e2e)
    op.vm_start(f"{p}-hpc-compute-01")
    assert running(box)["hpc-compute-01"] is True
    before = box.conn.lookupByName(f"{p}-hpc-compute-01").ID()
    op.vm_restart(f"{p}-hpc-compute-01")
    dom = box.conn.lookupByName(f"{p}-hpc-compute-01")
    assert dom.isActive() and dom.ID() != before
    op.vm_stop(f"{p}-cloud-cpu-worker-01", force=True)
    assert running(box)["cloud-cpu-worker-01"] is False
    no_changes(e2e)

    with pytest.raises(AihowError, match=r"no VM named 'nope'; allowed: .*-hpc-controller"):
        op.vm_start("nope")

    # CLOUD-0.2 / 0.6: down stops everything (Cloud first); up again restores what each VM should be.
    op.system_down()
    assert not any(running(box).values())
    no_changes(e2e)
    op.system_up()
    assert running(box) == {"hpc-controller": True, "hpc-compute-01": True, "hpc-compute-02": False,
                            "cloud-control-plane": True, "cloud-cpu-worker-01": False,
                            "cloud-gpu-worker-01": False}
    no_changes(e2e)

    # Topology: the shared GPU is marked on both VMs, nobody holds it.
    tree = topology_tree(op.system_status())
    text = _plain(tree)
    assert f"GPU 0000:41:00.0 shared with {p}-cloud-gpu-worker-01; free" in text
    assert f"network {p}-hpc-network" in text

    # Inventories from the real outputs, read back by ansible-inventory.
    for stack, group in (("hpc", "slurmctld"), ("cloud", "kube_control_plane")):
        listing = _ansible_list(e2e.root, build_inventory(e2e.workspace.outputs(stack), stack))
        assert len(listing[group]["hosts"]) == 1

    op.system_destroy()
    assert box.leftovers() == []


def test_system_up_rolls_back_hpc_when_cloud_fails(e2e: E2E) -> None:
    box = e2e.sandbox
    op, data = setup(e2e)
    box.images_dir.mkdir(parents=True, exist_ok=True)
    broken = box.images_dir / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + (99).to_bytes(4, "big") + b"\x00" * 64)
    data["cloud"]["worker_nodes"][0]["base_image_path"] = str(broken)
    e2e.write_cluster_file(data)

    with pytest.raises(StackError, match=r"system.up failed in cloud: .*cannot be read by qemu-img.*rolled back hpc"):
        op.system_up()
    assert [n for n in box.leftovers() if "-hpc" in n] == []
    assert e2e.workspace.outputs("hpc") == {}
    # And once the file is fixed, the whole system comes up.
    del data["cloud"]["worker_nodes"][0]["base_image_path"]
    e2e.write_cluster_file(data)
    op.system_up()
    assert running(box)["cloud-cpu-worker-01"] is True and running(box)["hpc-controller"] is True
    no_changes(e2e)

    # A stack whose only change was its power is put back too: after system.down, a system.up
    # that fails in Cloud leaves HPC stopped again, as it was, and its records say so.
    op.system_down()
    data["cloud"]["worker_nodes"].append(box.node(None, base_image_path=str(broken)))
    e2e.write_cluster_file(data)
    with pytest.raises(StackError, match=r"system.up failed in cloud: .*rolled back hpc"):
        op.system_up()
    assert not any(running(box).values())
    assert (op.records("hpc").read().cluster, op.records("cloud").read().cluster) == ("stopped", "stopped")


def test_tasks_print_one_line_per_error_and_exit_non_zero(tmp_path: Path, e2e: E2E) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"clusters": {"hpc": {"name": "x", "network": {"subnet": "10.1.0.0/24",
                                                                                 "bridge": "b"},
                                                        "controller": {"cpu_cores": 0, "memory_gb": 1,
                                                                       "disk_gb": 1, "ip": "10.2.0.1"}}}}))
    env = {**os.environ, "AIHOW_PROJECT_DIR": str(e2e.workspace.project_dir),
           "PULUMI_BACKEND_URL": e2e.workspace.backend_url or ""}
    invoke = [sys.executable, "-m", "invoke", "-r", str(CHECKOUT)]
    proc = subprocess.run([*invoke, "validate", "--config", str(bad)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    # A type error does not hide the checks that span keys (the subnet): both, with their lines.
    assert lines == [f"error: {bad}:4: clusters.hpc.controller.cpu_cores: 0 is invalid; allowed: greater than 0",
                     f"error: {bad}:6: clusters.hpc.controller.ip: '10.2.0.1' is outside subnet 10.1.0.0/24; "
                     "allowed: a host address of 10.1.0.0/24"], lines
    assert "Traceback" not in proc.stderr

    setup(e2e)
    proc = subprocess.run([*invoke, "vm.start", "nope"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no VM named 'nope'" in proc.stderr
    proc = subprocess.run([*invoke, "up", "--stack", "edge"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "allowed: hpc or cloud" in proc.stderr
    proc = subprocess.run([*invoke, "destroy", "--stack", "hpc"], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "needs confirmation; pass --yes" in proc.stderr
    proc = subprocess.run([*invoke, "topology", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert {c["stack"] for c in json.loads(proc.stdout)["clusters"]} == {"hpc", "cloud"}


def _plain(tree: Any) -> str:
    from rich.console import Console

    console = Console(width=300, record=True, color_system=None)
    console.print(tree)
    return console.export_text()


def _ansible_list(root: Path, inventory: dict[str, Any]) -> dict[str, Any]:
    path = root / "inventory.yml"
    path.write_text(to_yaml(inventory))
    tool = Path(sys.executable).parent / "ansible-inventory"
    proc = subprocess.run([str(tool), "-i", str(path), "--list"], capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data

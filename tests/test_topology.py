"""The topology tree: what it says and how it colours it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console
from rich.tree import Tree

from aihow_infra.cli.render import topology_tree, valid_table, vm_table
from aihow_infra.loading import parse_cluster_file
from aihow_infra.plan import mac_for, plan_all
from aihow_infra.status import ClusterStatus, GpuStatus, SharedGpuStatus, SystemStatus, VmStatus
from aihow_infra.topology import planned_topology
from tests.cli import run_task

ROOT = Path(__file__).resolve().parents[1]


def vm(name: str, state: str, gpus: list[str], auto_start: bool = True) -> VmStatus:
    return VmStatus(name=name, stack=name.split("-")[0], cluster=name.rsplit("-", 2)[0], role="compute",
                    state=state, desired="running", auto_start=auto_start, ip="10.0.0.5", vcpus=2, memory_gb=4,
                    disk_gb=10, gpus=[GpuStatus(a, [a], None) for a in gpus])


DATA = SystemStatus(
    clusters=[
        ClusterStatus("hpc", "hpc-cluster", "hpc-cluster-network", "192.168.100.0/24", "running", "running",
                      [vm("hpc-cluster-compute-01", "running", ["0000:01:00.0"])]),
        ClusterStatus("cloud", "cloud-cluster", "cloud-cluster-network", "192.168.200.0/24", "running", "degraded",
                      [vm("cloud-cluster-gpu-worker-01", "shutoff", ["0000:01:00.0"], auto_start=False)]),
    ],
    shared_gpus=[SharedGpuStatus("0000:01:00.0", ["hpc-cluster-compute-01", "cloud-cluster-gpu-worker-01"],
                                 "hpc/hpc-cluster-compute-01", False)],
)


def labels(tree: Tree) -> list[str]:
    out = [str(tree.label)]
    for child in tree.children:
        out += labels(child)
    return out


def test_tree_marks_the_shared_gpu_its_holder_and_colours() -> None:
    text = labels(topology_tree(DATA))
    assert "[cyan]network hpc-cluster-network 192.168.100.0/24[/cyan]" in text
    running = next(t for t in text if "hpc-cluster-compute-01[/" in t)
    stopped = next(t for t in text if "cloud-cluster-gpu-worker-01[/" in t)
    assert running.startswith("[green]") and stopped.startswith("[yellow]") and "(manual start)" in stopped
    gpu_labels = [t for t in text if t.startswith("[magenta]GPU 0000:01:00.0")]
    assert len(gpu_labels) == 2
    assert "[red]shared with cloud-cluster-gpu-worker-01; held by hpc-cluster-compute-01[/red]" in gpu_labels[0]
    assert text[-1] == "2 VMs, 1 running, 1 shared GPU address(es)"


def test_tree_from_a_cluster_file_shows_the_plan() -> None:
    data = planned_topology(str(ROOT / "config" / "example-multi-gpu-clusters.yaml"))
    assert [c.name for c in data.clusters] == ["hpc-cluster", "cloud-cluster"]
    assert [c.status for c in data.clusters] == ["planned", "planned"]
    assert [s.address for s in data.shared_gpus] == ["0000:01:00.0", "0000:01:00.1"]
    text = labels(topology_tree(data))
    assert any("shared with cloud-cluster-gpu-worker-01; free" in t for t in text)


def test_the_task_says_a_planned_tree_is_not_checked_against_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    """A file whose images, host paths or subnets this host refuses still draws (nothing needs to
    exist); the last line says which command checks it here."""
    config = str(ROOT / "config" / "default.yaml")
    code, out, _err = run_task(capsys, "topology", "--config", config)
    assert code == 0
    assert out.splitlines()[-1] == f"planned from {config} alone; `aihow validate --config {config}` checks it " \
                                   "against this host"


def test_a_spread_cluster_says_the_host_of_each_vm(tmp_path: Path) -> None:
    """The tree and the status table name each VM's host when a cluster runs on more than one;
    a cluster on one host names it once, in its own line."""
    data = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    data["hosts"] = {"gpu2": {"uri": "qemu+ssh://root@gpu2/system"}, "ws1": {"uri": "qemu:///system"}}
    data["clusters"]["hpc"]["network"] = {"subnet": "10.213.10.0/24", "bridge": "br-lab", "forward_mode": "bridge"}
    data["clusters"]["hpc"]["compute_nodes"][1]["host"] = "gpu2"
    data["clusters"]["cloud"]["host"] = "ws1"
    path = tmp_path / "two-hosts.yaml"
    path.write_text(yaml.safe_dump(data))
    status = planned_topology(str(path))
    text = labels(topology_tree(status))
    hpc_vms = [t for t in text if "aihow-hpc-" in t and " vCPU " in t]
    assert [t.rsplit(" on ", 1)[-1] for t in hpc_vms] == ["the stack's host", "the stack's host", "gpu2"]
    assert any(t.startswith("[bold]aihow-cloud[/bold] (cloud) on ws1 (qemu:///system)") for t in text)
    assert not any("aihow-cloud-" in t and t.endswith(" on ws1") for t in text)  # said once, for the cluster
    console = Console(width=200, record=True)
    console.print(vm_table(status.clusters[0].vms, "hpc"))
    assert [line.split("│")[2].strip() for line in console.export_text().splitlines() if "aihow-hpc-" in line] == [
        "the stack's host", "the stack's host", "gpu2"]


def test_validate_names_every_host_a_cluster_runs_on(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The table of a valid file gives each cluster's hosts when the file places any: a cluster
    spread over two lists both, one on the stack's host says so."""
    data = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    data["hosts"] = {"lab": {"uri": "test:///default"}}
    data["clusters"]["hpc"]["network"] = {"subnet": "10.213.10.0/24", "bridge": "eth1", "forward_mode": "bridge",
                                          "gateway_ip": "10.213.10.1"}
    data["clusters"]["hpc"]["compute_nodes"][1]["host"] = "lab"
    tree = valid_table(tmp_path / "c.yaml", plan_all(parse_cluster_file(data, env={})))
    console = Console(width=250, record=True)
    console.print(tree)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in console.export_text().splitlines()
            if line.startswith("│ aihow-")}
    assert rows == {"aihow-hpc": "aihow:libvirtUri, lab (test:///default)", "aihow-cloud": "aihow:libvirtUri"}


def test_a_vms_status_shows_its_mac_the_one_a_dhcp_reservation_or_a_bridged_lan_sees() -> None:
    status = planned_topology(str(ROOT / "config" / "default.yaml"))
    row = next(r for r in status.clusters[0].vms if r.name == "aihow-hpc-compute-01")
    assert row.mac == mac_for("aihow-hpc-compute-01")
    console = Console(width=200, record=True)
    console.print(vm_table([row], row.name, macs=True))
    lines = console.export_text().splitlines()
    header = [h.strip() for h in next(line for line in lines if line.startswith("┃")).split("┃")]
    values = [v.strip() for v in next(line for line in lines if line.startswith("│")).split("│")]
    assert values[header.index("MAC")] == row.mac
    console.print(vm_table([row], row.name))  # the tables of many VMs leave it out: it is in --json
    assert console.export_text().count(row.mac) == 0

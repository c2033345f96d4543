"""The topology tree: what it says and how it colours it."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.tree import Tree

from aihow_infra.cli.render import topology_tree
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

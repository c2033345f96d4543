"""SLURM power saving on the controller: slurmctld's power programs (ansible/files/aihow-power.sh)
run as slurmctld runs them, under their three names with a SLURM host list and a stand-in
``scontrol`` expanding it (each queues one whole request file, in the lines aihow_infra/kinds/hpc.py
reads), and how status counts nodes power saving keeps off."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from aihow_infra.kinds import hpc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ansible/files/aihow-power.sh"
# scontrol show hostnames: one name per line, as SLURM expands 'hpc-compute-[01-02]'.
SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] || exit 9
case $3 in 'hpc-compute-[01-02]') printf 'hpc-compute-01\\nhpc-compute-02\\n' ;; *) echo "$3" ;; esac
"""


def power_program(tmp_path: Path, name: str, hostlist: str) -> subprocess.CompletedProcess[str]:
    bin_dir, queue = tmp_path / "bin", tmp_path / "queue"
    bin_dir.mkdir(exist_ok=True)
    queue.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    program = bin_dir / name
    program.write_text(SCRIPT.read_text())
    program.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "AIHOW_POWER_QUEUE": str(queue)}
    return subprocess.run([str(program), hostlist], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("action", ["resume", "suspend", "resume-fail"])
def test_each_program_queues_one_request_with_its_action_and_every_node(tmp_path: Path, action: str) -> None:
    done = power_program(tmp_path, f"aihow-power-{action}", "hpc-compute-[01-02]")
    assert done.returncode == 0, done.stderr
    files = list((tmp_path / "queue").iterdir())
    assert [f.suffix for f in files] == [".req"]  # no half-written file left beside it
    assert files[0].read_text() == f"{action} hpc-compute-01 hpc-compute-02\n"
    assert files[0].name.endswith(f"-{action}.req")


def test_requests_queue_in_the_order_they_came(tmp_path: Path) -> None:
    for action in ("resume", "suspend"):
        assert power_program(tmp_path, f"aihow-power-{action}", "hpc-compute-03").returncode == 0
    names = sorted(f.name for f in (tmp_path / "queue").iterdir())
    assert [n.rsplit("-", 1)[-1] for n in names] == ["resume.req", "suspend.req"]


def test_a_program_of_another_name_queues_nothing(tmp_path: Path) -> None:
    done = power_program(tmp_path, "aihow-power-reboot", "hpc-compute-01")
    assert done.returncode == 2 and "unknown power action 'reboot'" in done.stderr
    assert list((tmp_path / "queue").iterdir()) == []


def test_slurm_health_counts_powered_down_nodes_apart() -> None:
    """sinfo's ``~`` is a node power saving keeps off until a job needs it: not a node that is
    missing; ``#`` is one powering up, ``%`` one powering down."""
    assert hpc.health({"a": "idle", "b": "idle"}) == "SLURM: 2/2 nodes up"
    assert hpc.health({"a": "idle", "b": "allocated", "c": "idle~"}) == "SLURM: 2/2 nodes up (1 powered down)"
    assert hpc.health({"a": "idle", "c": "allocated#"}) == "SLURM: 2/2 nodes up"
    assert hpc.health({"a": "down*", "c": "idle~", "d": "down~"}) == "SLURM: 0/1 nodes up (2 powered down)"
    # Powering down (SuspendTimeout not over yet): the VM is going off, not a node up.
    assert hpc.health({"a": "idle", "b": "idle%"}) == "SLURM: 1/1 nodes up (1 powered down)"
    assert hpc.health(None, "controller not running") == "SLURM: controller not running"

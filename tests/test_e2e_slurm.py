"""The HPC cluster runs SLURM jobs: system.up provisions, waits for ready and deploys the
project's playbook through the guest agent (no IP traffic from the host); jobs run across
the compute nodes; stopping a node drains it, starting it brings it back.

Every check runs on the controller through the guest agent."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aihow_infra.errors import DeployError
from aihow_infra.libvirt.guest import run
from aihow_infra.operations import Operator
from aihow_infra.sshkeys import project_key
from aihow_infra.stacks import PROJECT_ROOT
from tests.sandbox import E2E, Phases, Task, network_namespace

pytestmark = pytest.mark.e2e


def controller_run(e2e: E2E, *argv: str) -> str:
    dom = e2e.sandbox.conn.lookupByName(f"{e2e.sandbox.prefix}-hpc-controller")
    ran = run(dom, list(argv), timeout=300)
    assert ran.code == 0, (argv, ran.out, ran.err)
    return ran.out


def sinfo(e2e: E2E) -> dict[str, str]:
    out = controller_run(e2e, "/usr/bin/sinfo", "-h", "-N", "-o", "%N %T")
    return dict(line.split() for line in out.splitlines())


def wait_for(e2e: E2E, want: dict[str, str], timeout: float = 180) -> dict[str, str]:
    """SLURM's node states once they match ``want`` (a state, or a prefix ending in '-'), or
    the last seen. 'idle*' (not responding) is not 'idle'."""
    def matches(state: str, wanted: str) -> bool:
        return state.startswith(wanted[:-1]) if wanted.endswith("-") else state == wanted

    deadline = time.monotonic() + timeout
    states = sinfo(e2e)
    while time.monotonic() < deadline:
        if all(matches(states.get(node, ""), state) for node, state in want.items()):
            break
        time.sleep(3)
        states = sinfo(e2e)
    return states


def test_hpc_cluster_runs_jobs_drains_and_rejoins(e2e: E2E, phases: Phases, tmp_path: Path) -> None:
    box = e2e.sandbox
    net = box.subnet()
    hosts = list(net.hosts())
    cluster = box.cluster("hpc", net, [box.node(str(hosts[10]), disk_gb=4), box.node(str(hosts[11]), disk_gb=4)])
    cluster["image"] = "hpc"
    cluster["controller"]["disk_gb"] = 4
    cluster["slurm_config"] = {"partitions": ["debug"]}
    key = project_key(tmp_path / "keys")
    cluster_file = e2e.write_cluster_file({"hpc": cluster})
    public_key = str(key.private_path) + ".pub"
    e2e.configure("hpc", cluster_file, sshPublicKey=public_key, ansibleConnection="agent", stopTimeout="60")
    op = Operator(e2e.workspace)
    p = box.prefix
    computes = [f"{p}-hpc-compute-01", f"{p}-hpc-compute-02"]

    with phases.time("system.up to a deployed cluster"):
        op.system_up()

    assert wait_for(e2e, dict.fromkeys(computes, "idle")) == dict.fromkeys(computes, "idle")
    out = controller_run(e2e, "/usr/bin/srun", "-N2", "-p", "debug", "/usr/bin/hostname")
    assert sorted(out.split()) == computes
    status = op.system_status().clusters[0]
    assert status.health == "SLURM: 2/2 nodes up"
    assert [vm.workload for vm in status.vms if vm.role == "compute"] == ["idle", "idle"]

    # Nothing changed: system.up does not deploy; a deploy changes nothing.
    lines: list[str] = []
    with phases.time("system.up with nothing changed"):
        Operator(e2e.workspace, progress=lines.append).system_up()
    assert "hpc: nothing changed since the last deploy" in lines
    with phases.time("deploy with nothing to change, through the guest agent"):
        assert op.deploy("hpc").changed == 0

    # Stopping a compute node drains it first; SLURM sees it drained and down; start brings it back.
    with phases.time("vm.stop of a compute node (drained first)"):
        op.vm_stop(computes[1])
    assert not box.conn.lookupByName(computes[1]).isActive()
    state = wait_for(e2e, {computes[1]: "drain-"})[computes[1]]
    assert state.startswith(("drained", "down")), state
    with phases.time("vm.start of a compute node (rejoins)"):
        op.vm_start(computes[1])
    assert wait_for(e2e, {computes[1]: "idle"})[computes[1]] == "idle"
    assert sorted(controller_run(e2e, "/usr/bin/srun", "-N2", "/usr/bin/hostname").split()) == computes

    # A broken playbook: host, task and message; nothing stops.
    broken = tmp_path / "broken.yml"
    broken.write_text("- hosts: slurmctld\n  gather_facts: false\n  tasks:\n"
                      "    - name: use a variable nobody set\n"
                      "      ansible.builtin.debug: {msg: '{{ slurm_partition_typo }}'}\n")
    with pytest.raises(DeployError, match=r"deploy of hpc failed on controller, task 'use a variable nobody "
                                          r"set': .*slurm_partition_typo.* is undefined"):
        op.deploy("hpc", playbook=broken)
    assert all(box.conn.lookupByName(name).isActive() for name in [f"{p}-hpc-controller", *computes])

    # The same deploy over SSH, from a network namespace of this test's own: nothing to change.
    e2e.configure("hpc", cluster_file, ansibleConnection="ssh")
    address = ipaddress.IPv4Interface(f"{hosts[199]}/{net.prefixlen}")
    with (network_namespace(f"{p}n", cluster["network"]["bridge"], address) as inside,
          phases.time("deploy with nothing to change, over SSH")):
        proc = subprocess.run([*inside, sys.executable, "-m", "invoke", "-r", str(PROJECT_ROOT), "deploy",
                               "--stack", "hpc"], env=Task(e2e).env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hpc deployed in" in proc.stdout and "0 change(s)" in proc.stdout, proc.stdout
    assert "changed=0" in proc.stderr and "unreachable=0" in proc.stderr

    with phases.time("system.destroy"):
        op.system_destroy()
    assert box.leftovers() == []

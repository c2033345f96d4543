"""The lifecycle with real data on real libvirt: power that stays as asked (records, drift,
concurrency), disks that grow and keep their data, networks that carry their VMs along, and
undefine that copes with what libvirt keeps beside a domain."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from aihow_infra.errors import AihowError
from aihow_infra.ops import Operator
from tests.sandbox import E2E, Sandbox, Task

pytestmark = pytest.mark.e2e


def cluster(box: Sandbox, **compute: Any) -> dict[str, Any]:
    net = box.subnet()
    hosts = list(net.hosts())
    return {"hpc": box.cluster("hpc", net, [box.node(str(hosts[10]), **compute), box.node(str(hosts[11]))])}


def setup(e2e: E2E, **compute: Any) -> tuple[Operator, dict[str, Any]]:
    clusters = cluster(e2e.sandbox, **compute)
    e2e.configure("hpc", e2e.write_cluster_file(clusters))
    op = Operator(e2e.workspace, confirm=lambda _risks: True)
    op.up("hpc")
    return op, clusters


def dom(box: Sandbox, short: str) -> libvirt.virDomain:
    return box.conn.lookupByName(f"{box.prefix}-hpc-{short}")


def all_print(text: str, logs: list[Path], tasks: list[subprocess.Popen[str]], timeout: float = 600) -> bool:
    """Whether every log comes to hold ``text`` before a task ends or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not all(text in log.read_text() for log in logs):
        if time.monotonic() > deadline or any(t.poll() is not None for t in tasks):
            return False
        time.sleep(0.2)
    return True


def test_power_records_drift_and_concurrent_stops(e2e: E2E) -> None:
    box = e2e.sandbox
    op, _ = setup(e2e)
    p = box.prefix
    tracked = (e2e.root / "project" / "Pulumi.hpc.yaml").read_text()

    # Drift is put right by the next run: a VM powered off by hand is started again...
    dom(box, "compute-01").destroy()
    op.vm_start(f"{p}-hpc-compute-01")
    assert dom(box, "compute-01").isActive()
    # ...and a VM started by hand while meant to be stopped is stopped again.
    op.vm_stop(f"{p}-hpc-compute-02", force=True)
    dom(box, "compute-02").create()
    op.up("hpc")
    assert not dom(box, "compute-02").isActive()

    # Stopping another VM keeps the first one's record (it is not started again).
    op.vm_stop(f"{p}-hpc-compute-01", force=True)
    assert not dom(box, "compute-01").isActive() and not dom(box, "compute-02").isActive()

    # Two tasks at once on different VMs of one stack: both records kept, both applied. The test
    # holds the stack until both tasks wait for it, so they overlap however slow the machine is.
    for round_ in range(2):
        op.vm_start(f"{p}-hpc-compute-01")
        op.vm_start(f"{p}-hpc-compute-02")
        logs = [e2e.root / f"stop-{n}-{round_}.log" for n in ("compute-01", "compute-02")]
        with e2e.workspace.hold("hpc"):
            tasks = []
            for n, log in zip(("compute-01", "compute-02"), logs, strict=True):
                with log.open("w") as out:
                    tasks.append(Task(e2e).start("vm.stop", f"{p}-hpc-{n}", "--force", output=out))
            assert all_print(f"waiting for process {os.getpid()}", logs, tasks), [log.read_text() for log in logs]
        codes = [t.wait(timeout=600) for t in tasks]
        outputs = [log.read_text() for log in logs]
        assert codes == [0, 0], outputs
        assert op.records("hpc").read().vms == {f"{p}-hpc-compute-01": "stopped", f"{p}-hpc-compute-02": "stopped"}
        assert not dom(box, "compute-01").isActive() and not dom(box, "compute-02").isActive()
    assert (e2e.root / "project" / "Pulumi.hpc.yaml").read_text() == tracked  # the tracked file never changed
    assert e2e.workspace.planned_steps("hpc") == {}


def write_pattern(path: str, byte: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} 0 1M", path], check=True,
                   capture_output=True)


def has_pattern(path: str, byte: int) -> bool:
    done = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {byte} 0 1M", path],
                          capture_output=True, text=True)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def test_disks_grow_in_place_and_keep_their_data(e2e: E2E) -> None:
    box = e2e.sandbox
    op, clusters = setup(e2e, auto_start=False)
    pool = box.conn.storagePoolLookupByName(f"{box.prefix}-hpc-pool")
    stopped = pool.storageVolLookupByName(f"{box.prefix}-hpc-compute-01.qcow2")
    running = pool.storageVolLookupByName(f"{box.prefix}-hpc-compute-02.qcow2")
    dom(box, "compute-02").destroy()
    write_pattern(stopped.path(), 0xA5)
    write_pattern(running.path(), 0x5A)
    dom(box, "compute-02").create()
    booted = dom(box, "compute-02").ID()

    for node in clusters["hpc"]["compute_nodes"]:
        node["disk_gb"] = 3
    e2e.write_cluster_file(clusters)
    assert op.workspace.planned_steps("hpc") == {"compute-01-disk": "update", "compute-01-domain": "update",
                                                 "compute-02-disk": "update", "compute-02-domain": "update"}
    op.up("hpc")  # nothing to confirm: no disk is deleted, no VM restarted
    for vol in (stopped, running):
        assert vol.info()[1] == 3 * 2**30
    assert dom(box, "compute-02").ID() == booted  # grown live (blockResize), not restarted
    assert has_pattern(stopped.path(), 0xA5) and has_pattern(running.path(), 0x5A)

    for node in clusters["hpc"]["compute_nodes"]:
        node["disk_gb"] = 2
    e2e.write_cluster_file(clusters)
    with pytest.raises(AihowError, match=r"size_gb: 2 is smaller than the disk .*'s 3 GiB; allowed: 3 or more"):
        op.up("hpc")
    assert stopped.info()[1] == 3 * 2**30 and has_pattern(stopped.path(), 0xA5)


def test_a_new_network_carries_its_running_vms_along(e2e: E2E) -> None:
    box = e2e.sandbox
    op, clusters = setup(e2e)
    booted = dom(box, "controller").ID()
    clusters["hpc"]["network"]["bridge"] = f"{box.prefix}n"
    e2e.write_cluster_file(clusters)
    op.up("hpc")
    net = box.conn.networkLookupByName(f"{box.prefix}-hpc-network")
    assert f"<bridge name='{box.prefix}n'" in net.XMLDesc(0)
    live = dom(box, "controller").XMLDesc(0)
    assert f"bridge='{box.prefix}n'" in live  # its interface is on the new bridge
    assert dom(box, "controller").ID() == booted  # without a restart
    assert op.workspace.planned_steps("hpc") == {}


def test_destroy_copes_with_checkpoints(e2e: E2E) -> None:
    box = e2e.sandbox
    op, _ = setup(e2e)
    made = subprocess.run(["virsh", "-c", "qemu:///system", "checkpoint-create-as", f"{box.prefix}-hpc-controller",
                           "c1"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    op.destroy("hpc")
    assert box.leftovers() == []


def test_nothing_to_do_skips_the_engine_and_any_change_goes_through_it(e2e: E2E) -> None:
    box = e2e.sandbox
    op, clusters = setup(e2e)
    said: list[str] = []
    op.progress = said.append

    def engine_ran() -> bool:
        ran = "pulumi up -s hpc" in said
        said.clear()
        return ran

    op.up("hpc")  # (setup ran the first)
    assert not engine_ran()
    op.system_up(deploy=False)
    assert not engine_ran()

    # A changed cluster file, a changed setting: through the engine (and then quiet again).
    clusters["hpc"]["controller"]["memory_gb"] = 2
    e2e.write_cluster_file(clusters)
    op.up("hpc")
    assert engine_ran() and dom(box, "controller").maxMemory() == 2 * 2**20
    op.up("hpc")
    assert not engine_ran()
    e2e.configure("hpc", e2e.root / "cluster.yaml", stopTimeout="3")
    op.up("hpc")
    assert engine_ran()

    # Drift: a VM powered off by hand, a deleted network.
    dom(box, "compute-01").destroy()
    op.up("hpc")
    assert engine_ran() and dom(box, "compute-01").isActive()
    net = box.conn.networkLookupByName(f"{box.prefix}-hpc-network")
    net.destroy()
    net.undefine()
    op.up("hpc")
    assert engine_ran() and box.conn.networkLookupByName(f"{box.prefix}-hpc-network").isActive()

    # A run of plain pulumi changes the state: the next task goes through the engine.
    e2e.workspace.run(["refresh", "--yes", "--skip-preview"], "hpc")
    op.up("hpc")
    assert engine_ran()
    op.up("hpc")
    assert not engine_ran()

"""What an operator sees while the engine works: a line when each resource step starts and
one when it ends, from the engine's own events, and a summary of what changed; and the
tasks' small answers (stacks listed, no leases, a missing --stack). On libvirt's test
driver: the engine is real, no guest boots."""

from __future__ import annotations

import re

import pytest

from aihow_infra.ops import Operator
from tests.cli import run_task
from tests.sandbox import E2E

pytestmark = pytest.mark.e2e


def test_up_says_what_each_resource_does_and_sums_it_up(e2e: E2E, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    box = e2e.sandbox
    net = box.subnet()
    cluster = box.cluster("hpc", net, [box.node(str(list(net.hosts())[10]))])
    e2e.configure("hpc", e2e.write_cluster_file({"hpc": cluster}), libvirtUri="test:///default")
    lines: list[str] = []
    op = Operator(e2e.workspace, progress=lines.append)

    summary = op.up("hpc")

    assert summary == "6 created"  # network, pool, and a disk and a VM for each of the two nodes
    for what in ("network", "storage pool", "disk of controller", "VM controller", "VM compute-01"):
        assert f"hpc: creating {what}" in lines
        done = [line for line in lines if line.startswith(f"hpc: created {what} (")]
        assert len(done) == 1 and re.fullmatch(rf"hpc: created {what} \(\d+ s\)", done[0]), lines
    assert lines.index("hpc: creating VM controller") > lines.index("hpc: creating disk of controller")
    assert lines[-1] == "hpc: 6 created"
    assert op.up("hpc").startswith("no changes")

    monkeypatch.setenv("AIHOW_PROJECT_DIR", str(e2e.workspace.project_dir))
    monkeypatch.setenv("PULUMI_BACKEND_URL", e2e.workspace.backend_url or "")
    code, out, err = run_task(capsys, "stacks")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("│ hpc"))
    assert re.search(r"│ hpc\s+│ \S*cluster\.yaml\s+│ \S+-hpc\s+│ 6\s+│ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row), row
    code, out, err = run_task(capsys, "up", "--stack", "hpc")
    assert code == 0 and out.startswith("hpc: no changes"), err
    code, out, err = run_task(capsys, "gpu.leases")
    assert (code, out.strip()) == (0, f"no GPU leases: no VM holds a GPU ({e2e.ledger})")
    code, out, err = run_task(capsys, "up")
    assert (code, out, err.strip()) == (1, "", "error: --stack is missing; allowed: --stack hpc or --stack cloud "
                                               "(`stacks` lists them)")

    # A change that restarts a running VM is listed and refused without a terminal; --yes applies it.
    cluster["compute_nodes"][0]["memory_gb"] = 2
    e2e.write_cluster_file({"hpc": cluster})
    code, out, err = run_task(capsys, "up", "--stack", "hpc")
    assert code == 1 and out == "", out
    assert "These planned changes delete data or interrupt a guest:" in err
    assert f"  - VM {box.prefix}-hpc-compute-01: restarted to apply memory_mib" in err.splitlines()
    code, out, err = run_task(capsys, "up", "--stack", "hpc", "--yes")
    assert (code, out.strip()) == (0, "hpc: 1 updated, 5 unchanged"), err

    lines.clear()
    op.destroy("hpc")
    assert "hpc: deleting VM controller" in lines and "hpc: 6 deleted" in lines

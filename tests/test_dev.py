"""The end-to-end tier's order (aihow_infra/cli/dev.py): the GPU-host simulator and the short
tests side by side, each on test subnets of its own; then the main job alone; then the tests that
stop libvirtd, alone. Checked with stand-in test files that record when they run and wait for
each other.

Why not the main job beside the others: tried on 2026-12-02 (the others started once its two
clusters were deployed), everything ran 2-4x slower on two cores (the simulator's `system.up`
666 s against 307 s that morning, a compute node's `vm.start` 304 s against 87 s), the
simulator's test was stopped by its 40-minute limit unfinished and the control plane's guest
agent stopped answering a kubectl poll: 46 min and two failures, against 65 min, all passed,
in this order."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from aihow_infra.cli import dev

SIDE = """
import os, time
from pathlib import Path

def test_side():
    log, lane = Path(os.environ["ORDER_LOG"]), os.environ["AIHOW_TEST_LANE"]
    (log.parent / f"side-{lane}").touch()
    deadline = time.monotonic() + 60
    while not all((log.parent / f"side-{n}").exists() for n in (0, 1)):  # both lanes at once
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.5)
    with log.open("a") as f:
        f.write("side\\n")
"""
ALONE = """
import os
from pathlib import Path

def test_alone():
    with Path(os.environ["ORDER_LOG"]).open("a") as f:
        f.write(f"{os.path.basename(__file__)} lane={os.environ.get('AIHOW_TEST_LANE')}\\n")
    assert {FAIL} == 0
"""


def order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: int = 0) -> Path:
    (tmp_path / "test_side.py").write_text(textwrap.dedent(SIDE))
    (tmp_path / "test_main.py").write_text(textwrap.dedent(ALONE.replace("{FAIL}", "0")))
    (tmp_path / "test_last.py").write_text(textwrap.dedent(ALONE.replace("{FAIL}", str(fail))))
    monkeypatch.setattr(dev, "SIDE_BY_SIDE", {"one": ["test_side.py"], "two": ["test_side.py"]})
    monkeypatch.setattr(dev, "MAIN_JOB", ["test_main.py"])
    monkeypatch.setattr(dev, "ALONE", ["test_last.py"])
    log = tmp_path / "order.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIHOW_")} | {"ORDER_LOG": str(log)}
    dev.end_to_end(tmp_path, env)
    return log


def test_two_lanes_side_by_side_then_the_main_job_alone_then_the_libvirtd_tests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = order(tmp_path, monkeypatch)
    assert log.read_text().splitlines() == ["side", "side", "test_main.py lane=None", "test_last.py lane=None"]
    out = capsys.readouterr().out
    for line in ("one: passed in", "two: passed in", "main job: passed in", "tests that stop libvirtd: passed in"):
        assert line in out


def test_any_failed_run_fails_the_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exit):
        order(tmp_path, monkeypatch, fail=1)
    assert "tests that stop libvirtd: FAILED (pytest exit 1)" in capsys.readouterr().out

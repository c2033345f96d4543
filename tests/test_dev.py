"""The end-to-end tier's order (aihow_infra/cli/dev.py): the GPU-host simulator and the short
tests side by side, each on test subnets of its own; then the main job, and beside it, once it says
a core is spare (its Cloud cluster destroyed), a third group; then the tests that stop libvirtd,
alone. Checked with stand-in test files that record when they run and wait for each other.

Why not the main job beside the others from its start: tried on 2026-12-02 (the others started once its two
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

# What the stand-ins share: a wait, bounded.
WAIT = """
import os, time
from pathlib import Path

def wait_for(done):
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.2)
"""
SIDE = WAIT + """
def test_side():
    log, lane = Path(os.environ["ORDER_LOG"]), os.environ["AIHOW_TEST_LANE"]
    (log.parent / f"side-{lane}").touch()
    wait_for(lambda: all((log.parent / f"side-{n}").exists() for n in (0, 1)))  # both lanes at once
    time.sleep(0.5)
    with log.open("a") as f:
        f.write("side\\n")
"""
MAIN = WAIT + """
def test_main():
    log = Path(os.environ["ORDER_LOG"])
    with log.open("a") as f:
        f.write(f"main lane={os.environ.get('AIHOW_TEST_LANE')}\\n")
    Path(os.environ["AIHOW_TEST_SPARE_CPU"]).touch()
    wait_for((log.parent / "beside-started").exists)  # started beside it, not after it
    with log.open("a") as f:
        f.write("main ends\\n")
"""
BESIDE = """
import os
from pathlib import Path

def test_beside():
    log = Path(os.environ["ORDER_LOG"])
    (log.parent / "beside-started").touch()
    with log.open("a") as f:
        f.write(f"beside lane={os.environ.get('AIHOW_TEST_LANE')} nice={os.nice(0)}\\n")
"""
ALONE = """
import os
from pathlib import Path

def test_alone():
    with Path(os.environ["ORDER_LOG"]).open("a") as f:
        f.write(f"{os.path.basename(__file__)} lane={os.environ.get('AIHOW_TEST_LANE')}\\n")
    assert {FAIL} == 0
"""


def order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: int = 0, main: str = MAIN) -> Path:
    (tmp_path / "test_side.py").write_text(textwrap.dedent(SIDE))
    (tmp_path / "test_main.py").write_text(textwrap.dedent(main))
    (tmp_path / "test_beside.py").write_text(textwrap.dedent(BESIDE))
    (tmp_path / "test_last.py").write_text(textwrap.dedent(ALONE.replace("{FAIL}", str(fail))))
    monkeypatch.setattr(dev, "SIDE_BY_SIDE", {"one": ["test_side.py"], "two": ["test_side.py"]})
    monkeypatch.setattr(dev, "MAIN_JOB", ["test_main.py"])
    monkeypatch.setattr(dev, "BESIDE_SLURM", ["test_beside.py"])
    monkeypatch.setattr(dev, "ALONE", ["test_last.py"])
    log = tmp_path / "order.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIHOW_")} | {"ORDER_LOG": str(log)}
    dev.end_to_end(tmp_path, env)
    return log


def test_two_lanes_side_by_side_then_the_main_job_with_a_group_beside_it_then_the_libvirtd_tests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = order(tmp_path, monkeypatch)
    beside = f"beside lane=1 nice={dev.BESIDE_NICE}"  # at a lower priority than the main job's
    lines = log.read_text().splitlines()
    assert lines == ["side", "side", "main lane=0", beside, "main ends", "test_last.py lane=None"]
    out = capsys.readouterr().out
    for line in ("one: passed in", "two: passed in", "main job: passed in",
                 "short tests beside the main job's SLURM scenarios: passed in", "tests that stop libvirtd: passed in"):
        assert line in out


def test_any_failed_run_fails_the_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exit):
        order(tmp_path, monkeypatch, fail=1)
    assert "tests that stop libvirtd: FAILED (pytest exit 1)" in capsys.readouterr().out


def test_a_main_job_that_never_says_a_core_is_spare_has_the_group_run_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exit):  # it failed before its Cloud cluster was destroyed
        order(tmp_path, monkeypatch, main=ALONE.replace("{FAIL}", "1"))
    assert (tmp_path / "order.log").read_text().splitlines() == [
        "side", "side", "test_main.py lane=0", f"beside lane=1 nice={dev.BESIDE_NICE}", "test_last.py lane=None"]
    out = capsys.readouterr().out
    assert "main job: FAILED (pytest exit 1)" in out
    assert "short tests beside the main job's SLURM scenarios: passed in" in out

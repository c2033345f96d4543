"""The end-to-end tier's order (aihow_infra/cli/dev.py): the main job first and alone until its
clusters are deployed, the other runs beside the rest of it, the libvirtd tests last and alone.
Checked with stand-in test files that record when they run and wait for each other."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from aihow_infra.cli import dev

MAIN = """
import os, time
from pathlib import Path

def test_main():
    log = Path(os.environ["ORDER_LOG"])
    assert not (log.parent / "side-0").exists()  # nothing beside it while the clusters come up
    time.sleep(1)
    Path(os.environ["AIHOW_E2E_MAIN_JOB_UP"]).touch()
    deadline = time.monotonic() + 60
    while not all((log.parent / f"side-{n}").exists() for n in (0, 1)):  # they run beside its scenarios
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with log.open("a") as f:
        f.write(f"main lane={os.environ['AIHOW_TEST_LANE']}\\n")
"""
SIDE = """
import os
from pathlib import Path

def test_side():
    log = Path(os.environ["ORDER_LOG"])
    (log.parent / f"side-{os.environ['AIHOW_TEST_LANE']}").touch()
    assert os.environ.get("AIHOW_E2E_MAIN_JOB_UP") is None
"""
LAST = """
import os
from pathlib import Path

def test_last():
    with Path(os.environ["ORDER_LOG"]).open("a") as f:
        f.write(f"alone lane={os.environ.get('AIHOW_TEST_LANE')}\\n")
    assert {FAIL} == 0
"""


def order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: int = 0) -> Path:
    last = LAST.replace("{FAIL}", str(fail))
    for name, text in (("test_main.py", MAIN), ("test_side.py", SIDE), ("test_last.py", last)):
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.setattr(dev, "MAIN_JOB", ["test_main.py"])
    monkeypatch.setattr(dev, "SIDE_BY_SIDE", {"one": ["test_side.py"], "two": ["test_side.py"]})
    monkeypatch.setattr(dev, "ALONE", ["test_last.py"])
    log = tmp_path / "order.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIHOW_")} | {"ORDER_LOG": str(log)}
    dev.end_to_end(tmp_path, env)
    return log


def test_the_main_job_comes_up_alone_the_others_run_beside_its_scenarios_and_libvirtd_tests_come_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = order(tmp_path, monkeypatch)
    assert log.read_text().splitlines() == ["main lane=2", "alone lane=None"]
    out = capsys.readouterr().out
    assert "main job: passed in" in out and "one (beside the main job): passed in" in out
    assert "tests that stop libvirtd: passed in" in out


def test_any_failed_run_fails_the_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exit):
        order(tmp_path, monkeypatch, fail=1)
    assert "tests that stop libvirtd: FAILED (pytest exit 1)" in capsys.readouterr().out

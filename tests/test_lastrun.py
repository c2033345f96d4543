"""The fingerprint of a stack's last run: what it covers (each part, a change there must go
through the engine)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from aihow_infra.desired import DesiredPower
from aihow_infra.lastrun import PROGRAM, ROOT, LastRuns, program_digest, run_fingerprint
from aihow_infra.loading import parse_cluster_file
from aihow_infra.plan import plan_cluster
from aihow_infra.settings import parse_settings
from tests.samples import base


def test_every_file_of_the_program_is_in_its_digest(tmp_path: Path) -> None:
    for name in PROGRAM:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    before = program_digest(tmp_path)
    for changed in ("providers/domain.py", "templates/domain.xml.j2", "__main__.py", "aihow_infra/plan.py"):
        path = tmp_path / changed
        text = path.read_text()
        path.write_text(text + "\n")
        assert program_digest(tmp_path) != before, changed
        path.write_text(text)
    assert program_digest(tmp_path) == before


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "Pulumi.yaml").write_text("name: aihow\n")
    (tmp_path / "Pulumi.hpc.yaml").write_text("config: {}\n")
    state = tmp_path / "hpc.json"
    state.write_text("{}")
    return {"stack": "hpc", "settings": parse_settings({"clusterFile": "c.yaml"}),
            "plan": plan_cluster(parse_cluster_file(base(), check_images=False), "hpc", "t"),
            "power": DesiredPower(), "project_dir": tmp_path, "state_files": [state]}


def test_each_input_of_an_up_changes_the_fingerprint(parts: dict[str, object], tmp_path: Path) -> None:
    first = run_fingerprint(**parts)  # type: ignore[arg-type]
    assert run_fingerprint(**parts) == first  # type: ignore[arg-type]
    plan = parts["plan"]
    changes = {
        "settings": parse_settings({"clusterFile": "c.yaml", "stopTimeout": "5"}),
        "power": DesiredPower(vms={"hpc-compute-01": "stopped"}),
        "plan": dataclasses.replace(plan, vms=plan.vms[:1]),  # type: ignore[type-var]
    }
    for key, value in changes.items():
        assert run_fingerprint(**{**parts, key: value}) != first, key  # type: ignore[arg-type]
    (tmp_path / "hpc.json").write_text('{"changed": true}')  # a plain pulumi run wrote the state
    assert run_fingerprint(**parts) != first  # type: ignore[arg-type]


def test_last_runs_are_recorded_and_forgotten(tmp_path: Path) -> None:
    runs = LastRuns(tmp_path)
    assert not runs.matches("hpc", "abc")
    runs.save("hpc", "abc")
    assert runs.matches("hpc", "abc") and not runs.matches("hpc", "abd") and not runs.matches("cloud", "abc")
    runs.forget("hpc")
    assert not runs.matches("hpc", "abc")

"""The record of a stack's last run: what its digest covers (a change in any part must go
through the engine), and the live check against libvirt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aihow_infra.lastrun import PROGRAM, Expected, ExpectedVm, LastRuns, inputs_digest, program_digest
from aihow_infra.state.layout import CHECKOUT


def test_every_file_of_the_program_is_in_its_digest(tmp_path: Path) -> None:
    for name in PROGRAM:
        source = CHECKOUT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    before = program_digest(tmp_path)
    for changed in ("providers/domain.py", "templates/domain.xml.j2", "__main__.py", "aihow_infra/plan.py",
                    "ansible/hpc.yml"):
        path = tmp_path / changed
        text = path.read_text()
        path.write_text(text + "\n")
        assert program_digest(tmp_path) != before, changed
        path.write_text(text)
    assert program_digest(tmp_path) == before


def test_each_input_of_an_up_changes_the_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [tmp_path / n for n in ("Pulumi.yaml", "Pulumi.hpc.yaml", "cluster.yaml", "power.json", "state.json")]
    for f in files:
        f.write_text(f"{f.name}\n")
    cluster = files[2]
    cluster.write_text("base_image_path: ${IMAGES}/base.qcow2\n")
    monkeypatch.setenv("IMAGES", "/srv/a")
    first = inputs_digest(files, cluster)
    assert inputs_digest(files, cluster) == first
    for f in files:
        text = f.read_text()
        f.write_text(text + "#\n")
        assert inputs_digest(files, cluster) != first, f.name
        f.write_text(text)
    files[3].unlink()  # the power records removed
    assert inputs_digest(files, cluster) != first
    files[3].write_text("power.json\n")
    monkeypatch.setenv("IMAGES", "/srv/b")  # a variable the cluster file names
    assert inputs_digest(files, cluster) != first
    monkeypatch.setenv("IMAGES", "/srv/a")
    monkeypatch.setenv("UNRELATED", "x")  # one it does not
    assert inputs_digest(files, cluster) == first


def test_a_recorded_run_is_checked_against_its_files_and_libvirt(tmp_path: Path) -> None:
    (tmp_path / "Pulumi.yaml").write_text("name: aihow\n")
    (tmp_path / "Pulumi.hpc.yaml").write_text("config: {}\n")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("clusters: {}\n")
    state = "stamp-1"  # Workspace.state_stamp of the stack's state
    runs = LastRuns(tmp_path)
    assert runs.changes("hpc", state) == ["no successful run is recorded"]
    # Nothing of it exists on the test driver: libvirt disagrees.
    expected = Expected(stack="hpc", uri="test:///default", network="t-net", pool="t-pool",
                        ledger=str(tmp_path / "leases.json"), images=[str(tmp_path / "gone-image")],
                        vms=[ExpectedVm("t-vm", True, 1, 1024, "t-vm.qcow2", [])])
    runs.save("hpc", cluster, state, expected)
    assert runs.changes("hpc", state) == [f"image {tmp_path / 'gone-image'} is gone",
                                            "network t-net is not active", "pool t-pool is not active"]
    assert runs.changes("hpc", state, settled=True) == ["its last deploy check did not finish"]
    # A plain pulumi run (or another operator's, on a shared backend) wrote the state.
    assert runs.changes("hpc", "stamp-2") == ["its files, settings, power records, state or the program changed"]
    runs.forget("hpc")
    assert runs.changes("hpc", state) == ["no successful run is recorded"]

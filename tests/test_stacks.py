"""The local backend after a pulumi process was killed while saving: the next task that holds
the stack mends what the store left (an empty ``.attrs`` sidecar makes every later run fail
with 'failed to load checkpoint: EOF'), and touches nothing of other stacks or live engines."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from aihow_infra.stacks import Workspace, summarize_failure
from tests.sandbox import dead_pid

ATTRS = json.dumps({"user.cache_control": "", "user.content_type": "application/json"}) + "\n"


def backend(tmp_path: Path, lock_pid: int) -> tuple[Workspace, Path, list[str]]:
    project = tmp_path / "project"
    project.mkdir()
    (project / "Pulumi.yaml").write_text("name: aihow\nruntime: python\n")
    pulumi = tmp_path / "state" / ".pulumi"
    stacks = pulumi / "stacks" / "aihow"
    stacks.mkdir(parents=True)
    for stack in ("hpc", "cloud"):
        (stacks / f"{stack}.json").write_text('{"version": 3}')
        (stacks / f"{stack}.json.attrs").write_text("")  # cut by the kill
        (stacks / f"{stack}.json.bak").write_text('{"version": 3}')
        (stacks / f"{stack}.json.bak.attrs").write_text(ATTRS)
        (stacks / f"{stack}.json.18ec8305dfcef19c.tmp").write_text('{"vers')
    history = pulumi / "history" / "aihow" / "hpc"
    history.mkdir(parents=True)
    (history / "hpc-1795953464.history.json").write_text("{}")
    (history / "hpc-1795953464.history.json.attrs").write_text('{"user.content_')
    locks = pulumi / "locks" / "organization" / "aihow" / "hpc"
    locks.mkdir(parents=True)
    (locks / "87ce6ffa.json").write_text(json.dumps({"pid": lock_pid, "hostname": socket.gethostname()}))
    (locks / "87ce6ffa.json.attrs").write_text(ATTRS)
    told: list[str] = []
    return Workspace(project_dir=project, backend_url=f"file://{tmp_path / 'state'}", waiting=told.append), pulumi, told


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_dead_engines_lock_and_cut_files_are_cleared_and_said(tmp_path: Path) -> None:
    pid = dead_pid()
    workspace, pulumi, told = backend(tmp_path, pid)
    with workspace.hold("hpc"):
        pass
    assert names(pulumi / "stacks" / "aihow") == {
        "hpc.json", "hpc.json.bak", "hpc.json.bak.attrs",  # the state itself and a sound sidecar stay
        "cloud.json", "cloud.json.attrs", "cloud.json.bak", "cloud.json.bak.attrs", "cloud.json.18ec8305dfcef19c.tmp"}
    assert names(pulumi / "history" / "aihow" / "hpc") == {"hpc-1795953464.history.json"}
    assert names(pulumi / "locks" / "organization" / "aihow" / "hpc") == set()
    assert told == [
        f"cleared the lock of stack hpc left by pulumi process {pid}, which is gone",
        "removed hpc.json.attrs, a broken or orphaned attributes file of stack hpc's state left by a pulumi "
        "process that was stopped while saving",
        "removed hpc.json.18ec8305dfcef19c.tmp, a temporary file of stack hpc's state left by that process",
        "removed hpc-1795953464.history.json.attrs, a broken or orphaned attributes file of stack hpc's state "
        "left by a pulumi process that was stopped while saving",
        "removed 87ce6ffa.json.attrs, a broken or orphaned attributes file of stack hpc's state left by a pulumi "
        "process that was stopped while saving"]
    with workspace.hold("hpc"):
        pass
    assert len(told) == 5  # nothing more to mend


def test_a_live_engines_files_are_left_alone(tmp_path: Path) -> None:
    workspace, pulumi, told = backend(tmp_path, os.getpid())
    before = {p: p.read_bytes() for p in pulumi.rglob("*") if p.is_file()}
    with workspace.hold("hpc"):
        pass
    assert {p: p.read_bytes() for p in pulumi.rglob("*") if p.is_file()} == before
    assert told == []


def test_without_a_dead_engine_only_the_states_broken_sidecar_goes(tmp_path: Path) -> None:
    workspace, pulumi, told = backend(tmp_path, dead_pid())
    for lock in (pulumi / "locks").rglob("*.json*"):
        lock.unlink()
    with workspace.hold("hpc"):
        pass
    assert names(pulumi / "stacks" / "aihow") == {
        "hpc.json", "hpc.json.bak", "hpc.json.bak.attrs", "hpc.json.18ec8305dfcef19c.tmp",  # no dead writer known
        "cloud.json", "cloud.json.attrs", "cloud.json.bak", "cloud.json.bak.attrs", "cloud.json.18ec8305dfcef19c.tmp"}
    assert (pulumi / "history" / "aihow" / "hpc" / "hpc-1795953464.history.json.attrs").exists()
    assert told == ["removed hpc.json.attrs, a broken or orphaned attributes file of stack hpc's state left by "
                    "a pulumi process that was stopped while saving"]


def test_a_program_crash_is_said_with_its_exception() -> None:
    output = """Diagnostics:
  pulumi:pulumi:Stack (aihow-hpc):
    error: Program failed with an unhandled exception:
    Traceback (most recent call last):
      File "/p/__main__.py", line 57, in main
        cluster = Cluster(plan.key, ClusterArgs(plan=plan))
    TypeError: ClusterArgs.__init__() missing 1 required positional argument: 'ledger'
"""
    assert summarize_failure(output) == (
        "Program failed with an unhandled exception: TypeError: ClusterArgs.__init__() missing 1 "
        "required positional argument: 'ledger'")

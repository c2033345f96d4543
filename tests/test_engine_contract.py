"""What aihow_infra/stacks.py counts on from the Pulumi engine this checkout builds (engine/go.mod
pins it), checked against that engine, so that a version bump fails here first rather than in a
user's run: the local backend's file layout the project reads directly, the text of a stack that
does not exist, and ``--event-log`` (offered only with PULUMI_DEBUG_COMMANDS)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aihow_infra.stacks import Workspace
from aihow_infra.state.layout import CHECKOUT

ENGINE_VERSION = re.search(r"github.com/pulumi/pulumi/pkg/v3 (v[0-9.]+)",
                           (CHECKOUT / "engine" / "go.mod").read_text())


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    project = tmp_path / "project"
    project.mkdir()
    (project / "Pulumi.yaml").write_text("name: contract\nruntime: python\n")
    (tmp_path / "state").mkdir()  # as ./bootstrap makes the checkout's
    return Workspace(project_dir=project, backend_url=f"file://{tmp_path / 'state'}")


def test_the_engine_is_the_pinned_one(workspace: Workspace) -> None:
    assert ENGINE_VERSION, "engine/go.mod pins no github.com/pulumi/pulumi/pkg/v3"
    said = workspace.run(["version"]).stdout.strip()
    assert said == ENGINE_VERSION.group(1), f"pulumi says {said}; engine/go.mod pins {ENGINE_VERSION.group(1)}"


def test_a_new_stack_lies_where_the_project_reads_it(workspace: Workspace) -> None:
    """stacks(), state_files() and urns() read the local backend's files, not the CLI."""
    workspace.ensure_stack("hpc")
    assert workspace.backend_folder() is not None
    assert any(path.is_file() for path in workspace.state_files("hpc")), \
        sorted(str(p) for p in (workspace.backend_folder() or Path()).rglob("*"))
    assert Workspace(project_dir=workspace.project_dir, backend_url=workspace.backend_url).stacks() == {"hpc"}
    assert workspace.urns("hpc") == set()


def test_a_missing_stack_is_said_in_the_words_up_looks_for(workspace: Workspace) -> None:
    proc = workspace.run(["up", "--yes", "--skip-preview"], "nosuch", check=False)
    assert proc.returncode != 0
    assert "no stack named 'nosuch' found" in proc.stdout


def test_the_event_log_is_offered_with_debug_commands(workspace: Workspace, tmp_path: Path) -> None:
    """An engine run with ``events`` asks for --event-log; a stack with no program fails, and the
    failure comes back as events and output, not as an unknown flag."""
    workspace.ensure_stack("cloud")
    seen: list[dict[str, object]] = []
    proc = workspace.run(["preview"], "cloud", check=False, events=seen.append)
    assert "unknown flag" not in proc.stdout, proc.stdout
    assert seen, proc.stdout
    assert all(isinstance(json.dumps(event), str) for event in seen)

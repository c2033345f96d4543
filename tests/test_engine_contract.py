"""What aihow_infra/stacks.py counts on from the Pulumi engine this checkout builds (engine/go.mod
pins it), checked against that engine, so that a version bump fails here first rather than in a
user's run: the layout of both state backends (a folder, PostgreSQL) the project reads directly,
the text of a stack that does not exist, and ``--event-log`` (offered only with
PULUMI_DEBUG_COMMANDS)."""

from __future__ import annotations

import json
import re
import time
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


@pytest.mark.parametrize("where", ["folder", "postgresql"])
def test_a_stack_and_its_resources_lie_where_the_project_reads_them(
        where: str, workspace: Workspace, request: pytest.FixtureRequest) -> None:
    """stacks(), urns(), state_stamp() and state_updated() read the backend itself, not the CLI,
    and agree with what the engine wrote, in a folder and in PostgreSQL."""
    if where == "postgresql":
        url = request.getfixturevalue("postgres_server") + "&table=contract_state"
        workspace = Workspace(project_dir=workspace.project_dir, backend_url=url)
    (workspace.project_dir / "__main__.py").write_text(
        "import pulumi\n\n\nclass Thing(pulumi.ComponentResource):\n"
        "    def __init__(self, name: str) -> None:\n        super().__init__('contract:x:Thing', name)\n\n\n"
        "Thing('one')\npulumi.export('answer', 42)\n")
    workspace.ensure_stack("hpc")
    fresh = Workspace(project_dir=workspace.project_dir, backend_url=workspace.backend_url)
    assert fresh.stacks() == {"hpc"}
    assert fresh.urns("hpc") == set()
    empty = fresh.state_stamp("hpc")
    workspace.up("hpc")
    assert workspace.outputs("hpc") == {"answer": 42}
    assert {urn.split("::")[-1] for urn in fresh.urns("hpc")} == {"contract-hpc", "one"}
    assert fresh.state_stamp("hpc") != empty
    updated = fresh.state_updated("hpc")
    assert updated is not None and abs(updated - time.time()) < 600
    assert fresh.state_stamp("hpc") == fresh.state_stamp("hpc")
    assert fresh.stacks() == {"hpc"} and fresh.state_stamp("cloud") == Workspace(
        project_dir=workspace.project_dir, backend_url=workspace.backend_url).state_stamp("cloud")


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

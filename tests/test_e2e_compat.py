"""A stack made by the previous layout converges with this checkout's code and changes nothing.

Every stack's state records the providers by module path and class (their pickles), the
component type tokens and the resource names: moving code between rooms (issue 24) must keep
them. Both kinds of cluster are made by the commit before the move, then previewed and brought
up by this checkout's program. Blank disks, so nothing boots; about a minute here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aihow_infra.state.layout import CHECKOUT
from tests.sandbox import E2E

pytestmark = pytest.mark.e2e

# The last commit before the Operator, the kinds and the state layout moved (aihow_infra/ops,
# kinds, state): its program and providers make the stacks.
PREVIOUS = "736b56d"
CODE = ("__main__.py", "aihow_infra", "providers", "templates")


def test_a_stack_made_by_the_previous_layout_converges_with_no_change(e2e: E2E, tmp_path: Path) -> None:
    old = tmp_path / "previous"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", PREVIOUS, *CODE],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    box = e2e.sandbox
    clusters = {}
    for kind in ("hpc", "cloud"):
        net = box.subnet()
        clusters[kind] = box.cluster(kind, net, [box.node(str(list(net.hosts())[10]))])
    cluster_file = e2e.write_cluster_file(clusters)
    project = e2e.workspace.project_dir
    program = project / "__main__.py"
    program.unlink()
    # The program's folder comes first on the engine's sys.path: the previous program imports
    # the previous code, not this checkout's (installed in the venv).
    for name in CODE:
        (project / name).symlink_to(old / name)
    for stack in ("hpc", "cloud"):
        e2e.configure(stack, cluster_file)
        e2e.workspace.up(stack)
    for name in CODE:
        (project / name).unlink()
    program.symlink_to(CHECKOUT / "__main__.py")
    for stack in ("hpc", "cloud"):
        assert e2e.workspace.planned_steps(stack) == {}, stack
        assert "unchanged" in e2e.workspace.up(stack)

"""Fixtures: a libvirt sandbox on qemu:///system, the real engine in a workspace of its own, and
the phase times of the slow tests (printed at the end of every run, CI's log included)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml

from aihow_infra.stacks import Workspace
from aihow_infra.state.layout import CHECKOUT
from tests.sandbox import E2E, Phases, Sandbox, system_libvirt


@pytest.fixture
def phases(request: pytest.FixtureRequest) -> Phases:
    """The test's phase timer."""
    return Phases(request.node)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the phase times of every test that kept some."""
    timed = [(r.nodeid, [v for k, v in r.user_properties if k == "phase"])
             for key in ("passed", "failed") for r in terminalreporter.stats.get(key, []) if r.when == "call"]
    timed = [(nodeid, lines) for nodeid, lines in timed if lines]
    if timed:
        terminalreporter.section("phase times")
        for nodeid, lines in timed:
            terminalreporter.write_line(nodeid)
            for line in lines:
                terminalreporter.write_line(f"  {line}")


@contextlib.contextmanager
def open_sandbox() -> Iterator[Sandbox]:
    """A libvirt sandbox on qemu:///system; everything it names is removed afterwards."""
    conn = system_libvirt()
    if conn is None:
        pytest.fail("libvirtd is not reachable at qemu:///system (run ./bootstrap)")
    box = Sandbox(conn)
    try:
        yield box
    finally:
        box.cleanup()
        with contextlib.suppress(libvirt.libvirtError):
            box.conn.close()  # (a test may have given the box a new connection)


@contextlib.contextmanager
def open_e2e(sandbox: Sandbox, root: Path, backend_url: str | None = None,
             shared_ledger: str | None = None) -> Iterator[E2E]:
    """The real engine on real libvirt, its project under ``root`` with its backend there too,
    or at ``backend_url`` (with ``shared_ledger``: another project folder's, as a second operator
    has it); every stack is destroyed afterwards, even on failure."""
    if not (CHECKOUT / ".tools" / "bin" / "pulumi").exists():
        pytest.fail("the Pulumi engine is not built: run ./bootstrap")
    project = root / "project"
    project.mkdir(parents=True)
    (project / "Pulumi.yaml").write_text(yaml.safe_dump({
        "name": "aihow",
        "runtime": {"name": "python", "options": {"toolchain": "pip",
                                                   "virtualenv": str(CHECKOUT / ".venv")}},
        "options": yaml.safe_load((CHECKOUT / "Pulumi.yaml").read_text())["options"],
    }))
    os.symlink(CHECKOUT / "__main__.py", project / "__main__.py")
    (root / "state").mkdir()
    workspace = Workspace(project_dir=project, backend_url=backend_url or f"file://{root / 'state'}")
    harness = E2E(workspace=workspace, root=root, sandbox=sandbox, shared_ledger=shared_ledger)
    try:
        yield harness
    finally:
        fresh = Workspace(project_dir=project, backend_url=workspace.backend_url)  # stacks made by any process
        for stack in sorted(fresh.stacks(), reverse=True):  # cloud before hpc
            with contextlib.suppress(Exception):
                fresh.destroy(stack)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A libvirt sandbox on qemu:///system for one test."""
    with open_sandbox() as box:
        yield box


@pytest.fixture
def e2e(sandbox: Sandbox, tmp_path: Path) -> Iterator[E2E]:
    """The real engine on real libvirt for one test."""
    with open_e2e(sandbox, tmp_path) as harness:
        yield harness


@pytest.fixture
def holding() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts to hold a device's files open (tests/test_custody.hold); each is
    killed afterwards, also when the test fails."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One private PostgreSQL server for the session (tests/postgres.py), on a unix socket only;
    its URL. Tests keep apart by the ledger name (``&ledger=``) or database objects they make."""
    from tests.postgres import private_postgres

    with private_postgres() as server:
        yield server.url

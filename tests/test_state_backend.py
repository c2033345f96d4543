"""The stacks' state in PostgreSQL (the engine's own ``postgres://`` backend), as two operators
share it: which backend a project uses, a task holding a stack against another operator's
(waiting, naming who; freed when the holder is killed), a dead engine's lock row cleared, and
bad backends said in one line. The engine's own reads and writes: test_engine_contract.py."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from aihow_infra.backend import configured_url, engine_url
from aihow_infra.desired import DesiredPower
from aihow_infra.errors import ConfigError, StackError, StateFileError
from aihow_infra.stacks import Workspace, summarize_failure
from tests.cli import run_task
from tests.samples import base
from tests.sandbox import dead_pid

ROOT = Path(__file__).resolve().parents[1]


def project(folder: Path, backend: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["name: shared", "runtime: python"] + ([f"backend:\n  url: {backend}"] if backend else [])
    (folder / "Pulumi.yaml").write_text("\n".join(lines) + "\n")
    return folder


def test_the_backend_is_the_environments_then_the_project_files_then_the_checkouts(tmp_path: Path) -> None:
    folder = project(tmp_path / "p", "postgres://ops@db.lab/state")
    assert configured_url(folder, {"PULUMI_BACKEND_URL": "file:///x"}, "file:///d") == ("file:///x",
                                                                                         "PULUMI_BACKEND_URL")
    assert configured_url(folder, {}, "file:///d") == ("postgres://ops@db.lab/state", "backend.url in Pulumi.yaml")
    assert configured_url(project(tmp_path / "q"), {}, "file:///d") == ("file:///d", "the default")
    # A relative folder is the project's (as the engine reads Pulumi.yaml), from wherever a task runs.
    assert configured_url(project(tmp_path / "r", "file://./.state"), {}, "file:///d") == (
        f"file://{tmp_path / 'r' / '.state'}", "backend.url in Pulumi.yaml")
    # The engine knows the scheme postgres:// only; TLS means nothing over a unix socket.
    assert engine_url("postgresql://ops@/state?host=/run/postgresql", "x") == \
        "postgres://ops@/state?host=/run/postgresql&sslmode=disable"
    assert engine_url("postgres://ops@db.lab/state", "x") == "postgres://ops@db.lab/state"


@pytest.mark.parametrize(("url", "said"), [
    ("s3://bucket/state", "backend.url in Pulumi.yaml: 's3://bucket/state' is not allowed; allowed: file://FOLDER, "
                          "or postgres://USER@HOST/DATABASE (the engine's PostgreSQL backend)"),
    ("https://api.pulumi.com", "backend.url in Pulumi.yaml: 'https://api.pulumi.com' is not allowed"),
    ("postgres://ops@/state?table=x;drop", "backend.url in Pulumi.yaml: table: 'x;drop' is not allowed; allowed: a "
                                           "table name of letters, digits and _"),
])
def test_a_backend_the_project_cannot_use_is_one_line_naming_it(tmp_path: Path, url: str, said: str) -> None:
    workspace = Workspace(project_dir=project(tmp_path / "p", url))
    with pytest.raises(ConfigError) as caught:
        workspace.stacks()
    assert said in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "p" / ".state").exists()


@pytest.mark.parametrize("argv", [["stacks"], ["system.status"], ["topology"], ["system.destroy", "--yes"]])
@pytest.mark.parametrize(("backend", "said"), [
    ("s3://bucket/state", "'s3://bucket/state' is not allowed"),
    ("postgres://aihow:pw@/aihow?host=/nonexistent", "Pulumi state backend postgres://aihow@/aihow?host=/nonexistent"),
])
def test_a_backend_that_cannot_be_used_is_one_line_for_every_command_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
        backend: str, said: str) -> None:
    folder = project(tmp_path / "p", backend)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(base()))
    for stack in ("hpc", "cloud"):
        (folder / f"Pulumi.{stack}.yaml").write_text(yaml.safe_dump({"config": {
            "aihow:clusterFile": str(cluster), "aihow:libvirtUri": "test:///default",
            "aihow:ledgerPath": str(tmp_path / "leases.json")}}))
    monkeypatch.setenv("AIHOW_PROJECT_DIR", str(folder))
    code, out, err = run_task(capsys, *argv)
    assert code == 1, (out, err)
    assert said in err and len(err.strip().splitlines()) == 1 and "pw" not in err, err
    assert out.strip() == ""
    assert sorted(p.name for p in folder.iterdir()) == ["Pulumi.cloud.yaml", "Pulumi.hpc.yaml", "Pulumi.yaml"]


def test_an_unreachable_server_is_one_line_naming_it(tmp_path: Path) -> None:
    url = f"postgres://aihow@/aihow?host={tmp_path}"  # no server listens there
    workspace = Workspace(project_dir=project(tmp_path / "p"), backend_url=url)
    with pytest.raises(StackError) as caught:
        workspace.stacks()
    message = str(caught.value)
    assert message.startswith(f"Pulumi state backend postgres://aihow@/aihow?host={tmp_path}")
    assert "cannot be used" in message and "\n" not in message


def holder_script(url: str, folder: Path, ready: Path) -> list[str]:
    """Another operator's task: holds stack hpc until killed."""
    code = (f"import pathlib, time\nfrom aihow_infra.stacks import Workspace\n"
            f"w = Workspace(project_dir=pathlib.Path({str(folder)!r}), backend_url={url!r})\n"
            f"with w.hold('hpc'):\n    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(600)\n")
    return [sys.executable, "-c", code]


def test_a_second_operator_waits_for_the_stack_naming_who_holds_it(postgres_server: str, tmp_path: Path) -> None:
    """Two project folders, one database: the second task waits, says who holds the stack, and
    goes on the moment the holder is killed (the server frees a dead connection's lock)."""
    url = postgres_server + "&table=shared_hold"
    ready = tmp_path / "ready"
    other = subprocess.Popen(holder_script(url, project(tmp_path / "alice"), ready), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert other.poll() is None and time.monotonic() < deadline, "the first operator's task did not start"
            time.sleep(0.1)
        told: list[str] = []
        mine = Workspace(project_dir=project(tmp_path / "bob"), backend_url=url, waiting=told.append)
        entered = threading.Event()

        def take() -> None:
            with mine.hold("hpc"):
                entered.set()

        taker = threading.Thread(target=take)
        taker.start()
        time.sleep(2)
        assert not entered.is_set(), "the stack was held twice"
        assert told == [f"waiting for aihow {os.environ.get('USER') or 'root'}@{socket.gethostname()} pid {other.pid} "
                        "to release stack hpc (up to 3600 s)"]
        other.send_signal(signal.SIGKILL)
        taker.join(timeout=30)
        assert entered.is_set()
    finally:
        other.kill()
        other.wait()


def lock_row(url: str, pid: int) -> tuple[str, str]:
    """A lock row as the engine writes one (backend/diy/lock.go), for stack hpc of project shared."""
    key = f"aihow/.pulumi/locks/organization/shared/hpc/{pid}.json"
    content = json.dumps({"pid": pid, "username": "root", "hostname": socket.gethostname(),
                          "timestamp": "2026-12-01T18:00:00Z"})
    return key, json.dumps({"data": base64.b64encode(content.encode()).decode()})


def test_a_dead_engines_lock_row_is_cleared_and_a_live_ones_kept(postgres_server: str, tmp_path: Path) -> None:
    url = postgres_server + "&table=shared_locks"
    told: list[str] = []
    workspace = Workspace(project_dir=project(tmp_path / "p"), backend_url=url, waiting=told.append)
    workspace.ensure_stack("hpc")  # the engine makes its table
    gone, alive = dead_pid(), os.getpid()
    with psycopg.connect(postgres_server) as conn:
        for pid in (gone, alive):
            conn.execute("INSERT INTO shared_locks (key, data) VALUES (%s, %s)", lock_row(url, pid))
    with workspace.hold("hpc"):
        pass
    assert told == [f"cleared the lock of stack hpc left by pulumi process {gone}, which is gone"]
    with psycopg.connect(postgres_server) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM shared_locks WHERE key LIKE '%/locks/%'")]
    assert keys == [lock_row(url, alive)[0]]
    # The engine refuses to run under the live lock, and says who holds it in one line.
    proc = workspace.run(["up", "--yes", "--skip-preview"], "hpc", check=False)
    assert proc.returncode != 0
    said = summarize_failure(proc.stdout)
    assert said == (f"the stack is locked by another pulumi run: root@{socket.gethostname()} (pid {alive}) since "
                    "2026-12-01T18:00:00Z; wait for it to end (if that process is gone: `pulumi cancel`)"), said


def test_power_records_kept_beside_a_shared_state_are_one_record_for_every_operator(
        postgres_server: str, tmp_path: Path) -> None:
    """What one operator's ``vm.stop`` records, another's ``system.up`` reads (else it would
    start the VM again), and the change counts as a change for both (no-op detection)."""
    url = postgres_server + "&table=shared_power"
    alice = Workspace(project_dir=project(tmp_path / "alice"), backend_url=url)
    bob = Workspace(project_dir=project(tmp_path / "bob"), backend_url=url)
    before = bob.state_stamp("hpc")
    with alice.hold("hpc"):
        alice.power_records("hpc").write(DesiredPower(vms={"hpc-compute-01": "stopped"}))
    assert bob.power_records("hpc").read() == DesiredPower(vms={"hpc-compute-01": "stopped"})
    assert bob.state_stamp("hpc") != before
    assert bob.power_records("cloud").read() == DesiredPower()
    assert not (tmp_path / "alice" / ".state" / "power" / "hpc.json").exists()  # only the folder's own lock
    # Another project in the same database, kept apart by its state table, has records of its own.
    other = Workspace(project_dir=project(tmp_path / "carol"), backend_url=postgres_server + "&table=other_power")
    assert other.power_records("hpc").read() == DesiredPower()
    # A corrupt row is one line naming where it is.
    with psycopg.connect(postgres_server) as conn:
        conn.execute("UPDATE aihow_power SET document = '{\"cluster\": \"sideways\"}' "
                     "WHERE name = 'shared_power/shared/hpc'")
    with pytest.raises(StateFileError) as caught:
        bob.power_records("hpc").read()
    assert str(caught.value).startswith("power records postgres://aihow@/aihow?host=")
    assert "(table aihow_power, row shared_power/shared/hpc): unexpected content" in str(caught.value)

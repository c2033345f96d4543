"""The GPU lease ledger: grants, releases, corruption, and a stress test with SIGKILL. What a
ledger means is tested on both places it can be kept: a file, and a private PostgreSQL server
(tests/postgres.py); what only one of them can do wrong (a corrupt file, a full disk, a lock file
held, a server that is gone) is tested on that one."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aihow_infra.errors import BusyError, LeaseConflictError, LeaseError
from aihow_infra.gpu.hosts import host_ledger
from aihow_infra.gpu.ledger import Ledger, for_host
from providers.gpu_lease import GpuLeaseProvider

GPU = ["0000:01:00.0", "0000:01:00.1"]


@pytest.fixture(params=["file", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's ledger is kept: a file in its folder, or a row of its own (named after the
    test) in the session's PostgreSQL server."""
    if request.param == "file":
        return str(tmp_path / "leases.json")
    url: str = request.getfixturevalue("postgres_server")
    return f"{url}&ledger={tmp_path.name}"


def test_acquire_release_and_generations(where: str) -> None:
    ledger = Ledger(where)
    granted = ledger.acquire("hpc/hpc-compute-01", GPU)
    assert [(g.address, g.generation) for g in granted] == [(GPU[0], 1), (GPU[1], 1)]
    assert ledger.acquire("hpc/hpc-compute-01", GPU)[0].generation == 1  # already ours: no new grant
    with pytest.raises(LeaseConflictError) as err:
        ledger.acquire("cloud/cloud-gpu-worker-01", GPU)
    message = str(err.value)
    assert "GPU 0000:01:00.0 is held by hpc/hpc-compute-01 since 20" in message
    assert "aihow vm.stop hpc-compute-01" in message and "aihow gpu.reclaim 0000:01:00.0" in message

    assert ledger.release("cloud/cloud-gpu-worker-01", GPU) == []  # not the holder: never a steal
    assert ledger.holder_of(GPU[0]) is not None
    assert ledger.release("hpc/hpc-compute-01", GPU) == GPU
    assert ledger.release("hpc/hpc-compute-01", GPU) == []  # idempotent
    assert ledger.acquire("cloud/cloud-gpu-worker-01", GPU)[0].generation == 2


def test_a_conflict_grants_nothing(where: str) -> None:
    ledger = Ledger(where)
    ledger.acquire("hpc/a", [GPU[1]])
    with pytest.raises(LeaseConflictError):
        ledger.acquire("cloud/b", GPU)
    assert ledger.holder_of(GPU[0]) is None  # all or nothing


def test_the_early_check_refuses_as_acquire_would_and_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "leases.json")
    ledger.check_free("cloud/b", GPU)  # no ledger yet: free, and none is made
    assert not ledger.path.exists()
    ledger.acquire("hpc/a", [GPU[1]])
    before = ledger.path.read_text()
    with pytest.raises(LeaseConflictError) as early:
        ledger.check_free("cloud/b", GPU)
    with pytest.raises(LeaseConflictError) as late:
        ledger.acquire("cloud/b", GPU)
    assert str(early.value) == str(late.value)
    assert str(early.value).startswith(f"GPU {GPU[1]} is held by hpc/a since ")
    ledger.check_free("hpc/a", GPU)  # its own lease is no conflict
    assert ledger.path.read_text() == before


def test_corrupt_ledger_is_reported_kept_aside_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    path.write_text('{"version": 1, "devices": {"0000:01:00.0": {"holder": "hpc/a", "gener')
    ledger = Ledger(path)
    for attempt in (lambda: ledger.acquire("cloud/b", GPU), lambda: ledger.release("hpc/a", GPU),
                    lambda: ledger.reclaim(GPU[0]), ledger.leases):
        with pytest.raises(LeaseError, match=r"is corrupt .* nothing was changed and a copy is kept at"):
            attempt()
    assert path.read_text().endswith('"gener')  # untouched
    kept = list(tmp_path.glob("leases.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text() == path.read_text()


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LeaseError, match=r"cannot be opened .* allowed: a writable folder"):
        Ledger(blocker / "leases.json").acquire("hpc/a", GPU)


def test_reclaim_frees_the_whole_device_whoever_holds_it(where: str) -> None:
    ledger = Ledger(where)
    ledger.acquire("hpc/a", GPU)
    ledger.acquire("hpc/b", ["0000:02:00.0"])
    freed = ledger.reclaim(GPU[1])  # the audio function names the device too
    assert [(lease.address, lease.holder) for lease in freed] == [(GPU[0], "hpc/a"), (GPU[1], "hpc/a")]
    assert ledger.holder_of(GPU[0]) is None and ledger.holder_of(GPU[1]) is None
    assert ledger.holder_of("0000:02:00.0") is not None  # another device is left alone
    assert ledger.reclaim(GPU[0]) == []


def test_release_of_an_old_grant_leaves_a_newer_one_alone(where: str) -> None:
    ledger = Ledger(where)
    old = {lease.address: lease.generation for lease in ledger.acquire("hpc/a", GPU)}
    ledger.acquire("hpc/a", GPU, renew=True)  # a new lease resource of the same VM
    assert ledger.release("hpc/a", GPU, old) == []
    assert all(ledger.holder_of(a) is not None for a in GPU)
    newer = {a: lease.generation for a, lease in ledger.leases().items()}
    assert ledger.release("hpc/a", GPU, newer) == GPU


def test_a_vm_with_two_gpus_gets_both_or_neither(where: str) -> None:
    ledger = Ledger(where)
    ledger.acquire("cloud/b", ["0000:02:00.0"])
    with pytest.raises(LeaseConflictError, match=r"0000:02:00\.0 is held by cloud/b"):
        ledger.acquire("hpc/a", [*GPU, "0000:02:00.0"])
    assert ledger.holder_of(GPU[0]) is None  # the free one was not taken either


def test_a_lock_held_too_long_is_a_clear_error(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "leases.json", lock_timeout=0.3)
    told: list[str] = []
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(ledger.path) + '.lock'!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, str(os.getpid()).encode(), 0)\n"
        "print('locked', flush=True); time.sleep(30)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(BusyError, match=rf"locked by process {holder.pid} for more than 0 s"):
            Ledger(ledger.path, lock_timeout=0.3, waiting=told.append).acquire("hpc/a", GPU)
        assert told == [f"waiting for process {holder.pid} to release GPU lease ledger {ledger.path} (up to 0 s)"]
    finally:
        holder.kill()
        holder.wait()
    ledger.acquire("hpc/a", GPU)  # free again once the holder is gone


def test_a_row_held_too_long_is_a_clear_error(postgres_server: str, tmp_path: Path) -> None:
    """PostgreSQL: another transaction holding the ledger's row (an operator's psql, a stuck
    process) makes a change wait at most the lock timeout, then say so in one line."""
    import psycopg

    where = f"{postgres_server}&ledger={tmp_path.name}"
    Ledger(where).acquire("hpc/a", [GPU[0]])  # the row exists
    with psycopg.connect(postgres_server) as other, other.transaction():
        other.execute("SELECT document FROM aihow_gpu_ledger WHERE name = %s FOR UPDATE", (tmp_path.name,))
        with pytest.raises(BusyError, match=r"^GPU lease ledger postgresql://aihow@/aihow\?host=.*&ledger=.* is "
                                            r"locked by another transaction for more than 0 s; wait for it"):
            Ledger(where, lock_timeout=0.3).acquire("cloud/b", [GPU[1]])
        assert Ledger(where).holder_of(GPU[0]) is not None  # a reader does not wait
    Ledger(where).acquire("cloud/b", [GPU[1]])  # free again once it ended


def test_a_server_that_is_gone_is_one_line_without_the_password(tmp_path: Path) -> None:
    where = f"postgresql://aihow:s3cret@/aihow?host={tmp_path}&password=an0ther"  # no server listens there
    for attempt in (lambda: Ledger(where).acquire("hpc/a", GPU), Ledger(where).leases,
                    lambda: Ledger(for_host(where, "hostname:ws1")).leases()):
        with pytest.raises(LeaseError) as refused:
            attempt()
        message = str(refused.value)
        assert message.startswith(f"GPU lease ledger postgresql://aihow@/aihow?host={tmp_path}&password=**** ")
        assert message.endswith("allowed: the URL of a running PostgreSQL server, and a database and role on it "
                                "this user may connect as")
        assert "s3cret" not in message and "an0ther" not in message and "\n" not in message
    # The host a ledger's leases are kept for is said in words, not as a parameter no one may write.
    assert Ledger(for_host(where, "hostname:ws1")).shown.endswith("&password=**** (leases of host hostname:ws1)")


def test_a_corrupt_row_is_reported_and_never_overwritten(postgres_server: str, tmp_path: Path) -> None:
    import psycopg

    where = f"{postgres_server}&ledger={tmp_path.name}"
    Ledger(where).acquire("hpc/a", [GPU[0]])
    with psycopg.connect(postgres_server) as conn:
        conn.execute("UPDATE aihow_gpu_ledger SET document = '{\"version\": 7}' WHERE name = %s", (tmp_path.name,))
    for attempt in (lambda: Ledger(where).acquire("cloud/b", GPU), Ledger(where).leases):
        with pytest.raises(LeaseError, match=rf"is corrupt \(not a version-1 ledger\); nothing was changed; repair "
                                             rf"row '{tmp_path.name}' of table aihow_gpu_ledger by hand"):
            attempt()
    with psycopg.connect(postgres_server) as conn:
        row = conn.execute("SELECT document FROM aihow_gpu_ledger WHERE name = %s", (tmp_path.name,)).fetchone()
    assert row is not None and row[0] == {"version": 7}


def test_a_full_disk_is_one_line_and_keeps_the_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(tmp_path / "leases.json")
    ledger.acquire("hpc/a", GPU)
    before = ledger.path.read_text()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LeaseError, match=r"cannot be written \(No space left on device\); the previous content "
                                         r"is kept; free some space"):
        ledger.release("hpc/a", GPU)
    monkeypatch.undo()
    assert ledger.path.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_temp_files_of_killed_writers_are_removed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "leases.json")
    (tmp_path / ".leases.json.tmp-abc123").write_text("half")
    ledger.acquire("hpc/a", GPU)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leases.json", "leases.json.lock"]


def test_every_read_of_a_corrupt_ledger_keeps_one_copy(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "leases.json")
    ledger.path.write_text("{half")
    for _ in range(3):
        with pytest.raises(LeaseError, match="is corrupt"):
            ledger.leases()
    assert len(list(tmp_path.glob("leases.json.corrupt-*"))) == 1


def test_lease_provider_refresh_and_diff_see_a_lost_lease(tmp_path: Path) -> None:
    provider = GpuLeaseProvider()
    props = {"ledger": str(tmp_path / "l.json"), "holder": "hpc/a", "addresses": GPU}
    created = provider.create(props)
    assert created.outs["held"] is True and created.outs["generation"] == 1
    assert provider.diff(created.id, created.outs, props).changes is False
    Ledger(props["ledger"]).reclaim(GPU[0])
    Ledger(props["ledger"]).acquire("cloud/b", [GPU[0]])
    read = provider.read(created.id, created.outs)
    assert read.outs["held"] is False and read.outs["current_holders"] == ["cloud/b"]
    assert provider.diff(created.id, read.outs, props).changes is True
    with pytest.raises(LeaseConflictError):
        provider.update(created.id, read.outs, props)
    provider.delete(created.id, props)
    assert Ledger(props["ledger"]).holder_of(GPU[0]).holder == "cloud/b"  # type: ignore[union-attr]
    assert Ledger(props["ledger"]).holder_of(GPU[1]) is None


# --- stress -------------------------------------------------------------------------------------

ADDRESSES = ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0"]
GRANTS = 40


def _worker(path: str, marks: str, log: str, index: int, grants: int, seed: int) -> None:
    """Acquire/release at random until ``grants`` leases were granted (a conflict is retried).
    Holding is mirrored by a marker file per address, made by a link (which fails when the
    marker exists), so a double grant shows up as a marker that already exists."""
    rng = random.Random(seed)
    ledger = Ledger(path)
    holder = f"w{index}/vm"
    granted = 0
    with open(log, "a", buffering=1) as out:
        while granted < grants:
            address = rng.choice(ADDRESSES)
            try:
                lease = ledger.acquire(holder, [address])[0]
            except LeaseConflictError:
                continue
            marker = os.path.join(marks, address)
            # The marker appears with its holder already in it (written aside, then linked: the
            # link fails if the marker exists): a SIGKILL between creating it and writing it would
            # leave an empty marker the operator's reclaim below cannot tell is the victim's.
            draft = f"{marker}.w{index}"
            with open(draft, "w") as f:
                f.write(holder)
            try:
                os.link(draft, marker)
            except FileExistsError:
                out.write(f"DOUBLE {address} {holder}\n")
                return
            os.unlink(draft)
            out.write(f"GRANT {address} {lease.generation}\n")
            granted += 1
            time.sleep(rng.random() / 500)
            os.unlink(marker)
            ledger.release(holder, [address])


def test_stress_sixteen_processes_with_sigkill(where: str, tmp_path: Path) -> None:
    path, marks = Path(where), tmp_path / "marks"
    on_file = not where.startswith("postgresql://")
    marks.mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = {}
    for i in range(16):
        log = tmp_path / f"w{i}.log"
        procs[i] = ctx.Process(target=_worker, args=(where, str(marks), str(log), i, GRANTS, i))
        procs[i].start()

    killed: set[int] = set()
    ledger = Ledger(where)
    deadline = time.monotonic() + 120
    rng = random.Random(7)
    while any(p.is_alive() for p in procs.values()) and time.monotonic() < deadline:
        if on_file and path.exists():  # a reader never sees a partial file
            json.loads(path.read_text())
        victim = rng.randrange(16)
        if len(killed) < 5 and victim not in killed and procs[victim].is_alive() and rng.random() < 0.3:
            os.kill(procs[victim].pid, signal.SIGKILL)  # type: ignore[arg-type]
            procs[victim].join()
            killed.add(victim)
            # The operator's view of a dead holder: its leases are stale and get reclaimed by hand.
            for lease in ledger.leases().values():
                if lease.holder == f"w{victim}/vm":
                    marker = marks / lease.address
                    if marker.exists() and marker.read_text() == lease.holder:
                        marker.unlink()
                    ledger.reclaim(lease.address)
        time.sleep(0.01)
    for p in procs.values():
        p.join(timeout=30)
        assert not p.is_alive()

    grants: dict[str, list[int]] = {a: [] for a in ADDRESSES}
    for i in range(16):
        for line in (tmp_path / f"w{i}.log").read_text().splitlines():
            kind, address, value = line.split()
            assert kind != "DOUBLE", f"{address} granted to {value} while held"
            grants[address].append(int(value))
    final = ledger.leases()
    for address, generations in grants.items():
        assert len(generations) == len(set(generations)), f"a generation of {address} was granted twice"
        if address in final:
            assert final[address].generation >= max(generations, default=0)
    # No lost lease: whatever is still held belongs to a killed worker (nobody else released it).
    for lease in final.values():
        assert lease.holder is None or int(lease.holder[1:].split("/")[0]) in killed
    # Every worker that was not killed got all its grants: contention delays, never starves.
    for i in set(range(16)) - killed:
        assert len((tmp_path / f"w{i}.log").read_text().splitlines()) == GRANTS
    assert killed, "the test killed no worker"
    if on_file:
        json.loads(path.read_text())


def test_the_ledger_setting_takes_a_file_or_a_postgresql_url() -> None:
    from aihow_infra.errors import ConfigError
    from aihow_infra.settings import parse_settings

    for value in ("/var/lib/aihow/gpu-leases.json", "postgresql://aihow@db.lab/aihow",
                  "postgres://aihow@/aihow?host=/run/postgresql&ledger=lab"):
        assert parse_settings({"clusterFile": "c.yaml", "ledgerPath": value}).ledger_path == value
    with pytest.raises(ConfigError) as refused:
        parse_settings({"clusterFile": "c.yaml", "ledgerPath": "leases.json"})
    assert str(refused.value).splitlines()[-1].strip().endswith(
        "aihow:ledgerPath: 'leases.json' is neither an absolute path nor a PostgreSQL URL; allowed: a file such as "
        "/var/lib/aihow/gpu-leases.json, or postgresql://USER@HOST/DATABASE (one ledger several hosts share)")
    with pytest.raises(ConfigError) as refused:
        parse_settings({"clusterFile": "c.yaml", "ledgerPath": "postgresql://aihow:pw@db.lab/aihow?libvirt_host=x"})
    assert "'postgresql://aihow@db.lab/aihow?libvirt_host=x' names libvirt_host; allowed: a URL without it" in str(
        refused.value)
    assert "pw" not in str(refused.value)


def test_a_shared_ledger_keys_leases_by_host(postgres_server: str, tmp_path: Path) -> None:
    """In one database, each libvirt host has its own leases: the same address on two hosts is
    two GPUs, and two URIs naming one host (the same identity) share one lease. A file ledger is
    one host's, and libvirt is not asked about it."""
    url = f"{postgres_server}&ledger={tmp_path.name}"
    gpu_host, workstation = Ledger(for_host(url, "4c4c4544-0042")), Ledger(for_host(url, "hostname:ws1"))
    gpu_host.acquire("cloud/cloud-gpu-worker-01", GPU)
    workstation.acquire("hpc/hpc-compute-01", GPU)  # another machine's card at the same address
    assert {lease.holder for lease in gpu_host.leases().values()} == {"cloud/cloud-gpu-worker-01"}
    with pytest.raises(LeaseConflictError, match="held by cloud/cloud-gpu-worker-01"):
        Ledger(for_host(url, "4c4c4544-0042")).acquire("hpc/hpc-compute-02", GPU)  # the same host, reached again
    assert host_ledger("/var/lib/aihow/gpu-leases.json", "qemu+ssh://nowhere.invalid/system") == \
        "/var/lib/aihow/gpu-leases.json"
    on_test_driver = host_ledger(url, "test:///default")  # no SMBIOS there: the host's name
    assert on_test_driver == for_host(url, f"hostname:{socket.gethostname()}")
    assert Ledger(on_test_driver).leases() == {}


def _operator(location: str, holder: str, start: Any, said: str) -> None:
    """One operator's grant of the GPU (both functions), as its GpuLease would take it; what it
    got is written to a file of its own. (A queue shared by both would not do: a process
    SIGKILLed while writing to it keeps the queue's lock, and the other one hangs at exit.)"""
    start.wait()
    try:
        Ledger(location).acquire(holder, GPU)
        result = "won"
    except LeaseConflictError:
        result = "refused"
    Path(said).write_text(result)


def test_two_operators_grant_one_gpu_exactly_once_over_200_rounds_with_sigkill(
        postgres_server: str, tmp_path: Path) -> None:
    """Two operators (each its own process, the host reached under one identity) ask for the same
    GPU at once, 200 times; in about a third of the rounds one of them is SIGKILLed at a random
    moment. Each round: at most one holder, all functions or none, and when neither was killed
    exactly one won; a killed winner's lease stays until reclaimed (never silently freed)."""
    url, host = f"{postgres_server}&ledger={tmp_path.name}", "4c4c4544-0042-3510-8052-b4c04f384e32"
    alice, bob = "hpc/hpc-compute-01", "cloud/cloud-gpu-worker-01"
    # Forked from a server process of one thread: a fork of this test's process would copy any
    # lock another thread (left by an earlier test in this worker) holds, and hang on it.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # imported once, by the server: each child starts at once
    rng = random.Random(28)
    ledger = Ledger(for_host(url, host))
    tally = {"won once": 0, "killed": 0}
    for _round in range(200):
        start = ctx.Event()
        files = {who: tmp_path / f"round-{_round}-{who.replace('/', '-')}" for who in (alice, bob)}
        procs = {who: ctx.Process(target=_operator, args=(for_host(url, host), who, start, str(files[who])))
                 for who in (alice, bob)}
        for proc in procs.values():
            proc.start()
        start.set()
        victim = rng.choice([alice, bob]) if rng.random() < 0.35 else None
        if victim is not None:
            time.sleep(rng.random() / 50)
            os.kill(procs[victim].pid, signal.SIGKILL)  # type: ignore[arg-type]
            tally["killed"] += 1
        for proc in procs.values():
            proc.join(timeout=30)
            assert not proc.is_alive()
        said = {who: path.read_text() for who, path in files.items() if path.exists()}
        leases = ledger.leases()
        holders = {leases[a].holder for a in GPU if a in leases}
        assert len(holders - {None}) <= 1 and len(holders) == 1, f"round {_round}: {leases}"
        winners = [who for who, result in said.items() if result == "won"]
        assert len(winners) <= 1, f"round {_round}: both won {said}"
        if victim is None:
            assert winners == list(holders), f"round {_round}: {said} {leases}"
            tally["won once"] += 1
        holder = holders.pop()
        if holder is not None:
            if holder == victim:
                ledger.reclaim(GPU[0])  # the operator's command for a dead holder's lease
            else:
                ledger.release(holder, GPU)
        assert all(lease.holder is None for lease in ledger.leases().values())
    assert tally["killed"] >= 40 and tally["won once"] >= 100, tally


def test_a_server_restarted_during_a_grant_grants_nothing_and_the_next_grant_goes_through(tmp_path: Path) -> None:
    """The grant waits on the ledger's row (held, as by another host's transaction); the server
    restarts meanwhile: one line, nothing granted; asked again, the grant goes through."""
    import psycopg

    from aihow_infra.gpu.ledger import LEDGER_TABLE
    from tests.postgres import private_postgres

    with private_postgres() as server:
        ledger = Ledger(f"{server.url}&ledger=restart")
        ledger.acquire("hpc/hpc-compute-01", GPU)
        ledger.release("hpc/hpc-compute-01", GPU)
        other = psycopg.connect(server.url)
        other.execute(f"SELECT document FROM {LEDGER_TABLE} WHERE name = 'restart' FOR UPDATE")
        failed: list[BaseException] = []

        def grant() -> None:
            try:
                ledger.acquire("cloud/cloud-gpu-worker-01", GPU)
            except LeaseError as exc:
                failed.append(exc)

        waiter = threading.Thread(target=grant)
        waiter.start()
        time.sleep(1.5)  # the grant now waits for the row
        server.restart("fast")
        waiter.join(timeout=60)
        other.close()
        assert len(failed) == 1 and "the server broke the transaction off" in str(failed[0]), failed
        assert "nothing was changed" in str(failed[0]) and "\n" not in str(failed[0])
        assert {lease.holder for lease in ledger.leases().values()} == {None}
        assert [lease.generation for lease in ledger.acquire("cloud/cloud-gpu-worker-01", GPU)] == [2, 2]

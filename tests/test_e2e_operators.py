"""Two operators, one PostgreSQL: each has a project folder of their own, and both name the same
database for the stacks' Pulumi state and for the GPU lease ledger (README, "Shared state").
Through the real engine, on libvirt's test driver as in test_e2e_gpu_sharing.py (it starts
domains with PCI hostdevs without hardware): what one operator does, the other sees and keeps;
two tasks on one stack run one after the other, the second told who holds it; the GPU goes to
one VM at a time whichever operator asks."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aihow_infra.errors import LeaseConflictError, StackError
from aihow_infra.gpu.hosts import host_ledger
from aihow_infra.gpu.ledger import Ledger
from aihow_infra.ops import Operator
from tests.conftest import open_e2e
from tests.sandbox import E2E, Sandbox, at_once, shared_gpu_clusters

pytestmark = pytest.mark.e2e


@pytest.fixture
def operators(sandbox: Sandbox, tmp_path: Path, postgres_server: str) -> Iterator[tuple[E2E, E2E]]:
    """Alice's and Bob's project folders over one database (a table and a ledger of this test's)."""
    backend = postgres_server.replace("postgresql://", "postgres://", 1) + f"&table=state_{tmp_path.name}"
    ledger = f"{postgres_server}&ledger={tmp_path.name}"
    with open_e2e(sandbox, tmp_path / "alice", backend, ledger) as alice, \
            open_e2e(sandbox, tmp_path / "bob", backend, ledger) as bob:
        for person in (alice, bob):
            cluster_file = person.write_cluster_file(shared_gpu_clusters(sandbox, cloud_auto_start=False))
            for stack in ("hpc", "cloud"):
                person.configure(stack, cluster_file, libvirtUri="test:///default")
        yield alice, bob


def holders(e2e: E2E) -> dict[str, str | None]:
    located = host_ledger(e2e.ledger_path, "test:///default")
    return {a: lease.holder for a, lease in Ledger(located).leases().items()}


def test_two_operators_share_stacks_power_records_and_the_gpu(operators: tuple[E2E, E2E]) -> None:
    alice, bob = operators
    box = alice.sandbox
    hpc_vm, cloud_vm = f"{box.prefix}-hpc-compute-01", f"{box.prefix}-cloud-gpu-worker-01"
    told: dict[str, list[str]] = {"alice": [], "bob": []}
    ops = {name: Operator(person.workspace, progress=told[name].append)
           for name, person in (("alice", alice), ("bob", bob))}

    # Alice brings HPC up: its GPU node takes the GPU. Bob sees her stack, resources and lease.
    alice.workspace.up("hpc")
    assert bob.workspace.outputs("hpc")["nodes"][hpc_vm]["power_state"] == "running"
    assert {s.stack: s.resources > 0 for s in ops["bob"].stack_summaries()} == {"hpc": True, "cloud": False}
    assert holders(bob) == {"0000:41:00.0": f"hpc/{hpc_vm}", "0000:41:00.1": f"hpc/{hpc_vm}"}

    # Bob brings Cloud up; his start of its GPU worker is refused, naming Alice's VM.
    bob.workspace.up("cloud")
    with pytest.raises(LeaseConflictError, match=f"GPU 0000:41:00.0 is held by hpc/{hpc_vm} since "):
        ops["bob"].vm_start(cloud_vm)

    # Bob stops Alice's GPU node: the lease is freed, and Alice's next up keeps it stopped (her
    # tasks read his power record), after seeing that the stack changed under her.
    ops["bob"].vm_stop(hpc_vm)
    assert holders(alice) == {"0000:41:00.0": None, "0000:41:00.1": None}
    assert ops["alice"].records("hpc").read().vms == {hpc_vm: "stopped"}
    assert not ops["alice"].nothing_to_do("hpc")
    alice.workspace.up("hpc")
    assert alice.workspace.outputs("hpc")["nodes"][hpc_vm]["power_state"] == "shutoff"
    assert holders(alice) == {"0000:41:00.0": None, "0000:41:00.1": None}

    # Both start a GPU VM at once, each on a stack of their own: exactly one gets the GPU.
    results = at_once({"alice": lambda: ops["alice"].vm_start(hpc_vm), "bob": lambda: ops["bob"].vm_start(cloud_vm)},
                      (LeaseConflictError, StackError))
    won = [name for name, result in results.items() if result == "ok"]
    assert len(won) == 1, results
    lost = "bob" if won == ["alice"] else "alice"
    assert "is held by" in results[lost], results
    winner_vm = hpc_vm if won == ["alice"] else cloud_vm
    assert set(holders(alice).values()) == {f"{'hpc' if won == ['alice'] else 'cloud'}/{winner_vm}"}

    # Two ups of one stack at once: one runs, the other waits for it and says whom it waits for.
    told["alice"].clear()
    told["bob"].clear()
    ups = at_once({"alice": lambda: alice.workspace.up("cloud"), "bob": lambda: bob.workspace.up("cloud")})
    assert ups == {"alice": "ok", "bob": "ok"}
    waited = [line for lines in told.values() for line in lines if line.startswith("waiting for aihow ")]
    assert len(waited) == 1 and waited[0].endswith("to release stack cloud (up to 3600 s)"), told


def test_a_server_restarted_during_an_up_is_finished_by_the_next_plain_up(sandbox: Sandbox, tmp_path: Path) -> None:
    """PostgreSQL crashes (every session cut) and is back 3 s later, while the engine runs an up
    that takes the GPU:
    that up may fail, in one line; the next plain up finishes it: the VM runs and holds the GPU
    once, no lock row is left, nothing is left to change."""
    from tests.postgres import private_postgres

    with private_postgres() as server:
        backend = server.url.replace("postgresql://", "postgres://", 1)
        with open_e2e(sandbox, tmp_path, backend, f"{server.url}&ledger=restart") as e2e:
            cluster_file = e2e.write_cluster_file(shared_gpu_clusters(sandbox, cloud_auto_start=False))
            e2e.configure("hpc", cluster_file, libvirtUri="test:///default")
            ws = e2e.workspace
            ws.ensure_stack("hpc")
            outcome: list[str] = []

            def up() -> None:
                try:
                    ws.up("hpc")
                    outcome.append("ok")
                except StackError as exc:
                    outcome.append(str(exc))

            runner = threading.Thread(target=up)
            runner.start()
            deadline = time.monotonic() + 120
            while not lock_rows(server.url) and runner.is_alive():  # the engine holds the stack
                assert time.monotonic() < deadline, "the engine never locked the stack"
                time.sleep(0.1)
            assert runner.is_alive(), f"the up ended before the restart: {outcome}"
            server.stop("immediate")  # as a crash: no session is told; down for a while
            time.sleep(3)
            server.start()
            runner.join(timeout=600)
            assert len(outcome) == 1 and "\n" not in outcome[0], outcome
            ws.up("hpc")
            vm = f"{sandbox.prefix}-hpc-compute-01"
            assert ws.outputs("hpc")["nodes"][vm]["power_state"] == "running"
            assert set(holders(e2e).values()) == {f"hpc/{vm}"}
            assert lock_rows(server.url) == []
            assert ws.planned_steps("hpc") == {}
            print("the up cut by the restart:", outcome[0])


def lock_rows(url: str) -> list[str]:
    """The engine's lock rows (backend/diy/lock.go) in the default state table."""
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(url, connect_timeout=2) as conn:
        return [k for (k,) in conn.execute("SELECT key FROM pulumi_state WHERE key LIKE '%/.pulumi/locks/%'")]
    return []

"""GPU sharing between the two stacks, through the real engine.

There is no GPU here, so how does a GPU VM "run"? These stacks use libvirt's
test driver (``test:///default``) as their libvirt URI: the test driver accepts
and starts domains with PCI hostdevs without touching hardware, while every
other part is real (the Pulumi engine, both stacks' state, the dynamic
providers, and the one lease ledger file the two stacks share). The driver
keeps no state between provider processes, so each ``pulumi up`` finds its
domains gone and defines them again (the domain provider converges on that).
What the real daemon does with a start that fails (it must release the lease)
is proven on ``qemu:///system`` in the last test.
"""

from __future__ import annotations

import json

import pytest

from aihow_infra.errors import LeaseConflictError, StackError
from aihow_infra.gpu.ledger import Ledger
from aihow_infra.ops import Operator
from tests.sandbox import E2E, at_once, shared_gpu_clusters

pytestmark = pytest.mark.e2e


def holders(e2e: E2E) -> dict[str, str | None]:
    return {a: lease.holder for a, lease in Ledger(e2e.ledger).leases().items()}


def test_seed_scenario_one_gpu_two_clusters(e2e: E2E) -> None:
    """CLOUD-0.3's test scenarios, step by step, with the ledger checked at each."""
    box, ws = e2e.sandbox, e2e.workspace
    cluster_file = e2e.write_cluster_file(shared_gpu_clusters(box, cloud_auto_start=False))
    for stack in ("hpc", "cloud"):
        e2e.configure(stack, cluster_file, libvirtUri="test:///default")
    op = Operator(ws)
    hpc_vm, cloud_vm = f"{box.prefix}-hpc-compute-01", f"{box.prefix}-cloud-gpu-worker-01"

    # 1. HPC up takes the lease.
    ws.up("hpc")
    assert holders(e2e) == {"0000:41:00.0": f"hpc/{hpc_vm}", "0000:41:00.1": f"hpc/{hpc_vm}"}
    assert Ledger(e2e.ledger).leases()["0000:41:00.0"].generation == 1

    # 2-4. Cloud up succeeds: its GPU worker is defined, not started, and holds no lease.
    ws.up("cloud")
    cloud = ws.outputs("cloud")["nodes"]
    assert cloud[cloud_vm]["power_state"] == "shutoff" and cloud[cloud_vm]["desired_power"] == "stopped"
    assert set(holders(e2e).values()) == {f"hpc/{hpc_vm}"}

    # 5. Starting the Cloud GPU worker is refused with the clear message, before any engine
    # run; nothing is recorded.
    with pytest.raises(LeaseConflictError) as err:
        op.vm_start(cloud_vm)
    assert f"GPU 0000:41:00.0 is held by hpc/{hpc_vm} since " in str(err.value)
    assert f"free it with `aihow vm.stop {hpc_vm}`" in str(err.value)
    assert op.records("cloud").read().vms == {}
    assert "power" not in (e2e.root / "project" / "Pulumi.cloud.yaml").read_text()
    assert set(holders(e2e).values()) == {f"hpc/{hpc_vm}"}

    # 6. Stopping the HPC GPU VM frees the lease.
    op.vm_stop(hpc_vm)
    assert holders(e2e) == {"0000:41:00.0": None, "0000:41:00.1": None}
    assert ws.outputs("hpc")["nodes"][hpc_vm]["power_state"] == "shutoff"

    # 7. Starting the Cloud GPU worker now gets it (a new grant: generation 2).
    op.vm_start(cloud_vm)
    assert holders(e2e) == {"0000:41:00.0": f"cloud/{cloud_vm}", "0000:41:00.1": f"cloud/{cloud_vm}"}
    assert Ledger(e2e.ledger).leases()["0000:41:00.0"].generation == 2
    assert ws.outputs("cloud")["nodes"][cloud_vm]["power_state"] == "running"

    # 8. Pulumi stays the record: neither stack has anything left to change.
    assert ws.planned_steps("hpc") == {} and ws.planned_steps("cloud") == {}

    # invoke switch --to hpc: Cloud's GPU VMs stop first, then HPC's start and take the GPU back.
    op.switch("hpc")
    assert holders(e2e) == {"0000:41:00.0": f"hpc/{hpc_vm}", "0000:41:00.1": f"hpc/{hpc_vm}"}
    assert ws.outputs("cloud")["nodes"][cloud_vm]["power_state"] == "shutoff"
    assert ws.outputs("hpc")["nodes"][hpc_vm]["power_state"] == "running"
    assert ws.planned_steps("hpc") == {} and ws.planned_steps("cloud") == {}


def test_simultaneous_ups_grant_the_gpu_exactly_once(e2e: E2E) -> None:
    """Both clusters start the same GPU automatically; launched together, exactly one wins.
    Five rounds through the whole engine path; the ledger's own exactness under contention and
    SIGKILLs is shown over hundreds of rounds in tests/test_ledger.py."""
    box, ws = e2e.sandbox, e2e.workspace
    clusters = shared_gpu_clusters(box, cloud_auto_start=True)
    clusters["cloud"]["worker_nodes"] = clusters["cloud"]["worker_nodes"][1:]
    cluster_file = e2e.write_cluster_file(clusters)
    for stack in ("hpc", "cloud"):
        e2e.configure(stack, cluster_file, libvirtUri="test:///default")
        ws.ensure_stack(stack)

    winners = []
    for _round in range(5):
        results = at_once({stack: lambda stack=stack: ws.up(stack) for stack in ("hpc", "cloud")}, (StackError,))
        won = [s for s, r in results.items() if r == "ok"]
        assert len(won) == 1, results
        lost = "cloud" if won == ["hpc"] else "hpc"
        assert "is held by" in results[lost]
        owner = {h.split("/")[0] for h in holders(e2e).values() if h}
        assert owner == set(won)
        winners.append(won[0])
        for stack in ("cloud", "hpc"):
            ws.destroy(stack)
        assert all(h is None for h in holders(e2e).values())
    print("winners:", json.dumps(winners))


def test_failed_start_on_real_libvirt_releases_its_lease(e2e: E2E) -> None:
    """On qemu:///system the GPU does not exist, so the start fails: no lease, no domain."""
    box, ws = e2e.sandbox, e2e.workspace
    clusters = shared_gpu_clusters(box, cloud_auto_start=False)
    del clusters["cloud"]
    e2e.configure("hpc", e2e.write_cluster_file(clusters))
    with pytest.raises(StackError, match=r"starting domain .*-hpc-compute-01"):
        ws.up("hpc")
    assert all(h is None for h in holders(e2e).values())
    assert Ledger(e2e.ledger).leases()["0000:41:00.0"].generation == 1  # it was granted, then released
    assert f"{box.prefix}-hpc-compute-01" not in {d.name() for d in box.conn.listAllDomains()}
    assert box.conn.lookupByName(f"{box.prefix}-hpc-controller").isActive()

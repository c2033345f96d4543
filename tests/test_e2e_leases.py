"""Stale leases: listed by gpu.leases, freed only by an explicit gpu.reclaim."""

from __future__ import annotations

import libvirt
import pytest

from aihow_infra.errors import AihowError
from aihow_infra.gpu.leases import lease_report, reclaim
from aihow_infra.ops import Operator
from tests.sandbox import E2E

pytestmark = pytest.mark.e2e

DOMAIN = """<domain type='test'><name>{name}</name><memory unit='MiB'>128</memory>
<os><type arch='x86_64'>hvm</type></os></domain>"""


def test_stale_leases_are_listed_and_reclaimed_only_on_request(e2e: E2E) -> None:
    e2e.configure("hpc", e2e.write_cluster_file({"hpc": e2e.sandbox.cluster("hpc", e2e.sandbox.subnet(), [])}),
                  libvirtUri="test:///default")
    ledger, uri = Operator(e2e.workspace).host_ledger()
    conn = libvirt.open("test:///default")  # the same in-process test driver the lease report reads
    running = f"{e2e.sandbox.prefix}-running"
    conn.defineXML(DOMAIN.format(name=running)).create()
    assert (ledger.path, uri) == (e2e.ledger, "test:///default")
    ledger.acquire(f"hpc/{running}", ["0000:01:00.0"])
    ledger.acquire("hpc/gone-vm", ["0000:02:00.0"])
    try:
        rows = {r.address: r for r in lease_report(ledger, uri)}
        assert (rows["0000:01:00.0"].holder_state, rows["0000:01:00.0"].stale) == ("running", False)
        assert (rows["0000:02:00.0"].holder_state, rows["0000:02:00.0"].stale) == ("undefined", True)
        assert ledger.holder_of("0000:02:00.0") is not None  # listing frees nothing

        with pytest.raises(AihowError, match=rf"held by hpc/{running}, which is running; .*--force"):
            reclaim(ledger, uri, "0000:01:00.0")
        assert reclaim(ledger, uri, "0000:02:00.0") == "hpc/gone-vm"
        assert reclaim(ledger, uri, "0000:02:00.0") is None
        assert reclaim(ledger, uri, "0000:01:00.0", force=True) == f"hpc/{running}"
        assert all(lease.holder is None for lease in ledger.leases().values())
    finally:
        dom = conn.lookupByName(running)
        dom.destroy()
        dom.undefine()
        conn.close()

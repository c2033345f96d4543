"""A guest whose boot fails, through the real engine on real libvirt: the error names the VM,
cloud-init's own words and the console log, and no domain is left.

The default example's guests booted whole (host name, addresses, DHCP reservations, cloud-init,
keys, data kept over stop, start and an address change) are checked on the main job's shared pair
of clusters (test_e2e_main_job.py). Under software emulation a boot takes about a minute."""

from __future__ import annotations

from pathlib import Path

import pytest

from aihow_infra.errors import StackError
from aihow_infra.ops import Operator
from aihow_infra.sshkeys import project_key
from tests.sandbox import E2E

pytestmark = pytest.mark.e2e


def test_broken_user_data_names_the_vm_and_its_console_and_leaves_no_domain(e2e: E2E, tmp_path: Path) -> None:
    box = e2e.sandbox
    net = box.subnet()
    hosts = list(net.hosts())
    cluster = box.cluster("hpc", net, [])
    cluster["image"] = "hpc"
    cluster["controller"]["disk_gb"] = 2
    cluster["controller"]["cloud_init"] = {"runcmd": [["sh", "-c", "echo aihow-broken-step >&2; exit 3"]]}
    del cluster["controller"]["ip_address"]
    cluster["controller"]["ip"] = str(hosts[9])
    key = project_key(tmp_path / "keys")
    path = e2e.write_cluster_file({"hpc": cluster})
    e2e.configure("hpc", path, sshPublicKey=key.public, readyTimeout="900")
    op = Operator(e2e.workspace)
    with pytest.raises(StackError, match=rf"VM {box.prefix}-hpc-controller is not ready: cloud-init failed.*"
                                         r"; console: "):
        op.up("hpc")
    assert [n for n in box.leftovers() if n.endswith("-controller")] == []  # the domain is gone

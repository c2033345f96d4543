"""Guests that boot, through the real engine on real libvirt: the default example's shape
(three HPC VMs, two Cloud VMs, project images, isolated networks) comes up with every VM
ready, and everything is checked through the guest agent: no IP traffic from the host.

Under software emulation (these machines: kvm_pvm) a boot takes about a minute; the first
run also builds the two images (cached afterwards, outside the work tree)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import libvirt
import pytest

from aihow_infra.errors import StackError
from aihow_infra.libvirt.guest import agent_command, read_file, run
from aihow_infra.operations import Operator
from aihow_infra.plan import mac_for
from aihow_infra.sshkeys import project_key
from tests.sandbox import E2E, Sandbox

pytestmark = pytest.mark.e2e


def default_shape(box: Sandbox) -> dict[str, Any]:
    """config/default.yaml's topology, with this sandbox's names and subnets."""
    hpc_net, cloud_net = box.subnet(), box.subnet()
    h, c = list(hpc_net.hosts()), list(cloud_net.hosts())
    # The second compute node asks DHCP (ip: DHCP): the network reserves it an address.
    hpc = box.cluster("hpc", hpc_net, [box.node(str(h[10]), disk_gb=4), box.node(None, disk_gb=4)])
    cloud = box.cluster("cloud", cloud_net, [box.node(str(c[10]), disk_gb=4)])
    for cluster, image in ((hpc, "hpc"), (cloud, "cloud")):
        cluster["image"] = image
        head = cluster.get("controller") or cluster["control_plane"]
        head["disk_gb"] = 4
    return {"hpc": hpc, "cloud": cloud}


def guest_exec(dom: libvirt.virDomain, *argv: str) -> tuple[int, str]:
    ran = run(dom, list(argv))
    return ran.code, ran.out


def booted(e2e: E2E, data: dict[str, Any], key_file: Path) -> Operator:
    path = e2e.write_cluster_file(data)
    for stack in ("hpc", "cloud"):
        e2e.configure(stack, path, sshPublicKey=str(key_file), readyTimeout="900", stopTimeout="60")
    return Operator(e2e.workspace)


def test_default_example_boots_every_vm_ready_and_keeps_data(e2e: E2E, tmp_path: Path) -> None:
    box = e2e.sandbox
    key = project_key(tmp_path / "keys")
    data = default_shape(box)
    op = booted(e2e, data, key.private_path.with_suffix(".pub"))  # type: ignore[union-attr]

    op.system_up(deploy=False)  # booting is what this test is about; deploys have tests of their own

    status = op.system_status()
    rows = [vm for cluster in status.clusters for vm in cluster.vms]
    assert len(rows) == 5 and all(vm.ready for vm in rows), [(vm.name, vm.guest) for vm in rows]
    for cluster in status.clusters:
        for vm in cluster.vms:
            dom = box.conn.lookupByName(vm.name)
            hostname = agent_command(dom, "guest-get-host-name")["host-name"]
            assert hostname == vm.name
            interfaces = {i["hardware-address"]: [a["ip-address"] for a in i.get("ip-addresses", [])]
                          for i in agent_command(dom, "guest-network-get-interfaces")}
            assert vm.ip in interfaces[mac_for(vm.name)], interfaces
            result = json.loads(read_file(dom, "/run/cloud-init/result.json") or "{}")
            assert result["v1"]["errors"] == []
            assert read_file(dom, "/home/aihow/.ssh/authorized_keys").strip() == key.public  # type: ignore[union-attr]
            code, sudoers = guest_exec(dom, "/usr/bin/sudo", "-l", "-U", "aihow")
            assert code == 0 and "NOPASSWD: ALL" in sudoers
            hosts = read_file(dom, "/etc/hosts") or ""
            assert all(other.name in hosts for other in cluster.vms)
    hpc_head = box.conn.lookupByName(f"{box.prefix}-hpc-controller")
    assert guest_exec(hpc_head, "/usr/bin/dpkg-query", "-W", "slurmctld")[0] == 0
    cloud_head = box.conn.lookupByName(f"{box.prefix}-cloud-control-plane")
    assert guest_exec(cloud_head, "/usr/bin/dpkg-query", "-W", "containerd")[0] == 0
    outputs = e2e.workspace.outputs("hpc")["nodes"]
    assert all(node["ready"] and node["addresses"]["eth0"] == [node["ip"]] for node in outputs.values())

    # A second system.up changes nothing and boots nothing.
    ids = {d.name(): d.ID() for d in box.conn.listAllDomains() if d.name().startswith(box.prefix)}
    op.system_up(deploy=False)  # booting is what this test is about; deploys have tests of their own
    assert {d.name(): d.ID() for d in box.conn.listAllDomains() if d.name().startswith(box.prefix)} == ids
    for stack in ("hpc", "cloud"):
        assert e2e.workspace.planned_steps(stack) == {}, stack

    # Data written before stop/start and restart is there after.
    name = f"{box.prefix}-hpc-compute-01"
    dom = box.conn.lookupByName(name)
    assert guest_exec(dom, "/bin/sh", "-c", "echo kept > /var/tmp/data && sync")[0] == 0
    op.vm_stop(name)
    assert not box.conn.lookupByName(name).isActive()
    op.vm_start(name)
    assert op.vm_status(name).ready
    assert read_file(box.conn.lookupByName(name), "/var/tmp/data") == "kept\n"
    op.vm_restart(name)
    assert read_file(box.conn.lookupByName(name), "/var/tmp/data") == "kept\n"

    # A running node's new address reaches the guest: the change restarts it (asked first), and its
    # cloud-init applies the network again at that boot; the data stays.
    moved = str(list(ipaddress.IPv4Network(data["hpc"]["network"]["subnet"]).hosts())[30])
    data["hpc"]["compute_nodes"][0]["ip"] = moved
    e2e.write_cluster_file(data)
    asked: list[str] = []
    Operator(e2e.workspace, confirm=lambda risks: asked.extend(str(r) for r in risks) or True).up("hpc")
    assert asked == [f"VM {name}: restarted to apply address"]
    dom = box.conn.lookupByName(name)
    interfaces = {i["hardware-address"]: [a["ip-address"] for a in i.get("ip-addresses", [])]
                  for i in agent_command(dom, "guest-network-get-interfaces")}
    assert [a for a in interfaces[mac_for(name)] if ":" not in a] == [moved], interfaces  # the old one is gone
    assert read_file(dom, "/var/tmp/data") == "kept\n"

    op.system_destroy()
    assert box.leftovers() == []


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

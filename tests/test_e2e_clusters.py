"""End to end: the real Pulumi engine against the real libvirtd (qemu:///system).

Networks are isolated (no NAT), disks are small blank qcow2 volumes, and every
libvirt object carries the sandbox's prefix so the fixture removes it all.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import pytest

from aihow_infra.changes import Risk, risks
from aihow_infra.errors import AihowError, StackError
from aihow_infra.ops import Operator
from tests.sandbox import E2E, SANDBOX_MARK, Sandbox, gpu_passthrough

pytestmark = pytest.mark.e2e


def two_clusters(box: Sandbox) -> dict[str, Any]:
    hpc_net, cloud_net = box.subnet(), box.subnet()
    h, c = list(hpc_net.hosts()), list(cloud_net.hosts())
    gpu = gpu_passthrough()
    return {
        "hpc": box.cluster("hpc", hpc_net, [box.node(str(h[10])), box.node(str(h[11]))]),
        "cloud": box.cluster("cloud", cloud_net, [
            box.node(str(c[10])),
            box.node(str(c[11]), auto_start=False, pcie_passthrough=gpu),
        ]),
    }


def states(conn: libvirt.virConnect, prefix: str) -> dict[str, bool]:
    return {d.name(): bool(d.isActive()) for d in conn.listAllDomains() if d.name().startswith(prefix)}


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], check=True, capture_output=True,
                          text=True).stdout


def host_view(box: Sandbox) -> tuple[str, dict[str, set[str]]]:
    """``virsh net-list --all`` and every domain/network/pool name, leaving out other test
    sandboxes that may run at the same time on this host (``Sandbox.snapshot``)."""
    def foreign(name: str) -> bool:
        return name.startswith(SANDBOX_MARK) and not name.startswith(box.prefix)

    nets = "\n".join(line for line in virsh("net-list", "--all").splitlines()
                     if not (line.split() and foreign(line.split()[0])))
    return nets, box.snapshot()


def test_up_and_destroy_leave_the_host_as_it_was(e2e: E2E) -> None:
    box = e2e.sandbox
    before = host_view(box)
    clusters = two_clusters(box)
    del clusters["cloud"]
    e2e.configure("hpc", e2e.write_cluster_file(clusters))
    e2e.workspace.up("hpc")
    assert states(box.conn, box.prefix) == {f"{box.prefix}-hpc-controller": True,
                                            f"{box.prefix}-hpc-compute-01": True,
                                            f"{box.prefix}-hpc-compute-02": True}
    e2e.workspace.destroy("hpc")
    assert box.leftovers() == []
    assert host_view(box) == before


def test_two_stacks_converge_update_replace_refresh_and_destroy(e2e: E2E) -> None:
    box, ws = e2e.sandbox, e2e.workspace
    clusters = two_clusters(box)
    cluster_file = e2e.write_cluster_file(clusters)
    for stack in ("hpc", "cloud"):
        e2e.configure(stack, cluster_file)
        ws.up(stack)

    p = box.prefix
    assert states(box.conn, p) == {
        f"{p}-hpc-controller": True, f"{p}-hpc-compute-01": True, f"{p}-hpc-compute-02": True,
        f"{p}-cloud-control-plane": True, f"{p}-cloud-cpu-worker-01": True, f"{p}-cloud-gpu-worker-01": False,
    }
    gpu_xml = virsh("dumpxml", f"{p}-cloud-gpu-worker-01")
    assert gpu_xml.count("<hostdev mode='subsystem' type='pci' managed='yes'>") == 2
    assert "bus='0x41'" in gpu_xml and "<rom bar='on'/>" in gpu_xml
    net_xml = virsh("net-dumpxml", f"{p}-cloud-network")
    assert all(f"name='{p}-cloud-{n}'" in net_xml for n in ("control-plane", "cpu-worker-01", "gpu-worker-01"))
    assert "<forward" not in net_xml

    outputs = ws.outputs("cloud")
    gpu_node = outputs["nodes"][f"{p}-cloud-gpu-worker-01"]
    assert gpu_node["power_state"] == "shutoff" and gpu_node["auto_start"] is False
    assert gpu_node["gpus"][0]["address"] == "0000:41:00.0"
    assert outputs["cluster"]["cidr"] == clusters["cloud"]["network"]["subnet"]

    # A second up changes nothing, and a preview says so.
    ws.run(["preview", "--expect-no-changes"], "hpc")
    ws.up("cloud")
    assert states(box.conn, p)[f"{p}-cloud-gpu-worker-01"] is False

    # Memory updates in place (a restart), and the disk of a running VM grows in place.
    clusters["hpc"]["compute_nodes"][0]["memory_gb"] = 2
    clusters["hpc"]["compute_nodes"][1]["disk_gb"] = 2
    e2e.write_cluster_file(clusters)
    steps = ws.planned_steps("hpc")
    assert steps["compute-01-domain"] == "update"
    assert steps["compute-02-domain"] == "update" and steps["compute-02-disk"] == "update"
    assert "compute-01-disk" not in steps
    assert [str(r) for r in risks(ws.preview_steps("hpc"))] == [
        f"VM {p}-hpc-compute-01: restarted to apply memory_mib"]
    uuid_before = box.conn.lookupByName(f"{p}-hpc-compute-01").UUIDString()
    ws.up("hpc")
    dom = box.conn.lookupByName(f"{p}-hpc-compute-01")
    assert dom.UUIDString() == uuid_before and dom.maxMemory() == 2 * 1024 * 1024 and dom.isActive()
    vol = box.conn.storagePoolLookupByName(f"{p}-hpc-pool").storageVolLookupByName(f"{p}-hpc-compute-02.qcow2")
    assert vol.info()[1] == 2 * 1024**3
    ws.run(["preview", "--expect-no-changes"], "hpc")

    # A VM removed behind Pulumi's back shows up in refresh; the next up recreates it.
    victim = box.conn.lookupByName(f"{p}-cloud-cpu-worker-01")
    victim.destroy()
    victim.undefine()
    refresh = ws.refresh("cloud")
    assert "cpu-worker-01-domain" in refresh and "deleted" in refresh
    ws.up("cloud")
    assert box.conn.lookupByName(f"{p}-cloud-cpu-worker-01").isActive()
    ws.run(["preview", "--expect-no-changes"], "cloud")

    # Renaming (here the cluster, which names every VM) replaces the VMs and their disks: listed
    # before it happens, and nothing happens unless the operator says yes.
    clusters["cloud"]["name"] = f"{p}-cloud2"
    e2e.write_cluster_file(clusters)
    seen: list[Risk] = []
    op = Operator(ws, confirm=lambda found: bool(seen.extend(found)))  # the operator says no
    with pytest.raises(AihowError, match="cancelled; nothing was changed"):
        op.gate("cloud")
    assert f"disk {p}-cloud-cpu-worker-01.qcow2: deleted and made anew" in {str(r).split(" (")[0] for r in seen}
    assert f"VM {p}-cloud-control-plane: removed and defined anew" in {str(r).split(" (")[0] for r in seen}
    with pytest.raises(StackError, match="marked for protection"):  # and the engine refuses to delete a disk
        ws.up("cloud")
    clusters["cloud"]["name"] = f"{p}-cloud"
    e2e.write_cluster_file(clusters)

    for stack in ("cloud", "hpc"):
        ws.destroy(stack)
    assert box.leftovers() == []


def test_failure_midway_leaves_no_orphans_and_a_fixed_file_converges(e2e: E2E) -> None:
    box, ws = e2e.sandbox, e2e.workspace
    box.images_dir.mkdir(parents=True, exist_ok=True)  # where qemu may read a base image
    bad_image = box.images_dir / "broken.qcow2"
    bad_image.write_bytes(b"QFI\xfb" + (99).to_bytes(4, "big") + b"\x00" * 64)  # qcow2 "version 99"
    clusters = two_clusters(box)
    del clusters["cloud"]
    clusters["hpc"]["compute_nodes"][1]["base_image_path"] = str(bad_image)
    cluster_file = e2e.write_cluster_file(clusters)
    e2e.configure("hpc", cluster_file)

    with pytest.raises(StackError, match=r"base image .* cannot be read by qemu-img"):
        ws.up("hpc")
    state = ws.run(["stack", "export"], "hpc").stdout
    for obj in box.leftovers():  # whatever exists on the host is in Pulumi's state
        assert f'"name": "{obj}"' in state, f"{obj} exists outside Pulumi's state"
    assert f"{box.prefix}-hpc-compute-02" not in states(box.conn, box.prefix)

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bad_image), "1G"], check=True)
    ws.up("hpc")
    assert all(states(box.conn, box.prefix).values()) and len(states(box.conn, box.prefix)) == 3
    backing = box.conn.lookupByName(f"{box.prefix}-hpc-compute-02")
    vol = box.conn.storageVolLookupByPath(
        backing.XMLDesc(0).split("<source file='")[1].split("'")[0])
    assert str(bad_image) in vol.XMLDesc(0)  # an overlay on the base image, not a copy
    ws.run(["preview", "--expect-no-changes"], "hpc")


def test_a_cluster_on_a_host_bridge_puts_its_guests_there_and_leaves_the_bridge(e2e: E2E) -> None:
    """``forward_mode: bridge``: without the bridge, ``up`` says so in one line and makes nothing;
    with it (made here, no address on it: the host sends no traffic there), each guest's tap joins
    it, libvirt's network has no address or DHCP of its own, and destroy leaves the bridge, which
    is not the project's."""
    box = e2e.sandbox
    clusters = two_clusters(box)
    del clusters["cloud"]
    bridge = f"{box.prefix}l"
    clusters["hpc"]["network"] |= {"bridge": bridge, "forward_mode": "bridge"}
    e2e.configure("hpc", e2e.write_cluster_file(clusters))
    op = Operator(e2e.workspace)
    with pytest.raises(AihowError, match=rf"clusters\.hpc\.network\.bridge: '{bridge}' is not a bridge the guests "
                                         rf"can join: the host has no interface '{bridge}'"):
        op.up("hpc")
    assert box.leftovers() == []
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        op.up("hpc")
        p = box.prefix
        assert states(box.conn, p) == dict.fromkeys([f"{p}-hpc-controller", f"{p}-hpc-compute-01",
                                                     f"{p}-hpc-compute-02"], True)
        net_xml = virsh("net-dumpxml", f"{p}-hpc-network")
        assert "<forward mode='bridge'/>" in net_xml and f"<bridge name='{bridge}'/>" in net_xml
        assert "<ip" not in net_xml and "<host " not in net_xml
        taps = {target.get("dev") for dom in box.conn.listAllDomains() if dom.name().startswith(p)
                for target in ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/interface/target")}
        joined = set(subprocess.run(["ls", f"/sys/class/net/{bridge}/brif"], capture_output=True, text=True,
                                    check=True).stdout.split())
        assert joined == taps and len(joined) == 3
        op.destroy("hpc")
        assert box.leftovers() == []
        assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)

"""Provider CRUD against libvirt's test driver (test:///default, in-process, shared per process)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from aihow_infra.errors import CustodyError, LibvirtError
from aihow_infra.gpu.ledger import Ledger
from aihow_infra.host import Host
from aihow_infra.libvirt import connection
from aihow_infra.libvirt.connection import translate
from aihow_infra.libvirt.inspect import metadata, read_definition
from aihow_infra.libvirt.render import pool_xml
from aihow_infra.settings import parse_settings
from providers import storage
from providers.domain import DomainProvider
from providers.network import NetworkProvider
from providers.storage import HostImageProvider, PoolProvider, VolumeProvider

URI = "test:///default"


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


def net_props(tag: str, hosts: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"uri": URI, "name": f"t{tag}-network", "stack": "test", "bridge": f"tb{tag}", "forward_mode": "isolated",
            "dns_domain": f"t{tag}.local", "dns_servers": [], "gateway": "10.99.0.1", "netmask": "255.255.255.0",
            "dhcp_start": "10.99.0.10", "dhcp_end": "10.99.0.254",
            "hosts": hosts if hosts is not None else [{"mac": "52:54:00:00:00:01", "name": "a", "ip": "10.99.0.11"}]}


def dom_props(tag: str, **over: Any) -> dict[str, Any]:
    props = {"uri": URI, "name": f"t{tag}-vm", "cluster": "t", "role": "compute", "stack": "test",
             "vcpus": 1, "memory_mib": 512, "disk_path": f"/tmp/t{tag}.qcow2", "disk_gb": 1,
             "mac": "52:54:00:00:00:02", "network": "default", "running": True, "stop_timeout": 1,
             "virt_type": "auto", "acceleration": {}, "mounts": [],
             "devices": [{"address": "0000:01:00.0", "type": "gpu"}, {"address": "0000:01:00.1", "type": "audio"}]}
    return {**props, **over}


def test_network_create_update_read_delete(conn: libvirt.virConnect, tag: str) -> None:
    provider = NetworkProvider()
    props = net_props(tag)
    created = provider.create(props)
    try:
        net = conn.networkLookupByName(props["name"])
        assert net.isActive() and net.autostart()
        assert "10.99.0.11" in net.XMLDesc(0) and "<forward" not in net.XMLDesc(0)

        hosts = [{"mac": "52:54:00:00:00:03", "name": "b", "ip": "10.99.0.12"}]
        updated = provider.update(created.id, created.outs, {**props, "hosts": hosts})
        assert updated.outs["hosts"] == hosts
        xml = conn.networkLookupByName(props["name"]).XMLDesc(0)
        assert "10.99.0.12" in xml and "10.99.0.11" not in xml

        read = provider.read(created.id, updated.outs)
        assert read.id == created.id and read.outs["hosts"] == hosts
    finally:
        provider.delete(created.id, props)
    assert props["name"] not in [n.name() for n in conn.listAllNetworks()]
    provider.delete(created.id, props)  # idempotent: already gone is success
    assert provider.read(created.id, props).id is None


def test_network_of_another_stack_is_refused_and_our_own_taken_over(conn: libvirt.virConnect, tag: str) -> None:
    provider = NetworkProvider()
    props = net_props(tag)
    created = provider.create({**props, "stack": "other"})
    try:
        with pytest.raises(LibvirtError, match="already exists outside this stack"):
            provider.create(props)
        # Left by an interrupted run of this stack (made, never recorded): taken over as it is.
        conn.networkLookupByName(props["name"]).destroy()
        again = provider.create({**props, "stack": "other"})
        assert again.outs["uuid"] == created.outs["uuid"] and again.outs["active"] is True
    finally:
        provider.delete(created.id, props)


def test_a_stopped_network_is_seen_and_started_again(conn: libvirt.virConnect, tag: str) -> None:
    provider = NetworkProvider()
    props = net_props(tag)
    created = provider.create(props)
    try:
        conn.networkLookupByName(props["name"]).destroy()  # behind Pulumi's back
        read = provider.read(created.id, created.outs)
        assert read.outs["active"] is False
        assert provider.diff(created.id, read.outs, props).changes
        provider.update(created.id, read.outs, props)
        assert conn.networkLookupByName(props["name"]).isActive()
    finally:
        provider.delete(created.id, props)


def test_network_diff_updates_hosts_in_place_and_replaces_on_subnet(tag: str) -> None:
    provider = NetworkProvider()
    olds = {**net_props(tag), "__provider": "old-code"}
    news = {**net_props(tag), "__provider": "new-code"}
    assert provider.diff("x", olds, news).changes is False  # __provider is ignored
    d = provider.diff("x", olds, {**news, "hosts": []})
    assert d.changes and not d.replaces
    two = [{"mac": "52:54:00:00:00:01", "name": "a", "ip": "10.99.0.11"},
           {"mac": "52:54:00:00:00:02", "name": "b", "ip": "10.99.0.12"}]
    assert provider.diff("x", {**olds, "hosts": two}, {**news, "hosts": two[::-1]}).changes is False
    d = provider.diff("x", olds, {**news, "gateway": "10.99.1.1"})
    assert d.replaces == ["gateway"] and d.delete_before_replace


def test_check_turns_bad_inputs_into_failures(tag: str) -> None:
    result = NetworkProvider().check({}, {**net_props(tag), "forward_mode": "route", "bridge": None})
    reasons = {f.property: f.reason for f in result.failures}
    assert reasons["bridge"] == "bridge is required"
    assert "allowed: 'nat', 'isolated' or 'bridge'" in reasons["forward_mode"]
    result = DomainProvider().check({}, dom_props(tag, vcpus=0, memory_mib="lots"))
    reasons = {f.property: f.reason for f in result.failures}
    assert "allowed: a positive number" in reasons["vcpus"]
    assert "not of type int" in reasons["memory_mib"]


def test_pool_and_volume_lifecycle(conn: libvirt.virConnect, tag: str, tmp_path: Any) -> None:
    pools, vols = PoolProvider(), VolumeProvider()
    pool_props = {"uri": URI, "name": f"t{tag}-pool", "path": str(tmp_path / "pool")}
    pool = pools.create(pool_props)
    try:
        vol_props = {"uri": URI, "pool": pool_props["name"], "name": f"t{tag}-vm.qcow2", "size_gb": 2,
                     "base_image": None}
        vol = vols.create(vol_props)
        assert vol.outs["path"].endswith(f"t{tag}-vm.qcow2")
        info = conn.storagePoolLookupByName(pool_props["name"]).storageVolLookupByName(vol_props["name"]).info()
        assert info[1] == 2 * 1024**3
        grow = vols.diff(vol.id, vol.outs, {**vol_props, "size_gb": 3})
        assert grow.changes and grow.replaces == []  # grown in place, never made anew
        # (growing itself needs a real pool: the test driver cannot resize; see test_e2e_lifecycle)
        shrink = vols.check(vol.outs, {**vol_props, "size_gb": 1}).failures
        assert [f.reason for f in shrink] == [f"size_gb: 1 is smaller than the disk t{tag}-vm.qcow2's 2 GiB; "
                                              "allowed: 2 or more (disks only grow: shrinking would cut the "
                                              "guest's data)"]
        assert vols.create(vol_props).outs["path"] == vol.outs["path"]  # our own, left by an interrupted run
        other = tmp_path / "other-base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "1G"], check=True)
        with pytest.raises(LibvirtError, match="already exists in pool"):  # not ours: another base image
            vols.create({**vol_props, "base_image": str(other)})
        conn.storagePoolLookupByName(pool_props["name"]).destroy()
        stopped = pools.read(pool.id, pool.outs)
        assert stopped.outs["active"] is False and pools.diff(pool.id, stopped.outs, pool_props).changes
        pools.update(pool.id, stopped.outs, pool_props)
        assert conn.storagePoolLookupByName(pool_props["name"]).isActive()
        vols.delete(vol.id, vol_props)
        vols.delete(vol.id, vol_props)
        assert vols.read(vol.id, vol_props).id is None
    finally:
        pools.delete(pool.id, pool_props)
    assert pools.read(pool.id, pool_props).id is None


def test_volume_check_rejects_missing_base_image(tag: str) -> None:
    result = VolumeProvider().check({}, {"uri": URI, "pool": "p", "name": "v", "size_gb": 1,
                                         "base_image": "/nonexistent.qcow2"})
    assert [f.property for f in result.failures] == ["base_image"]


def test_domain_running_and_stopped_states(conn: libvirt.virConnect, tag: str) -> None:
    provider = DomainProvider()
    props = dom_props(tag, running=False)
    created = provider.create(props)
    try:
        dom = conn.lookupByName(props["name"])
        assert not dom.isActive() and created.outs["state"] == "shutoff"
        xml = dom.XMLDesc(0)
        assert xml.count("<hostdev mode='subsystem' type='pci' managed='yes'>") == 2
        assert "<rom bar='on'/>" in xml and "urn:x-aihow:vm:1" in xml

        started = provider.update(created.id, created.outs, {**props, "running": True})
        assert started.outs["running"] and conn.lookupByName(props["name"]).isActive()

        resized = provider.update(created.id, started.outs, {**props, "running": True, "memory_mib": 1024})
        dom = conn.lookupByName(props["name"])
        assert dom.isActive() and dom.maxMemory() == 1024 * 1024
        assert resized.outs["uuid"] == created.outs["uuid"]

        dom.destroy()  # behind Pulumi's back
        read = provider.read(created.id, resized.outs)
        assert read.outs["running"] is False and read.outs["state"] == "shutoff"
        assert provider.diff(created.id, read.outs, {**props, "running": True, "memory_mib": 1024}).changes
    finally:
        provider.delete(created.id, props)
    assert provider.read(created.id, props).id is None
    provider.delete(created.id, props)


def test_domain_diff_says_what_replaces(tag: str) -> None:
    provider = DomainProvider()
    props = dom_props(tag)
    assert provider.diff("x", props, {**props, "memory_mib": 2048}).replaces == []
    assert provider.diff("x", props, {**props, "disk_gb": 5}).replaces == []  # the disk grows in place
    assert provider.diff("x", props, {**props, "name": "other"}).replaces == ["name"]


def test_metadata_changes_apply_live_without_a_restart(conn: libvirt.virConnect, tag: str) -> None:
    provider = DomainProvider()
    props = dom_props(tag)
    created = provider.create(props)
    try:
        booted = conn.lookupByName(props["name"]).ID()
        moved = provider.update(created.id, created.outs, {**props, "role": "worker", "cluster": "u"})
        dom = conn.lookupByName(props["name"])
        assert dom.isActive() and dom.ID() == booted  # not restarted
        assert metadata(dom, 0) == {"cluster": "u", "role": "worker", "stack": "test"}  # the running instance
        assert metadata(dom) == metadata(dom, 0)  # and its definition
        assert moved.outs["role"] == "worker"
    finally:
        provider.delete(created.id, props)


def test_a_definition_edited_behind_pulumis_back_is_seen(conn: libvirt.virConnect, tag: str) -> None:
    provider = DomainProvider()
    props = dom_props(tag, running=False)
    created = provider.create(props)
    try:
        xml = conn.lookupByName(props["name"]).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        conn.defineXML(xml.replace("<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>3</vcpu>"))
        read = provider.read(created.id, created.outs)
        assert read.outs["vcpus"] == 3 and provider.diff(created.id, read.outs, props).changes
        provider.update(created.id, read.outs, props)
        assert read_definition(conn.lookupByName(props["name"]))["vcpus"] == 1
    finally:
        provider.delete(created.id, props)


def test_a_domain_of_this_stack_is_taken_over_and_of_another_refused(conn: libvirt.virConnect, tag: str) -> None:
    provider = DomainProvider()
    props = dom_props(tag, running=False)
    created = provider.create({**props, "stack": "other"})
    try:
        with pytest.raises(LibvirtError, match="already exists outside this stack"):
            provider.create(props)
        adopted = provider.create({**props, "stack": "other"})  # an interrupted run of "other" made it
        assert adopted.outs["uuid"] == created.outs["uuid"]
    finally:
        provider.delete(created.id, props)


def test_a_failed_define_releases_the_vms_lease(tag: str, tmp_path: Any) -> None:
    ledger = str(tmp_path / "leases.json")
    lease = {"ledger": ledger, "holder": f"test/t{tag}-vm", "addresses": ["0000:01:00.0", "0000:01:00.1"]}
    Ledger(ledger).acquire(lease["holder"], lease["addresses"])
    with pytest.raises(LibvirtError, match="defining domain"):
        DomainProvider().create(dom_props(tag, mac="not-a-mac", lease=lease))
    assert all(not held.holder for held in Ledger(ledger).leases().values())


def test_a_device_held_open_on_the_host_is_never_handed_to_the_vm(tag: str, tmp_path: Path,
                                                                   conn: libvirt.virConnect,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The domain provider checks the host just before it starts a VM that takes devices: a
    process holding the GPU's VFIO group open stops the start; nothing is left (no domain, no
    lease). The test driver has no devices, so a host laid out under a temp folder stands in."""
    import providers.domain
    from tests.test_custody import hold, ready_host

    root = ready_host(tmp_path / "r").root
    monkeypatch.setattr(providers.domain, "local_host", lambda uri: Host(root))
    ledger = str(tmp_path / "leases.json")
    lease = {"ledger": ledger, "holder": f"test/t{tag}-vm", "addresses": ["0000:01:00.0", "0000:01:00.1"]}
    Ledger(ledger).acquire(lease["holder"], lease["addresses"])
    # Their home is vfio-pci, where the laid-out host has them: the delete at the end finds them
    # home (a home on the host's driver would wait out its bound: no kernel binds in a folder).
    Ledger(ledger).set_home(lease["addresses"], "vfio-pci")
    started: list[subprocess.Popen[bytes]] = []
    try:
        holder = hold(started, root / "dev/vfio/14")
        with pytest.raises(CustodyError, match=rf"device 0000:01:00.0 is held open on the host: pid {holder.pid} "
                                               rf"\(sleep\) has .*; t{tag}-vm was not started"):
            DomainProvider().create(dom_props(tag, lease=lease))
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert f"t{tag}-vm" not in [d.name() for d in conn.listAllDomains()]
    assert all(not held.holder for held in Ledger(ledger).leases().values())
    created = DomainProvider().create(dom_props(tag, lease=lease))  # let go: it starts
    try:
        assert conn.lookupByName(f"t{tag}-vm").isActive()
    finally:
        DomainProvider().delete(created.id, created.outs)


def test_spellings_of_one_libvirt_daemon_replace_nothing(tag: str) -> None:
    assert parse_settings({"clusterFile": "c.yaml", "libvirtUri": "qemu+unix:///system"}).libvirt_uri \
        == "qemu:///system"
    assert parse_settings({"clusterFile": "c.yaml", "libvirtUri": "qemu+ssh://gpu-host/system"}).libvirt_uri \
        == "qemu+ssh://gpu-host/system"  # another transport is another address
    props = dom_props(tag, uri="qemu:///system")
    assert DomainProvider().diff("x", {**props, "uri": "qemu+unix:///system"}, props).changes is False


def test_libvirts_refusal_of_a_held_device_names_the_vm_that_holds_it() -> None:
    # libvirt's own words when a domain started outside the project holds the device (seen for
    # real in the GPU-host simulator, tests/test_e2e_gpuhost.py).
    refusal = libvirt.libvirtError("Requested operation is not valid: PCI device 0000:00:1e.0 is in use by "
                                   "driver QEMU, domain sim-hpc-compute-01")
    message = str(translate(refusal, "starting domain sim-cloud-gpu-worker-01"))
    assert message.startswith("starting domain sim-cloud-gpu-worker-01: PCI device 0000:00:1e.0 is in use by the "
                              "running VM sim-hpc-compute-01, which the GPU lease ledger has no record of")
    assert "stop sim-hpc-compute-01 first" in message and message.endswith("domain sim-hpc-compute-01)")
    other = libvirt.libvirtError("internal error: qemu unexpectedly closed the monitor")
    assert str(translate(other, "starting domain x")) == "starting domain x: internal error: qemu unexpectedly " \
                                                         "closed the monitor"


# --- a project image on a libvirt host -------------------------------------------------------
# The copy needs libvirt's storage streams, which the test driver lacks: libvirtd (qemu:///system)
# with folders under tmp_path, the host's copy in a folder of its own (on a remote host it has the
# built image's path; here the two must differ to tell a copy from the original).
SYSTEM = "qemu:///system"
IMAGE_FILES = ["disk.qcow2", "vmlinuz", "initrd.img", "image.json"]


@pytest.fixture
def built(tmp_path: Path) -> Path:
    folder = tmp_path / "built" / "hpc-0123456789ab"
    folder.mkdir(parents=True)
    for i, name in enumerate(IMAGE_FILES):
        (folder / name).write_bytes(bytes([i]) * (3 * (1 << 20) + i))  # past one stream chunk
    return folder


def image_props(built: Path, folder: Path) -> dict[str, Any]:
    return {"uri": SYSTEM, "name": built.name, "source": str(built), "folder": str(folder), "files": IMAGE_FILES}


def pools_on(folder: Path) -> list[str]:
    """The libvirt pools on folders under ``folder`` (tests beside this one have their own)."""
    found = []
    with libvirt.open(SYSTEM) as system:
        for pool in system.listAllStoragePools():
            with contextlib.suppress(libvirt.libvirtError):  # another test's transient pool, gone meanwhile
                if str(folder) in pool.XMLDesc(0):
                    found.append(pool.name())
    return sorted(found)


def test_an_image_a_host_lacks_is_copied_through_libvirt_marker_last_and_found_after(built: Path,
                                                                                      tmp_path: Path) -> None:
    provider = HostImageProvider()
    props = image_props(built, tmp_path / "host" / built.name)
    assert provider.read(built.name, props).id is None  # the host lacks it: a refresh says it is gone
    created = provider.create(props)
    host = Path(props["folder"])
    assert created.outs["path"] == str(host)
    assert [(host / f).read_bytes() == (built / f).read_bytes() for f in IMAGE_FILES] == [True] * 4
    assert {oct((host / f).stat().st_mode & 0o777) for f in IMAGE_FILES} == {"0o644"}  # every VM's qemu reads it
    assert pools_on(tmp_path) == []  # the folder was a transient pool, closed after
    copied = {f: (host / f).stat().st_mtime_ns for f in IMAGE_FILES}
    assert provider.create(props).outs["path"] == str(host)
    assert {f: (host / f).stat().st_mtime_ns for f in IMAGE_FILES} == copied  # found: nothing copied again
    assert provider.read(built.name, props).id == built.name
    provider.delete(built.name, props)
    assert sorted(p.name for p in host.iterdir()) == sorted(IMAGE_FILES)  # a cache: deleting keeps it


def test_a_copy_cut_short_or_of_another_recipe_is_made_again(built: Path, tmp_path: Path) -> None:
    provider = HostImageProvider()
    props = image_props(built, tmp_path / "host" / built.name)
    host = Path(props["folder"])
    host.mkdir(parents=True)
    (host / "disk.qcow2").write_bytes(b"the first megabyte of a cut copy")  # no marker: not whole
    provider.create(props)
    assert (host / "disk.qcow2").read_bytes() == (built / "disk.qcow2").read_bytes()
    (host / "image.json").write_bytes(b"x" * (built / "image.json").stat().st_size)  # same size, other content
    assert provider.read(built.name, props).id is None
    provider.create(props)
    assert (host / "image.json").read_bytes() == (built / "image.json").read_bytes()


def test_the_machine_that_built_an_image_has_it_in_place(built: Path) -> None:
    provider = HostImageProvider()
    built.chmod(0o755)
    before = {f: (built / f).stat().st_mtime_ns for f in IMAGE_FILES}
    created = provider.create(image_props(built, built))
    assert created.outs["path"] == str(built)
    assert {f: (built / f).stat().st_mtime_ns for f in IMAGE_FILES} == before
    assert oct(built.stat().st_mode & 0o777) == "0o755"  # opened as it is, not built (a build sets its mode)


def test_two_runs_copying_one_image_to_one_host_take_turns(built: Path, tmp_path: Path) -> None:
    props = image_props(built, tmp_path / "host" / built.name)
    with concurrent.futures.ThreadPoolExecutor(2) as both:
        paths = list(both.map(lambda _: HostImageProvider().create(props).outs["path"], range(2)))
    assert paths == [props["folder"]] * 2
    assert [(Path(props["folder"]) / f).read_bytes() == (built / f).read_bytes() for f in IMAGE_FILES] == [True] * 4


def test_a_folder_another_run_holds_past_the_wait_is_one_line(built: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    props = image_props(built, tmp_path / "host")
    Path(props["folder"]).mkdir()
    monkeypatch.setattr(storage, "COPY_WAIT", 1)
    with libvirt.open(SYSTEM) as system:
        stale = pool_xml({"name": f"aihow-copy-{built.name}-stale", "path": props["folder"]})
        other = system.storagePoolCreateXML(stale, 0)
        try:
            with pytest.raises(LibvirtError, match=f"image folder {props['folder']} on qemu:///system is held by pool "
                                                   f"aihow-copy-{built.name}-stale for 0 minutes; allowed: wait"):
                HostImageProvider().create(props)
        finally:
            other.destroy()


# --- a remote libvirt host that does not answer -----------------------------------------------


def test_a_remote_host_that_does_not_answer_fails_the_connect_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libvirtd address whose TCP handshake completes (the kernel's backlog) but which never
    answers libvirt's protocol (a host hung, or its network cut after the handshake): the connect
    gives up after CONNECT_TIMEOUT with one line, instead of waiting on TCP for minutes."""
    monkeypatch.setattr(connection, "CONNECT_TIMEOUT", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # never accepted, never answered
        uri = f"qemu+tcp://127.0.0.1:{silent.getsockname()[1]}/system"
        began = time.monotonic()
        with pytest.raises(LibvirtError) as err, connection.connect(uri):
            pass
        assert time.monotonic() - began < 10
    assert str(err.value) == (f"connecting to libvirt at {uri}: no answer within 1 s; allowed: a host whose libvirtd "
                              "answers (is it up, and its network?)")
    # A refused connection is said at once, in libvirt's words.
    refused = "qemu+tcp://127.0.0.1:1/system"
    with pytest.raises(LibvirtError, match=r"^connecting to libvirt at qemu\+tcp://127\.0\.0\.1:1/system: "), \
            connection.connect(refused):
        pass

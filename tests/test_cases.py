"""The cases of tests/fixtures/cases (inputs from the peers' public bug reports): each gives a clear
one-line error before anything is made, or files that work (their consumers read them in
test_consumers.py)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aihow_infra.changes import risks
from aihow_infra.cloudinit import seed_files
from aihow_infra.components import acceleration_args, seed_spec
from aihow_infra.crosscheck import subnet_collisions
from aihow_infra.errors import ConfigError
from aihow_infra.host import SubnetInUse
from aihow_infra.hostcheck import check_host, check_hugepages, check_shares, check_subnets, subnets_of
from aihow_infra.hostrecord import materialize
from aihow_infra.libvirt.render import domain_xml
from aihow_infra.loading import load_cluster_file, parse_cluster_file
from aihow_infra.plan import ClusterPlan, mac_for, plan_all
from tests.cli import run_task
from tests.samples import base

CASES = Path(__file__).resolve().parent / "fixtures" / "cases"
KEY = "ssh-ed25519 AAAA test"


def plan_of(name: str, key: str) -> ClusterPlan:
    return next(p for p in plan_all(load_cluster_file(CASES / name)) if p.key == key)


def refusals(name: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_cluster_file(CASES / name)
    return err.value.problems


def test_nat_with_static_addresses_routes_by_0_0_0_0() -> None:
    plan = plan_of("nat-static.yaml", "hpc")
    config = yaml.safe_load(seed_files(seed_spec(plan.vms[0], plan, "aihow", KEY))["network-config"])
    assert config["ethernets"]["eth0"]["routes"] == [{"to": "0.0.0.0/0", "via": "192.168.150.1"}]


def test_nodes_without_an_address_get_a_reservation_everything_uses() -> None:
    hpc, cloud = plan_of("dhcp-nodes.yaml", "hpc"), plan_of("dhcp-nodes.yaml", "cloud")
    assert [(vm.name, vm.ip, vm.dhcp) for vm in hpc.vms] == [
        ("dhcp-hpc-controller", "10.213.50.10", False), ("dhcp-hpc-compute-01", "10.213.50.254", True),
        ("dhcp-hpc-compute-02", "10.213.50.253", True)]
    assert [(vm.ip, vm.dhcp) for vm in cloud.vms] == [("10.213.60.254", True), ("10.213.60.253", True)]
    seed = seed_files(seed_spec(cloud.vms[0], cloud, "aihow", KEY))
    assert yaml.safe_load(seed["network-config"])["ethernets"]["eth0"]["dhcp4"] is True
    assert "10.213.60.253 dhcp-cloud-cpu-worker-01" in seed["user-data"]


def test_a_reservation_skips_static_addresses_and_a_full_range_is_an_error() -> None:
    data = base()
    data["clusters"]["hpc"]["network"].update(subnet="10.1.0.0/29", dhcp_start="10.1.0.5", dhcp_end="10.1.0.6")
    data["clusters"]["hpc"]["controller"]["ip_address"] = "10.1.0.6"
    data["clusters"]["hpc"]["compute_nodes"] = [{"cpu_cores": 1, "memory_gb": 1, "disk_gb": 4}] * 3
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert err.value.problems == [
        "clusters.hpc.compute_nodes[1].ip: DHCP, but the DHCP range 10.1.0.5-10.1.0.6 has no address left to "
        "reserve for it; allowed: a static address, or a larger range",
        "clusters.hpc.compute_nodes[2].ip: DHCP, but the DHCP range 10.1.0.5-10.1.0.6 has no address left to "
        "reserve for it; allowed: a static address, or a larger range"]


@pytest.mark.parametrize(("name", "expected"), [
    ("slurm-partition-default.yaml", [
        "clusters.hpc.slurm_config.partitions[0]: 'default' is reserved: slurm.conf reads PartitionName=DEFAULT as "
        "the defaults of every partition; allowed: another name, e.g. 'compute'",
        "clusters.hpc.slurm_config.default_partition: 'default' is reserved: slurm.conf reads "
        "PartitionName=DEFAULT as the defaults of every partition; allowed: another name, e.g. 'compute'"]),
    ("cloud-disk-2g.yaml", [
        "clusters.cloud.control_plane.disk_gb: 2 is smaller than the cloud image's root file system (3 GiB); "
        "allowed: 3 or more",
        "clusters.cloud.worker_nodes[0].disk_gb: 2 is smaller than the cloud image's root file system (3 GiB); "
        "allowed: 3 or more"]),
])
def test_refused_cases_name_key_value_and_allowed(name: str, expected: list[str]) -> None:
    assert refusals(name) == expected


def test_a_virtiofs_share_that_is_not_a_folder_is_refused_with_the_other_host_problems(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A share's folder is a fact of this host, as its hugepages are: validate says both in one
    report (the hugepages line where this host does not reserve them), not one after the other."""
    path = tmp_path / "c.yaml"
    path.write_text((CASES / "hugepages-virtiofs.yaml").read_text())
    plans = plan_all(load_cluster_file(path))  # the file itself is valid
    share = (f"clusters.hpc.controller.virtio_fs_mounts[0].host_path: '{tmp_path / 'share'}' is not a folder on "
             "this host; allowed: an existing folder to share")
    with pytest.raises(ConfigError) as err:
        check_shares(plans, path)
    assert err.value.problems == [share]
    try:
        check_hugepages(plans, path)
        hugepages = []
    except ConfigError as exc:
        hugepages = exc.problems
    code, _out, said = run_task(capsys, "validate", "--config", str(path))
    said = " ".join(said.split())
    assert code == 1 and [p for p in [share, *hugepages] if " ".join(p.split()) not in said] == []
    (tmp_path / "share").mkdir()
    check_shares(plans, path)
    assert plan_all(load_cluster_file(path))[0].vms[0].mounts[0].mount_point == "/srv/project"


def refusals_at(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_cluster_file(path)
    return err.value.problems


def test_partition_names_slurm_cannot_read_are_refused() -> None:
    data = base()
    data["clusters"]["hpc"]["slurm_config"] = {"partitions": ["compute", "long jobs", "a/b"]}
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert err.value.problems == [  # every bad name, at its index
        f"clusters.hpc.slurm_config.partitions[{i}]: {name!r} is not a SLURM partition name; allowed: 1-64 "
        "letters, digits, '_', '-', '.' (no spaces)" for i, name in ((1, "long jobs"), (2, "a/b"))]


@pytest.mark.parametrize(("text", "expected"), [
    ("max_job_time: 24:00:00", "24:00:00"),  # YAML 1.1 would read 86400 (base 60)
    ("max_job_time: '2-12:30'", "2-12:30"),
    ("max_job_time: 90", "90"),
    ("max_job_time: unlimited", "INFINITE"),
])
def test_the_job_time_limit_reaches_every_partition(tmp_path: Path, text: str, expected: str) -> None:
    source = (CASES / "slurm-partitions.yaml").read_text()
    source = source.replace('["default", "long jobs", "gpu"]', '["batch", "long_jobs", "gpu"]')
    source = source.replace('default_partition: "default"', 'default_partition: "batch"')
    path = tmp_path / "c.yaml"
    path.write_text(re.sub(r'max_job_time: "24:00:00"', text, source))
    plan = plan_all(load_cluster_file(path))[0]
    assert plan.partitions == ("batch", "long_jobs", "gpu")
    assert plan.max_job_time == expected


def test_a_job_time_slurm_cannot_read_is_refused() -> None:
    data = base()
    data["clusters"]["hpc"]["slurm_config"] = {"max_job_time": "1 day"}
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert err.value.problems == [
        "clusters.hpc.slurm_config.max_job_time: '1 day' is not a SLURM time; allowed: 'MM', 'MM:SS', 'HH:MM:SS', "
        "'D-HH', 'D-HH:MM', 'D-HH:MM:SS' or 'INFINITE', e.g. '24:00:00'"]


def test_hugepages_beside_a_virtiofs_share_get_shared_memory() -> None:
    plan = plan_of("hugepages-virtiofs.yaml", "hpc")
    controller = plan.vms[0]
    xml = domain_xml({"name": controller.name, "stack": "hpc", "cluster": plan.name, "role": "controller",
                      "vcpus": 2, "memory_mib": 4096, "disk_path": "/d.qcow2", "mac": controller.mac,
                      "network": plan.network_name, "devices": [], "acceleration": acceleration_args(controller),
                      "mounts": [{"tag": m.tag, "host_path": m.host_path} for m in controller.mounts]}, "qemu")
    backing = re.search(r"<memoryBacking>.*</memoryBacking>", xml, re.S)
    assert backing and "<page size='1' unit='G'/>" in backing.group() and "<access mode='shared'/>" in backing.group()


def _ai_how_mac(name: str) -> str:
    digest = bytearray(hashlib.md5(name.encode(), usedforsecurity=False).digest()[:6])
    digest[0] = (digest[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def test_no_derived_mac_starts_with_fe_and_others_keep_theirs() -> None:
    plan = plan_of("mac-fe.yaml", "hpc")
    assert _ai_how_mac("slurm-compute-01").startswith("fe:")
    assert mac_for("slurm-compute-01") == "7e:" + _ai_how_mac("slurm-compute-01")[3:]
    names = [f"{c}-{r}-{i:02d}" for c in ("slurm", "dev", "test", "hpc", "cloud", "lab", "a", "b", "x")
             for r in ("compute", "gpu-worker", "cpu-worker") for i in range(1, 40)]
    for name in names:
        mac = mac_for(name)
        first = int(mac[:2], 16)
        assert first != 0xFE and first & 0x01 == 0 and first & 0x02 == 0x02, name
        assert mac == _ai_how_mac(name) or _ai_how_mac(name).startswith("fe:"), name
    assert all(not vm.mac.startswith("fe:") for vm in plan.vms)


def test_a_gpu_sharing_its_group_with_the_boot_disk_gets_no_unbind_fix(tmp_path: Path) -> None:
    root = materialize(json.loads((CASES / "host-group-with-nvme.json").read_text()), tmp_path / "host")
    report = check_host(root, [CASES / "gpu-group-with-nvme.yaml"])
    assert not report.ready
    group_checks = [c for c in report.checks if "iommu group" in c.name]
    assert group_checks and all(not c.ok for c in group_checks)
    for check in report.checks:
        assert "nvme/unbind" not in check.fix and "0000:08:00.0/driver_override" not in check.fix, check
    assert "cannot be passed through in this slot" in group_checks[0].detail
    assert "0000:08:00.0 (storage controller, driver nvme)" in group_checks[0].detail


def _recorded_group(tmp_path: Path, member: dict[str, Any]) -> list[str]:
    recording = json.loads((CASES / "host-group-with-nvme.json").read_text())
    recording["pci_devices"]["0000:08:00.0"] = member
    root = materialize(recording, tmp_path / "host")
    return [c.fix for c in check_host(root, [CASES / "gpu-group-with-nvme.yaml"]).checks if "iommu group" in c.name]


@pytest.mark.parametrize(("klass", "driver", "safe_to_unbind"), [
    ("0x020000", "igb", False),  # the host's NIC
    ("0x030000", "amdgpu", False),  # the console's display
    ("0x0c0330", "xhci_hcd", False),  # USB: keyboard and mouse
    ("0x010802", "nvme", False),  # the boot disk
    ("0x040300", "snd_hda_intel", True),  # a sound card the host does not need
])
def test_fix_commands_never_detach_what_the_host_uses(tmp_path: Path, klass: str, driver: str,
                                                      safe_to_unbind: bool) -> None:
    fixes = _recorded_group(tmp_path, {"vendor": "0x1022", "device": "0x1234", "class": klass, "driver": driver,
                                       "iommu_group": 0})
    unbinds = [f for f in fixes if f"drivers/{driver}/unbind" in f]
    assert bool(unbinds) is safe_to_unbind


def test_a_changed_address_restarts_the_running_guest_and_reaches_it() -> None:
    before, after = plan_of("ip-change-before.yaml", "hpc"), plan_of("ip-change-after.yaml", "hpc")
    old, new = before.vm("aihow-hpc-compute-02"), after.vm("aihow-hpc-compute-02")
    assert (old.ip, new.ip) == ("10.213.10.12", "10.213.10.22")
    # The seed applies the network on every boot, not only the first (the instance id stays).
    user_data = yaml.safe_load(seed_files(seed_spec(new, after, "aihow", KEY))["user-data"])
    assert user_data["updates"] == {"network": {"when": ["boot-new-instance", "boot"]}}
    step = {"op": "update", "oldState": {"outputs": {"name": old.name, "running": True, "address": old.ip}},
            "newState": {"inputs": {"name": new.name, "running": True, "address": new.ip}}}
    step["urn"] = "urn:pulumi:hpc::aihow::aihow:libvirt:Node$libvirt:Domain::aihow-hpc-compute-02-domain"
    assert [str(r) for r in risks([step])] == ["VM aihow-hpc-compute-02: restarted to apply address"]


def test_a_subnet_the_host_uses_is_refused_naming_the_interface() -> None:
    plans = plan_all(load_cluster_file(CASES / "subnet-host-collision.yaml"))
    with pytest.raises(ConfigError) as err:
        check_subnets(plans, "test:///default", CASES / "subnet-host-collision.yaml")
    assert err.value.problems == [
        "clusters.cloud.network.subnet: '192.168.122.0/24' overlaps 192.168.122.0/24 of libvirt network 'default' "
        "(bridge virbr0) on this host; allowed: a subnet no interface, route or libvirt network of the host uses"]
    assert err.value.lines == [6]
    in_use = [SubnetInUse("10.213.0.0/16", "a route via eth1", "eth1"),
              SubnetInUse("10.213.20.0/24", "interface aihow-cloud0", "aihow-cloud0")]
    default = plan_all(load_cluster_file(Path(__file__).resolve().parents[1] / "config/default.yaml"))
    problems = subnet_collisions(default, in_use)
    # A LAN route covering the subnet is a collision; the cluster's own bridge (an earlier up) is not.
    assert problems == [
        "clusters.hpc.network.subnet: '10.213.10.0/24' overlaps 10.213.0.0/16 of a route via eth1 on this host; "
        "allowed: a subnet no interface, route or libvirt network of the host uses",
        "clusters.cloud.network.subnet: '10.213.20.0/24' overlaps 10.213.0.0/16 of a route via eth1 on this host; "
        "allowed: a subnet no interface, route or libvirt network of the host uses"]


def test_a_cluster_moving_to_a_new_bridge_does_not_collide_with_its_old_one() -> None:
    default = plan_all(load_cluster_file(Path(__file__).resolve().parents[1] / "config/default.yaml"))
    hpc = next(p for p in default if p.key == "hpc")
    assert hpc.bridge != "old-br0"
    # The host still shows the cluster's own network on the bridge it had before the change.
    host = [SubnetInUse(hpc.subnet, "interface old-br0", "old-br0"),
            SubnetInUse(hpc.subnet, "a route via old-br0", "old-br0")]
    mine = subnets_of(host, [(hpc.network_name, "old-br0", hpc.subnet)])
    assert {used.network for used in mine} == {hpc.network_name}
    assert subnet_collisions([hpc], mine) == []
    # The same interface on someone else's network is a collision.
    theirs = subnets_of(host, [("lab", "old-br0", hpc.subnet)])
    assert subnet_collisions([hpc], theirs) == [
        f"clusters.hpc.network.subnet: '{hpc.subnet}' overlaps {hpc.subnet} of interface old-br0 on this host; "
        "allowed: a subnet no interface, route or libvirt network of the host uses"]


def test_the_longest_names_allowed_make_host_names_every_consumer_takes() -> None:
    """A VM's name is its host name (cloud-init, /etc/hosts, SLURM's NodeName, a Kubernetes node):
    one DNS label, at most 63 characters of lowercase letters, digits and '-'."""
    data = base()
    data["clusters"]["hpc"]["name"] = "h" * 40
    data["clusters"]["cloud"]["name"] = "c" * 40
    names = [vm.name for plan in plan_all(parse_cluster_file(data, env={})) for vm in plan.vms]
    assert max(len(n) for n in names) <= 63
    assert all(re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", n) for n in names), names


def test_a_default_partition_must_be_one_of_the_partitions() -> None:
    data = base()
    data["clusters"]["hpc"]["slurm_config"] = {"partitions": ["debug"], "default_partition": "debgu"}
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert err.value.problems == ["clusters.hpc.slurm_config.default_partition: 'debgu' is not in partitions "
                                  "['debug']; allowed: one of them"]
    # Only a default given: it is the cluster's one partition (no 'compute' beside it).
    data["clusters"]["hpc"]["slurm_config"] = {"default_partition": "batch"}
    assert plan_all(parse_cluster_file(data, env={}))[0].partitions == ("batch",)

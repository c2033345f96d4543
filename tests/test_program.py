"""The Pulumi program (``__main__.py``) under Pulumi's mocks: what it registers, and that an
invalid file registers nothing. Provider methods do not run under mocks (they are tested
against the libvirt test driver), but every provider still goes through serialization."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml

from aihow_infra.desired import DesiredPower, PowerRecords
from aihow_infra.images import IMAGE_ROLES, image_for
from tests.samples import base

ROOT = Path(__file__).resolve().parents[1]


class Mocks(pulumi.runtime.Mocks):
    """Records every resource; fills the outputs the providers would compute."""

    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = dict(args.inputs)
        if args.typ.endswith(":Volume"):
            outputs["path"] = f"/images/{args.inputs['name']}"
        if args.typ.endswith(":Domain"):
            outputs["state"] = "running" if args.inputs["running"] else "shutoff"
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def of_type(self, suffix: str) -> list[pulumi.runtime.MockResourceArgs]:
        return [r for r in self.resources if r.typ.endswith(suffix)]


def run_program(stack: str, config: dict[str, Any], mocks: Mocks | None = None) -> Mocks:
    mocks = mocks or Mocks()
    pulumi.runtime.set_mocks(mocks, project="aihow", stack=stack, preview=False)
    pulumi.runtime.set_all_config({f"aihow:{k}": v if isinstance(v, str) else json.dumps(v)
                                   for k, v in config.items()})

    @pulumi.runtime.test
    def program() -> None:
        runpy.run_path(str(ROOT / "__main__.py"))

    program()
    return mocks


def write(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_hpc_stack_registers_network_pool_and_a_volume_and_domain_per_vm(tmp_path: Path) -> None:
    mocks = run_program("hpc", {"clusterFile": str(ROOT / "config" / "default.yaml")})
    assert len(mocks.of_type(":Network")) == 1 and len(mocks.of_type(":StoragePool")) == 1
    assert sorted(r.inputs["name"] for r in mocks.of_type(":Domain")) == [
        "aihow-hpc-compute-01", "aihow-hpc-compute-02", "aihow-hpc-controller"]
    assert all(r.inputs["running"] for r in mocks.of_type(":Domain"))
    assert [r.typ for r in mocks.resources if r.typ.startswith("aihow:")].count("aihow:libvirt:Node") == 3
    net = mocks.of_type(":Network")[0].inputs
    assert net["forward_mode"] == "isolated" and len(net["hosts"]) == 3
    assert mocks.of_type(":GpuLease") == []


@pytest.fixture(autouse=True)
def project_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The program runs in a project folder of the test's own (never the checkout's power records),
    with stand-ins for the built images it checks for (this host's may not be built)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AIHOW_IMAGES_DIR", str(tmp_path / "images"))
    for role in IMAGE_ROLES:
        image = image_for(role)
        image.folder.mkdir(parents=True)
        for path in (image.disk, image.kernel, image.initrd):
            path.write_bytes(b"stand-in")
        image.manifest.write_text(json.dumps({"built_seconds": 1.0, "disk_bytes": 8}))
    return tmp_path


def test_an_image_not_built_stops_the_program_naming_the_command_that_builds_it(tmp_path: Path) -> None:
    (image_for("hpc").manifest).unlink()
    with pytest.raises(Exception, match=r"guest image\(s\) hpc not built; allowed: build them first with "
                                        r"`invoke image.build --role hpc`"):
        run_program("hpc", {"clusterFile": str(ROOT / "config" / "default.yaml")})


def test_gpu_worker_is_defined_stopped_without_lease_until_started(tmp_path: Path) -> None:
    cluster_file = write(tmp_path, base())
    mocks = run_program("cloud", {"clusterFile": cluster_file})
    domains = {r.inputs["name"]: r.inputs for r in mocks.of_type(":Domain")}
    worker = domains["cloud-gpu-worker-01"]
    assert worker["running"] is False and worker["devices"] == [{"address": "0000:01:00.0", "type": "gpu"}]
    assert mocks.of_type(":GpuLease") == []

    PowerRecords(tmp_path, "cloud").write(DesiredPower(vms={"cloud-gpu-worker-01": "running"}))
    mocks = run_program("cloud", {"clusterFile": cluster_file})
    leases = mocks.of_type(":GpuLease")
    assert [(r.inputs["holder"], r.inputs["addresses"]) for r in leases] == [
        ("cloud/cloud-gpu-worker-01", ["0000:01:00.0"])]
    assert {r.inputs["name"]: r.inputs["running"] for r in mocks.of_type(":Domain")}["cloud-gpu-worker-01"]


def test_hpc_gpu_node_takes_a_lease_covering_sibling_functions(tmp_path: Path) -> None:
    mocks = run_program("hpc", {"clusterFile": write(tmp_path, base()), "ledgerPath": "/srv/l.json"})
    [lease] = mocks.of_type(":GpuLease")
    assert lease.inputs == {**lease.inputs, "holder": "hpc/hpc-compute-01", "ledger": "/srv/l.json",
                            "addresses": ["0000:01:00.0", "0000:01:00.1"]}


def test_power_records_of_the_project_folder_decide_what_runs(tmp_path: Path) -> None:
    records = PowerRecords(tmp_path, "cloud")
    records.write(DesiredPower(vms={"cloud-gpu-worker-01": "running", "cloud-cpu-worker-01": "stopped"}))
    running = {r.inputs["name"]: r.inputs["running"] for r in run_program(
        "cloud", {"clusterFile": write(tmp_path, base())}).of_type(":Domain")}
    assert running["cloud-gpu-worker-01"] is True and running["cloud-cpu-worker-01"] is False
    assert running["cloud-control-plane"] is True  # no record: its auto_start

    records.write(DesiredPower(cluster="stopped", vms={"cloud-gpu-worker-01": "running"}))
    mocks = run_program("cloud", {"clusterFile": write(tmp_path, base())})
    assert not any(r.inputs["running"] for r in mocks.of_type(":Domain"))
    assert mocks.of_type(":GpuLease") == []


def test_corrupt_power_records_stop_the_program(tmp_path: Path) -> None:
    records = PowerRecords(tmp_path, "hpc")
    records.path.parent.mkdir(parents=True)
    records.path.write_text("{not json")
    mocks = Mocks()
    with pytest.raises(Exception, match=r"power records .*hpc.json cannot be read"):
        run_program("hpc", {"clusterFile": write(tmp_path, base())}, mocks)
    assert mocks.resources == []


@pytest.mark.parametrize(("stack", "config", "message"), [
    ("hpc", {"clusterFile": "MISSING"}, r"cannot be read"),
    ("hpc", {"clusterFile": "BAD"}, r"clusters\.hpc\.compute_nodes\[0\]\.ip: '10\.9\.9\.9' is outside subnet"),
    ("edge", {"clusterFile": "GOOD"}, r"aihow:cluster: not set and the stack name 'edge' is not a cluster"),
    ("hpc", {"clusterFile": "GOOD", "stopTimeout": "-1"},
     r"aihow:stopTimeout: '-1' is invalid; allowed: greater than 0"),
    ("hpc", {"clusterFile": "GOOD", "imagesDir": "images"},
     r"aihow:imagesDir: 'images' is relative; allowed: an absolute path"),
    ("hpc", {"clusterFile": "GOOD", "power": {"hpc-controller": "stopped"}},
     r"aihow:power: desired power is no longer a stack setting .*use `aihow vm.start/vm.stop`"),
    ("hpc", {"clusterFile": "GOOD", "clusterPower": "stopped"},
     r"aihow:clusterPower: desired power is no longer a stack setting"),
    ("hpc", {"clusterFile": "GOOD", "stopTimout": "5"},
     r"aihow:stopTimout: unknown setting; allowed: .*stopTimeout"),
    ("hpc", {"clusterFile": "GOOD", "virtType": "xen"},
     r"aihow:virtType: 'xen' is invalid; allowed: 'auto', 'kvm' or 'qemu'"),
])
def test_invalid_input_fails_at_the_start_and_registers_nothing(
        tmp_path: Path, stack: str, config: dict[str, Any], message: str) -> None:
    bad = base()
    bad["clusters"]["hpc"]["compute_nodes"][0]["ip"] = "10.9.9.9"
    files = {"MISSING": str(tmp_path / "missing.yaml"), "BAD": write(tmp_path, bad),
             "GOOD": str(ROOT / "config" / "default.yaml")}
    config = {**config, "clusterFile": files[config["clusterFile"]]}
    mocks = Mocks()
    with pytest.raises(Exception, match=message):
        run_program(stack, config, mocks)
    assert mocks.resources == []  # not even a network


def test_a_cluster_spread_over_two_hosts_has_a_network_pool_and_image_on_each(tmp_path: Path) -> None:
    """The HPC controller on the stack's host (libvirtd here), its GPU node on host ``lab`` (libvirt's
    test driver), both joining bridge br-hpc: the controller's host keeps the names one host always
    had, the other's carry its name; each node's disk, seed, domain and lease are on its own host."""
    data = base()
    data["hosts"] = {"lab": {"uri": "test:///default"}}
    hpc = data["clusters"]["hpc"]
    hpc["image"] = "hpc"
    hpc["network"]["forward_mode"] = "bridge"
    hpc["compute_nodes"][0]["host"] = "lab"
    mocks = run_program("hpc", {"clusterFile": write(tmp_path, data), "ledgerPath": "/srv/l.json"})
    named = {r.name: r.inputs for r in mocks.resources}
    assert {name: named[name]["uri"] for name in ("network", "network-lab", "pool", "pool-lab", "image-hpc",
                                                  "image-hpc-lab")} == {
        "network": "qemu:///system", "network-lab": "test:///default", "pool": "qemu:///system",
        "pool-lab": "test:///default", "image-hpc": "qemu:///system", "image-hpc-lab": "test:///default"}
    assert named["network"]["bridge"] == named["network-lab"]["bridge"] == "br-hpc"
    assert {r.inputs["name"]: r.inputs["uri"] for r in mocks.of_type(":Domain")} == {
        "hpc-controller": "qemu:///system", "hpc-compute-01": "test:///default"}
    assert named["compute-01-disk"]["uri"] == named["compute-01-seed"]["uri"] == "test:///default"
    assert [lease.name for lease in mocks.of_type(":GpuLease")] == ["compute-01-lease-0000-01-00"]
    nodes = {r.name: r for r in mocks.resources if r.typ == "aihow:libvirt:Node"}
    assert set(nodes) == {"controller", "compute-01"}

"""The cluster file: what loads, what derives from it, and every mistake's message."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aihow_infra.components import network_args, seed_spec
from aihow_infra.errors import ConfigError
from aihow_infra.loading import load_cluster_file, parse_cluster_file
from aihow_infra.placement import by_host, placed
from aihow_infra.plan import mac_for, plan_all, plan_cluster, shared_devices
from aihow_infra.settings import parse_settings
from tests.samples import base

ROOT = Path(__file__).resolve().parents[1]
SEED_EXAMPLES = ROOT / "tests" / "fixtures" / "seed-examples.yaml"


def mutate(path: str, value: Any) -> dict[str, Any]:
    """``base()`` with the value at a dotted path (``a.b[0].c``) set, or deleted when value is DELETE."""
    data = base()
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node: Any = data
    for part in parts[:-1]:
        node = node[part]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return data


DELETE = object()
LAN = {"subnet": "10.1.0.0/24", "bridge": "br-lan", "forward_mode": "bridge"}


def on_one_lan(path: str, value: Any) -> dict[str, Any]:
    """``mutate`` on a file whose two clusters join one host bridge (the LAN's subnet, shared),
    each node on an address of its own."""
    data = mutate(path, value)
    data["clusters"]["hpc"]["network"] = dict(LAN)
    data["clusters"]["cloud"]["network"] = dict(LAN)
    cloud = data["clusters"]["cloud"]
    cloud["control_plane"]["ip_address"] = "10.1.0.20"
    for index, worker in enumerate(cloud["worker_nodes"]):
        if worker.get("ip", "").startswith("10.2."):
            worker["ip"] = f"10.1.0.{21 + index}"
    return data


def placed_on(host: str, path: str, value: Any = None) -> dict[str, Any]:
    """``base()`` whose HPC cluster is placed on ``host`` of a file naming host gpu2 (another
    machine), with the value at ``path`` set (the host name itself when no value is given)."""
    data = mutate(path, host if value is None else value)
    data["hosts"] = {"gpu2": {"uri": "qemu+ssh://root@gpu2/system"}}
    data["clusters"]["hpc"].setdefault("host", host)
    return data


HPC = "clusters.hpc"
NODE = f"{HPC}.compute_nodes[0]"
DEV = f"{NODE}.pcie_passthrough.devices[0]"

BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("ip outside subnet", mutate(f"{NODE}.ip", "10.9.0.11"),
     r"clusters\.hpc\.compute_nodes\[0\]\.ip: '10\.9\.0\.11' is outside subnet 10\.1\.0\.0/24"),
    ("ip is network address", mutate(f"{NODE}.ip", "10.1.0.0"),
     r"compute_nodes\[0\]\.ip: '10\.1\.0\.0' is the network address"),
    ("ip is gateway", mutate(f"{NODE}.ip", "10.1.0.1"), r"compute_nodes\[0\]\.ip: '10\.1\.0\.1' is the gateway"),
    ("ip is broadcast", mutate(f"{NODE}.ip", "10.1.0.255"),
     r"compute_nodes\[0\]\.ip: '10\.1\.0\.255' is the broadcast address"),
    ("ip not an address", mutate(f"{NODE}.ip", "10.1.0.300"),
     r"compute_nodes\[0\]\.ip: '10\.1\.0\.300' is invalid; allowed: a valid IPv4 address"),
    ("duplicate ip", mutate(f"{NODE}.ip", "10.1.0.10"),
     r"compute_nodes\[0\]\.ip: '10\.1\.0\.10' is already used by clusters\.hpc\.controller"),
    ("duplicate VM names (same cluster name)", mutate("clusters.cloud.name", "hpc"),
     r"clusters\.cloud\.name: 'hpc' equals clusters\.hpc\.name"),
    ("overlapping subnets", mutate("clusters.cloud.network", {"subnet": "10.1.0.0/16", "bridge": "br-cloud"}),
     r"clusters\.cloud\.network\.subnet: '10\.1\.0\.0/16' overlaps clusters\.hpc\.network\.subnet"),
    ("equal bridges", mutate("clusters.cloud.network.bridge", "br-hpc"),
     r"clusters\.cloud\.network\.bridge: 'br-hpc' equals clusters\.hpc\.network\.bridge"),
    ("bridge too long", mutate(f"{HPC}.network.bridge", "a-bridge-name-too-long"),
     r"clusters\.hpc\.network\.bridge: 'a-bridge-name-too-long' has 22 characters; allowed: at most 15"),
    ("bridge bad characters", mutate(f"{HPC}.network.bridge", "br hpc"),
     r"network\.bridge: 'br hpc' is not an interface name"),
    ("subnet with host bits", mutate(f"{HPC}.network.subnet", "10.1.0.5/24"),
     r"network\.subnet: '10\.1\.0\.5/24' is not an IPv4 subnet"),
    ("subnet too small", mutate(f"{HPC}.network.subnet", "10.1.0.0/30"),
     r"network\.subnet: '10\.1\.0\.0/30' is too small; allowed: a prefix of /29 or shorter"),
    ("gateway outside subnet", mutate(f"{HPC}.network.gateway_ip", "10.3.0.1"),
     r"clusters\.hpc\.network\.gateway_ip: '10\.3\.0\.1' is outside subnet 10\.1\.0\.0/24"),
    ("dhcp range reversed", mutate(f"{HPC}.network.dhcp_end", "10.1.0.5"),
     r"clusters\.hpc\.network\.dhcp_start: '10\.1\.0\.10' is after dhcp_end '10\.1\.0\.5'"),
    ("pci address short bus", mutate(f"{DEV}.pci_address", "0000:1:00.0"),
     r"pci_address: '0000:1:00\.0' is not a PCI address; allowed: DDDD:BB:SS\.F"),
    ("pci function 8", mutate(f"{DEV}.pci_address", "0000:01:00.8"),
     r"pci_address: '0000:01:00\.8' is not a PCI address; allowed: .*function 0-7"),
    ("pci address garbage", mutate(f"{DEV}.pci_address", "gpu0"), r"pci_address: 'gpu0' is not a PCI address"),
    ("vendor id not hex", mutate(f"{DEV}.vendor_id", "nvda"),
     r"devices\[0\]\.vendor_id: 'nvda' is not a PCI id; allowed: 4 hex digits"),
    ("device id too long", mutate(f"{DEV}.device_id", "28050"),
     r"devices\[0\]\.device_id: '28050' is not a PCI id"),
    ("device type unknown", mutate(f"{DEV}.device_type", "fpga"),
     r"devices\[0\]\.device_type: 'fpga' is invalid; allowed: 'gpu', 'audio', 'network', 'storage' or 'other'"),
    ("iommu group negative", mutate(f"{DEV}.iommu_group", -1),
     r"devices\[0\]\.iommu_group: -1 is invalid; allowed: greater than or equal to 0"),
    ("zero cpu cores", mutate(f"{NODE}.cpu_cores", 0),
     r"compute_nodes\[0\]\.cpu_cores: 0 is invalid; allowed: greater than 0"),
    ("negative memory", mutate(f"{NODE}.memory_gb", -4),
     r"compute_nodes\[0\]\.memory_gb: -4 is invalid; allowed: greater than 0"),
    ("zero disk", mutate(f"{HPC}.controller.disk_gb", 0),
     r"controller\.disk_gb: 0 is invalid; allowed: greater than 0"),
    ("memory not a number", mutate(f"{NODE}.memory_gb", "lots"),
     r"compute_nodes\[0\]\.memory_gb: 'lots' is invalid; allowed: a valid integer"),
    ("unknown node key with hint", mutate(f"{NODE}.memroy_gb", 4),
     r"compute_nodes\[0\]\.memroy_gb: unknown key 'memroy_gb'; did you mean 'memory_gb'\?"),
    ("unknown top key with hint", {**base(), "clustres": {}},
     r"clustres: unknown key 'clustres'; did you mean 'clusters'\?"),
    ("unknown cluster kind", mutate("clusters.edge", {"name": "x"}), r"clusters\.edge: unknown key 'edge'"),
    ("missing required key", mutate(f"{NODE}.cpu_cores", DELETE),
     r"compute_nodes\[0\]\.cpu_cores: required key is missing"),
    ("missing network", mutate(f"{HPC}.network", DELETE), r"clusters\.hpc\.network: required key is missing"),
    ("no clusters", mutate("clusters", {}), r"clusters: no cluster defined; allowed: 'hpc', 'cloud' or both"),
    ("bad version", mutate("version", "2.0"), r"version: '2\.0' is not supported; allowed: '1\.0'"),
    ("same GPU on two auto-start VMs of one cluster",
     mutate(f"{HPC}.controller.pcie_passthrough",
            {"enabled": True, "devices": [{"pci_address": "0000:01:00.0", "device_type": "gpu"}]}),
     r"compute_nodes\[0\]\.pcie_passthrough: '0000:01:00\.0' is also taken by hpc-controller and both start "
     r"automatically .*allowed: set auto_start: false on all but one"),
    ("same function listed twice",
     mutate(f"{NODE}.pcie_passthrough.devices",
            [{"pci_address": "0000:01:00.0", "device_type": "gpu"},
             {"pci_address": "0000:01:00.0", "device_type": "gpu"}]),
     r"pcie_passthrough\.devices: '0000:01:00\.0' is listed twice"),
    ("missing base image", mutate(f"{HPC}.base_image_path", "/nonexistent/base.qcow2"),
     r"controller\.base_image_path: '/nonexistent/base\.qcow2' does not exist"),
    ("bad cluster name", mutate(f"{HPC}.name", "HPC_Cluster"),
     r"clusters\.hpc\.name: 'HPC_Cluster' is not a cluster name"),
    ("ip and ip_address both", mutate(f"{HPC}.controller.ip", "10.1.0.10"),
     r"clusters\.hpc\.controller: give either 'ip' or 'ip_address', not both"),
    ("auto_start not a bool", mutate(f"{NODE}.auto_start", "sometimes"),
     r"compute_nodes\[0\]\.auto_start: 'sometimes' is invalid; allowed: a valid boolean"),
    ("gpu worker without gpu", mutate("clusters.cloud.worker_nodes[0].worker_type", "gpu"),
     r"clusters\.cloud\.worker_nodes\[0\]: declared a gpu worker but has no GPU passthrough"),
    ("unset variable", mutate(f"{HPC}.base_image_path", "${AIHOW_TEST_UNSET_VAR}/img.qcow2"),
     r"clusters\.hpc\.base_image_path: .* uses \$\{AIHOW_TEST_UNSET_VAR\}, which is not set"),
    ("template form with zero count", mutate(f"{HPC}.compute_nodes",
                                             {"count": 0, "cpu_cores": 1, "memory_gb": 1, "disk_gb": 1}),
     r"clusters\.hpc\.compute_nodes\.count: 0 is not a positive integer"),
    ("cni that needs a registry", mutate("clusters.cloud.kubernetes_config", {"cni": "calico"}),
     r"clusters\.cloud\.kubernetes_config\.cni: 'calico' is not available: it needs images from a container "
     r"registry; allowed: 'bridge'"),
    ("ingress the project cannot deploy", mutate("clusters.cloud.kubernetes_config", {"ingress": "nginx"}),
     r"clusters\.cloud\.kubernetes_config\.ingress: unknown key 'ingress'"),
    ("pod subnet too small", mutate("clusters.cloud.kubernetes_config", {"pod_subnet": "10.244.0.0/20"}),
     r"kubernetes_config\.pod_subnet: '10\.244\.0\.0/20' is too small; allowed: a /16 or larger"),
    ("pod subnet over the cluster network", mutate("clusters.cloud.kubernetes_config", {"pod_subnet": "10.2.0.0/16"}),
     r"clusters\.cloud\.kubernetes_config\.pod_subnet: '10\.2\.0\.0/16' overlaps clusters\.cloud\.network\.subnet "
     r"'10\.2\.0\.0/24'; allowed: disjoint subnets"),
    ("on-demand controller", mutate(f"{HPC}.controller.on_demand", True),
     r"clusters\.hpc\.controller\.on_demand: true on the controller; allowed: false \(slurmctld"),
    ("on-demand control plane", mutate("clusters.cloud.control_plane.on_demand", True),
     r"clusters\.cloud\.control_plane\.on_demand: true: the control plane runs the API server .*allowed: false"),
    ("true for a number of seconds", mutate("clusters.cloud.kubernetes_config", {"scale_down_unneeded_time": True}),
     r"clusters\.cloud\.kubernetes_config\.scale_down_unneeded_time: true is not a number; allowed: a number"),
    ("false for a number of cores", mutate(f"{NODE}.cpu_cores", False),
     r"compute_nodes\[0\]\.cpu_cores: false is not a number; allowed: a number"),
    ("a count group as a list item", mutate(f"{HPC}.compute_nodes", [{"count": 2, "cpu_cores": 1, "memory_gb": 1,
                                                                      "disk_gb": 1}]),
     r"clusters\.hpc\.compute_nodes\[0\]\.count: 'count' is not a key of this form; allowed here: auto_start, "),
    ("idle time with no on-demand worker", mutate("clusters.cloud.kubernetes_config", {"scale_down_unneeded_time": 60}),
     r"clusters\.cloud\.kubernetes_config\.scale_down_unneeded_time: 60 is set, but no node of this cluster has "
     r"on_demand: true, so nothing would use it; allowed: on_demand: true on a worker, or leave "
     r"scale_down_unneeded_time out"),
    ("power saving with no on-demand node", mutate(f"{HPC}.slurm_config", {"resume_timeout": 900}),
     r"clusters\.hpc\.slurm_config\.resume_timeout: 900 is set, but no node of this cluster has on_demand: true"),
    ("no idle time for workers", mutate("clusters.cloud.kubernetes_config", {"scale_down_unneeded_time": 0}),
     r"clusters\.cloud\.kubernetes_config\.scale_down_unneeded_time: 0 seconds is no idle time; allowed: 1 or more "
     r"seconds with no work before an on-demand worker is stopped"),
    ("on-demand and auto_start", mutate(f"{NODE}", {**base()["clusters"]["hpc"]["compute_nodes"][0],
                                                    "on_demand": True, "auto_start": True}),
     r"compute_nodes\[0\]\.auto_start: true with on_demand: true; allowed: one of them"),
    ("no idle time", mutate(f"{HPC}.slurm_config", {"suspend_time": 0}),
     r"clusters\.hpc\.slurm_config\.suspend_time: 0 seconds is no idle time; allowed: 1 or more seconds"),
    ("negative idle time", mutate(f"{HPC}.slurm_config", {"suspend_time": -5}),
     r"slurm_config\.suspend_time: -5 seconds is no idle time"),
    ("resume timeout shorter than a boot", mutate(f"{HPC}.slurm_config", {"resume_timeout": 30}),
     r"clusters\.hpc\.slurm_config\.resume_timeout: 30 seconds is shorter than a compute node's boot \(60 s under "
     r"KVM, estimated; 215 s under software emulation, measured\); allowed: at least 60 under KVM, 215 under "
     r"software emulation \(the host decides\)"),
    ("DHCP range on a host bridge", mutate(f"{HPC}.network", {**LAN, "dhcp_start": "10.1.0.100"}),
     r"clusters\.hpc\.network\.dhcp_start: '10\.1\.0\.100' is set, but forward_mode 'bridge' has no DHCP "
     r"\(the guests join an existing host bridge, where libvirt serves none\); allowed: leave it out"),
    ("DHCP node on a host bridge", on_one_lan(f"{NODE}.ip", DELETE),
     r"clusters\.hpc\.compute_nodes\[0\]\.ip: DHCP, but network\.forward_mode is 'bridge' \(the guests join an "
     r"existing host bridge, where libvirt serves no DHCP\); allowed: a static address in 10\.1\.0\.0/24"),
    ("one address twice on one host bridge", on_one_lan("clusters.cloud.worker_nodes[0].ip", "10.1.0.11"),
     r"clusters\.cloud\.worker_nodes\[0\]\.ip: '10\.1\.0\.11' is already used by clusters\.hpc\.compute_nodes"
     r"\[0\] on the same bridge 'br-lan'; allowed: one VM per address"),
    ("unknown forward mode", mutate(f"{HPC}.network.forward_mode", "route"),
     r"clusters\.hpc\.network\.forward_mode: 'route' .*'nat', 'isolated' or 'bridge'"),
    ("host URI that is not libvirt's", mutate("hosts", {"gpu2": {"uri": "https://gpu2/system"}}),
     r"^hosts\.gpu2\.uri: 'https://gpu2/system' is not a libvirt URI; allowed: a URI of libvirt's QEMU system "
     r"daemon, such as qemu:///system or qemu\+ssh://USER@HOST/system$"),
    ("host on QEMU's session daemon", mutate("hosts", {"gpu2": {"uri": "qemu:///session"}}),
     r"^hosts\.gpu2\.uri: 'qemu:///session' is QEMU's session daemon, which has no networks of its own and no PCI "
     r"passthrough; allowed: a URI of libvirt's QEMU system daemon"),
    ("host of another libvirt driver", mutate("hosts", {"gpu2": {"uri": "xen:///system"}}),
     r"^hosts\.gpu2\.uri: 'xen:///system' is a libvirt URI of the xen driver, which the project does not drive; "
     r"allowed: a URI of libvirt's QEMU system daemon"),
    ("host given as its URI alone", mutate("hosts", {"gpu2": "qemu+ssh://root@gpu2/system"}),
     r"^hosts\.gpu2: 'qemu\+ssh://root@gpu2/system' is not a host entry; allowed: \{uri: URI\}, e\.g\. "
     r"\{uri: qemu\+ssh://root@gpu2/system\}$"),
    ("host name that is not one", mutate("hosts", {"GPU_2": {"uri": "qemu+ssh://gpu2/system"}}),
     r"^hosts: 'GPU_2' is not a host name; allowed: lowercase letters, digits and '-'"),
    ("host without its URI", mutate("hosts", {"gpu2": {}}), r"^hosts\.gpu2\.uri: .*required"),
    ("cluster on an unknown host", placed_on("gpu3", "clusters.hpc.host"),
     r"^clusters\.hpc\.host: 'gpu3' is not a host of this file; allowed: a name under hosts \(gpu2\)$"),
    ("base image on another machine", placed_on("gpu2", f"{NODE}.base_image_path", "/srv/mine.qcow2"),
     r"^clusters\.hpc\.compute_nodes\[0\]\.base_image_path: '/srv/mine\.qcow2': the node runs on host 'gpu2' "
     r"\(qemu\+ssh://root@gpu2/system\), whose files this machine cannot see; allowed: the project's images"),
    ("shared folder on another machine",
     placed_on("gpu2", f"{NODE}.virtio_fs_mounts", [{"tag": "data", "host_path": "/srv/data",
                                                      "mount_point": "/data"}]),
     r"^clusters\.hpc\.compute_nodes\[0\]\.virtio_fs_mounts\[0\]\.host_path: '/srv/data': the node runs on "
     r"host 'gpu2'"),
    ("node on an unknown host", placed_on("gpu2", f"{NODE}.host", "gpu9"),
     r"^clusters\.hpc\.compute_nodes\[0\]\.host: 'gpu9' is not a host of this file; allowed: a name under hosts "
     r"\(gpu2\)$"),
    ("cluster spread over hosts on a network that ends at its host",
     mutate(f"{NODE}.host", "gpu2") | {"hosts": {"gpu2": {"uri": "qemu+ssh://root@gpu2/system"}}},
     r"^clusters\.hpc\.compute_nodes\[0\]\.host: 'gpu2' puts the cluster on a second host besides the stack's "
     r"host \(aihow:libvirtUri\) of clusters\.hpc\.controller, but clusters\.hpc\.network\.forward_mode is 'nat', "
     r"a network that ends at its host \(the nodes could not reach each other\); allowed: forward_mode 'bridge'"),
    ("service subnet over the pod subnet",
     mutate("clusters.cloud.kubernetes_config", {"pod_subnet": "10.96.0.0/16", "service_subnet": "10.96.0.0/12"}),
     r"kubernetes_config\.service_subnet: '10\.96\.0\.0/12' overlaps clusters\.cloud\.kubernetes_config\.pod_subnet"),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_key_value_and_allowed(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert any(re.search(expected, p) for p in err.value.problems), err.value.report()
    # One line each, so an operator sees exactly what to change.
    assert all("\n" not in p for p in err.value.problems)


def test_two_clusters_on_one_host_bridge_share_its_subnet_and_nothing_else() -> None:
    hpc, cloud = plan_all(parse_cluster_file(on_one_lan("version", "1.0"), env={}))
    assert (hpc.forward_mode, hpc.bridge, hpc.subnet) == (cloud.forward_mode, cloud.bridge, cloud.subnet) == (
        "bridge", "br-lan", "10.1.0.0/24")
    assert not {vm.ip for vm in hpc.vms} & {vm.ip for vm in cloud.vms}
    # A host bridge carries no DHCP: no reservation; the LAN's gateway is the guests' route and
    # only the file's name servers are theirs (no libvirt dnsmasq answers there).
    network = network_args(cloud, "qemu:///system", "cloud")
    assert network["hosts"] == [] and network["forward_mode"] == "bridge"
    spec = seed_spec(cloud.vms[0], cloud, "aihow", "ssh-ed25519 AAAA k")
    assert (spec.gateway, spec.dns_servers) == ("10.1.0.1", ())
    # No DHCP range there, so the LAN's router may sit where a NAT network's range would be.
    data = on_one_lan("version", "1.0")
    data["clusters"]["hpc"]["network"]["gateway_ip"] = "10.1.0.254"
    assert plan_all(parse_cluster_file(data, env={}))[0].gateway == "10.1.0.254"


@pytest.mark.parametrize("form", ["list", "groups"])
def test_worker_errors_name_the_worker_not_the_other_form(form: str) -> None:
    data = base()
    worker = {"cpu_cores": 0, "memory_gb": 1, "disk_gb": 1}
    data["clusters"]["cloud"]["worker_nodes"] = [worker] if form == "list" else {"cpu": [worker], "gpu": []}
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    where = "worker_nodes[0]" if form == "list" else "worker_nodes.cpu[0]"
    assert err.value.problems == [f"clusters.cloud.{where}.cpu_cores: 0 is invalid; allowed: greater than 0"]


def test_every_error_is_reported_at_once() -> None:
    data = mutate(f"{NODE}.cpu_cores", 0)
    data["clusters"]["cloud"]["control_plane"]["memory_gb"] = 0
    data["clusters"]["hpc"]["controller"]["disk_gb"] = -1
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert len(err.value.problems) == 3
    assert str(err.value).startswith("invalid cluster file: 3 problems; first:")


def test_there_are_at_least_thirty_bad_inputs() -> None:
    assert len(BAD_INPUTS) >= 30


def test_valid_base_loads_and_reports_the_shared_gpu() -> None:
    model = parse_cluster_file(base(), env={})
    shared = shared_devices(plan_all(model))
    assert [s.address for s in shared] == ["0000:01:00.0"]
    assert [vm.name for vm in shared[0].vms] == ["hpc-compute-01", "cloud-gpu-worker-01"]
    assert not shared[0].conflict


def test_both_clusters_auto_starting_a_shared_gpu_is_reported_as_conflict() -> None:
    data = mutate("clusters.cloud.worker_nodes[1].auto_start", True)
    shared = shared_devices(plan_all(parse_cluster_file(data, env={})))
    assert shared[0].conflict
    assert "CONFLICT" in shared[0].describe() and "second cluster's start will fail" in shared[0].describe()


def test_either_cluster_may_be_absent() -> None:
    data = base()
    del data["clusters"]["cloud"]
    model = parse_cluster_file(data, env={})
    assert model.clusters.cloud is None
    with pytest.raises(ConfigError, match=r"clusters.cloud: .* defines no such cluster; allowed: .*\(hpc\)"):
        plan_cluster(model, "cloud")


def test_variables_expand_from_the_environment_with_defaults(tmp_path: Path) -> None:
    data = mutate(f"{HPC}.controller.virtio_fs_mounts",
                  [{"tag": "data", "host_path": "${DATA}", "mount_point": "${MNT:-/mnt/data}"}])
    model = parse_cluster_file(data, env={"DATA": str(tmp_path)})
    assert model.clusters.hpc is not None
    mount = model.clusters.hpc.controller.virtio_fs_mounts[0]
    assert (mount.host_path, mount.mount_point) == (str(tmp_path), "/mnt/data")


def test_template_form_expands_to_dhcp_nodes() -> None:
    data = mutate(f"{HPC}.compute_nodes", {"count": 3, "cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip": "DHCP"})
    plan = plan_cluster(parse_cluster_file(data, env={}), "hpc")
    assert [vm.name for vm in plan.vms] == ["hpc-controller", "hpc-compute-01", "hpc-compute-02", "hpc-compute-03"]
    # Each DHCP node gets a reservation, counted down from the end of the DHCP range.
    assert [(vm.ip, vm.dhcp) for vm in plan.vms] == [
        ("10.1.0.10", False), ("10.1.0.254", True), ("10.1.0.253", True), ("10.1.0.252", True)]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters:\n  hpc: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line \d+, column \d+"):
        load_cluster_file(bad)


def test_a_key_given_twice_is_refused_not_overwritten(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently (`disk_gb: 4, disk_gb: 9` gave 9)."""
    bad = tmp_path / "twice.yaml"
    bad.write_text("clusters:\n  hpc:\n    name: hpc\n    controller:\n      disk_gb: 4\n      cpu_cores: 1\n"
                   "      disk_gb: 9\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML at line 7, column 7: key 'disk_gb' appears "
                                          r"twice in one mapping \(first on line 5\); allowed: each key once$"):
        load_cluster_file(bad)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot be read"):
        load_cluster_file(tmp_path / "nope.yaml")


# --- the shipped examples and the seed's -----------------------------------------

EXPECTED_MACS = {  # computed by the original ai-how tool (see shared/notes/original-ai-how.md, section 7)
    "hpc-cluster-controller": "72:55:52:1e:8f:d9",
    "hpc-cluster-compute-01": "66:a4:f5:05:88:3a",
    "hpc-cluster-compute-02": "b2:f5:bd:f0:b6:a1",
    "cloud-cluster-control-plane": "46:a8:1e:4a:83:7b",
    "cloud-cluster-cpu-worker-01": "32:c6:9b:23:55:d9",
    "cloud-cluster-gpu-worker-01": "72:5f:e1:8d:76:58",
}


def test_multi_gpu_example_gives_ai_how_names_roles_macs_and_sharing() -> None:
    # It shares ${HOME} into the controller: an operator's home, not root's (refused, see below).
    model = load_cluster_file(ROOT / "config" / "example-multi-gpu-clusters.yaml", check_images=False,
                              env={**os.environ, "HOME": "/home/admin"})
    plans = plan_all(model)
    vms = {vm.name: vm for plan in plans for vm in plan.vms}
    assert {name: vm.mac for name, vm in vms.items()} == EXPECTED_MACS
    assert [vm.role for vm in vms.values()] == [
        "controller", "compute", "compute", "control-plane", "cpu-worker", "gpu-worker"]
    assert vms["cloud-cluster-gpu-worker-01"].auto_start is False
    assert vms["hpc-cluster-compute-01"].claims[0].functions == ("0000:01:00.0", "0000:01:00.1")
    shared = shared_devices(plans)
    assert [s.address for s in shared] == ["0000:01:00.0", "0000:01:00.1"]
    assert all(not s.conflict for s in shared)
    assert plans[0].network_name == "hpc-cluster-network" and plans[1].pool_name == "cloud-cluster-pool"


def test_images_of_the_multi_gpu_example_are_reported_missing_here() -> None:
    with pytest.raises(ConfigError) as err:
        load_cluster_file(ROOT / "config" / "example-multi-gpu-clusters.yaml", env={**os.environ, "HOME": "/home/a"})
    images = [p for p in err.value.problems if "base_image_path" in p]
    shares = [p for p in err.value.problems if "virtio_fs_mounts" in p]
    assert images and all("does not exist" in p for p in images) and all("is not a folder" in p for p in shares)
    assert len(images) + len(shares) == len(err.value.problems)
    # Looked for beside the file, wherever it is loaded from.
    assert f"(looked at {ROOT / 'config' / 'build/packer'}" in images[0]


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    # As an operator's (ai-how's example shares ${HOME}; root's home is a system location).
    assert plan_all(load_cluster_file(path, check_images=False, env={**os.environ, "HOME": "/home/operator"}))


def seed_examples() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(SEED_EXAMPLES.read_text()))


def test_seed_examples_load_unchanged_over_a_minimal_base() -> None:
    """The seed's YAML blocks are excerpts of a full file: each is laid over name and network only."""
    full, both, gpu_list = seed_examples()
    frame = {"name": "cloud-cluster", "network": {"subnet": "192.168.200.0/24", "bridge": "virbr200"}}
    cloud = {**frame, **full["clusters"]["cloud"]}
    plan = plan_cluster(parse_cluster_file({"clusters": {"cloud": cloud}}, env={}), "cloud")
    assert [(vm.name, vm.role, vm.auto_start) for vm in plan.vms] == [
        ("cloud-cluster-control-plane", "control-plane", True),
        ("cloud-cluster-cpu-worker-01", "cpu-worker", True),
        ("cloud-cluster-gpu-worker-01", "gpu-worker", False),
    ]

    hpc = {"name": "hpc-cluster", "network": {"subnet": "192.168.100.0/24", "bridge": "virbr100"},
           "controller": {"cpu_cores": 4, "memory_gb": 8, "disk_gb": 100, "ip_address": "192.168.100.10"},
           **both["clusters"]["hpc"]}
    cloud2 = {**frame, "control_plane": full["clusters"]["cloud"]["control_plane"], **both["clusters"]["cloud"]}
    model = parse_cluster_file({"clusters": {"hpc": hpc, "cloud": cloud2}}, env={})
    shared = shared_devices(plan_all(model))
    assert [(s.address, [vm.name for vm in s.vms], s.conflict) for s in shared] == [
        ("0000:01:00.0", ["hpc-cluster-compute-01", "cloud-cluster-gpu-worker-01"], False)]

    worker = gpu_list["gpu"][0]
    assert worker["auto_start"] is False and worker["pcie_passthrough"]["devices"][0]["pci_address"] == "0000:01:00.0"


def test_mac_round_trip_is_stable_and_locally_administered() -> None:
    for name in ["a", "hpc-cluster-compute-01", "x" * 60]:
        mac = mac_for(name)
        assert mac == mac_for(name)
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01
    model = parse_cluster_file(copy.deepcopy(base()), env={})
    names = [vm.name for plan in plan_all(model) for vm in plan.vms]
    assert names == ["hpc-controller", "hpc-compute-01", "cloud-control-plane", "cloud-cpu-worker-01",
                     "cloud-gpu-worker-01"]
    assert len({mac_for(n) for n in names}) == len(names)


def test_image_per_cluster_or_node_and_user_data_joined() -> None:
    data = base()
    hpc = data["clusters"]["hpc"]
    hpc["image"] = "hpc"
    hpc["cloud_init"] = {"runcmd": ["echo cluster"]}
    hpc["compute_nodes"][0]["cloud_init"] = {"runcmd": ["echo node"], "packages": ["munge"]}
    hpc["compute_nodes"][0]["base_image_path"] = None
    data["clusters"]["cloud"]["control_plane"]["image"] = "cloud"
    plans = {p.key: p for p in plan_all(parse_cluster_file(data, env={}))}
    controller, compute = plans["hpc"].vms
    assert (controller.image, compute.image) == ("hpc", "hpc")
    assert compute.cloud_init == {"packages": ["munge"], "runcmd": ["echo cluster", "echo node"]}
    assert controller.cloud_init == {"runcmd": ["echo cluster"]} and controller.waits_ready
    assert [vm.image for vm in plans["cloud"].vms] == ["cloud", None, None]


@pytest.mark.parametrize(("path", "value", "message"), [
    ("clusters.hpc.controller.image", "gpu", "clusters.hpc.controller.image: 'gpu' is invalid; allowed: 'base', "
                                            "'hpc' or 'cloud'"),
    ("clusters.hpc.controller.disk_gb", 1, None),
    ("clusters.hpc.controller.cloud_init", {"bootcmd": ["x"]},
     "clusters.hpc.controller.cloud_init.bootcmd: unknown key 'bootcmd'; allowed here: packages, runcmd, write_files"),
])
def test_image_mistakes(path: str, value: Any, message: str | None) -> None:
    data = mutate(path, value)
    if message is None:  # a disk smaller than the image it overlays
        data["clusters"]["hpc"]["controller"]["image"] = "hpc"
        message = ("clusters.hpc.controller.disk_gb: 1 is smaller than the hpc image's root file system (2 GiB); "
                   "allowed: 2 or more")
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert err.value.problems == [message]


def test_image_and_base_image_path_together_are_refused() -> None:
    data = mutate("clusters.hpc.controller.image", "hpc")
    data["clusters"]["hpc"]["controller"]["base_image_path"] = "/images/own.qcow2"
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={}, check_images=False)
    assert err.value.problems == ["clusters.hpc.controller.image: 'hpc' given with base_image_path "
                                  "'/images/own.qcow2'; allowed: one of them"]


@pytest.mark.parametrize(("node", "key", "where"), [
    ({"base_image_path": "/etc/shadow"}, "base_image_path", "/etc"),
    ({"virtio_fs_mounts": [{"tag": "all", "host_path": "/", "mount_point": "/host"}]},
     "virtio_fs_mounts[0].host_path", "/"),
    ({"virtio_fs_mounts": [{"tag": "leases", "host_path": "/var/lib/aihow/", "mount_point": "/l"}]},
     "virtio_fs_mounts[0].host_path", "/var/lib/aihow"),
])
def test_system_locations_of_the_host_are_refused_unless_allowed(
        tmp_path: Path, node: dict[str, Any], key: str, where: str) -> None:
    data = base()
    data["clusters"]["hpc"]["controller"] |= node
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, check_images=False)
    assert err.value.problems == [f"clusters.hpc.controller.{key}: '{os.path.normpath(_path_of(node))}' is in "
                                  f"the host's system location {where}; allowed: a path outside it (or set "
                                  "aihow:allowSystemPaths true for this stack)"]
    parse_cluster_file(data, check_images=False, allow_system_paths=True)


def _path_of(node: dict[str, Any]) -> str:
    return str(node.get("base_image_path") or node["virtio_fs_mounts"][0]["host_path"])


def test_relative_host_paths_are_taken_from_the_cluster_files_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "site"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "base.qcow2").write_bytes(b"")
    data = base()
    data["clusters"]["hpc"]["controller"] |= {"base_image_path": "images/base.qcow2", "virtio_fs_mounts": [
        {"tag": "data", "host_path": "../data", "mount_point": "/data"}]}
    path = folder / "clusters.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)  # elsewhere: the file still means the same
    [hpc, _cloud] = plan_all(load_cluster_file(path))
    controller = hpc.vms[0]
    assert controller.base_image == str(folder / "images" / "base.qcow2")
    assert controller.mounts[0].host_path == str(tmp_path / "data")


BAD_TWICE = """\
clusters:
  hpc:
    name: hpc
    network: {subnet: 10.1.0.0/24, bridge: br-hpc}
    controller: {cpu_cores: 1, memory_gb: 1, disk_gb: 1, ip_address: 10.1.0.10}
    compute_nodes:
      - cpu_cores: 1
        memory_gb: lots
        disk_gb: 1
        ip: 10.1.0.10
        memroy_gb: 2
"""


def test_type_errors_and_errors_across_keys_come_in_one_pass_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_TWICE)
    with pytest.raises(ConfigError) as err:
        load_cluster_file(path, check_images=False)
    node = "clusters.hpc.compute_nodes[0]"
    assert err.value.located() == [
        f"{path}:8: {node}.memory_gb: 'lots' is invalid; allowed: a valid integer",
        f"{path}:10: {node}.ip: '10.1.0.10' is already used by clusters.hpc.controller; allowed: one VM per address",
        f"{path}:11: {node}.memroy_gb: unknown key 'memroy_gb'; did you mean 'memory_gb'?",
    ]
    assert str(err.value).startswith(f"invalid cluster file {path}: 3 problems; first: line 8: {node}.memory_gb")


def test_a_value_no_placeholder_can_stand_for_leaves_only_the_errors_of_single_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_TWICE.replace("ip: 10.1.0.10", "ip: ten"))
    with pytest.raises(ConfigError) as err:
        load_cluster_file(path, check_images=False)
    assert [line for line in err.value.lines] == [8, 10, 11]
    assert "is already used" not in err.value.report()


def test_an_unknown_key_is_answered_with_the_keys_of_its_own_level(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text('version: "1.0"\nabout: x\nclusters:\n  hpc:\n    name: h\n'
                    "    network: {subnet: 10.99.1.0/24, bridge: hb0, count: 3}\n"
                    "    controller: {cpu_core: 1, memory_gb: 1, disk_gb: 2, ip_address: 10.99.1.10}\n")
    with pytest.raises(ConfigError) as err:
        load_cluster_file(path)
    # In file order; a misspelt required key is one mistake, not also a missing one.
    assert err.value.located() == [
        f"{path}:2: about: unknown key 'about'; allowed here: clusters, global, hosts, metadata, version",
        f"{path}:6: clusters.hpc.network.count: unknown key 'count'; allowed here: bridge, dhcp_end, dhcp_start, "
        "dns_servers, forward_mode, gateway_ip, subnet",
        f"{path}:7: clusters.hpc.controller.cpu_core: unknown key 'cpu_core'; did you mean 'cpu_cores'?"]
    path.write_text("")
    with pytest.raises(ConfigError) as err:
        load_cluster_file(path)
    assert err.value.located() == [f"{path}: (top level): the file is empty; allowed: a YAML mapping with 'clusters'"]


def test_a_mistake_in_slurm_config_does_not_hide_another() -> None:
    """The default partition is checked against the list as a field of its own: a bad time
    beside it does not hide it (both are said in one run)."""
    data = base()
    data["clusters"]["hpc"]["slurm_config"] = {"partitions": ["compute", "gpu"], "default_partition": "nope",
                                               "max_job_time": "one day"}
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data)
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert any(p.startswith("clusters.hpc.slurm_config.default_partition: 'nope' is not in partitions "
                            "['compute', 'gpu']; allowed: one of them") for p in problems), problems
    assert any(p.startswith("clusters.hpc.slurm_config.max_job_time: 'one day' is not a SLURM time") for p in problems)


def on_two_hosts() -> dict[str, Any]:
    """``base()`` with the HPC cluster on host a and the Cloud cluster on host b, both using the
    same bridge name and subnet (each host has its own)."""
    data = base()
    data["hosts"] = {"a": {"uri": "qemu+ssh://root@a/system"}, "b": {"uri": "qemu+tcp://b/system"}}
    data["clusters"]["hpc"]["host"] = "a"
    data["clusters"]["cloud"]["host"] = "b"
    data["clusters"]["cloud"]["network"] = dict(data["clusters"]["hpc"]["network"])
    cloud = data["clusters"]["cloud"]
    cloud["control_plane"]["ip_address"] = "10.1.0.10"
    for index, worker in enumerate(cloud["worker_nodes"]):
        worker["ip"] = f"10.1.0.{11 + index}"
    return data


def test_clusters_on_two_hosts_may_repeat_bridges_subnets_and_gpu_addresses() -> None:
    hpc, cloud = plan_all(parse_cluster_file(on_two_hosts(), env={}))
    assert (hpc.host, hpc.host_uri, cloud.host, cloud.host_uri) == (
        "a", "qemu+ssh://root@a/system", "b", "qemu+tcp://b/system")
    assert (hpc.bridge, hpc.subnet) == (cloud.bridge, cloud.subnet)
    # 0000:01:00.0 on host a and on host b are two GPUs: nothing is shared.
    assert shared_devices([hpc, cloud]) == []
    # On one named host, the same file is refused as on one machine.
    data = on_two_hosts()
    data["clusters"]["cloud"]["host"] = "a"
    with pytest.raises(ConfigError) as err:
        parse_cluster_file(data, env={})
    assert "clusters.cloud.network.bridge: 'br-hpc' equals clusters.hpc.network.bridge" in err.value.report()
    # A cluster placed by its stack setting alone may be on the other's host: still one machine.
    data = base()
    data["hosts"] = {"a": {"uri": "qemu+ssh://root@a/system"}}
    data["clusters"]["hpc"]["host"] = "a"
    assert [s.address for s in shared_devices(plan_all(parse_cluster_file(data, env={})))] == ["0000:01:00.0"]


def test_a_hosts_uri_is_spelt_one_way() -> None:
    data = base()
    data["hosts"] = {"here": {"uri": "qemu+unix:///system"}}
    data["clusters"]["hpc"]["host"] = "here"
    assert plan_all(parse_cluster_file(data, env={}))[0].host_uri == "qemu:///system"


def test_the_file_and_the_stack_place_a_cluster_once() -> None:
    hpc = plan_all(parse_cluster_file(on_two_hosts(), env={}))[0]
    unset = parse_settings({"clusterFile": "c.yaml"})
    assert placed(unset, hpc).libvirt_uri == "qemu+ssh://root@a/system"
    same = parse_settings({"clusterFile": "c.yaml", "libvirtUri": "qemu+ssh://root@a/system"})
    assert placed(same, hpc) == same
    other = parse_settings({"clusterFile": "c.yaml", "libvirtUri": "qemu:///system"})
    with pytest.raises(ConfigError) as err:
        placed(other, hpc, "stack hpc")
    assert err.value.problems == [
        "aihow:libvirtUri: 'qemu:///system', but clusters.hpc.host places the cluster on 'a' "
        "(qemu+ssh://root@a/system); allowed: one place for a cluster (remove aihow:libvirtUri, or clusters.hpc.host)"]
    # Placed by nothing in the file: the stack's setting, whatever it is.
    plain = plan_all(parse_cluster_file(base(), env={}))[0]
    assert placed(other, plain) is other
    assert by_host([hpc, plain], "qemu:///system") == {"qemu+ssh://root@a/system": [hpc], "qemu:///system": [plain]}


def test_a_cluster_spread_over_hosts_on_one_bridge_is_valid_and_each_node_knows_its_host() -> None:
    data = on_one_lan(f"{NODE}.host", "gpu2")
    data["hosts"] = {"gpu2": {"uri": "qemu+ssh://root@gpu2/system"}}
    hpc = plan_all(parse_cluster_file(data, env={}))[0]
    assert hpc.spread and hpc.host is None
    assert [(vm.short_name, vm.host, vm.host_uri) for vm in hpc.vms] == [
        ("controller", None, None), ("compute-01", "gpu2", "qemu+ssh://root@gpu2/system")]
    groups = by_host([hpc], "qemu:///system")
    assert {uri: [vm.short_name for plan in plans for vm in plan.vms] for uri, plans in groups.items()} == {
        "qemu:///system": ["controller"], "qemu+ssh://root@gpu2/system": ["compute-01"]}
    # The GPU of compute-01 (on gpu2) and of the Cloud GPU worker (on the stack's host, which may
    # be gpu2 too) may be one device: still reported as shared.
    assert [s.address for s in shared_devices(plan_all(parse_cluster_file(data, env={})))] == ["0000:01:00.0"]

"""Every file the project generates, over a corpus of cluster files, read by its real consumer:
seeds by the images' cloud-init, slurm.conf by the images' slurmctld, domain and network XML by
libvirtd (defined, then undefined), and the Kubernetes files free of empty values. A cluster file
``validate`` accepts must give files its consumers accept (tests/consumers.py says how each runs).

A new generated file joins here with its consumer; a new case joins ``CORPUS``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from aihow_infra.cloudinit import seed_files
from aihow_infra.components import acceleration_args, network_args, seed_spec
from aihow_infra.errors import ConfigError
from aihow_infra.hostcheck import check_subnets
from aihow_infra.images import KUBERNETES_NODE_FILES, kubernetes_node_files, recipe_for
from aihow_infra.inventory import build_inventory
from aihow_infra.kubebins import ensure_binaries
from aihow_infra.kubepki import Cluster, ensure
from aihow_infra.libvirt.render import domain_xml, network_xml
from aihow_infra.loading import load_cluster_file
from aihow_infra.plan import ClusterPlan, VmPlan, plan_all
from tests.consumers import READ_ALL, cloud_init, containerd_reads, rendered_templates, slurmctld_reads

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "fixtures" / "cases"
# The shipped examples, and every case of tests/fixtures/cases that validate accepts.
CORPUS = sorted([*(ROOT / "config").glob("*.yaml"), *(CASES / n for n in (
    "nat-static.yaml", "dhcp-nodes.yaml", "hugepages-virtiofs.yaml", "mac-fe.yaml", "ip-change-before.yaml",
    "ip-change-after.yaml", "gpu-group-with-nvme.yaml"))])
# slurmctld checks its power programs after reading the file, before it says this.
POWER_JUDGED = "Running as primary controller"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtestkeytestkeytestkeytestkeytestkeytestkey test"


def made(plan: ClusterPlan, folder: Path) -> dict[str, Any]:
    """What earlier tasks registered for the nodes' files: the munge key as the raw command prints
    it (base64); the certificates and kubeconfigs as the ``aihow_kube_pki`` action gives them,
    made in ``folder``."""
    if plan.key == "hpc":
        return {"munge": {"stdout_lines": ["a2V5"]}}
    control = next(vm for vm in plan.vms if vm.role == "control-plane")
    workers = tuple(vm.name for vm in plan.vms if vm.role != "control-plane")
    pki = ensure(folder, Cluster(plan.name, control.name, str(control.ip), plan.service_subnet, workers))
    files = {control.name: pki.control_plane_files(), **{w: pki.worker_files(w) for w in workers}}
    return {"pki": {"files": {node: [{"dest": dest, "content": text, "mode": "0600"} for dest, text in got.items()]
                              for node, got in files.items()}}}


# What a value left empty by a template looks like: a flag or key with nothing after it, a port
# without its host, a prefix length without its address.
EMPTY_VALUES = (re.compile(r"--[a-z-]+=(\s|$|[\"'])"), re.compile(r"^\s*[A-Za-z]+: *(\"\"|'')\s*$"),
                re.compile(r"(^|[\s\"'=,\[])(:\d+)\b"), re.compile(r"(^|[\s\"'=,\[])/\d{1,2}\b"))


def plans(path: Path) -> list[ClusterPlan]:
    return plan_all(load_cluster_file(path, check_images=False, allow_system_paths=True))


def vms() -> Iterator[Any]:
    for path in CORPUS:
        for plan in plans(path):
            for vm in plan.vms:
                yield pytest.param(path, plan.key, vm.name, id=f"{path.stem}:{vm.name}")


def node_outputs(plan: ClusterPlan, vm: VmPlan, started: bool = False) -> dict[str, Any]:
    """What the stack's Node component outputs for a VM (aihow_infra/components.py): running, or
    off when it is on demand and not ``started``."""
    off = vm.on_demand and not started
    return {"name": vm.name, "cluster": vm.cluster_name, "cluster_key": vm.cluster_key, "role": vm.role,
            "short_name": vm.short_name, "ip": vm.ip, "pod_subnet": vm.pod_subnet, "mac": vm.mac,
            "vcpus": vm.cpu_cores, "memory_gb": vm.memory_gb, "disk_gb": vm.disk_gb,
            "gpus": [{"address": c.address, "functions": list(c.functions), "vendor_id": c.vendor_id,
                      "device_id": c.device_id} for c in vm.claims if c.is_gpu],
            "on_demand": vm.on_demand, "power_state": "stopped" if off else "running",
            "desired_power": "stopped" if off else "running", "login_user": "aihow"}


def inventory(plan: ClusterPlan, started: bool = False) -> dict[str, Any]:
    """The stack's inventory at its first deploy (on-demand VMs off), or with every VM ``started``."""
    cluster = {"name": plan.name, "key": plan.key, "slurm_partitions": list(plan.partitions),
               "slurm_max_time": plan.max_job_time, "slurm_suspend_time": plan.suspend_time,
               "slurm_resume_timeout": plan.resume_timeout, "pod_subnet": plan.pod_subnet,
               "service_subnet": plan.service_subnet}
    return build_inventory({"cluster": cluster, "nodes": {vm.name: node_outputs(plan, vm, started)
                                                          for vm in plan.vms}}, plan.key)


def the_vm(path: Path, key: str, name: str) -> tuple[ClusterPlan, VmPlan]:
    plan = next(p for p in plans(path) if p.key == key)
    return plan, plan.vm(name)


@pytest.mark.parametrize(("path", "key", "name"), list(vms()))
def test_cloud_init_takes_every_seed(path: Path, key: str, name: str) -> None:
    plan, vm = the_vm(path, key, name)
    files = seed_files(seed_spec(vm, plan, "aihow", KEY))
    rendered = cloud_init("network-config", files["network-config"])
    assert f"MACAddress={vm.mac}" in rendered
    if vm.dhcp:
        assert "DHCP=ipv4" in rendered
    else:
        assert f"Address={vm.ip}/" in rendered
    if plan.forward_mode == "nat" and not vm.dhcp:
        assert "Destination=0.0.0.0/0" in rendered and f"Gateway={plan.gateway}" in rendered
    assert cloud_init("user-data", files["user-data"]).strip() == "valid"


@pytest.mark.parametrize("path", [p for p in CORPUS if any(pl.key == "hpc" for pl in plans(p))],
                         ids=lambda p: p.stem)
def test_slurmctld_reads_every_slurm_conf(path: Path, tmp_path: Path) -> None:
    """With on-demand nodes, slurmctld also judges its power programs (installed as the playbook
    writes them) before it runs as the primary controller: power saving is on, not disabled."""
    plan = next(p for p in plans(path) if p.key == "hpc")
    rendered = rendered_templates(ROOT / "ansible/hpc.yml", inventory(plan), made(plan, tmp_path))
    files = {dest: text for host, dest, text in rendered if host == "controller"}
    conf = files["/etc/slurm/slurm.conf"]
    assert not re.search(r"=(\s|$)", conf), f"an empty value in slurm.conf:\n{conf}"
    on_demand = [vm.name for vm in plan.vms if vm.on_demand]
    programs = {dest: text for dest, text in files.items() if dest.startswith("/usr/local/sbin/")}
    log = slurmctld_reads(conf, tmp_path, programs, POWER_JUDGED if on_demand else READ_ALL)
    for partition in plan.partitions:
        assert f"PartitionName={partition} " in conf
    assert f"MaxTime={plan.max_job_time} " in conf
    assert "started on cluster" in log
    assert "power_save" not in log, log
    for vm in plan.vms:
        if vm.role == "compute":
            assert f"NodeName={vm.name} " in conf and (" State=CLOUD" in conf.split(f"NodeName={vm.name} ")[1]
                                                       .splitlines()[0]) == vm.on_demand
    assert ("ResumeProgram=/usr/local/sbin/aihow-power-resume" in conf) == bool(on_demand)
    if on_demand:
        assert f"SuspendTime={plan.suspend_time}\n" in conf and f"ResumeTimeout={plan.resume_timeout}\n" in conf
        assert set(programs) == {f"/usr/local/sbin/aihow-power-{a}" for a in ("resume", "suspend", "resume-fail")}


@pytest.mark.parametrize("path", [p for p in CORPUS if any(pl.key == "cloud" for pl in plans(p))],
                         ids=lambda p: p.stem)
def test_kubernetes_files_have_no_empty_values(path: Path, tmp_path: Path) -> None:
    plan = next(p for p in plans(path) if p.key == "cloud")
    # On-demand workers as the deploy that follows the broker's start of them sees them: running.
    rendered = list(rendered_templates(ROOT / "ansible/cloud.yml", inventory(plan, started=True),
                                       made(plan, tmp_path)))
    control = next(vm for vm in plan.vms if vm.role == "control-plane")
    assert {(h, d) for h, d, _t in rendered} >= {(control.short_name, "/etc/kubernetes/pki/apiserver.crt"),
                                                 (control.short_name, "/var/lib/kubelet/config.yaml")}
    for host, dest, text in rendered:
        if text.startswith("-----BEGIN "):  # a certificate or key: random base64 that no template fills
            continue
        empty = [line for line in text.splitlines() if any(p.search(line) for p in EMPTY_VALUES)]
        assert not empty, f"{host} {dest}: empty values:\n" + "\n".join(empty)
    workers = {vm.short_name for vm in plan.vms if vm.role != "control-plane"}
    for worker in workers:
        assert {d for h, d, _t in rendered if h == worker} >= {"/etc/kubernetes/kubelet.conf",
                                                               "/etc/kubernetes/pki/ca.crt",
                                                               "/etc/systemd/system/kubelet.service"}
        assert not {d for h, d, _t in rendered if h == worker and "kube-apiserver" in d}, "a control-plane role ran"
    apiserver = next(t for h, d, t in rendered if h == control.short_name and d.endswith("kube-apiserver.service"))
    assert f"--advertise-address={control.ip} " in apiserver


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


def _image_free_props(vm: VmPlan, plan: ClusterPlan, tmp: Path) -> dict[str, Any]:
    """The domain's inputs as the Node component gives them (images not needed: a blank disk path)."""
    return {"name": f"aihow-consumer-{vm.name}"[:60], "stack": "consumers", "cluster": vm.cluster_name,
            "role": vm.role, "vcpus": vm.cpu_cores, "memory_mib": vm.memory_gb * 1024,
            "disk_path": str(tmp / f"{vm.name}.qcow2"), "seed_path": str(tmp / f"{vm.name}-seed.iso"),
            "console_log": str(tmp / f"{vm.name}.log"), "mac": vm.mac, "network": plan.network_name,
            "devices": [], "acceleration": acceleration_args(vm),
            "mounts": [{"tag": m.tag, "host_path": m.host_path} for m in vm.mounts], "graphics": "none"}


@pytest.mark.parametrize(("path", "key", "name"), list(vms()))
def test_libvirtd_defines_every_domain(libvirtd: libvirt.virConnect, path: Path, key: str, name: str,
                                       tmp_path: Path) -> None:
    plan, vm = the_vm(path, key, name)
    xml = domain_xml(_image_free_props(vm, plan, tmp_path), "qemu")
    dom = libvirtd.defineXML(xml)
    try:
        assert dom.name().startswith("aihow-consumer-")
    finally:
        dom.undefine()


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_libvirtd_defines_every_network(libvirtd: libvirt.virConnect, path: Path) -> None:
    """Defined, not started (a host bridge need not exist to be named); libvirt keeps a reservation
    per VM, or on a host bridge none, and no address of its own there."""
    for plan in plans(path):
        props = {**network_args(plan, "qemu:///system", "consumers"), "name": f"aihow-consumer-{plan.key}",
                 "bridge": f"aihowc-{plan.key}"}
        net = libvirtd.networkDefineXML(network_xml(dict(props)))
        try:
            defined = net.XMLDesc(0)
            hosts = re.findall(r"<host mac='([0-9a-f:]+)'", defined)
            assert sorted(hosts) == ([] if plan.forward_mode == "bridge" else sorted(vm.mac for vm in plan.vms))
            assert (f"<forward mode='{plan.forward_mode}'" in defined) == (plan.forward_mode != "isolated")
            assert ("<ip " in defined) == (plan.forward_mode != "bridge")
        finally:
            net.undefine()


def test_the_corpus_has_every_accepted_case() -> None:
    """A case added to tests/fixtures/cases that validate accepts belongs in the corpus."""
    accepted = set()
    for path in CASES.glob("*.yaml"):
        try:
            # libvirt's test driver has the stock 'default' network (192.168.122.0/24), as a new host has.
            check_subnets(plan_all(load_cluster_file(path)), "test:///default", path)
        except ConfigError:  # refused cases are tested in test_cases.py
            continue
        accepted.add(path)
    missing = sorted(p.name for p in accepted - set(CORPUS))
    assert not missing, f"accepted but not in CORPUS: {missing}"
    assert shutil.which("unshare"), "util-linux's unshare runs slurmctld in a namespace of its own"


def test_containerd_reads_its_config_as_the_nodes_need_it(tmp_path: Path) -> None:
    """Debian's containerd takes the file and applies what the nodes count on: systemd cgroups (the
    kubelet's cgroupDriver), the pause image the image carries, Debian's CNI plugins."""
    plan = next(p for p in plans(ROOT / "config" / "default.yaml") if p.key == "cloud")
    text = next(t for _h, d, t in rendered_templates(ROOT / "ansible/cloud.yml", inventory(plan),
                                                     made(plan, tmp_path)) if d == "/etc/containerd/config.toml")
    dumped = containerd_reads(text, tmp_path)
    for line in ('sandbox_image = "localhost/aihow/pause:image"', "SystemdCgroup = true",
                 'bin_dir = "/usr/lib/cni"', 'conf_dir = "/etc/cni/net.d"'):
        assert line in dumped, line


def test_the_cloud_image_carries_the_node_files_byte_for_byte_as_the_roles_write_them(tmp_path: Path) -> None:
    """What the cloud image bakes in (``images.KUBERNETES_NODE_FILES``) is what the roles write on
    every node, to the byte: a node of that image finds them in place on its first deploy, and
    nothing is rewritten or restarted for them."""
    plan = next(p for p in plans(ROOT / "config" / "default.yaml") if p.key == "cloud")
    assert recipe_for("cloud").kubernetes_node_files
    baked = kubernetes_node_files()
    rendered = list(rendered_templates(ROOT / "ansible/cloud.yml", inventory(plan, started=True),
                                       made(plan, tmp_path)))
    hosts = {host for host, _d, _t in rendered}
    assert hosts == {vm.short_name for vm in plan.vms}
    node_files = [(host, dest, text) for host, dest, text in rendered if dest in KUBERNETES_NODE_FILES]
    assert {(host, dest) for host, dest, _t in node_files} == {(h, d) for h in hosts for d in KUBERNETES_NODE_FILES}
    for host, dest, text in node_files:
        assert text == baked[dest], f"{host} {dest}: the image's file differs from the role's"


def test_every_kubernetes_unit_is_accepted_by_its_binary(tmp_path: Path) -> None:
    """Each service's command line (etcd, the API server, the controller manager, the scheduler,
    the kubelet, kube-proxy), as the roles render it, parsed by the binary the image carries:
    ``--version`` after the flags makes it parse them all and stop, refusing an unknown or
    malformed one (checked: an unknown flag fails)."""
    binaries = ensure_binaries()
    plan = next(p for p in plans(ROOT / "config" / "default.yaml") if p.key == "cloud")
    seen = set()
    rendered = list(rendered_templates(ROOT / "ansible/cloud.yml", inventory(plan), made(plan, tmp_path)))
    for host, dest, text in rendered:
        start = re.search(r"^ExecStart=(?:/usr/local/sbin/aihow-after-api-server (\S+) +)?/usr/local/bin/(.*)$",
                          text.replace("\\\n", " "), re.M)
        if not dest.startswith("/etc/systemd/system/") or not start:
            continue
        waits_with, (name, *flags) = start.group(1), shlex.split(start.group(2))
        seen.add(name)
        # The wait before the controller manager asks as its own client, with a file its node has.
        assert (waits_with is not None) == (name == "kube-controller-manager"), f"{host} {dest}"
        assert waits_with is None or (f"--kubeconfig={waits_with}" in flags
                                      and (host, waits_with) in {(h, d) for h, d, _t in rendered}), f"{host} {dest}"
        for extra, accepted in (([], True), (["--no-such-flag"], False)):
            done = subprocess.run([str(binaries.path(name)), *flags, *extra, "--version"], capture_output=True,
                                  text=True, timeout=60, check=False)
            assert (done.returncode == 0) == accepted, f"{host} {dest}: {done.stderr[-1500:]}"
    assert seen == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"}

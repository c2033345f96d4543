"""Host checks against recorded hosts laid out as sysfs and /proc under a folder."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml

from aihow_infra import hostcheck
from aihow_infra.errors import ConfigError
from aihow_infra.host import Host, VirtChoice, choose_virt_type
from aihow_infra.hostcheck import check_bridges, check_devices_through_libvirt, check_host, check_resume_timeout
from aihow_infra.hostrecord import load_recording, materialize
from aihow_infra.libvirt import identity
from aihow_infra.libvirt.inspect import interface_addresses
from aihow_infra.loading import load_cluster_file, parse_cluster_file
from aihow_infra.plan import plan_all
from tests.cli import run_task
from tests.samples import base

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
READY = FIXTURES / "ready-host-sysfs.json"
# The live recording of a real H200 host (shared/fixtures), kept with the tests so that a lone
# clone has it.
H200 = FIXTURES / "gpu-host-h200-live.json"


def cluster_file(tmp_path: Path, devices: list[dict[str, Any]]) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"clusters": {"hpc": {
        "name": "hpc", "network": {"subnet": "10.1.0.0/24", "bridge": "br-hpc"},
        "controller": {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip_address": "10.1.0.10"},
        "compute_nodes": [{"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip": "10.1.0.11",
                           "pcie_passthrough": {"enabled": True, "devices": devices}}]}}}))
    return str(path)


def failures(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.checks if not c.ok}


def test_h200_host_is_not_ready_and_says_why(tmp_path: Path) -> None:
    root = materialize(load_recording(H200), tmp_path / "root")
    config = cluster_file(tmp_path, [{"pci_address": "0000:00:06.0", "device_type": "gpu",
                                      "vendor_id": "10de", "device_id": "2335"}])
    report = check_host(root, [config])
    assert not report.ready
    failed = failures(report)
    assert set(failed) == {"iommu", "device 0000:00:06.0 (hpc-compute-01) iommu group", "acceleration"}
    assert failed["acceleration"].verdict == "WARN" and "kvm_pvm" in failed["acceleration"].detail
    assert "no IOMMU groups" in failed["iommu"].detail and "intel_iommu=on" in failed["iommu"].fix
    # The H200 host is itself a VM (a cloud instance): no firmware switch, its hypervisor's IOMMU.
    assert failed["iommu"].fix.startswith("this host is itself a VM: give it a virtual IOMMU from its hypervisor")
    # A recording's homes are in its own host's ledger: any driver passes; vfio-pci is loaded on demand.
    driver = next(c for c in report.checks if c.name == "device 0000:00:06.0 (hpc-compute-01) driver")
    assert driver.ok and driver.detail.startswith("on nvidia (its home is in that host's GPU lease ledger)")
    vfio = next(c for c in report.checks if c.name == "vfio")
    assert vfio.ok and vfio.detail.endswith("libvirt loads it when a VM that passes a device through starts")
    # On this host with no home set, nvidia is home; kept on vfio-pci instead, it is not home, and
    # the fix binds it (and vfio-pci must be loaded).
    driver = next(c for c in check_host(root, [config], homes={}).checks if c.name.endswith("driver"))
    assert driver.ok and driver.detail.startswith("at home on nvidia (home: host)")
    kept = failures(check_host(root, [config], homes={"0000:00:06.0": "vfio-pci"}))
    driver = kept["device 0000:00:06.0 (hpc-compute-01) driver"]
    assert driver.detail == "bound to nvidia (home: vfio-pci)"
    assert "/sys/bus/pci/drivers/nvidia/unbind" in driver.fix and "aihow gpu.home 0000:00:06.0" in driver.fix
    assert kept["vfio"].verdict == "FAIL" and "modprobe vfio-pci" in kept["vfio"].fix
    passed = {c.name: c.detail for c in report.checks if c.ok}
    assert {"kvm", "device 0000:00:06.0 (hpc-compute-01) ids"} <= set(passed)
    assert passed["device 0000:00:06.0 (hpc-compute-01) reset"] == "reset by flr"


def test_ready_host_is_ready(tmp_path: Path) -> None:
    root = materialize(load_recording(READY), tmp_path / "root")
    config = cluster_file(tmp_path, [
        {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de", "device_id": "2684"},
        {"pci_address": "0000:01:00.1", "device_type": "audio", "vendor_id": "10de", "device_id": "22ba"}])
    report = check_host(root, [config])
    assert report.ready, [c for c in report.checks if not c.ok]
    assert report.to_dict()["ready"] is True


def test_a_host_without_kvm_is_warned_but_ready(tmp_path: Path) -> None:
    # Software emulation runs the same VMs, only slower (the GPU-host simulator is such a host).
    recording = copy.deepcopy(load_recording(READY))
    recording["dev_kvm"] = False
    config = cluster_file(tmp_path, [
        {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de", "device_id": "2684"},
        {"pci_address": "0000:01:00.1", "device_type": "audio", "vendor_id": "10de", "device_id": "22ba"}])
    report = check_host(materialize(recording, tmp_path / "root"), [config])
    kvm = next(c for c in report.checks if c.name == "kvm")
    assert kvm.verdict == "WARN" and "software emulation" in kvm.detail and "modprobe kvm_intel" in kvm.fix
    assert report.ready


def test_a_device_without_a_reset_method_is_warned_and_told_what_to_do(tmp_path: Path) -> None:
    """The kernel resets a function between VMs by one of its ``reset_method``s; with none, the
    next VM gets it as the last one left it. The VMs still start: a warning, not a failure."""
    recording = copy.deepcopy(load_recording(READY))
    recording["pci_devices"]["0000:01:00.0"]["reset_method"] = "flr bus"
    config = cluster_file(tmp_path, [
        {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de", "device_id": "2684"},
        {"pci_address": "0000:01:00.1", "device_type": "audio", "vendor_id": "10de", "device_id": "22ba"}])
    report = check_host(materialize(recording, tmp_path / "root"), [config])
    checks = {c.name: c for c in report.checks}
    assert checks["device 0000:01:00.0 (hpc-compute-01) reset"].detail == "reset by flr, bus"
    audio = checks["device 0000:01:00.1 (hpc-compute-01) reset"]
    assert audio.verdict == "WARN" and audio.detail.startswith("has no reset method")
    assert "alone behind its bridge" in audio.fix and "0000:01:00.1/reset_method" in audio.fix
    assert report.ready
    # A host (or a recording) where no function shows a reset method says it does not know.
    unknown = check_host(materialize(load_recording(READY), tmp_path / "older"), [config])
    gpu = next(c for c in unknown.checks if c.name == "device 0000:01:00.0 (hpc-compute-01) reset")
    assert (gpu.verdict, gpu.detail) == ("WARN", "reset method unknown: no device of this host shows one")
    assert "lspci -vv -s 0000:01:00.0" in gpu.fix


def test_group_member_on_another_driver_wrong_ids_and_missing_device(tmp_path: Path) -> None:
    recording = copy.deepcopy(load_recording(READY))
    recording["pci_devices"]["0000:01:00.1"]["driver"] = "snd_hda_intel"
    root = materialize(recording, tmp_path / "root")
    config = cluster_file(tmp_path, [
        {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de", "device_id": "2805"},
        {"pci_address": "0000:09:00.0", "device_type": "network"}])
    failed = failures(check_host(root, [config]))
    group = failed["device 0000:01:00.0 (hpc-compute-01) iommu group 14"]
    assert "0000:01:00.1 (snd_hda_intel)" in group.detail
    assert "/sys/bus/pci/drivers/snd_hda_intel/unbind" in group.fix
    ids = failed["device 0000:01:00.0 (hpc-compute-01) ids"]
    assert ids.detail == "device is 2684 but the cluster file says 2805" and "device_id: '2684'" in ids.fix
    assert failed["device 0000:09:00.0 (hpc-compute-01)"].detail == "not present on this host"


# --- acceleration: which hosts get KVM ------------------------------------------------------


@pytest.mark.parametrize(("modules", "kvm_usable", "wanted", "expected"), [
    (["kvm_intel", "kvm"], True, "auto", ("kvm", "KVM (kvm_intel)")),
    (["kvm_amd", "kvm"], True, "auto", ("kvm", "KVM (kvm_amd)")),
    (["kvm_pvm", "kvm"], True, "auto", ("qemu", "software emulation: /dev/kvm is kvm_pvm, which cannot run a "
                                                "real guest kernel")),
    (["kvm_intel", "kvm"], False, "auto", ("qemu", "software emulation: libvirt reports KVM unusable on this host")),
    (["kvm_pvm"], True, "kvm", ("kvm", "aihow:virtType is kvm")),
    (["kvm_intel"], True, "qemu", ("qemu", "aihow:virtType is qemu")),
])
def test_acceleration_choice(tmp_path: Path, modules: list[str], kvm_usable: bool, wanted: str,
                             expected: tuple[str, str]) -> None:
    recording = {**load_recording(READY), "modules_loaded": modules}
    choice = choose_virt_type(wanted, Host(materialize(recording, tmp_path)), kvm_usable)
    assert (choice.virt_type, choice.reason) == expected


def test_acceleration_on_the_recorded_ready_host(tmp_path: Path) -> None:
    ready = choose_virt_type("auto", Host(materialize(load_recording(READY), tmp_path)), True)
    assert ready == VirtChoice("kvm", "KVM (kvm_intel)")


def test_this_machine_gets_what_its_kvm_can_run() -> None:
    # On kvm_pvm (these CI machines) a guest kernel crashes under KVM: auto must say TCG.
    choice = choose_virt_type("auto", Host(Path("/")), True)
    assert (choice.virt_type == "qemu") == Path("/sys/module/kvm_pvm").exists(), choice


def test_host_check_task_gives_the_recorded_h200_its_verdicts(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    """Nothing in the example needs passthrough: IOMMU and VFIO are 'not needed', the host is
    ready. With the H200 configured, they fail, and each fix is printed whole, on one line."""
    code, out, _err = run_task(capsys, "host.check", "--recorded", str(H200), "--config",
                               str(ROOT / "config" / "default.yaml"))
    assert code == 0, out
    assert "not needed iommu: no IOMMU groups: the IOMMU is off" in out.splitlines()
    assert "not needed vfio: vfio_pci is not loaded" in out.splitlines()
    assert "ok kvm: /dev/kvm present" in out.splitlines() and "FAIL" not in out

    config = cluster_file(tmp_path, [{"pci_address": "0000:00:06.0", "device_type": "gpu",
                                      "vendor_id": "10de", "device_id": "2335"}])
    code, out, _err = run_task(capsys, "host.check", "--recorded", str(H200), "--config", config)
    assert code == 1
    lines = out.splitlines()
    assert "ok device 0000:00:06.0 (hpc-compute-01) driver: on nvidia (its home is in that host's GPU lease " \
           "ledger); libvirt binds it to vfio-pci when its VM starts" in lines
    assert "FAIL device 0000:00:06.0 (hpc-compute-01) iommu group: has no IOMMU group" in lines
    assert "     fix: turn the IOMMU on (see the iommu check)" in lines
    assert lines[-1] == "not ready"


@pytest.mark.parametrize(("args", "message"), [
    (["--sysfs-root", "{fixture}"], "--sysfs-root: {fixture} is a file; allowed: a folder laid out as /sys and "
                                    "/proc (a recorded host's JSON is --recorded FILE)"),
    (["--sysfs-root", "/nonexistent/root"], "--sysfs-root: /nonexistent/root does not exist; allowed: a folder "
                                            "laid out as /sys and /proc"),
    (["--recorded", "/nonexistent.json"], "--recorded: /nonexistent.json does not exist; allowed: a recorded "
                                          "host's JSON file"),
    (["--recorded", "{config}"], "--recorded: {config} is not JSON"),
])
def test_host_check_task_refuses_what_is_not_a_host(capsys: pytest.CaptureFixture[str], args: list[str],
                                                    message: str) -> None:
    names = {"fixture": str(H200), "config": str(ROOT / "config" / "default.yaml")}
    code, out, err = run_task(capsys, "host.check", "--config", names["config"],
                              *[a.format(**names) for a in args])
    assert code == 1 and out == ""
    assert err.startswith(f"error: {message.format(**names)}") and len(err.splitlines()) == 1


@pytest.mark.parametrize(("size", "kib", "reserved", "ready"), [("1G", 1048576, 0, False), ("1G", 1048576, 2, True),
                                                               ("2M", 2048, 1000, False), ("2M", 2048, 1024, True)])
def test_hugepage_backed_memory_needs_the_pool_reserved(tmp_path: Path, size: str, kib: int, reserved: int,
                                                        ready: bool) -> None:
    """What validate accepts works: VMs backed by hugepages start only when the host's pool of
    that size holds their memory (here two 1 GiB VMs)."""
    root = materialize(load_recording(READY), tmp_path / "root")
    pool = root / f"sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"
    pool.parent.mkdir(parents=True, exist_ok=True)
    pool.write_text(f"{reserved}\n")
    path = Path(cluster_file(tmp_path, []))
    data = yaml.safe_load(path.read_text())
    data["clusters"]["hpc"]["hardware"] = {"acceleration": {"performance": {"enable_hugepages": True,
                                                                            "hugepage_size": size}}}
    path.write_text(yaml.safe_dump(data))
    check = next(c for c in check_host(root, [path]).checks if c.name == f"hugepages {size}")
    need = 2 * 1048576 // kib
    assert check.ok == ready
    assert check.detail == f"{reserved} pages of {size} reserved; {need} needed for the memory of hpc-controller, " \
                           "hpc-compute-01"
    assert (check.fix.startswith(f"echo {need} > /sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages")
            if not ready else check.fix == "")


def test_libvirtd_is_checked_at_each_uri_the_stacks_name() -> None:
    """``aihow:libvirtUri`` decides where the VMs go, so that daemon is the one that must answer."""
    missing = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    checks = [c for c in check_host(Path("/"), [], ["test:///default", missing]).checks if c.name == "libvirtd"]
    assert [(c.ok, c.detail.split(" (")[0]) for c in checks] == [(True, "test:///default answers"),
                                                                (False, f"{missing} does not answer")]
    assert "aihow:libvirtUri" in checks[1].fix


def test_validate_reads_the_stacks_cluster_files_from_any_folder(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack's relative clusterFile is the project folder's, wherever `aihow` runs."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_task(capsys, "validate")
    assert code == 0, out + err
    assert f"{ROOT / 'config' / 'default.yaml'}: valid" in " ".join(out.split())


def test_the_installed_command_runs_from_any_folder(tmp_path: Path) -> None:
    """`aihow` as bootstrap installs it (the console script of an editable install) finds the
    tasks and the library from any folder, with nothing on PYTHONPATH."""
    command = Path(sys.executable).parent / "aihow"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = subprocess.run([str(command), "validate"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"{ROOT / 'config' / 'default.yaml'}: valid" in " ".join(ran.stdout.split())


def test_an_error_prints_the_operators_values_as_they_are(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    """A value quoted in an error is text: rich's markup ([b]) and emoji codes (:bus:) are not
    applied to it."""
    path = tmp_path / "cluster.yaml"
    path.write_text('clusters:\n  hpc:\n    name: hpc\n    "[b]oops[/b]:bus:": 1\n')
    code, out, err = run_task(capsys, "validate", "--config", str(path))
    assert code == 1 and out == ""
    assert f"error: {path}: clusters.hpc.[b]oops[/b]:bus:: unknown key '[b]oops[/b]:bus:'; allowed here: " in err


def test_validate_refuses_hugepages_the_host_does_not_reserve(tmp_path: Path) -> None:
    """libvirt would refuse to start a VM whose memory the host's hugepages cannot back: the
    check names the key, the VMs, what is reserved and the command that reserves enough."""
    from aihow_infra.errors import ConfigError
    from aihow_infra.hostcheck import check_hugepages
    from aihow_infra.loading import load_cluster_file
    from aihow_infra.plan import plan_all

    path = tmp_path / "cluster.yaml"
    text = Path(ROOT / "tests/fixtures/cases/hugepages-virtiofs.yaml").read_text()
    path.write_text(text)
    (tmp_path / "share").mkdir()
    plans = plan_all(load_cluster_file(path))
    root = materialize({"pci_devices": {}, "iommu_groups": {}}, tmp_path / "host")
    pool = root / "sys/kernel/mm/hugepages/hugepages-1048576kB"
    pool.mkdir(parents=True)
    (pool / "nr_hugepages").write_text("4\n")
    with pytest.raises(ConfigError) as caught:
        check_hugepages(plans, path, root)
    assert caught.value.problems == [
        "clusters.hpc.hardware.acceleration.performance.hugepage_size: '1G' pages back the memory of "
        "hp-hpc-controller, hp-hpc-compute-01, 20 of them, and this host reserves 4; allowed: reserve them first "
        "(echo 20 > "
        "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages (1G pages are surest at boot: add `hugepagesz=1G "
        "hugepages=20` to GRUB_CMDLINE_LINUX, `update-grub`, reboot)), or turn hugepages off"]
    (pool / "nr_hugepages").write_text("20\n")
    check_hugepages(plans, path, root)


def test_a_resume_timeout_shorter_than_a_boot_here_is_refused_with_its_line(tmp_path: Path) -> None:
    """SLURM's ResumeTimeout for on-demand nodes against the boot measured for this host's
    acceleration: under software emulation 215 s, under KVM less."""
    text = (ROOT / "config/example-on-demand.yaml").read_text().replace("resume_timeout: 600", "resume_timeout: 100")
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    plans = plan_all(load_cluster_file(path, check_images=False))
    check_resume_timeout(plans, "kvm", path)
    with pytest.raises(ConfigError) as refused:
        check_resume_timeout(plans, "qemu", path)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "resume_timeout" in row)
    assert refused.value.problems == [
        "clusters.hpc.slurm_config.resume_timeout: 100 seconds is shorter than a compute node's boot under software "
        "emulation on this host (215 s measured); allowed: at least 215, e.g. 900"]
    assert f"line {line}:" in str(refused.value)
    without = plan_all(load_cluster_file(ROOT / "config/default.yaml", check_images=False))
    check_resume_timeout(without, "qemu", path)  # no on-demand node: SLURM never powers one up


def test_a_cluster_on_a_host_bridge_needs_that_bridge_on_the_host() -> None:
    """Read through libvirt's interface API (as for a remote host): libvirt's test driver has one
    interface, eth1, an Ethernet NIC; a real bridge is made on this machine's libvirtd (no address:
    no traffic) and removed."""
    example = ROOT / "config" / "example-host-bridge.yaml"
    plans = plan_all(load_cluster_file(example, check_images=False))
    with pytest.raises(ConfigError) as missing:
        check_bridges(plans, "test:///default", example)
    assert missing.value.problems == [
        f"clusters.{key}.network.bridge: 'br0' is not a bridge the guests can join: the host has no interface 'br0'; "
        "allowed: an existing bridge of that host (forward_mode 'bridge' makes none)" for key in ("hpc", "cloud")]
    assert f"{example}:" in missing.value.report() and ":14:" in missing.value.report()  # the key's line
    on_nic = [dataclasses.replace(plan, bridge="eth1") for plan in plans]
    with pytest.raises(ConfigError, match=r"'eth1' is not a bridge the guests can join: the host's interface 'eth1' "
                                          r"is not a bridge \(libvirt says: ethernet\)"):
        check_bridges(on_nic, "test:///default", example)
    # A node on the host's own address there is refused too (eth1 has 192.168.0.5 in the test driver).
    lan = yaml.safe_load(example.read_text())
    lan["clusters"]["hpc"]["network"] |= {"subnet": "192.168.0.0/24", "bridge": "eth1", "gateway_ip": "192.168.0.1"}
    lan["clusters"]["hpc"]["compute_nodes"][0]["ip"] = "192.168.0.5"
    lan["clusters"]["hpc"]["controller"]["ip_address"] = "192.168.0.50"
    del lan["clusters"]["cloud"]
    with pytest.raises(ConfigError) as taken:
        check_bridges(plan_all(parse_cluster_file(lan, env={})), "test:///default", example)
    assert "clusters.hpc.compute_nodes[0].ip: '192.168.0.5' is the host's own address on bridge 'eth1'; allowed: " \
           "another address of 192.168.0.0/24" in taken.value.problems
    assert interface_addresses("<interface type='bridge' name='br0'><protocol family='ipv4'><ip address='10.0.0.2' "
                               "prefix='24'/></protocol><protocol family='ipv6'><ip address='fe80::1' prefix='64'/>"
                               "</protocol><bridge/></interface>") == ["10.0.0.2"]
    bridge = f"aihowb{os.getpid() % 10**6}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        check_bridges([dataclasses.replace(plan, bridge=bridge) for plan in plans], "qemu:///system", example)
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=True)


def test_validate_says_every_host_problem_at_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A missing bridge does not hide a hugepage shortfall: each host check's lines, in one report."""
    data = yaml.safe_load((ROOT / "config" / "example-host-bridge.yaml").read_text())
    data["clusters"]["hpc"]["hardware"] = {"acceleration": {"performance": {"enable_hugepages": True,
                                                                            "hugepage_size": "1G"}}}
    data["clusters"]["hpc"]["compute_nodes"][0]["memory_gb"] = 512  # more than any host here reserves
    path = tmp_path / "lan.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = run_task(capsys, "validate", "--config", str(path))
    said = " ".join((out + err).split())
    assert code == 1
    assert "clusters.hpc.network.bridge: 'br0' is not a bridge the guests can join" in said
    assert "clusters.cloud.network.bridge: 'br0' is not a bridge the guests can join" in said
    assert "clusters.hpc.hardware.acceleration.performance.hugepage_size: '1G' pages back the memory" in said


def test_validate_checks_each_cluster_on_the_host_the_file_places_it_on(capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts named in the file: each must answer, two names may not reach one machine, and each
    cluster's bridge and subnets are checked on its own host."""
    data = yaml.safe_load((ROOT / "config" / "example-host-bridge.yaml").read_text())
    gone = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    data["hosts"] = {"lab": {"uri": "test:///default"}, "gone": {"uri": gone}}
    data["clusters"]["hpc"]["host"] = "gone"
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = run_task(capsys, "validate", "--config", str(path))
    said = " ".join((out + err).split())
    spelt = gone.replace("qemu+unix://", "qemu://")  # one spelling per daemon
    assert code == 1 and f"hosts.gone.uri: '{spelt}' cannot be reached (" in said
    assert "allowed: a host whose libvirt daemon answers" in said

    data["hosts"]["twin"] = {"uri": "test:///default"}
    data["clusters"]["hpc"]["host"], data["clusters"]["cloud"]["host"] = "lab", "twin"
    path.write_text(yaml.safe_dump(data))
    code, out, err = run_task(capsys, "validate", "--config", str(path))
    said = " ".join((out + err).split())
    assert code == 1 and "hosts.twin.uri: 'test:///default' reaches the same machine as hosts.lab (" in said

    # The same for hosts named on a node only: its host must answer, and be a machine of its own.
    data["clusters"]["cloud"]["host"] = "lab"
    for node_host, expected in (("gone", f"hosts.gone.uri: '{spelt}' cannot be reached ("),
                                ("twin", "hosts.twin.uri: 'test:///default' reaches the same machine as hosts.lab (")):
        data["clusters"]["cloud"]["worker_nodes"]["cpu"][0]["host"] = node_host
        path.write_text(yaml.safe_dump(data))
        code, out, err = run_task(capsys, "validate", "--config", str(path))
        said = " ".join((out + err).split())
        assert code == 1 and expected in said, said
    del data["clusters"]["cloud"]["worker_nodes"]["cpu"][0]["host"]

    # HPC on libvirt's test driver (no bridge there), Cloud on this machine (a bridge made here):
    # each cluster's bridge is looked for on its own host. The test driver runs in this process,
    # so it is this machine (as the last case says): told apart here by its URI.
    monkeypatch.setattr(identity, "host_identity", lambda uri: uri)
    bridge = f"aihowc{os.getpid() % 10**6}"
    data["hosts"] = {"lab": {"uri": "test:///default"}, "here": {"uri": "qemu:///system"}}
    data["clusters"]["cloud"]["host"] = "here"
    data["clusters"]["hpc"]["network"]["bridge"] = data["clusters"]["cloud"]["network"]["bridge"] = bridge
    path.write_text(yaml.safe_dump(data))
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        code, out, err = run_task(capsys, "validate", "--config", str(path))
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=True)
    said = " ".join((out + err).split())
    assert code == 1, said
    assert f"clusters.hpc.network.bridge: '{bridge}' is not a bridge the guests can join on host 'lab' " \
           f"(test:///default): the host has no interface '{bridge}'" in said
    assert "clusters.cloud.network.bridge" not in said


HOST_WITH_A_GPU = """<node>
  <device>
    <name>pci_0000_01_00_0</name>
    <parent>computer</parent>
    <capability type='pci'>
      <domain>0</domain><bus>1</bus><slot>0</slot><function>0</function>
      <product id='0x2335'>H200</product>
      <vendor id='0x10de'>NVIDIA Corporation</vendor>
      {group}
    </capability>
  </device>
</node>
"""


@pytest.mark.parametrize(("device", "group", "expected"), [
    ({"device_id": "2335", "iommu_group": 21}, 21, []),
    ({"pci_address": "0000:02:00.0"}, 21,
     ["clusters.hpc.compute_nodes[0].pcie_passthrough.devices[0].pci_address: '0000:02:00.0' is not a PCI function "
      "of host 'gpu2' (test:///{xml}); allowed: an address `virsh -c test:///{xml} nodedev-list --cap pci` lists"]),
    ({"device_id": "2805"}, 21,
     ["clusters.hpc.compute_nodes[0].pcie_passthrough.devices[0].device_id: '2805', but the device at 0000:01:00.0 on "
      "host 'gpu2' (test:///{xml}) has '2335'; allowed: '2335'"]),
    ({"iommu_group": 7}, 21,
     ["clusters.hpc.compute_nodes[0].pcie_passthrough.devices[0].iommu_group: 7, but the device at 0000:01:00.0 on "
      "host 'gpu2' (test:///{xml}) is in group 21; allowed: 21"]),
    ({}, None,
     ["clusters.hpc.compute_nodes[0].pcie_passthrough.devices[0].pci_address: '0000:01:00.0' on host 'gpu2' "
      "(test:///{xml}) is in no IOMMU group (the host's IOMMU is off); allowed: a host with its IOMMU on "
      "(intel_iommu=on or amd_iommu=on)"]),
])
def test_a_remote_hosts_devices_are_checked_through_libvirts_node_devices(
        tmp_path: Path, device: dict[str, Any], group: int | None, expected: list[str]) -> None:
    """Another host's sysfs is not here: its passthrough devices are read through libvirt's
    node-device API (libvirt's test driver stands in for that host, with the device it lists)."""
    xml = tmp_path / "gpu2.xml"
    member = "<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>"
    xml.write_text(HOST_WITH_A_GPU.format(
        group=f"<iommuGroup number='{group}'>{member}</iommuGroup>" if group is not None else ""))
    data = base()
    data["hosts"] = {"gpu2": {"uri": f"test://{xml}"}}
    data["clusters"]["hpc"]["host"] = "gpu2"
    data["clusters"]["hpc"]["compute_nodes"][0]["pcie_passthrough"]["devices"] = [
        {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de", **device}]
    plans = [plan_all(parse_cluster_file(data, env={}))[0]]
    if not expected:
        check_devices_through_libvirt(plans, f"test://{xml}", tmp_path / "c.yaml")
        return
    with pytest.raises(ConfigError) as err:
        check_devices_through_libvirt(plans, f"test://{xml}", tmp_path / "c.yaml")
    assert err.value.problems == [line.replace("test:///{xml}", f"test://{xml}") for line in expected]


def test_host_check_reads_another_hosts_devices_through_libvirt(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """host.check on a file whose GPU node runs on another host: that device is not looked for in
    this machine's sysfs but through that host's libvirt (the test driver, taken here for another
    machine), and that host's libvirtd is checked to answer."""
    xml = tmp_path / "gpu2.xml"
    member = "<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>"
    xml.write_text(HOST_WITH_A_GPU.format(group=f"<iommuGroup number='21'>{member}</iommuGroup>"))
    data = base()
    data["hosts"] = {"gpu2": {"uri": f"test://{xml}"}}
    data["clusters"]["hpc"]["compute_nodes"][0]["host"] = "gpu2"
    data["clusters"]["hpc"]["network"]["forward_mode"] = "bridge"
    data["clusters"]["hpc"]["compute_nodes"][0]["pcie_passthrough"]["devices"] = [
        {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de", "device_id": "2335"},
        {"pci_address": "0000:01:00.1", "device_type": "audio"}]
    del data["clusters"]["cloud"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(hostcheck, "runs_here", lambda uri: not uri.startswith("test:"))
    report = check_host(Path("/"), [path], ["test:///default"])
    checks = {c.name: c for c in report.checks}
    gpu, audio = (checks[f"device 0000:01:00.{f} (hpc-compute-01) on host gpu2"] for f in (0, 1))
    assert (gpu.ok, gpu.detail) == (True, "10de:2335, IOMMU group 21")
    assert (audio.ok, audio.detail) == (False, "not present on that host")
    # Not looked for in this machine's sysfs:
    assert [n for n in checks if n.startswith("device 0000:01:00") and " on host " not in n] == []
    assert [c.detail.split(" (")[0] for c in report.checks if c.name == "libvirtd"] == [
        "test:///default answers", f"test://{xml} answers"]


def test_a_network_removed_while_the_subnets_are_listed_is_passed_over() -> None:
    """Another stack's destroy may remove its network between libvirt's listing and the read of
    its definition (seen in CI: two tests' stacks on one libvirtd); the subnet check goes on."""
    from aihow_infra.libvirt.inspect import network_subnets

    conn = libvirt.open("test:///default")
    gone = conn.networkDefineXML("<network><name>gone</name><ip address='10.77.0.1' prefix='24'/></network>")
    gone.undefine()

    class Listing:
        def listAllNetworks(self, flags: int) -> list[Any]:
            return [gone, *conn.listAllNetworks(flags)]

    assert network_subnets(Listing()) == network_subnets(conn)
    assert ("default", "virbr0", "192.168.122.0/24") in network_subnets(conn)


def test_every_host_problem_in_one_report_in_the_files_order() -> None:
    """validate reports the host checks' problems together, by line (a share on line 17 after
    hugepages on line 10, as the hugepages-virtiofs case has them), one with no line last."""
    def share() -> None:
        raise ConfigError(["share problem", "unplaced problem"], "cluster file c.yaml", [17, None], "c.yaml")

    def hugepages() -> None:
        raise ConfigError(["hugepages problem"], "cluster file c.yaml", [10], "c.yaml")

    with pytest.raises(ConfigError) as err:
        hostcheck.check_all([share, lambda: None, hugepages])
    assert err.value.located() == ["c.yaml:10: hugepages problem", "c.yaml:17: share problem",
                                   "c.yaml: unplaced problem"]

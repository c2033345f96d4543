"""Recordings of a host tell the truth: this machine recorded, laid out again and checked gives
the verdicts and the acceleration the live machine gets; the recorded H200 host (a real one, with
kvm_pvm built into its kernel) gets software emulation, as it did live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from aihow_infra.errors import AihowError
from aihow_infra.host import Host, VirtChoice, choose_virt_type
from aihow_infra.hostcheck import check_host
from aihow_infra.hostrecord import load_recording, materialize, record_host, write_recording
from tests.cli import run_task

ROOT = Path(__file__).resolve().parents[1]
H200 = Path(__file__).parent / "fixtures" / "gpu-host-h200-live.json"
LIVE = Path("/")


def devices_of_this_machine(tmp_path: Path) -> str:
    """A cluster file passing through this machine's first two PCI functions, with their ids."""
    found = record_host()["pci_devices"]
    chosen = list(found.items())[:2]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"clusters": {"hpc": {
        "name": "hpc", "network": {"subnet": "10.1.0.0/24", "bridge": "br-hpc"},
        "controller": {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip_address": "10.1.0.10"},
        "compute_nodes": [{"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip": "10.1.0.11",
                           "pcie_passthrough": {"enabled": True, "devices": [
                               {"pci_address": address, "device_type": "gpu",
                                "vendor_id": attrs["vendor"].removeprefix("0x"),
                                "device_id": attrs["device"].removeprefix("0x")}
                               for address, attrs in chosen]}}]}}}))
    return str(path)


def verdicts(report: Any) -> dict[str, tuple[str, str, str]]:
    return {c.name: (c.verdict, c.detail, c.fix) for c in report.checks if c.name != "libvirtd"}


def test_this_machine_recorded_is_checked_as_it_is_live(tmp_path: Path) -> None:
    config = devices_of_this_machine(tmp_path)
    recording = record_host()
    path = tmp_path / "host.json"
    write_recording(recording, path)
    root = materialize(load_recording(path), tmp_path / "root")
    live, recorded = check_host(LIVE, [config]), check_host(root, [config])
    assert verdicts(recorded) == verdicts(live)
    assert any(name.startswith("device ") for name in verdicts(live)), "no device was compared"
    kvm = Path("/dev/kvm").exists()
    assert choose_virt_type("auto", Host(root), kvm) == choose_virt_type("auto", Host(LIVE), kvm)


def test_a_recording_laid_out_and_recorded_again_is_the_same(tmp_path: Path) -> None:
    recording = record_host()
    again = record_host(materialize(recording, tmp_path / "root"))
    for key in ("pci_devices", "iommu_groups", "dev_vfio", "dev_kvm", "modules_loaded", "sys_module_kvm",
                "hugepages", "cpu_virt_flags", "proc_cmdline"):
        assert again[key] == recording[key], key


def test_a_recording_keeps_the_kernels_parameters_and_not_inits(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("console=ttyS0 quiet -- --init-flag --auth-token s3cret\n")
    assert record_host(tmp_path)["proc_cmdline"] == "console=ttyS0 quiet"


def test_the_recorded_h200_gets_software_emulation_as_it_did_live(tmp_path: Path) -> None:
    """Its /dev/kvm is kvm_pvm, built into the kernel: only /sys/module shows it, /proc/modules
    does not, and a real guest kernel cannot run under it."""
    recording = load_recording(H200)
    assert "kvm_pvm" not in recording["modules_loaded"] and "kvm_pvm" in recording["sys_module_kvm"]
    host = Host(materialize(recording, tmp_path))
    assert choose_virt_type("auto", host, True) == VirtChoice(
        "qemu", "software emulation: /dev/kvm is kvm_pvm, which cannot run a real guest kernel")


def test_the_record_task_writes_a_file_host_check_reads(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "this-host.json"
    code, out, err = run_task(capsys, "host.record", str(path))
    assert code == 0, out + err
    assert f"wrote {path}" in " ".join(out.split())
    assert load_recording(path)["pci_devices"] == record_host()["pci_devices"]
    code, out, err = run_task(capsys, "host.check", "--recorded", str(path), "--config",
                              str(ROOT / "config" / "default.yaml"))
    assert code == 0, out + err


def test_the_record_task_takes_no_option_for_a_file_name(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_task(capsys, "host.record", "--help")
    assert code == 1 and out == "" and list(tmp_path.iterdir()) == []
    assert err.strip() == "error: host.record: file '--help' starts with '-'; allowed: a path to write " \
                          "(help: aihow --help host.record)"


def test_a_recording_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "missing-folder" / "host.json"
    with pytest.raises(AihowError, match=r"host recording .*missing-folder/host.json cannot be written"):
        write_recording({"pci_devices": {}}, target)
    assert not target.parent.exists()


def test_an_old_recording_keeps_its_reset_method_beside_the_device(tmp_path: Path) -> None:
    recording = load_recording(H200)
    root = materialize(recording, tmp_path / "root")
    assert (root / "sys/bus/pci/devices/0000:00:06.0/reset_method").read_text().strip() == "flr"

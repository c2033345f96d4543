"""A home per device: where it lives when no VM holds it, set once per host in the GPU lease
ledger, checked against the host's boot configuration, and reached by three sysfs writes made
only while nothing holds the device open. The kernel's side of those writes is played by a host
whose sysfs folder rebinds like the kernel does (``KernelHost``); the simulator shows the real one
(tests/test_e2e_gpuhost.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from aihow_infra.errors import CustodyError, LeaseError
from aihow_infra.gpu import leases
from aihow_infra.gpu.homes import Place, at_home, boot_binding, boot_conflict, card_functions, parse_home, send_home
from aihow_infra.gpu.leases import bring_home
from aihow_infra.gpu.ledger import Ledger
from aihow_infra.host import Host
from aihow_infra.hostcheck import _home_checks, check_host
from aihow_infra.hostrecord import load_recording, materialize, record_host
from tests.cli import run_task
from tests.samples import base
from tests.test_custody import AUDIO, GPU, READY, hold, ledger_project, ready_host


class KernelHost(Host):
    """A host laid out under a folder whose PCI writes act as the kernel's do: ``unbind`` drops
    the driver link, ``drivers_probe`` binds the override, else the device's own driver (``native``),
    which may be None (no driver claims it) or ``stubborn`` (nothing changes)."""

    def __init__(self, root: Path, native: dict[str, str | None], stubborn: bool = False) -> None:
        super().__init__(root)
        self.native = native
        self.stubborn = stubborn
        self.writes: list[tuple[str, str]] = []

    def write(self, absolute: str, text: str) -> None:
        self.writes.append((absolute, text))
        if self.stubborn:
            return
        if absolute.endswith("/unbind"):
            (self.device(text) / "driver").unlink()
        elif absolute.endswith("/drivers_probe"):
            override = (self.read(f"/sys/bus/pci/devices/{text}/driver_override") or "").strip()
            driver = override or self.native.get(text)
            if driver:
                (self.path("/sys/bus/pci/drivers") / driver).mkdir(exist_ok=True)
                (self.device(text) / "driver").symlink_to(f"../../drivers/{driver}")
        else:
            super().write(absolute, text)


@pytest.fixture
def kernel(tmp_path: Path) -> KernelHost:
    """The ready host (GPU and audio on vfio-pci, group 14) whose GPU's own driver is nvidia and
    whose audio function has none."""
    return KernelHost(ready_host(tmp_path / "root").root, {GPU: "nvidia", AUDIO: None})


def test_what_at_home_means() -> None:
    assert at_home("vfio-pci", "vfio-pci") and not at_home("nvidia", "vfio-pci") and not at_home(None, "vfio-pci")
    assert at_home("nvidia", "host") and at_home(None, "host") and not at_home("vfio-pci", "host")
    assert parse_home("vfio-pci") == "vfio-pci"
    with pytest.raises(CustodyError, match=r"^--to: 'nvidia' is not a home; allowed: host, vfio-pci \(the host's"):
        parse_home("nvidia", "--to")


def test_a_device_goes_home_to_the_host_driver_and_back_to_vfio(kernel: KernelHost) -> None:
    assert send_home(kernel, GPU, "host", sleep=lambda _s: None) == "nvidia"
    assert kernel.writes == [(f"/sys/bus/pci/devices/{GPU}/driver_override", "\n"),
                             ("/sys/bus/pci/drivers/vfio-pci/unbind", GPU), ("/sys/bus/pci/drivers_probe", GPU)]
    assert send_home(kernel, AUDIO, "host") is None  # the host has no driver for it: home is no driver
    kernel.writes.clear()
    assert send_home(kernel, GPU, "host") == "nvidia" and kernel.writes == []  # at home: nothing written
    assert send_home(kernel, GPU, "vfio-pci") == "vfio-pci"
    assert kernel.writes == [(f"/sys/bus/pci/devices/{GPU}/driver_override", "vfio-pci"),
                             ("/sys/bus/pci/drivers/nvidia/unbind", GPU), ("/sys/bus/pci/drivers_probe", GPU)]


def test_a_device_held_open_is_not_moved(kernel: KernelHost, holding: list[subprocess.Popen[bytes]]) -> None:
    config = kernel.device(GPU) / "config"
    config.write_bytes(b"\0" * 256)
    process = hold(holding, config)
    with pytest.raises(CustodyError) as refused:
        send_home(kernel, GPU, "host")
    assert str(refused.value).startswith(f"device {GPU} cannot go home (host): pid {process.pid} (sleep) has ")
    assert f"it stays on vfio-pci and nothing was changed; allowed: end those first, then `aihow gpu.home {GPU}`" \
        in str(refused.value)
    assert kernel.writes == [] and kernel.driver(GPU) == "vfio-pci"


def test_a_device_that_does_not_get_home_is_said_stuck(tmp_path: Path) -> None:
    stubborn = KernelHost(ready_host(tmp_path / "root").root, {GPU: "nvidia"}, stubborn=True)
    with pytest.raises(CustodyError, match=rf"^device {GPU} did not reach its home \(host\) within 0 s: it is on "
                                           rf"vfio-pci; allowed: `aihow gpu.home {GPU}` again, or look at `dmesg`"):
        send_home(stubborn, GPU, "host", bound=0.0)


def test_where_a_device_is_said_in_words() -> None:
    assert str(Place(GPU, "host", "nvidia", None)) == "at home, on nvidia"
    assert str(Place(GPU, "host", None, None)) == "at home, on no driver"
    assert str(Place(GPU, "host", "vfio-pci", "hpc/vm-1")) == "held by hpc/vm-1"
    stuck = Place(GPU, "host", "vfio-pci", None)
    assert (str(stuck), stuck.stuck, stuck.fix) == ("stuck on vfio-pci with no holder (home: the host's driver)",
                                                    True, f"aihow gpu.home {GPU}")
    away = Place(GPU, "vfio-pci", "nvidia", None)
    assert (str(away), away.fix) == ("away from home: on nvidia (home: vfio-pci)", f"aihow gpu.home {GPU}")
    assert Place(GPU, "vfio-pci", "vfio-pci", None).at_home and not Place(GPU, "vfio-pci", "vfio-pci", "x").at_home
    gone = Place(GPU, "vfio-pci", None, None, present=False)  # a cluster file's address this host lacks
    assert (str(gone), gone.stuck, gone.at_home, gone.fix) == (
        "not present on this host (check pci_address with `lspci -D`)", False, False, "")


def test_the_ledger_keeps_one_home_per_address(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "leases.json")
    assert ledger.home_of(GPU) == "host"
    assert ledger.set_home([GPU, AUDIO], "vfio-pci") == {GPU: "host", AUDIO: "host"}
    ledger.acquire("hpc/vm-1", [GPU, AUDIO])
    ledger.release("hpc/vm-1", [GPU, AUDIO])  # leases come and go; the home stays
    assert {a: lease.home for a, lease in ledger.leases().items()} == {GPU: "vfio-pci", AUDIO: "vfio-pci"}
    data = json.loads(ledger.path.read_text())
    data["devices"][GPU]["home"] = "nvidia"
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(LeaseError, match=rf"is corrupt \(entry '{GPU}' has home 'nvidia'; allowed: host, vfio-pci\)"):
        ledger.leases()


def test_a_card_is_every_function_of_its_slot(kernel: KernelHost) -> None:
    assert card_functions(kernel, GPU) == [GPU, AUDIO] == card_functions(kernel, AUDIO)
    assert card_functions(kernel, "0000:42:00.0") == ["0000:42:00.0"]  # not on this host


@pytest.mark.parametrize(("path", "text", "where"), [
    ("proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 vfio-pci.ids=10de:2684,10de:22ba quiet",
     "vfio-pci.ids=10de:2684,10de:22ba on the kernel command line (/proc/cmdline)"),
    ("etc/modprobe.d/vfio.conf", "# GPUs for VMs\noptions vfio_pci ids=10de:2684:10de:0000 disable_vga=1\n",
     "`options vfio_pci ids=10de:2684:10de:0000 disable_vga=1` in /etc/modprobe.d/vfio.conf"),
    (f"etc/driverctl.d/pci-{GPU}", "vfio-pci\n", f"a driverctl override (/etc/driverctl.d/pci-{GPU})"),
])
def test_a_home_set_differently_at_boot_is_found(kernel: KernelHost, path: str, text: str, where: str) -> None:
    (kernel.root / path).parent.mkdir(parents=True, exist_ok=True)
    (kernel.root / path).write_text(text)
    assert boot_binding(kernel, GPU) == where
    assert boot_conflict(kernel, GPU, "host") == (
        f"device {GPU}: its home is the host's driver (the GPU lease ledger) but {where} binds it to vfio-pci at "
        f"boot: a home set differently in two places; allowed: `aihow gpu.home {GPU} --to vfio-pci`, or remove "
        "that boot setting")
    assert boot_conflict(kernel, GPU, "vfio-pci") is None  # the two agree
    checks = {c.name: c for c in check_host(kernel.root, [_cluster(kernel.root.parent)], homes={}).checks}
    home = checks[f"device {GPU} (hpc-compute-01) home"]
    assert home.verdict == "FAIL" and where in home.detail and "set differently in two places" in home.detail
    # ... and a recording keeps it: the recorded host gives the same verdict.
    again = materialize(record_host(kernel.root), kernel.root.parent / "again")
    assert boot_binding(Host(again), GPU) == where


def test_other_ids_and_other_modules_are_no_conflict(kernel: KernelHost) -> None:
    (kernel.root / "etc/modprobe.d").mkdir(parents=True)
    (kernel.root / "etc/modprobe.d/other.conf").write_text("options vfio-pci ids=10de:1111\n"
                                                           "options kvm ids=10de:2684\n")
    (kernel.root / "proc/cmdline").write_text("root=/dev/sda1 vfio-pci.ids=10de:26840\n")
    assert boot_binding(kernel, GPU) is None


def _cluster(folder: Path) -> str:
    from tests.test_hostcheck import cluster_file

    return cluster_file(folder, [{"pci_address": GPU, "device_type": "gpu", "vendor_id": "10de", "device_id": "2684"},
                                 {"pci_address": AUDIO, "device_type": "audio"}])


def test_host_check_measures_each_device_against_its_home(tmp_path: Path) -> None:
    recording = load_recording(READY)
    recording["pci_devices"][GPU]["driver"] = "nvidia"
    root = materialize(recording, tmp_path / "root")
    config = _cluster(tmp_path)

    checks = {c.name: c for c in check_host(root, [config], homes={}).checks}  # home: host (the default)
    gpu = checks[f"device {GPU} (hpc-compute-01) driver"]
    assert gpu.ok and gpu.detail == "at home on nvidia (home: host); libvirt binds it to vfio-pci when its VM starts"
    audio = checks[f"device {AUDIO} (hpc-compute-01) driver"]
    assert (audio.verdict, audio.fix) == ("WARN", f"aihow gpu.home {AUDIO}")
    assert audio.detail.startswith("stuck on vfio-pci with no holder (home: the host's driver)")

    report = check_host(root, [config], homes={GPU: "vfio-pci", AUDIO: "vfio-pci"})
    checks = {c.name: c for c in report.checks}
    gpu = checks[f"device {GPU} (hpc-compute-01) driver"]
    assert (gpu.verdict, gpu.detail) == ("FAIL", "bound to nvidia (home: vfio-pci)")
    assert gpu.fix.startswith(f"aihow gpu.home {GPU}  (or by hand: echo {GPU} > /sys/bus/pci/drivers/nvidia/unbind")
    assert checks[f"device {AUDIO} (hpc-compute-01) driver"].detail == "at home on vfio-pci (home: vfio-pci)"
    assert not report.ready


def test_host_check_on_the_live_host_names_who_holds_a_device_open(kernel: KernelHost,
                                                                   holding: list[subprocess.Popen[bytes]]) -> None:
    process = hold(holding, kernel.root / "dev/vfio/14")
    checks = {c.name: c for c in _home_checks(kernel, GPU, "device X", "vfio-pci", live=True)}
    opened = checks["device X open"]
    assert opened.verdict == "FAIL" and f"pid {process.pid} (sleep) has " in opened.detail
    assert opened.detail.endswith("a VM start is refused until that ends") and f"kill {process.pid}" in opened.fix
    assert [c.name for c in _home_checks(kernel, GPU, "device X", "vfio-pci", live=False)] == ["device X driver"]


def test_setting_a_home_takes_the_whole_card_there(kernel: KernelHost, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases, "local_host", lambda uri: kernel)
    ledger = Ledger(tmp_path / "leases.json")
    card = {GPU, AUDIO}
    with pytest.raises(CustodyError, match=r"^device 0000:00:1f.0 is not passed through by any VM of the cluster "
                                           rf"files, so its driver is not the project's to change; allowed: a "
                                           rf"pcie_passthrough address \({GPU}, {AUDIO}\)"):
        bring_home(ledger, "qemu:///system", "0000:00:1f.0", card, "vfio-pci")  # the host's own, never touched
    assert bring_home(ledger, "qemu:///system", AUDIO, card, "host") == [
        f"{GPU}: home host; at home, on nvidia", f"{AUDIO}: home host; at home, on no driver"]
    (kernel.root / "proc/cmdline").write_text("root=/dev/sda1 vfio-pci.ids=10de:2684\n")
    only_gpu = bring_home(ledger, "qemu:///system", GPU, {GPU}, "vfio-pci")  # audio is not passed through
    assert only_gpu == [f"{GPU}: home vfio-pci; at home, on vfio-pci"] and kernel.driver(AUDIO) is None
    assert bring_home(ledger, "qemu:///system", GPU, card, "vfio-pci") == [
        f"{GPU}: home vfio-pci; at home, on vfio-pci", f"{AUDIO}: home vfio-pci; at home, on vfio-pci"]
    with pytest.raises(CustodyError, match=rf"^device {GPU}: its home is the host's driver \(the GPU lease ledger\) "
                                           r"but vfio-pci.ids=10de:2684 on the kernel command line"):
        bring_home(ledger, "qemu:///system", GPU, card, "host")
    assert ledger.home_of(GPU) == "vfio-pci" and kernel.driver(GPU) == "vfio-pci"  # nothing recorded, nothing moved


def test_the_home_task_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = ledger_project(tmp_path, monkeypatch)
    clusters = base()
    clusters["clusters"]["hpc"]["compute_nodes"][0]["pcie_passthrough"]["devices"] = [
        {"pci_address": "0000:ff:1f.7", "device_type": "gpu"}]
    clusters["clusters"]["cloud"]["worker_nodes"][1]["pcie_passthrough"]["devices"] = [
        {"pci_address": "0000:ff:1f.7", "device_type": "gpu"}]
    (tmp_path / "project" / "c.yaml").write_text(yaml.safe_dump(clusters))
    for args, message in [
        (["01:00.0"], "gpu.home: address '01:00.0' is not a PCI function; allowed: domain:bus:slot.function"),
        ([GPU, "--to", "nvidia"], "--to: 'nvidia' is not a home; allowed: host, vfio-pci (the host's own driver, "
                                  "or kept on vfio-pci for VMs)"),
        (["0000:FF:1F.7"], "device 0000:ff:1f.7 is not present on this host; allowed: an address `lspci -D` lists"),
        (["0000:00:00.0", "--to", "vfio-pci"], "device 0000:00:00.0 is not passed through by any VM of the cluster "
                                               "files, so its driver is not the project's to change; allowed: a "
                                               "pcie_passthrough address (0000:ff:1f.7)"),
    ]:
        code, out, err = run_task(capsys, "gpu.home", *args)
        assert (code, out) == (1, "") and err.startswith(f"error: {message}"), err
        assert len(err.strip().splitlines()) == 1
    assert not ledger.path.exists()


def test_the_gpu_tasks_refuse_stacks_that_name_two_ledgers(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for stack in ("hpc", "cloud"):
        settings = {"config": {"aihow:clusterFile": "c.yaml", "aihow:ledgerPath": str(tmp_path / f"{stack}.json")}}
        (project / f"Pulumi.{stack}.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("AIHOW_PROJECT_DIR", str(project))
    for argv in (["gpu.leases"], ["gpu.home", GPU], ["gpu.reclaim", GPU], ["gpu.forget", GPU]):
        code, out, err = run_task(capsys, *argv)
        assert (code, out) == (1, ""), argv
        assert " ".join(err.split()).startswith(f"error: aihow:ledgerPath: '{tmp_path}/hpc.json' (stack hpc) differs "
                                                f"from '{tmp_path}/cloud.json' (stack cloud); allowed: one ledger")


def test_a_write_the_kernel_refuses_is_one_line(tmp_path: Path) -> None:
    class Refusing(KernelHost):
        def write(self, absolute: str, text: str) -> None:
            if absolute.endswith("/unbind"):
                raise OSError(16, "Device or resource busy")
            super().write(absolute, text)

    host = Refusing(ready_host(tmp_path / "root").root, {GPU: "nvidia"})
    with pytest.raises(CustodyError, match=rf"^device {GPU} cannot go home \(host\): writing /sys/bus/pci/drivers/"
                                           r"vfio-pci/unbind failed \(Device or resource busy\); it is on vfio-pci; "
                                           rf"allowed: run as root, or look at `dmesg`"):
        send_home(host, GPU, "host")

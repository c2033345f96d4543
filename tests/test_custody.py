"""Never hand over blind: a device a host process holds open, or whose IOMMU group-mate the host
still drives, is refused before its VM starts, in one line naming the pids and commands. Real
processes (this machine's /proc) hold files of a host laid out under a temp folder."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aihow_infra.errors import CustodyError, LeaseConflictError
from aihow_infra.gpu.custody import OpenFile, card_identity, device_files, open_by, refuse_blind_handover, serial_number
from aihow_infra.gpu.ledger import Ledger
from aihow_infra.host import Host
from aihow_infra.hostrecord import load_recording, materialize
from tests.cli import run_task

READY = Path(__file__).parent / "fixtures" / "ready-host-sysfs.json"
GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"


def ready_host(root: Path) -> Host:
    """The ready host of the fixtures laid out under ``root``: GPU and audio function in IOMMU
    group 14, both on vfio-pci, with the group's /dev/vfio node."""
    materialize(load_recording(READY), root)
    (root / "dev/vfio").mkdir(exist_ok=True)
    (root / "dev/vfio/14").touch()
    return Host(root)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """The ready host, with a GPU the nvidia driver knows as minor 3, and its BAR and config files."""
    root = ready_host(tmp_path / "root").root
    information = root / "proc/driver/nvidia/gpus" / GPU / "information"
    information.parent.mkdir(parents=True)
    information.write_text("Model: NVIDIA Stand-in\nDevice Minor: 3\n")
    for name in ("config", "resource", "resource0"):
        (root / "sys/bus/pci/devices" / GPU / name).write_bytes(b"\0" * 4096)
    (root / "dev/nvidia3").touch()
    return Host(root)


def hold(started: list[subprocess.Popen[bytes]], path: Path, how: str = "open") -> subprocess.Popen[bytes]:
    """A real process (``sleep``, or python for a mapping) holding ``path`` until killed; returns
    when it holds it."""
    if how == "open":
        process = subprocess.Popen(["sh", "-c", f'exec sleep 60 3<"{path}"'])
    else:
        code = (f"import mmap, sys, time; f = open({str(path)!r}, 'rb'); m = mmap.mmap(f.fileno(), 4096, "
                "access=mmap.ACCESS_READ); f.close(); print('held', flush=True); time.sleep(60)")
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert process.stdout is not None and process.stdout.readline().strip() == b"held"
    started.append(process)
    for _ in range(200):
        if any(f.pid == process.pid for f in open_by(Host(Path("/")), [path])):
            return process
        subprocess.run(["sleep", "0.02"], check=True)
    raise AssertionError(f"{process.pid} never held {path}")


def test_the_files_a_device_is_held_by(host: Host) -> None:
    files = device_files(host, GPU)
    assert files[:2] == [Path("/dev/vfio/14"), Path("/dev/nvidia3")]
    assert {p.name for p in files[2:]} == {"config", "resource", "resource0"}
    assert device_files(host, AUDIO) == [Path("/dev/vfio/14")]


@pytest.mark.parametrize(("node", "how", "command"), [
    ("dev/vfio/14", "open", "sleep"),
    ("dev/nvidia3", "open", "sleep"),
    (f"sys/bus/pci/devices/{GPU}/resource0", "mapped", Path(sys.executable).name[:15]),
])
def test_a_device_held_open_on_the_host_is_not_handed_over(host: Host, holding: list[subprocess.Popen[bytes]],
                                                           node: str, how: str, command: str) -> None:
    process = hold(holding, host.root / node, how)
    with pytest.raises(CustodyError) as refused:
        refuse_blind_handover(host, "hpc-compute-01", [GPU, AUDIO])
    message = str(refused.value)
    assert message.startswith(f"device {GPU} is held open on the host: pid {process.pid} ({command}) has ")
    assert f"`kill {process.pid}`" in message and "hpc-compute-01 was not started" in message
    assert "\n" not in message


def test_a_free_device_is_handed_over(host: Host) -> None:
    refuse_blind_handover(host, "hpc-compute-01", [GPU, AUDIO])
    assert open_by(host, device_files(host, GPU)) == []


def test_a_group_mate_the_host_still_drives_is_refused(tmp_path: Path) -> None:
    recording = copy.deepcopy(load_recording(READY))
    recording["pci_devices"][AUDIO]["driver"] = "snd_hda_intel"
    host = Host(materialize(recording, tmp_path / "root"))
    with pytest.raises(CustodyError, match=rf"device {GPU} shares IOMMU group 14 with {AUDIO} \(driver "
                                           r"snd_hda_intel\), which the host still drives; vm-1 was not started"):
        refuse_blind_handover(host, "vm-1", [GPU])
    recording["pci_devices"][AUDIO]["driver"] = None
    refuse_blind_handover(Host(materialize(recording, tmp_path / "again")), "vm-1", [GPU])


def test_an_open_file_says_who_and_what() -> None:
    assert str(OpenFile(42, "nvidia-smi", "/dev/nvidia0")) == "pid 42 (nvidia-smi) has /dev/nvidia0 open"
    assert str(OpenFile(7, "qemu-system-x86", "/dev/vfio/14", "hpc-compute-01")) == \
        "pid 7 (qemu-system-x86, the running VM hpc-compute-01) has /dev/vfio/14 open"


def test_a_vm_holding_the_device_is_named_with_how_to_stop_it(host: Host, tmp_path: Path,
                                                              holding: list[subprocess.Popen[bytes]]) -> None:
    """A domain started outside the ledger (by hand) holds the group: its qemu is named as the VM
    libvirt started it for. A stand-in qemu (a process of that name with libvirt's arguments)."""
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.symlink_to(sys.executable)
    node = host.root / "dev/vfio/14"
    code = "import time; print('held', flush=True); time.sleep(60)"
    process = subprocess.Popen(["sh", "-c", f'exec "{qemu}" -c "{code}" -name guest=hpc-compute-01,debug-threads=on '
                                            f'3<"{node}"'], stdout=subprocess.PIPE)
    holding.append(process)
    # It prints only once exec'd and started, holding the node it inherited: no polling, no deadline.
    assert process.stdout is not None and process.stdout.readline().strip() == b"held", \
        f"the stand-in qemu ended with {process.wait()}"
    assert Path(f"/proc/{process.pid}/comm").read_text().strip() == "qemu-system-x86"
    assert [f.pid for f in open_by(host, [node])] == [process.pid]
    with pytest.raises(CustodyError) as refused:
        refuse_blind_handover(host, "cloud-gpu-worker-01", [GPU])
    message = str(refused.value)
    assert f"pid {process.pid} (qemu-system-x86, the running VM hpc-compute-01) has" in message
    assert "allowed: stop hpc-compute-01 first (`aihow vm.stop NAME`" in message and "kill" not in message


def config_space(*capabilities: tuple[int, int, bytes]) -> bytes:
    """4096 bytes of configuration space with PCIe extended capabilities (offset, id, body),
    each pointing at the next."""
    space = bytearray(4096)
    for index, (offset, cap, body) in enumerate(capabilities):
        following = capabilities[index + 1][0] if index + 1 < len(capabilities) else 0
        space[offset:offset + 4] = (cap | 1 << 16 | following << 20).to_bytes(4, "little")
        space[offset + 4:offset + 4 + len(body)] = body
    return bytes(space)


def test_the_pcie_serial_number_is_read_from_the_configuration_space() -> None:
    serial = (0x0123456789ABCDEF).to_bytes(8, "little")
    assert serial_number(config_space((0x100, 0x0001, b""), (0x148, 0x0003, serial))) == "0123456789abcdef"
    assert serial_number(config_space((0x100, 0x0001, b""))) is None  # no serial capability
    assert serial_number(bytes(256)) is None  # what a user who is not root reads
    looping = bytearray(config_space((0x100, 0x0001, b"")))
    looping[0x100:0x104] = (0x0001 | 1 << 16 | 0x100 << 20).to_bytes(4, "little")
    assert serial_number(bytes(looping)) is None


def test_a_card_that_is_not_the_one_first_handed_over_is_refused(host: Host, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "leases.json")
    config = host.root / "sys/bus/pci/devices" / GPU / "config"
    config.write_bytes(config_space((0x100, 0x0003, (0xAB).to_bytes(8, "little"))))
    refuse_blind_handover(host, "vm-1", [GPU, AUDIO], ledger)  # first hand-over: recorded
    assert card_identity(host, GPU) == {"vendor": "0x10de", "device": "0x2684", "subsystem_vendor": "0x10de",
                                        "subsystem_device": "0x0000", "serial": "00000000000000ab"}
    refuse_blind_handover(host, "vm-2", [GPU, AUDIO], ledger)  # the same card: handed over again
    config.write_bytes(config_space((0x100, 0x0003, (0xCD).to_bytes(8, "little"))))  # another card, same ids
    with pytest.raises(CustodyError) as refused:
        refuse_blind_handover(host, "vm-2", [GPU, AUDIO], ledger)
    message = str(refused.value)
    assert message.startswith(f"device {GPU} is not the card first handed over there: 10de:2684 (subsystem "
                              "10de:0000, serial 00000000000000ab) was recorded at ")
    assert "10de:2684 (subsystem 10de:0000, serial 00000000000000cd) is there now; vm-2 was not started" in message
    assert f"`aihow gpu.forget {GPU}`" in message
    ledger.acquire("hpc/vm-1", [GPU])
    with pytest.raises(LeaseConflictError, match=f"GPU {GPU} is held by hpc/vm-1; stop that VM first"):
        ledger.forget_card(GPU)
    ledger.release("hpc/vm-1", [GPU])
    assert ledger.forget_card(GPU) is not None
    refuse_blind_handover(host, "vm-2", [GPU, AUDIO], ledger)  # the new card, recorded now
    assert ledger.known_card(GPU, card_identity(host, GPU)) is None


def ledger_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """A project whose one stack names a ledger in ``tmp_path``, for the ``gpu.*`` tasks; the ledger."""
    project = tmp_path / "project"
    project.mkdir()
    ledger = Ledger(tmp_path / "leases.json")
    settings = {"config": {"aihow:clusterFile": "c.yaml", "aihow:ledgerPath": str(ledger.path)}}
    (project / "Pulumi.hpc.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("AIHOW_PROJECT_DIR", str(project))
    return ledger


def test_the_forget_task_takes_a_pci_function_and_forgets_the_card(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = ledger_project(tmp_path, monkeypatch)
    code, out, err = run_task(capsys, "gpu.forget", "01:00.0")
    assert (code, out) == (1, "")
    assert err.strip() == "error: gpu.forget: address '01:00.0' is not a PCI function; allowed: domain:bus:slot." \
                          "function in hex, e.g. 0000:01:00.0 (`lspci -D` lists them)"
    code, out, err = run_task(capsys, "gpu.reclaim", "0000:zz:00.0")
    assert (code, out) == (1, "") and err.startswith("error: gpu.reclaim: address '0000:zz:00.0' is not a PCI")
    code, out, err = run_task(capsys, "gpu.forget", GPU)
    assert code == 0 and "no card was recorded at 0000:01:00.0" in out
    ledger.known_card(GPU, {"vendor": "0x10de", "device": "0x2684"})
    code, out, err = run_task(capsys, "gpu.forget", GPU)
    assert code == 0 and "forgot the card recorded at 0000:01:00.0 (0x10de:0x2684, recorded " in " ".join(out.split())
    assert ledger.known_card(GPU, {"vendor": "0x10de", "device": "0x2204"}) is None  # the next card is recorded

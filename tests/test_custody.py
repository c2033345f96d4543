"""Never hand over blind: a device a host process holds open, or whose IOMMU group-mate the host
still drives, is refused before its VM starts, in one line naming the pids and commands. Real
processes (this machine's /proc) hold files of a host laid out under a temp folder."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aihow_infra.errors import CustodyError
from aihow_infra.gpu.custody import OpenFile, device_files, open_by, refuse_blind_handover
from aihow_infra.host import Host
from aihow_infra.hostrecord import load_recording, materialize

READY = Path(__file__).parent / "fixtures" / "ready-host-sysfs.json"
GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """The ready host of the fixtures (GPU and audio function in IOMMU group 14, both on
    vfio-pci), with a GPU the nvidia driver knows as minor 3, and its BAR and config files."""
    root = materialize(load_recording(READY), tmp_path / "root")
    information = root / "proc/driver/nvidia/gpus" / GPU / "information"
    information.parent.mkdir(parents=True)
    information.write_text("Model: NVIDIA Stand-in\nDevice Minor: 3\n")
    for name in ("config", "resource", "resource0"):
        (root / "sys/bus/pci/devices" / GPU / name).write_bytes(b"\0" * 4096)
    (root / "dev/vfio").mkdir(exist_ok=True)
    (root / "dev/vfio/14").touch()
    (root / "dev/nvidia3").touch()
    return Host(root)


@pytest.fixture
def holding() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


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
    process = subprocess.Popen(["sh", "-c", f'exec "{qemu}" -c "import time; time.sleep(60)" '
                                            f'-name guest=hpc-compute-01,debug-threads=on 3<"{node}"'])
    holding.append(process)
    for _ in range(200):
        if open_by(host, [node]):
            break
        subprocess.run(["sleep", "0.02"], check=True)
    with pytest.raises(CustodyError) as refused:
        refuse_blind_handover(host, "cloud-gpu-worker-01", [GPU])
    message = str(refused.value)
    assert f"pid {process.pid} (qemu-system-x86, the running VM hpc-compute-01) has" in message
    assert "allowed: stop hpc-compute-01 first (`aihow vm.stop NAME`" in message and "kill" not in message

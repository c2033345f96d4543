"""The seed's GPU hand-over (CLOUD-0.3) through real VFIO, inside the GPU-host simulator.

The project runs inside an outer VM that has an IOMMU and a two-function stand-in GPU
(tests/gpuhost.py), against that VM's own libvirtd, exactly as an operator runs it on a
workstation: ``aihow host.check``, ``system.up``, ``vm.start``, ``switch``, ``system.destroy``.
Every step is checked from libvirt's and the kernel's own view inside: the driver each function
is bound to, the hostdevs of the running domain's live XML, which qemu holds ``/dev/vfio/<group>``
open, and the lease ledger. The inner domains boot nothing (a blank disk): holding the device
is what is tested. The outer VM needs no network; everything goes through its guest agent.

Run alone with ``pytest -m gpuhost``. About 8 minutes here (software emulation, 2 vCPUs); the
first run also builds the ``gpuhost`` image (about a minute, cached afterwards).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aihow_infra.images import ensure_image
from aihow_infra.libvirt.guest import Ran
from tests.gpuhost import GPU_SLOT, GpuHost, configure, edu_passthrough, gpu_host, lease_holders
from tests.sandbox import Phases, Sandbox

pytestmark = [pytest.mark.e2e, pytest.mark.gpuhost, pytest.mark.timeout(2400)]

HPC_VM, CLOUD_VM = "sim-hpc-compute-01", "sim-cloud-gpu-worker-01"
FUNCTIONS = (f"{GPU_SLOT}.0", f"{GPU_SLOT}.1")  # the stand-in GPU's "video" and "audio" functions
LEDGER = "/var/lib/aihow/gpu-leases.json"


def simulated_clusters() -> dict[str, Any]:
    """The seed's shape, small: the device in the HPC compute node and in the Cloud GPU worker
    (which does not start by itself); nodes with nothing to boot."""
    def node(ip: str, **extra: Any) -> dict[str, Any]:
        return {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip": ip, **extra}

    def cluster(kind: str, third: int) -> dict[str, Any]:
        return {"name": f"sim-{kind}", "hardware": {"acceleration": {"cpu_model": "qemu64"}},
                "network": {"subnet": f"10.77.{third}.0/24", "bridge": f"sim{kind}0", "forward_mode": "isolated"}}

    return {
        "hpc": {**cluster("hpc", 1), "controller": node("10.77.1.10"),
                "compute_nodes": [node("10.77.1.11", pcie_passthrough=edu_passthrough())]},
        "cloud": {**cluster("cloud", 2), "control_plane": node("10.77.2.10"),
                  "worker_nodes": {"gpu": [node("10.77.2.11", auto_start=False, pcie_passthrough=edu_passthrough())]}},
    }


@pytest.fixture
def simulator(sandbox: Sandbox) -> Iterator[GpuHost]:
    """The simulator, booted and ready to run the project; removed afterwards."""
    image, _built = ensure_image("gpuhost", progress=print)
    with gpu_host(sandbox, image) as host:
        yield host


class Steps:
    """Runs the operator's commands inside and keeps how long each took (a phase each)."""

    def __init__(self, host: GpuHost, phases: Phases) -> None:
        self.host = host
        self.phases = phases

    def aihow(self, *args: str, ok: bool = True) -> Ran:
        started = time.monotonic()
        ran = self.host.aihow(*args)
        self.phases.add(f"aihow {' '.join(args)}", time.monotonic() - started)
        if ok:
            assert ran.code == 0, f"aihow {' '.join(args)} exited {ran.code}:\n{ran.out}\n{ran.err}"
        return ran

    def host_check(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.aihow("host.check", "--json", ok=False).out)
        return report


def checks_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def assert_held_by(host: GpuHost, vm: str, other: str) -> None:
    """``vm`` runs with both functions through VFIO, ``other`` is off, the ledger agrees."""
    group = host.iommu_group(FUNCTIONS[0])
    assert [host.driver(f) for f in FUNCTIONS] == ["vfio-pci", "vfio-pci"]
    assert host.domain_state(vm) == "running" and host.domain_state(other) == "shut off"
    assert host.live_hostdevs(vm) == list(FUNCTIONS)
    assert host.vfio_users(group) == [vm]
    stack = vm.split("-")[1]
    assert lease_holders(host, LEDGER) == dict.fromkeys(FUNCTIONS, f"{stack}/{vm}")


def test_one_gpu_two_clusters_over_real_vfio(simulator: GpuHost, phases: Phases) -> None:
    host, steps = simulator, Steps(simulator, phases)
    configure(host, simulated_clusters())
    device = f"({HPC_VM}, {CLOUD_VM})"
    group = host.iommu_group(FUNCTIONS[0])
    assert host.iommu_group(FUNCTIONS[1]) == group  # one device: its functions share a group
    assert [host.driver(f) for f in FUNCTIONS] == [None, None]

    # host.check before anything is bound: the driver, the group, and the commands that fix it.
    before = steps.host_check()
    checks = checks_by_name(before)
    assert not before["ready"]
    assert checks["kvm"]["verdict"] == "WARN"  # software emulation inside: slower, never a failure
    assert checks["iommu"]["ok"] and checks["libvirtd"]["ok"]
    for function in FUNCTIONS:
        driver = checks[f"device {function} {device} driver"]
        assert driver["verdict"] == "FAIL" and driver["detail"] == "bound to no driver"
        assert f"echo vfio-pci > /sys/bus/pci/devices/{function}/driver_override" in driver["fix"]
        assert checks[f"device {function} {device} iommu group {group}"]["ok"]
        assert checks[f"device {function} {device} ids"]["ok"]

    # system.up: the HPC node starts holding both functions; libvirt bound them to vfio-pci itself.
    steps.aihow("system.up")
    assert_held_by(host, HPC_VM, CLOUD_VM)
    assert host.domain_state("sim-cloud-control-plane") == "running"
    assert steps.host_check()["ready"]
    status = json.loads(steps.aihow("system.status", "--json").out)
    assert {g["address"]: (g["holder"], g["vms"]) for g in status["shared_gpus"]} == dict.fromkeys(
        FUNCTIONS, (f"hpc/{HPC_VM}", [HPC_VM, CLOUD_VM]))

    # The Cloud GPU worker cannot start: the lease names the holder; nothing changes.
    refused = steps.aihow("vm.start", CLOUD_VM, ok=False)
    assert refused.code == 1 and f"GPU {FUNCTIONS[0]} is held by hpc/{HPC_VM} since " in refused.err
    assert_held_by(host, HPC_VM, CLOUD_VM)

    # switch --to cloud: the HPC node stops and gives the device back, the Cloud worker takes it.
    steps.aihow("switch", "--to", "cloud")
    assert_held_by(host, CLOUD_VM, HPC_VM)
    # ... and back, in two steps: stopped, the holder gives the device back to the host (libvirt
    # rebinds it to its own driver: none), and no lease is left.
    steps.aihow("vm.stop", CLOUD_VM)
    assert [host.driver(f) for f in FUNCTIONS] == [None, None]
    assert host.vfio_users(group) == [] and host.domain_state(CLOUD_VM) == "shut off"
    assert lease_holders(host, LEDGER) == dict.fromkeys(FUNCTIONS, None)
    steps.aihow("switch", "--to", "hpc")
    assert_held_by(host, HPC_VM, CLOUD_VM)

    # The ledger bypassed. Started by hand, libvirt itself refuses the second domain.
    by_hand = host.sh(f"virsh start {CLOUD_VM}")
    assert by_hand.code != 0
    assert f"PCI device {FUNCTIONS[0]} is in use by driver QEMU, domain {HPC_VM}" in by_hand.err
    # Through the project with the ledger moved away, the device is never handed over blind: the
    # qemu holding its VFIO group is found before anything runs, named as the VM it runs, in one
    # line; nothing was taken, so no ledger was even written.
    host.check(f"mv {LEDGER} {LEDGER}.kept")
    bypassed = steps.aihow("vm.start", CLOUD_VM, ok=False)
    refusal = " ".join(bypassed.err.split())  # one line, however the console wrapped it
    assert bypassed.code == 1
    assert f"device {FUNCTIONS[0]} is held open on the host: pid " in refusal
    assert (f"(qemu-system-x86, the running VM {HPC_VM}) has /dev/vfio/{group} open; {CLOUD_VM} was not started "
            f"and nothing was changed; allowed: stop {HPC_VM} first") in refusal
    assert host.check(f"test -e {LEDGER} && echo written || echo none").strip() == "none"
    host.check(f"mv {LEDGER}.kept {LEDGER}")
    assert_held_by(host, HPC_VM, CLOUD_VM)

    # system.destroy: no domain is left, and libvirt gave the device back to the host.
    steps.aihow("system.destroy", "--yes")
    assert host.check("virsh -q list --all --name").split() == []
    assert [host.driver(f) for f in FUNCTIONS] == [None, None]
    assert lease_holders(host, LEDGER) == dict.fromkeys(FUNCTIONS, None)

    # Bound by hand with the commands host.check prints, the host is ready without libvirt's help.
    after = checks_by_name(steps.host_check())
    for function in FUNCTIONS:
        fix = after[f"device {function} {device} driver"]["fix"]
        host.check(fix.split("  (or ")[0])
    assert [host.driver(f) for f in FUNCTIONS] == ["vfio-pci", "vfio-pci"]
    assert steps.host_check()["ready"]

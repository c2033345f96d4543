"""The seed's GPU hand-over (CLOUD-0.3) through real VFIO, inside the GPU-host simulator, and
GPU custody: every device goes back to its home, and is never handed over blind.

The project runs inside an outer VM that has an IOMMU, a two-function stand-in GPU and a NIC
with a host driver (tests/gpuhost.py), against that VM's own libvirtd, exactly as an operator
runs it on a workstation: ``aihow host.check``, ``gpu.home``, ``system.up``, ``vm.start``,
``switch``, ``system.destroy``.
Every step is checked from libvirt's and the kernel's own view inside: the driver each function
is bound to, the hostdevs of the running domain's live XML, which qemu holds ``/dev/vfio/<group>``
open, and the lease ledger. The inner domains boot nothing (a blank disk): holding the device
is what is tested. The outer VM needs no network; everything goes through its guest agent.

Run alone with ``pytest -m gpuhost``. About 10 minutes here alone, 14-17 beside the other lane of
``aihow test`` (software emulation, 2 vCPUs); the first run also builds the ``gpuhost`` image
(about a minute, cached afterwards).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aihow_infra.images import ensure_image
from aihow_infra.libvirt.guest import Ran
from tests.gpuhost import (
    GPU_SLOT,
    NIC,
    NIC_DRIVER,
    GpuHost,
    configure,
    edu_passthrough,
    gpu_host,
    lease_holders,
    ledger_homes,
    nic_passthrough,
)
from tests.sandbox import Phases, Sandbox

pytestmark = [pytest.mark.e2e, pytest.mark.gpuhost, pytest.mark.timeout(2400)]

HPC_VM, CLOUD_VM = "sim-hpc-compute-01", "sim-cloud-gpu-worker-01"  # the HPC node takes the NIC too
FUNCTIONS = (f"{GPU_SLOT}.0", f"{GPU_SLOT}.1")  # the stand-in GPU's "video" and "audio" functions
LEDGER = "/var/lib/aihow/gpu-leases.json"
SLOW_STEP = 60  # seconds: a step this slow has its progress lines in the phase times


def simulated_clusters() -> dict[str, Any]:
    """The seed's shape, small: the device in the HPC compute node and in the Cloud GPU worker
    (which does not start by itself), the NIC in the HPC compute node too (its round trip home
    rides on the GPU's hand-overs); nodes with nothing to boot. The heads are defined but not
    started: they hold no device, and each running inner domain costs the simulator about 13 % of
    a core in qemu's own timers, emulated (README, "The test command"), on a lane that has no core
    to spare."""
    def node(ip: str, **extra: Any) -> dict[str, Any]:
        return {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip": ip, **extra}

    def cluster(kind: str, third: int) -> dict[str, Any]:
        return {"name": f"sim-{kind}", "hardware": {"acceleration": {"cpu_model": "qemu64"}},
                "network": {"subnet": f"10.77.{third}.0/24", "bridge": f"sim{kind}0", "forward_mode": "isolated"}}

    return {
        "hpc": {**cluster("hpc", 1), "controller": node("10.77.1.10", auto_start=False),
                "compute_nodes": [node("10.77.1.11", pcie_passthrough={
                    "enabled": True, "devices": edu_passthrough()["devices"] + nic_passthrough()["devices"]})]},
        "cloud": {**cluster("cloud", 2), "control_plane": node("10.77.2.10", auto_start=False),
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
        seconds = time.monotonic() - started
        self.phases.add(f"aihow {' '.join(args)}", seconds)
        if seconds >= SLOW_STEP:  # where its time went: the engine's lines carry each resource's seconds
            for line in ran.err.splitlines():
                self.phases.note(line)
        if ok:
            assert ran.code == 0, f"aihow {' '.join(args)} exited {ran.code}:\n{ran.out}\n{ran.err}"
        return ran

    def host_check(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.aihow("host.check", "--json", ok=False).out)
        return report


def checks_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def assert_held_by(host: GpuHost, vm: str, other: str) -> None:
    """``vm`` runs with both functions through VFIO (the HPC node with the NIC too), ``other``
    is off, the ledger agrees."""
    group = host.iommu_group(FUNCTIONS[0])
    assert [host.driver(f) for f in FUNCTIONS] == ["vfio-pci", "vfio-pci"]
    assert host.domain_state(vm) == "running" and host.domain_state(other) == "shut off"
    assert host.live_hostdevs(vm) == sorted([*FUNCTIONS, *([NIC] if vm == HPC_VM else [])])
    assert host.driver(NIC) == ("vfio-pci" if vm == HPC_VM else NIC_DRIVER)
    assert host.vfio_users(group) == [vm]
    stack = vm.split("-")[1]
    holders = lease_holders(host, LEDGER)
    assert {f: holders.get(f) for f in FUNCTIONS} == dict.fromkeys(FUNCTIONS, f"{stack}/{vm}")


def test_one_gpu_two_clusters_over_real_vfio(simulator: GpuHost, phases: Phases) -> None:
    host, steps = simulator, Steps(simulator, phases)
    configure(host, simulated_clusters())
    device = f"({HPC_VM}, {CLOUD_VM})"
    group = host.iommu_group(FUNCTIONS[0])
    assert host.iommu_group(FUNCTIONS[1]) == group  # one device: its functions share a group
    assert [host.driver(f) for f in FUNCTIONS] == [None, None]
    assert host.driver(NIC) == NIC_DRIVER and host.iommu_group(NIC) != group

    # host.check before anything: every device is at home (the host's driver, or none), which is
    # where libvirt takes it from when a VM starts.
    before = steps.host_check()
    checks = checks_by_name(before)
    assert before["ready"], [c for c in before["checks"] if c["verdict"] == "FAIL"]
    assert checks["kvm"]["verdict"] == "WARN"  # software emulation inside: slower, never a failure
    assert checks["iommu"]["ok"] and checks["libvirtd"]["ok"]
    for function in FUNCTIONS:
        driver = checks[f"device {function} {device} driver"]
        assert driver["ok"] and driver["detail"].startswith("at home on no driver (home: host)")
        assert checks[f"device {function} {device} iommu group {group}"]["ok"]
        assert checks[f"device {function} {device} ids"]["ok"]
    assert checks[f"device {NIC} ({HPC_VM}) driver"]["detail"].startswith(f"at home on {NIC_DRIVER} (home: host)")

    # The stand-in GPU's home becomes vfio-pci (kept ready for VMs): both functions, bound now.
    homed = steps.aihow("gpu.home", FUNCTIONS[0], "--to", "vfio-pci").out
    assert [host.driver(f) for f in FUNCTIONS] == ["vfio-pci", "vfio-pci"]
    assert ledger_homes(host, LEDGER) == dict.fromkeys(FUNCTIONS, "vfio-pci")
    assert f"{FUNCTIONS[1]}: home vfio-pci; at home, on vfio-pci" in homed.splitlines()

    # system.up: the HPC node starts holding both functions, and the NIC (vmxnet3 -> vfio-pci).
    steps.aihow("system.up")
    assert_held_by(host, HPC_VM, CLOUD_VM)
    assert host.domain_state("sim-cloud-control-plane") == "shut off"  # defined, not started
    assert steps.host_check()["ready"]
    status = json.loads(steps.aihow("system.status", "--json").out)
    assert {g["address"]: (g["holder"], g["vms"]) for g in status["shared_gpus"]} == dict.fromkeys(
        FUNCTIONS, (f"hpc/{HPC_VM}", [HPC_VM, CLOUD_VM]))
    assert {h["address"]: h["now"] for h in status["homes"]} == dict.fromkeys([*FUNCTIONS, NIC],
                                                                              f"held by hpc/{HPC_VM}")

    # The Cloud GPU worker cannot start: the lease names the holder; nothing changes.
    refused = steps.aihow("vm.start", CLOUD_VM, ok=False)
    assert refused.code == 1 and f"GPU {FUNCTIONS[0]} is held by hpc/{HPC_VM} since " in refused.err
    assert_held_by(host, HPC_VM, CLOUD_VM)

    # switch --to cloud: the HPC node stops and gives the device back, the Cloud worker takes it;
    # the NIC goes back home to its own driver, said as it happens.
    switched = steps.aihow("switch", "--to", "cloud")
    assert_held_by(host, CLOUD_VM, HPC_VM)
    assert f"... device {NIC}: at home, on {NIC_DRIVER}" in switched.err.splitlines()  # the progress lines
    # ... and back, in two steps: stopped, the holder gives the device back to its home (vfio-pci:
    # libvirt's reattach took it off, the project bound it back), and no lease is left.
    stopped = steps.aihow("vm.stop", CLOUD_VM)
    assert [host.driver(f) for f in FUNCTIONS] == ["vfio-pci", "vfio-pci"]
    assert host.vfio_users(group) == [] and host.domain_state(CLOUD_VM) == "shut off"
    assert {f: lease_holders(host, LEDGER)[f] for f in FUNCTIONS} == dict.fromkeys(FUNCTIONS, None)
    assert f"... device {FUNCTIONS[0]}: at home, on vfio-pci" in stopped.err.splitlines()
    # The NIC held open by a host process: it is not handed over (the pid is named, nothing
    # starts, no lease is taken); once that process ends, the HPC node takes both again.
    holder = host.check(f"setsid sleep 600 < /sys/bus/pci/devices/{NIC}/config > /dev/null 2>&1 & echo $!").strip()
    refused = steps.aihow("vm.start", HPC_VM, ok=False)
    refusal = " ".join(refused.err.split())
    assert refused.code == 1 and f"device {NIC} is held open on the host: pid {holder} (sleep) has " in refusal
    assert f"{HPC_VM} was not started and nothing was changed" in refusal
    assert host.domain_state(HPC_VM) == "shut off" and host.driver(NIC) == NIC_DRIVER
    assert {f: lease_holders(host, LEDGER)[f] for f in FUNCTIONS} == dict.fromkeys(FUNCTIONS, None)
    host.check(f"kill {holder}")
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

    # system.destroy: no domain is left, and every device is at its home.
    steps.aihow("system.destroy", "--yes")
    assert host.check("virsh -q list --all --name").split() == []
    assert [host.driver(f) for f in FUNCTIONS] == ["vfio-pci", "vfio-pci"] and host.driver(NIC) == NIC_DRIVER
    assert {f: lease_holders(host, LEDGER)[f] for f in FUNCTIONS} == dict.fromkeys(FUNCTIONS, None)

    # A device stuck on vfio-pci with no holder (bound by hand, its home the host's driver) is said
    # by host.check and status, with the command that frees it; that command takes it home.
    steps.aihow("gpu.home", FUNCTIONS[0], "--to", "host")
    assert [host.driver(f) for f in FUNCTIONS] == [None, None]
    host.check(f"echo {NIC} > /sys/bus/pci/drivers/{NIC_DRIVER}/unbind; "
               f"echo vfio-pci > /sys/bus/pci/devices/{NIC}/driver_override; echo {NIC} > /sys/bus/pci/drivers_probe")
    assert host.driver(NIC) == "vfio-pci"
    stuck = checks_by_name(steps.host_check())[f"device {NIC} ({HPC_VM}) driver"]
    assert stuck["verdict"] == "WARN" and stuck["detail"].startswith("stuck on vfio-pci with no holder")
    assert stuck["fix"] == f"aihow gpu.home {NIC}"
    status = json.loads(steps.aihow("system.status", "--json").out)
    assert [(h["address"], h["stuck"], h["fix"]) for h in status["homes"] if h["stuck"]] == [
        (NIC, True, f"aihow gpu.home {NIC}")]
    steps.aihow("gpu.home", NIC)
    assert host.driver(NIC) == NIC_DRIVER
    assert steps.host_check()["ready"]

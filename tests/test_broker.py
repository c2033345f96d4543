"""The power broker's decisions (aihow_infra/ops/broker.py) against a stand-in of the operator's
lifecycle and the GPU lease ledger: the Kubernetes half (a worker started for a waiting pod,
stopped once idle) and the GPU following the work between the clusters. SLURM's queue and the
broker as a process are in test_power_programs.py, test_interrupts.py and, booted, in
test_e2e_main_job.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aihow_infra.desired import DesiredPower
from aihow_infra.errors import AihowError, LeaseConflictError, LeaseError
from aihow_infra.ops import broker as broker_module
from aihow_infra.ops.broker import PLACEMENT_GRACE, RETRY_FAILED_START, BrokerRecord, PowerBroker
from aihow_infra.plan import ClusterPlan, VmPlan
from tests.samples import cloud_plan, hpc_plan, pod, worker

GPU = "0000:01:00.0"


@dataclass
class Lifecycle:
    """The operator as the broker uses it: libvirt states and GPU leases it changes, the calls it
    gets, the work each VM runs (as its cluster's software would say)."""

    plans: list[ClusterPlan]
    state_dir: Path
    states: dict[str, str] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)  # address -> "<stack>/<vm>"
    work: dict[str, tuple[list[str], str]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    start_error: AihowError | None = None

    def __post_init__(self) -> None:
        self.state = type("State", (), {"broker": self.state_dir / "broker.json"})()
        self.states = {vm.name: "running" if vm.auto_start else "shutoff" for p in self.plans for vm in p.vms}

    def progress(self, line: str) -> None:
        self.said.append(line)

    def find_vm(self, name: str) -> tuple[Any, VmPlan]:
        plan, vm = next((p, vm) for p in self.plans for vm in p.vms if vm.name == name)
        return View(plan.key, plan), vm

    def live_states(self, _view: Any) -> dict[str, str]:
        return dict(self.states)

    def gpu_holders(self, name: str) -> list[str]:
        view, vm = self.find_vm(name)
        return [h for c in vm.claims if (h := self.leases.get(c.address)) and h != f"{view.stack}/{name}"]

    def work_on(self, name: str) -> tuple[list[str], str]:
        return self.work.get(name, ([], ""))

    def slurm_power_down(self, name: str) -> None:
        self.calls.append(f"slurm power down {name}")

    def vm_start(self, name: str) -> None:
        self.calls.append(f"start {name}")
        if self.start_error is not None:
            raise self.start_error
        view, vm = self.find_vm(name)
        held = self.gpu_holders(name)
        if held:
            raise LeaseConflictError(f"GPU {GPU} is held by {held[0]}")
        self.leases |= {c.address: f"{view.stack}/{name}" for c in vm.claims}
        self.states[name] = "running"

    def vm_stop(self, name: str, force: bool = False, drain: bool = True) -> None:
        self.calls.append(f"stop {name}" + (" force" if force else "") + ("" if drain else " nodrain"))
        view, _vm = self.find_vm(name)
        self.leases = {a: h for a, h in self.leases.items() if h != f"{view.stack}/{name}"}
        self.states[name] = "shutoff"


@dataclass(frozen=True)
class View:
    stack: str
    plan: ClusterPlan
    power: DesiredPower = field(default_factory=DesiredPower)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The broker's monotonic clock, moved by the test."""
    now = [1000.0]
    monkeypatch.setattr(broker_module.time, "monotonic", lambda: now[0])
    return now


def serve(broker: PowerBroker, plan: ClusterPlan, items: list[dict[str, Any]]) -> list[Any]:
    return broker._serve_workers(View("cloud", plan), items)  # type: ignore[arg-type]


def make(op: Lifecycle) -> PowerBroker:
    return PowerBroker(op)  # type: ignore[arg-type]


def test_the_broker_starts_a_worker_for_a_waiting_pod_and_stops_it_once_idle(tmp_path: Path,
                                                                          clock: list[float]) -> None:
    plan = cloud_plan(idle=60)
    cpu, gpu = worker(plan, 0), worker(plan, 1)
    op = Lifecycle([plan], tmp_path)
    broker = make(op)
    view = View("cloud", plan)
    wants_gpu = pod("train", nodeSelector={"aihow.dev/gpu": "nvidia_2335"})

    handled = broker._serve_workers(view, [wants_gpu])  # type: ignore[arg-type]
    assert op.calls == [f"start {gpu.name}"] and [h.result for h in handled] == ["started"]
    assert f"power broker: cloud: default/train waiting for {gpu.name}" in op.said

    # Scheduled there and running: work. Then done: idle, stopped (drained) after 60 s, not before.
    running = pod("train", phase="Running", node=gpu.name, unschedulable=False)
    broker._serve_workers(view, [running])  # type: ignore[arg-type]
    clock[0] += 500
    broker._serve_workers(view, [running])  # type: ignore[arg-type]
    done = pod("train", phase="Succeeded", node=gpu.name, unschedulable=False)
    broker._serve_workers(view, [done])  # type: ignore[arg-type]
    clock[0] += 59
    broker._serve_workers(view, [done])  # type: ignore[arg-type]
    assert op.calls == [f"start {gpu.name}"]
    clock[0] += 1
    broker._serve_workers(view, [done])  # type: ignore[arg-type]
    assert op.calls == [f"start {gpu.name}", f"stop {gpu.name}"]  # drained: no "nodrain"
    assert cpu.name not in " ".join(op.calls)
    record = BrokerRecord.read(op.state.broker)
    assert record is not None and [(h.action, h.result) for h in record.recent] == [("start", "started"),
                                                                                    ("stop", "stopped")]


def test_a_worker_held_off_by_a_gpu_lease_waits_and_a_failed_start_is_tried_again_later(
        tmp_path: Path, clock: list[float]) -> None:
    plan = cloud_plan()
    gpu = worker(plan, 1)
    op = Lifecycle([plan], tmp_path, start_error=LeaseError("GPU 0000:01:00.0 is held by hpc/hpc-compute-01"))
    broker = make(op)
    view = View("cloud", plan)
    wants_gpu = [pod("train", nodeSelector={"aihow.dev/gpu": "nvidia_2335"})]

    broker._serve_workers(view, wants_gpu)  # type: ignore[arg-type]
    broker._serve_workers(view, wants_gpu)  # type: ignore[arg-type]
    assert op.calls == [f"start {gpu.name}"] * 2  # a wait is tried every pass...
    assert [h.result for h in broker.waiting.values()] == ["waits: GPU 0000:01:00.0 is held by hpc/hpc-compute-01"]
    assert sum("waits" in line for line in op.said) == 1  # ...and said once

    op.calls.clear()
    op.start_error = AihowError("the image is missing")
    broker._serve_workers(view, wants_gpu)  # type: ignore[arg-type]
    assert op.calls == [f"start {gpu.name}", f"stop {gpu.name} force"]  # left off
    assert broker.waiting == {}
    clock[0] += RETRY_FAILED_START - 1
    broker._serve_workers(view, wants_gpu)  # type: ignore[arg-type]
    assert op.calls == [f"start {gpu.name}", f"stop {gpu.name} force"]
    clock[0] += 1
    op.start_error = None
    broker._serve_workers(view, wants_gpu)  # type: ignore[arg-type]
    assert op.calls[-1] == f"start {gpu.name}" and op.states[gpu.name] == "running"


def test_a_worker_started_by_hand_with_no_work_is_stopped_after_the_idle_time(tmp_path: Path,
                                                                              clock: list[float]) -> None:
    plan = cloud_plan(idle=30)
    cpu = worker(plan, 0)
    op = Lifecycle([plan], tmp_path)
    op.states[cpu.name] = "running"
    broker = make(op)
    proxy = pod("kube-proxy-x", phase="Running", node=cpu.name, unschedulable=False, owner="DaemonSet")
    broker._serve_workers(View("cloud", plan), [proxy])  # type: ignore[arg-type]
    clock[0] += 30
    broker._serve_workers(View("cloud", plan), [proxy])  # type: ignore[arg-type]
    assert op.calls == [f"stop {cpu.name}"]


def test_a_cordoned_worker_is_left_to_whoever_cordoned_it(tmp_path: Path, clock: list[float]) -> None:
    """An operator's vm.stop drains it (cordoned first), or they keep it out of use: the broker
    does not stop it too."""
    plan = cloud_plan(idle=30)
    cpu = worker(plan, 0)
    op = Lifecycle([plan], tmp_path)
    op.states[cpu.name] = "running"
    broker = make(op)
    node = {"kind": "Node", "metadata": {"name": cpu.name}, "spec": {"unschedulable": True}}
    broker._serve_workers(View("cloud", plan), [node])  # type: ignore[arg-type]
    clock[0] += 300
    broker._serve_workers(View("cloud", plan), [node])  # type: ignore[arg-type]
    assert op.calls == []
    del node["spec"]["unschedulable"]  # back in scheduling: idle from now
    broker._serve_workers(View("cloud", plan), [node])  # type: ignore[arg-type]
    clock[0] += 30
    broker._serve_workers(View("cloud", plan), [node])  # type: ignore[arg-type]
    assert op.calls == [f"stop {cpu.name}"]


def gpu_pod() -> list[dict[str, Any]]:
    return [pod("train", nodeSelector={"aihow.dev/gpu": "nvidia_2335"})]


def test_a_pod_takes_the_gpu_from_an_idle_slurm_node_drained_and_stopped(tmp_path: Path, clock: list[float]) -> None:
    hpc, cloud = hpc_plan(), cloud_plan()
    compute, gpu = next(vm for vm in hpc.vms if vm.role == "compute"), worker(cloud, 1)
    op = Lifecycle([hpc, cloud], tmp_path, leases={GPU: f"hpc/{compute.name}"})
    broker = make(op)

    handled = serve(broker, cloud, gpu_pod())
    assert op.calls == [f"start {gpu.name}", f"stop {compute.name}", f"start {gpu.name}"]  # drained: no "nodrain"
    assert [h.result for h in handled] == ["started (its GPU moved from an idle VM)"]
    assert op.leases[GPU] == f"cloud/{gpu.name}" and op.states[compute.name] == "shutoff"
    assert f"power broker: {gpu.name} needs the GPU of idle hpc/{compute.name}: stopping it (drained first)" in op.said
    record = BrokerRecord.read(op.state.broker)
    assert record is not None
    assert [(h.action, h.node, h.result) for h in record.recent] == [
        ("stop", compute.name, f"stopped: its GPU went to {gpu.name}"),
        ("start", gpu.name, "started (its GPU moved from an idle VM)")]


def test_a_busy_holder_is_never_preempted_and_the_start_waits_until_it_is_idle(tmp_path: Path,
                                                                               clock: list[float]) -> None:
    hpc, cloud = hpc_plan(), cloud_plan()
    compute, gpu = next(vm for vm in hpc.vms if vm.role == "compute"), worker(cloud, 1)
    op = Lifecycle([hpc, cloud], tmp_path, leases={GPU: f"hpc/{compute.name}"}, work={compute.name: (["41"], "")})
    broker = make(op)

    serve(broker, cloud, gpu_pod())
    serve(broker, cloud, gpu_pod())
    assert op.calls == [f"start {gpu.name}"] * 2 and op.states[compute.name] == "running"
    waiting = list(broker.waiting.values())
    assert [h.result for h in waiting] == [f"waits: GPU {GPU} is held by hpc/{compute.name}; hpc/{compute.name} is "
                                           "busy (41); a busy holder is never preempted"]
    record = BrokerRecord.read(op.state.broker)
    assert record is not None and [h.node for h in record.waiting] == [gpu.name]  # status shows who waits

    op.work[compute.name] = (["41", "42", "43", "44"], "")
    serve(broker, cloud, gpu_pod())
    assert "busy (41, 42, 43 and 1 more)" in next(iter(broker.waiting.values())).result

    op.work[compute.name] = ([], "")  # the job ended
    serve(broker, cloud, gpu_pod())
    assert op.calls[-2:] == [f"stop {compute.name}", f"start {gpu.name}"] and broker.waiting == {}


def test_a_holder_whose_work_cannot_be_told_is_kept(tmp_path: Path, clock: list[float]) -> None:
    hpc, cloud = hpc_plan(), cloud_plan()
    compute, gpu = next(vm for vm in hpc.vms if vm.role == "compute"), worker(cloud, 1)
    op = Lifecycle([hpc, cloud], tmp_path, leases={GPU: f"hpc/{compute.name}"},
                   work={compute.name: ([], "the controller of hpc is not running")})
    serve(make(op), cloud, gpu_pod())
    assert op.calls == [f"start {gpu.name}"] and op.states[compute.name] == "running"
    assert op.said[-1].endswith(f"hpc/{compute.name} is kept: whether it is idle cannot be told (the controller of "
                                "hpc is not running) (0 s)")


def test_an_idle_on_demand_slurm_holder_is_powered_down_by_slurm_then_the_gpu_moves(tmp_path: Path,
                                                                                     clock: list[float]) -> None:
    """SLURM powers its own node down (it stays in power saving for later jobs): the start waits
    until the broker has carried out the suspend SLURM then asks for."""
    hpc, cloud = hpc_plan(on_demand=True), cloud_plan()
    compute, gpu = next(vm for vm in hpc.vms if vm.role == "compute"), worker(cloud, 1)
    op = Lifecycle([hpc, cloud], tmp_path, leases={GPU: f"hpc/{compute.name}"})
    op.states[compute.name] = "running"
    broker = make(op)

    serve(broker, cloud, gpu_pod())
    assert op.calls == [f"start {gpu.name}", f"slurm power down {compute.name}"]
    assert "SLURM powers it down, then its GPU is free" in next(iter(broker.waiting.values())).result
    op.vm_stop(compute.name, drain=False)  # the suspend SLURM asks for, carried out
    serve(broker, cloud, gpu_pod())
    assert op.calls[-1] == f"start {gpu.name}" and op.leases[GPU] == f"cloud/{gpu.name}" and broker.waiting == {}


def test_a_slurm_job_takes_the_gpu_from_an_idle_kubernetes_worker(tmp_path: Path, clock: list[float]) -> None:
    hpc, cloud = hpc_plan(on_demand=True), cloud_plan()
    compute, gpu = next(vm for vm in hpc.vms if vm.role == "compute"), worker(cloud, 1)
    op = Lifecycle([hpc, cloud], tmp_path, leases={GPU: f"cloud/{gpu.name}"},
                   work={gpu.name: (["default/infer"], "")})
    op.states[gpu.name] = "running"
    broker = make(op)
    resume = broker._one(View("hpc", hpc), None, "resume", compute.name)  # type: ignore[arg-type]
    assert resume.result.endswith("cloud/" + gpu.name + " is busy (default/infer); a busy holder is never preempted")
    op.work[gpu.name] = ([], "")
    resume = broker._one(View("hpc", hpc), None, "resume", compute.name)  # type: ignore[arg-type]
    assert resume.result == "started (its GPU moved from an idle VM)"
    assert op.calls[-2:] == [f"stop {gpu.name}", f"start {compute.name}"]


def test_a_failure_while_moving_the_gpu_is_a_wait_not_the_nodes_failure(tmp_path: Path, clock: list[float]) -> None:
    hpc, cloud = hpc_plan(on_demand=True), cloud_plan()
    compute, gpu = next(vm for vm in hpc.vms if vm.role == "compute"), worker(cloud, 1)
    op = Lifecycle([hpc, cloud], tmp_path, leases={GPU: f"hpc/{compute.name}"})

    def refuse(name: str) -> None:
        raise AihowError("the controller of hpc is not running; SLURM cannot power it down")

    op.slurm_power_down = refuse  # type: ignore[method-assign]
    handled = serve(make(op), cloud, gpu_pod())
    assert handled[0].result.startswith("waits: ") and "moving the GPU failed, tried again next pass" in \
        handled[0].result
    assert op.calls == [f"start {gpu.name}"]  # not powered off as a failed start would be


def test_a_pod_the_scheduler_never_places_is_given_up_on_not_started_for_again(tmp_path: Path,
                                                                                clock: list[float]) -> None:
    """A pod that stays pending on the worker started for it (a volume, an affinity between pods:
    what the broker does not judge) keeps the worker up for PLACEMENT_GRACE, then is given up on,
    said once; the worker is stopped once idle and not started again for that pod."""
    plan = cloud_plan(idle=10)
    cpu = worker(plan, 0)
    op = Lifecycle([plan], tmp_path)
    broker = make(op)
    stuck = [pod("with-volume")]
    serve(broker, plan, stuck)
    assert op.calls == [f"start {cpu.name}"]
    for _ in range(int(PLACEMENT_GRACE) // 60 - 1):
        clock[0] += 60
        serve(broker, plan, stuck)
    assert op.calls == [f"start {cpu.name}"]  # still being placed: not idle, though nothing runs there
    clock[0] += 60
    serve(broker, plan, stuck)
    assert sum("gave up on default/with-volume" in line for line in op.said) == 1
    clock[0] += 10
    serve(broker, plan, stuck)
    assert op.calls == [f"start {cpu.name}", f"stop {cpu.name}"]
    clock[0] += 600
    serve(broker, plan, stuck)
    assert op.calls == [f"start {cpu.name}", f"stop {cpu.name}"] and sum("gave up" in line for line in op.said) == 1
    serve(broker, plan, [])  # the pod deleted: forgotten; made again, it is started for afresh
    serve(broker, plan, stuck)
    assert op.calls[-1] == f"start {cpu.name}"


def test_a_worker_just_started_for_a_pod_is_not_idle_before_the_pod_is_placed(tmp_path: Path,
                                                                             clock: list[float]) -> None:
    plan = cloud_plan(idle=1)
    cpu = worker(plan, 0)
    op = Lifecycle([plan], tmp_path)
    broker = make(op)
    serve(broker, plan, [pod("slow-bind")])
    clock[0] += 5
    serve(broker, plan, [pod("slow-bind")])  # not placed yet: the worker stays
    assert op.calls == [f"start {cpu.name}"]
    placed = pod("slow-bind", phase="Running", node=cpu.name, unschedulable=False)
    clock[0] += 5
    serve(broker, plan, [placed])
    assert op.calls == [f"start {cpu.name}"]

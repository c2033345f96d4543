"""On-demand Kubernetes workers: which stopped worker a waiting pod would run on
(aihow_infra.kinds.podfit), and what the power broker does with a cluster's nodes and pods (its
Kubernetes half, against a stand-in of the operator's lifecycle: the booted e2e is in
test_e2e_main_job.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aihow_infra.desired import DesiredPower
from aihow_infra.errors import AihowError, LeaseError
from aihow_infra.kinds import podfit
from aihow_infra.kinds.podfit import Pod, memory_quantity, node_labels, why_not, workers_to_start, workload_pods
from aihow_infra.loading import parse_cluster_file
from aihow_infra.ops import broker as broker_module
from aihow_infra.ops.broker import RETRY_FAILED_START, BrokerRecord, PowerBroker
from aihow_infra.plan import ClusterPlan, VmPlan, plan_cluster
from tests.samples import base


def cloud_plan(idle: int = 60) -> ClusterPlan:
    """The sample's Cloud cluster with both workers on demand (the second has an NVIDIA GPU)."""
    data = base()
    cloud = data["clusters"]["cloud"]
    for worker in cloud["worker_nodes"]:
        worker.pop("auto_start", None)
        worker["on_demand"] = True
    cloud["worker_nodes"][1]["pcie_passthrough"]["devices"][0] |= {"vendor_id": "10de", "device_id": "2335"}
    cloud["kubernetes_config"] = {"scale_down_unneeded_time": idle}
    return plan_cluster(parse_cluster_file(data, env={}), "cloud")


def worker(plan: ClusterPlan, index: int) -> VmPlan:
    return [vm for vm in plan.vms if vm.role != "control-plane"][index]


def pod(name: str, phase: str = "Pending", node: str | None = None, unschedulable: bool = True,
        namespace: str = "default", owner: str | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if owner:
        meta["ownerReferences"] = [{"kind": owner, "name": "x"}]
    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}] if unschedulable else []
    return {"kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "c"}], **spec,
                                                       **({"nodeName": node} if node else {})},
            "status": {"phase": phase, "conditions": conditions}}


def test_an_on_demand_worker_is_planned_off_with_the_idle_time() -> None:
    plan = cloud_plan(idle=45)
    workers = [vm for vm in plan.vms if vm.role != "control-plane"]
    assert [(vm.on_demand, vm.auto_start) for vm in workers] == [(True, False), (True, False)]
    assert plan.scale_down_unneeded_time == 45
    assert workers[1].gpu_type == "nvidia_2335" and workers[0].gpu_type is None


def test_a_worker_has_the_labels_the_deploy_gives_it() -> None:
    plan = cloud_plan()
    gpu = worker(plan, 1)
    labels = node_labels(gpu)
    assert labels["kubernetes.io/hostname"] == gpu.name and labels["node-role.kubernetes.io/worker"] == ""
    assert labels["aihow.dev/gpu"] == "nvidia_2335" and labels["kubernetes.io/arch"] == "amd64"
    assert "aihow.dev/gpu" not in node_labels(worker(plan, 0))


def test_only_pods_the_scheduler_could_not_place_wait_for_a_worker() -> None:
    items = [pod("waiting"), pod("new", unschedulable=False), pod("bound", node="w"),
             pod("running", phase="Running", unschedulable=False, node="w"),
             {"kind": "Node", "metadata": {"name": "w"}}]
    assert [p.name for p in podfit.unschedulable(items)] == ["waiting"]


def test_work_on_a_node_is_every_pod_but_daemonsets_mirrors_and_finished_ones() -> None:
    items = [pod("job", phase="Running", node="w", unschedulable=False),
             pod("proxy", phase="Running", node="w", unschedulable=False, owner="DaemonSet", namespace="kube-system"),
             pod("done", phase="Succeeded", node="w", unschedulable=False),
             pod("failed", phase="Failed", node="w", unschedulable=False),
             pod("elsewhere", phase="Running", node="v", unschedulable=False),
             pod("rs", phase="Pending", node="w", unschedulable=False, owner="ReplicaSet")]
    mirror = pod("static", phase="Running", node="w", unschedulable=False)
    mirror["metadata"]["annotations"] = {"kubernetes.io/config.mirror": "abc"}
    assert workload_pods([*items, mirror], "w") == ["default/job", "default/rs"]


def spec_pod(**spec: Any) -> Pod:
    return Pod("default", "p", {"containers": [{"name": "c"}], **spec})


@pytest.mark.parametrize(("spec", "cpu_fits", "gpu_fits"), [
    ({}, True, True),
    ({"nodeSelector": {"aihow.dev/gpu": "nvidia_2335"}}, False, True),
    ({"nodeSelector": {"aihow.dev/gpu": "amd_1"}}, False, False),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "aihow.dev/gpu", "operator": "Exists"}]}]}}}}, False, True),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "aihow.dev/gpu", "operator": "DoesNotExist"}]}]}}}}, True, False),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "aihow.dev/gpu", "operator": "In", "values": ["x"]}]},
        {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "NotIn", "values": ["windows"]}]}]}}}},
     True, True),  # terms are ORed
    ({"containers": [{"name": "c", "resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}}}]}, True, True),
    ({"containers": [{"name": "c", "resources": {"requests": {"cpu": "3"}}}]}, False, False),
    ({"containers": [{"name": "a", "resources": {"requests": {"memory": "1536Mi"}}},
                     {"name": "b", "resources": {"requests": {"memory": "1Gi"}}}]}, False, False),  # summed
    ({"initContainers": [{"name": "i", "resources": {"requests": {"memory": "3G"}}}]}, False, False),
])
def test_a_pod_fits_a_worker_as_the_scheduler_filters_it(spec: dict[str, Any], cpu_fits: bool,
                                                           gpu_fits: bool) -> None:
    plan = cloud_plan()
    assert [why_not(spec_pod(**spec), worker(plan, i)) is None for i in (0, 1)] == [cpu_fits, gpu_fits]


def test_why_a_pod_does_not_fit_is_said() -> None:
    plan = cloud_plan()
    cpu = worker(plan, 0)
    assert why_not(spec_pod(nodeSelector={"aihow.dev/gpu": "nvidia_2335"}), cpu) == \
        "its nodeSelector aihow.dev/gpu=nvidia_2335 does not match"
    assert why_not(spec_pod(containers=[{"resources": {"requests": {"cpu": "4"}}}]), cpu) == \
        "it requests 4 CPUs, the worker has 2"
    assert why_not(spec_pod(nodeName="elsewhere"), cpu) == "it names node elsewhere"


def test_quantities() -> None:
    assert memory_quantity("512Mi") == 512 * 2**20 and memory_quantity("1G") == 10**9
    assert memory_quantity("1048576") == 2**20 and memory_quantity("1.5Gi") == 3 * 2**29
    assert podfit.cpu_quantity("250m") == 0.25 and podfit.cpu_quantity("2") == 2.0


def test_each_waiting_pod_goes_to_the_first_stopped_worker_it_fits() -> None:
    plan = cloud_plan()
    cpu, gpu = worker(plan, 0), worker(plan, 1)
    items = [pod("any"), pod("gpu", nodeSelector={"aihow.dev/gpu": "nvidia_2335"}),
             pod("nowhere", nodeSelector={"disk": "ssd"})]
    assert workers_to_start(items, [cpu, gpu]) == {cpu.name: ["default/any"], gpu.name: ["default/gpu"]}
    assert workers_to_start(items, [gpu]) == {gpu.name: ["default/any", "default/gpu"]}
    assert workers_to_start(items, []) == {}


@dataclass
class Lifecycle:
    """The operator's lifecycle as the broker uses it: libvirt states it changes, calls it keeps."""

    plan: ClusterPlan
    state_dir: Path
    states: dict[str, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    start_error: AihowError | None = None

    def __post_init__(self) -> None:
        self.state = type("State", (), {"broker": self.state_dir / "broker.json"})()
        self.states = {vm.name: "shutoff" if vm.on_demand else "running" for vm in self.plan.vms}

    def progress(self, line: str) -> None:
        self.said.append(line)

    def live_states(self, _view: Any) -> dict[str, str]:
        return dict(self.states)

    def vm_start(self, name: str) -> None:
        self.calls.append(f"start {name}")
        if self.start_error is not None:
            raise self.start_error
        self.states[name] = "running"

    def vm_stop(self, name: str, force: bool = False, drain: bool = True) -> None:
        self.calls.append(f"stop {name}" + (" force" if force else "") + ("" if drain else " nodrain"))
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


def test_the_broker_starts_a_worker_for_a_waiting_pod_and_stops_it_once_idle(tmp_path: Path,
                                                                          clock: list[float]) -> None:
    plan = cloud_plan(idle=60)
    cpu, gpu = worker(plan, 0), worker(plan, 1)
    op = Lifecycle(plan, tmp_path)
    broker = PowerBroker(op)  # type: ignore[arg-type]
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
    op = Lifecycle(plan, tmp_path, start_error=LeaseError("GPU 0000:01:00.0 is held by hpc/hpc-compute-01"))
    broker = PowerBroker(op)  # type: ignore[arg-type]
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
    op = Lifecycle(plan, tmp_path)
    op.states[cpu.name] = "running"
    broker = PowerBroker(op)  # type: ignore[arg-type]
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
    op = Lifecycle(plan, tmp_path)
    op.states[cpu.name] = "running"
    broker = PowerBroker(op)  # type: ignore[arg-type]
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

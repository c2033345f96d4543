"""On-demand Kubernetes workers: which stopped worker a waiting pod would run on
(aihow_infra.kinds.podfit). What the broker does with it is in test_broker.py."""

from __future__ import annotations

from typing import Any

import pytest

from aihow_infra.kinds import podfit
from aihow_infra.kinds.podfit import Pod, node_labels, quantity, why_not, workers_to_start, workload_pods
from tests.samples import cloud_plan, pod, worker


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


def test_quantities_as_kubernetes_writes_them() -> None:
    assert quantity("512Mi") == 512 * 2**20 and quantity("1G") == 10**9 and quantity("1048576") == 2**20
    assert quantity("1.5Gi") == 3 * 2**29 and quantity("1Ei") == 2**60 and quantity("1e3") == 1000
    assert quantity("250m") == 0.25 and quantity("2") == 2.0 and quantity(".5") == 0.5
    assert quantity("512m") == 0.512  # milli-bytes: Kubernetes takes them (with a warning)
    with pytest.raises(ValueError, match="'lots' is not a Kubernetes quantity"):
        quantity("lots")


def test_a_pod_asking_for_what_no_worker_offers_starts_none() -> None:
    """No device plugin, so no worker offers nvidia.com/gpu: starting one would leave the pod
    pending and the worker idle, stopped and started again."""
    plan = cloud_plan()
    gpu = worker(plan, 1)
    cuda = spec_pod(nodeSelector={"aihow.dev/gpu": "nvidia_2335"},
                    containers=[{"name": "c", "resources": {"limits": {"nvidia.com/gpu": 1}}}])
    assert why_not(cuda, gpu) == "it asks for nvidia.com/gpu, which the broker cannot tell a worker offers"
    odd = spec_pod(containers=[{"name": "c", "resources": {"requests": {"memory": "lots"}}}])
    assert why_not(odd, gpu) == "its requests cannot be read ('lots' is not a Kubernetes quantity)"


def test_each_waiting_pod_goes_to_the_first_stopped_worker_it_fits() -> None:
    plan = cloud_plan()
    cpu, gpu = worker(plan, 0), worker(plan, 1)
    items = [pod("any"), pod("gpu", nodeSelector={"aihow.dev/gpu": "nvidia_2335"}),
             pod("nowhere", nodeSelector={"disk": "ssd"})]
    assert workers_to_start(items, [cpu, gpu]) == {cpu.name: ["default/any"], gpu.name: ["default/gpu"]}
    assert workers_to_start(items, [gpu]) == {gpu.name: ["default/any", "default/gpu"]}
    assert workers_to_start(items, []) == {}

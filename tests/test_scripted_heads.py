"""The heads' stand-ins (tests/scripted_heads.py) answer the project's own commands as SLURM and
Kubernetes would: the simulator's power-broker scenario relies on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aihow_infra.kinds import cloud, hpc
from aihow_infra.kinds.podfit import unschedulable, workload_pods
from tests.scripted_heads import ScriptedHeads, answered_by


class Head:
    """A head domain as the kinds' functions use it: by name."""

    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


CONTROLLER, CONTROL_PLANE = Head("hpc-controller"), Head("cloud-control-plane")


@pytest.fixture
def heads(tmp_path: Path) -> Iterator[ScriptedHeads]:
    made = ScriptedHeads.create(tmp_path / "heads.json", {"hpc-controller": "hpc", "cloud-control-plane": "cloud"},
                                ["hpc-compute-01"])
    undo = answered_by(made)
    try:
        yield made
    finally:
        undo()


def test_slurm_queues_a_resume_for_a_job_and_a_suspend_once_the_node_is_idle(heads: ScriptedHeads) -> None:
    heads.submit("7", "hpc-compute-01")
    [request] = hpc.power_requests(CONTROLLER)
    assert (request.action, request.nodes) == ("resume", ("hpc-compute-01",))
    assert hpc.jobs_on(CONTROLLER, "hpc-compute-01") == ["7"]
    hpc.acknowledge(CONTROLLER, request)
    assert hpc.power_requests(CONTROLLER) == []

    hpc.power_down_when_idle(CONTROLLER, ["hpc-compute-01"])
    assert hpc.power_requests(CONTROLLER) == []  # busy: not yet
    heads.job_ends("7")
    [request] = hpc.power_requests(CONTROLLER)
    assert (request.action, request.nodes) == ("suspend", ("hpc-compute-01",))

    heads.submit("8", "hpc-compute-01")
    hpc.mark_down(CONTROLLER, ["hpc-compute-01"], "aihow: could not start the VM")
    assert hpc.jobs_on(CONTROLLER, "hpc-compute-01") == []  # requeued
    assert hpc.node_states(CONTROLLER) == {"hpc-compute-01": "down"}
    assert heads.read()["hpc"]["down"] == {"hpc-compute-01": "aihow: could not start the VM"}


def test_kubernetes_lists_places_and_drains(heads: ScriptedHeads) -> None:
    heads.pod_waits("train", nodeSelector={"aihow.dev/gpu": "gpu_11e8"})
    items = cloud.cluster_objects(CONTROL_PLANE)
    assert [p.ref for p in unschedulable(items)] == ["default/train"]
    heads.pod_runs("train", "cloud-gpu-worker-01")
    items = cloud.cluster_objects(CONTROL_PLANE)
    assert unschedulable(items) == [] and workload_pods(items, "cloud-gpu-worker-01") == ["default/train"]
    assert cloud.node_states(CONTROL_PLANE) == {"cloud-gpu-worker-01": "Ready"}
    # As the API server answers the reader: every path 200 (the kubeconfig is not one of them).
    assert cloud.api_get(CONTROL_PLANE, ["/api/v1/nodes", "/readyz"]) == {
        "/api/v1/nodes": (200, {"kind": "NodeList", "items": [{
            "metadata": {"name": "cloud-gpu-worker-01"}, "spec": {"unschedulable": False},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]}),
        "/readyz": (200, "ok")}

    said: list[str] = []
    cloud.drain(CONTROL_PLANE, ["cloud-gpu-worker-01", "never-joined"], 30, said.append)
    assert said == ["draining cloud-gpu-worker-01 in Kubernetes (pods may take up to 30 s to leave)"]
    assert cloud.node_states(CONTROL_PLANE) == {
        "cloud-gpu-worker-01": "Ready,SchedulingDisabled"}
    assert workload_pods(cloud.cluster_objects(CONTROL_PLANE), "cloud-gpu-worker-01") == []


def test_a_command_no_stand_in_knows_fails_as_an_unknown_one_does(heads: ScriptedHeads) -> None:
    assert cloud.kubectl(CONTROL_PLANE, ["delete", "node", "x"]).code == 1
    assert heads.run(Head("elsewhere"), ["/bin/true"]).code == 127
    assert heads.read()["asked"][-1] == "elsewhere: /bin/true"


def test_power_down_asked_twice_suspends_once(heads: ScriptedHeads) -> None:
    for _ in range(2):
        hpc.power_down_when_idle(CONTROLLER, ["hpc-compute-01"])
    assert [r.action for r in hpc.power_requests(CONTROLLER)] == ["suspend"]

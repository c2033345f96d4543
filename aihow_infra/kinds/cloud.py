"""Kubernetes' view of the Cloud cluster, asked on the control plane through its guest agent
(no IP traffic from the host): node readiness, draining before a node stops, health for
status, and any kubectl command for ``aihow kubectl``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import libvirt

from aihow_infra.config import ClusterKey
from aihow_infra.desired import DesiredPower
from aihow_infra.errors import GuestError
from aihow_infra.kinds import Hosts, play_group
from aihow_infra.kinds.podfit import workload_pods
from aihow_infra.libvirt import guest
from aihow_infra.libvirt.guest import Ran, run
from aihow_infra.plan import ClusterPlan, Role
from aihow_infra.steps import Progress

KUBECTL = "/usr/local/bin/kubectl"
ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"


def kubectl(control_plane: libvirt.virDomain, args: Sequence[str], timeout: float = 120) -> Ran:
    """Run ``kubectl ARGS`` on the control plane with the admin kubeconfig."""
    return run(control_plane, [KUBECTL, "--kubeconfig", ADMIN_KUBECONFIG, *args], timeout=timeout)


def node_states(control_plane: libvirt.virDomain) -> dict[str, str] | None:
    """Each node's state by name: ``Ready``, ``NotReady`` or ``Unknown``, with
    ``,SchedulingDisabled`` when cordoned; None when the API server does not answer (not
    deployed yet, or the control plane is down)."""
    try:
        ran = kubectl(control_plane, ["get", "nodes", "-o", "json"], timeout=60)
    except GuestError:
        return None
    if ran.code != 0:
        return None
    try:
        items = json.loads(ran.out).get("items") or []
    except ValueError:
        return None
    return {item["metadata"]["name"]: _state(item) for item in items}


def _state(node: dict[str, object]) -> str:
    status = node.get("status") or {}
    conditions = status.get("conditions") if isinstance(status, dict) else None
    ready = next((c.get("status") for c in conditions or [] if c.get("type") == "Ready"), "Unknown")
    word = {"True": "Ready", "False": "NotReady"}.get(str(ready), "Unknown")
    spec = node.get("spec") or {}
    return f"{word},SchedulingDisabled" if isinstance(spec, dict) and spec.get("unschedulable") else word


def cluster_objects(control_plane: libvirt.virDomain) -> list[dict[str, Any]]:
    """Every Node and Pod (all namespaces) as the API server lists them, in one kubectl run;
    ``GuestError`` when the agent or the API server does not answer."""
    ran = kubectl(control_plane, ["get", "nodes,pods", "--all-namespaces", "-o", "json"], timeout=120)
    if ran.code != 0:
        raise GuestError(f"listing nodes and pods on {control_plane.name()} failed: "
                         f"{ran.err.strip() or ran.out.strip()}")
    try:
        items: list[dict[str, Any]] = json.loads(ran.out).get("items") or []
    except ValueError as exc:
        raise GuestError(f"listing nodes and pods on {control_plane.name()}: not JSON ({exc})") from None
    return items


def control_plane_ready(control_plane: libvirt.virDomain) -> bool:
    """True when the API server says it is ready (etcd included)."""
    try:
        return kubectl(control_plane, ["get", "--raw", "/readyz"], timeout=60).code == 0
    except GuestError:
        return False


def health(states: dict[str, str] | None, stopped: frozenset[str] = frozenset(), api_ready: bool = True,
           silent: str = "no answer from the control plane (not deployed, or stopped)") -> str:
    """One line for status: ``Kubernetes: healthy, 2/3 nodes Ready (1 stopped)``, or ``silent``
    (why it cannot say: ``silence``) when ``states`` is None. Nodes in ``stopped`` (VMs meant to
    be off) do not make the cluster degraded, and are not counted Ready even while Kubernetes
    still says so (it notices a node gone only after its grace period, 40 s or more)."""
    if states is None:
        return f"Kubernetes: {silent}"
    ready = sum(state.split(",")[0] == "Ready" for name, state in states.items() if name not in stopped)
    off = sum(name in stopped for name in states)
    word = ("API server not ready" if not api_ready else
            "healthy" if ready + off == len(states) else "degraded")
    return f"Kubernetes: {word}, {ready}/{len(states)} nodes Ready" + (f" ({off} stopped)" if off else "")


def silence(control_plane: libvirt.virDomain | None) -> str:
    """Why the API server gave no answer: the control plane is not running, not deployed (no admin
    kubeconfig yet), or deployed and not answering (with the guest's load)."""
    if control_plane is None:
        return "control plane not running"
    return guest.silence(control_plane, ADMIN_KUBECONFIG, "API server")


def drain(control_plane: libvirt.virDomain, nodes: list[str], timeout: float, progress: Progress) -> None:
    """Cordon ``nodes`` and evict their pods, waiting up to ``timeout`` seconds. The nodes stay
    in the cluster, unschedulable (a deploy uncordons a node that runs again); nodes the
    cluster does not know are left alone."""
    states = node_states(control_plane)
    known = [n for n in nodes if states and n in states]
    if not known:
        return
    names = " ".join(known)
    progress(f"draining {names} in Kubernetes (pods may take up to {timeout:.0f} s to leave)")
    for name in known:
        ran = kubectl(control_plane, ["drain", name, "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                                      f"--timeout={max(int(timeout), 1)}s"], timeout=timeout + 60)
        if ran.code != 0:
            raise GuestError(f"draining {name} failed on {control_plane.name()}: {ran.err.strip() or ran.out.strip()}")


class _Cloud:
    """The Cloud cluster: Kubernetes, its control plane the head."""

    key: ClusterKey = "cloud"
    software = "Kubernetes"
    head_role: Role = "control-plane"
    image = "cloud"
    component_type = "CloudCluster"

    def workload(self, head: libvirt.virDomain | None, plan: ClusterPlan,
                 power: DesiredPower) -> tuple[dict[str, str], str]:
        """Each node's readiness, and the health line (nodes meant to be off count as expected)."""
        nodes = node_states(head) if head is not None else None
        off = frozenset(vm.name for vm in plan.vms if not power.wants_running(vm.name, vm.auto_start))
        api = nodes is not None and head is not None and control_plane_ready(head)
        return nodes or {}, health(nodes, off, api, silence(head) if nodes is None else "")

    def drain(self, head: libvirt.virDomain, nodes: list[str], timeout: float, progress: Progress) -> None:
        """Cordon and evict (``drain`` above)."""
        drain(head, nodes, timeout, progress)

    def work_on(self, head: libvirt.virDomain, node: str) -> list[str]:
        """The pods on the node that are work (``podfit.workload_pods``)."""
        return workload_pods(cluster_objects(head), node)

    def inventory_groups(self, cluster: Mapping[str, Any], hosts: Hosts, by_role: Mapping[str, list[str]],
                         kube_pki_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Kubespray's layout: ``kube_control_plane``, ``kube_node`` and ``calico_rr`` under
        ``k8s_cluster``, and ``etcd``; subnets and the certificate folder as group variables."""
        control = by_role.get("control-plane", [])
        workers = by_role.get("cpu-worker", []) + by_role.get("gpu-worker", [])
        common = {"kube_pod_subnet": cluster.get("pod_subnet"), "kube_service_subnet": cluster.get("service_subnet")}
        if kube_pki_dir:
            common["kube_pki_dir"] = kube_pki_dir
        return common, {
            "k8s_cluster": {"children": {"kube_control_plane": play_group(hosts, control),
                                         "kube_node": play_group(hosts, workers), "calico_rr": {"hosts": {}}}},
            "etcd": {"hosts": {n: {} for n in control}},
        }


KIND = _Cloud()

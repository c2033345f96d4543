"""Kubernetes' view of the Cloud cluster, asked on the control plane through its guest agent
(no IP traffic from the host): node readiness, draining before a node stops, health for
status, and any kubectl command for ``aihow kubectl``.

Looks (nodes, pods, readiness) go through ``aihow-kube-get`` (kubernetes/kube/kubeget), which
the cloud image carries beside kubectl: GETs of API paths only, a tenth of kubectl's start
under software emulation (bench/kube_reader.py); the power broker looks every few seconds.
A control plane made from an image without it is asked with kubectl, as before."""

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
KUBE_GET = "/usr/local/bin/aihow-kube-get"
ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"
# aihow-kube-get's exit code (its main.go) when a path answered other than 2xx: every answer is
# still printed. The shell's when the program is not there: an image made before it.
_NOT_2XX, _NOT_FOUND = 1, 127
# How the reader is started: through the shell, which says 127 when the image has no reader.
KUBE_GET_COMMAND = ("/bin/sh", "-c", 'exec "$0" "$@"', KUBE_GET)


def kubectl(control_plane: libvirt.virDomain, args: Sequence[str], timeout: float = 120) -> Ran:
    """Run ``kubectl ARGS`` on the control plane with the admin kubeconfig."""
    return run(control_plane, [KUBECTL, "--kubeconfig", ADMIN_KUBECONFIG, *args], timeout=timeout)


def api_get(control_plane: libvirt.virDomain, paths: Sequence[str],
            timeout: float = 60) -> dict[str, tuple[int, Any]] | None:
    """GET each API path (``/api/v1/nodes``, ``/readyz``) with the admin kubeconfig, in one run of
    the image's reader: path -> (HTTP status, body: the decoded JSON, or the text). None when
    the control plane's image has no reader (made before it: ask kubectl). ``GuestError`` when
    the agent or the API server does not answer (no connection, no answer in time)."""
    ran = run(control_plane, [*KUBE_GET_COMMAND, "-kubeconfig", ADMIN_KUBECONFIG,
                              f"-timeout={max(int(timeout) - 5, 1)}s", *paths], timeout=timeout)
    if ran.code == _NOT_FOUND:
        return None
    if ran.code not in (0, _NOT_2XX):
        raise GuestError(f"asking the API server on {control_plane.name()} failed: "
                         f"{ran.err.strip() or f'{KUBE_GET} exited {ran.code}'}")
    try:
        return {a["path"]: (int(a["code"]), a["body"]) for a in json.loads(ran.out)}
    except (ValueError, TypeError, KeyError) as exc:
        raise GuestError(f"asking the API server on {control_plane.name()}: {KUBE_GET} printed no answers ({exc})") \
            from None


def _items(answers: dict[str, tuple[int, Any]], path: str, kind: str) -> list[dict[str, Any]]:
    """The items of a list answer, each with its ``kind`` (a list leaves it out; kubectl adds it);
    ``GuestError`` for any other answer."""
    code, body = answers[path]
    items = body.get("items") if isinstance(body, dict) else None
    if code != 200 or not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        said = body.get("message", "") if isinstance(body, dict) else str(body)[:200]
        raise GuestError(f"GET {path}: {code} {said or 'not a list'}")
    return [{"kind": kind, **item} for item in items]


def _kubectl_list(control_plane: libvirt.virDomain, what: str, timeout: float) -> list[dict[str, Any]]:
    """``kubectl get WHAT --all-namespaces -o json``'s items (each with its ``kind``)."""
    ran = kubectl(control_plane, ["get", what, "--all-namespaces", "-o", "json"], timeout=timeout)
    if ran.code != 0:
        raise GuestError(f"listing {what} on {control_plane.name()} failed: {ran.err.strip() or ran.out.strip()}")
    try:
        items: list[dict[str, Any]] = json.loads(ran.out).get("items") or []
    except (ValueError, AttributeError) as exc:
        raise GuestError(f"listing {what} on {control_plane.name()}: not JSON ({exc})") from None
    return items


def node_states(control_plane: libvirt.virDomain) -> dict[str, str] | None:
    """Each node's state by name: ``Ready``, ``NotReady`` or ``Unknown``, with
    ``,SchedulingDisabled`` when cordoned; None when the API server does not answer (not
    deployed yet, or the control plane is down)."""
    return _nodes_and_readiness(control_plane)[0]


def _nodes_and_readiness(control_plane: libvirt.virDomain) -> tuple[dict[str, str] | None, bool]:
    """``node_states``, and whether the API server says it is ready (etcd included): one run of
    the reader (two kubectl runs on an image without it)."""
    try:
        answers = api_get(control_plane, ["/api/v1/nodes", "/readyz"])
        if answers is None:
            items = _kubectl_list(control_plane, "nodes", timeout=60)
            ready = _kubectl_ready(control_plane)
        else:
            items, ready = _items(answers, "/api/v1/nodes", "Node"), answers["/readyz"][0] == 200
    except GuestError:
        return None, False
    return {item["metadata"]["name"]: _state(item) for item in items}, ready


def _kubectl_ready(control_plane: libvirt.virDomain) -> bool:
    try:
        return kubectl(control_plane, ["get", "--raw", "/readyz"], timeout=60).code == 0
    except GuestError:
        return False


def _state(node: dict[str, object]) -> str:
    status = node.get("status") or {}
    conditions = status.get("conditions") if isinstance(status, dict) else None
    ready = next((c.get("status") for c in conditions or [] if c.get("type") == "Ready"), "Unknown")
    word = {"True": "Ready", "False": "NotReady"}.get(str(ready), "Unknown")
    spec = node.get("spec") or {}
    return f"{word},SchedulingDisabled" if isinstance(spec, dict) and spec.get("unschedulable") else word


def cluster_objects(control_plane: libvirt.virDomain) -> list[dict[str, Any]]:
    """Every Node and Pod (all namespaces) as the API server lists them (each with its ``kind``,
    as ``kubectl get nodes,pods -o json`` gives them), in one run of the reader (of kubectl on an
    image without it); ``GuestError`` when the agent or the API server does not answer."""
    answers = api_get(control_plane, ["/api/v1/nodes", "/api/v1/pods"], timeout=120)
    if answers is None:
        return _kubectl_list(control_plane, "nodes,pods", timeout=120)
    return _items(answers, "/api/v1/nodes", "Node") + _items(answers, "/api/v1/pods", "Pod")


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
        nodes, api = _nodes_and_readiness(head) if head is not None else (None, False)
        off = frozenset(vm.name for vm in plan.vms if not power.wants_running(vm.name, vm.auto_start))
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

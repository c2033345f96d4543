"""Would a pending pod run on a Cloud worker that is stopped? The part of kube-scheduler's
filters the power broker needs to choose an on-demand worker to start for it, read from the
objects ``kubectl get nodes,pods -A -o json`` lists.

A worker that is off has no Node object, or an old one (NotReady, cordoned by the drain before
it stopped), so the pod is judged against what the worker will be once it has joined: the
labels the project gives it (``node_labels``) and its size from the cluster file. Checked, as
kube-scheduler's filters of the same names do (kubernetes.io/docs, "Assigning Pods to Nodes",
"Resource Management for Pods and Containers"):

- NodeName: ``spec.nodeName`` set to another node rules the worker out;
- NodeAffinity: ``spec.nodeSelector`` and ``requiredDuringSchedulingIgnoredDuringExecution``
  (operators In, NotIn, Exists, DoesNotExist, Gt, Lt; ``matchFields`` on ``metadata.name``);
- NodeResourcesFit: the pod's CPU and memory requests (its containers summed, or its largest
  init container) within the worker's vCPUs and memory. The kubelet keeps some of that memory
  for itself, so a pod that asks for nearly all of it may still wait once the worker runs (the
  broker gives up on such a pod: ops/broker.py). A pod that asks for any other resource
  (``nvidia.com/gpu``: the project installs no device plugin; hugepages; ephemeral storage) is
  not started for.

Taints are not checked: the project's workers carry none (a GPU worker is chosen by its
``aihow.dev/gpu`` label). A pod is waiting for a node when it is Pending, not bound to a node,
and its ``PodScheduled`` condition is False with reason ``Unschedulable``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aihow_infra.plan import VmPlan

# Labels every kubelet of the project's workers sets on itself (amd64 Debian guests).
KUBELET_LABELS = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                  "beta.kubernetes.io/arch": "amd64"}
GPU_LABEL = "aihow.dev/gpu"
WORKER_ROLE_LABEL = "node-role.kubernetes.io/worker"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"

Obj = Mapping[str, Any]


def node_labels(vm: VmPlan) -> dict[str, str]:
    """The labels worker ``vm`` has once it has joined: the kubelet's own, its host name, the
    worker role and, with a GPU, ``aihow.dev/gpu=<vendor>_<device id>`` (as the deploy's
    cluster_ready role sets them)."""
    labels = {**KUBELET_LABELS, "kubernetes.io/hostname": vm.name, WORKER_ROLE_LABEL: ""}
    if vm.gpu_type is not None:
        labels[GPU_LABEL] = vm.gpu_type
    return labels


@dataclass(frozen=True)
class Pod:
    """A pod as the broker needs it: where it is, what it asks for."""

    namespace: str
    name: str
    spec: Obj

    @property
    def ref(self) -> str:
        """``namespace/name``, as kubectl names it."""
        return f"{self.namespace}/{self.name}"


def _pod(item: Obj) -> Pod:
    meta = item.get("metadata") or {}
    return Pod(str(meta.get("namespace", "default")), str(meta.get("name", "")), item.get("spec") or {})


def _pods(items: Sequence[Obj]) -> list[Obj]:
    return [i for i in items if i.get("kind") == "Pod"]


def unschedulable(items: Sequence[Obj]) -> list[Pod]:
    """The pods waiting for a node (see the module's text), in listing order."""
    waiting = []
    for item in _pods(items):
        status = item.get("status") or {}
        if status.get("phase") != "Pending" or (item.get("spec") or {}).get("nodeName"):
            continue
        if any(c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
               for c in status.get("conditions") or []):
            waiting.append(_pod(item))
    return waiting


def workload_pods(items: Sequence[Obj], node: str) -> list[str]:
    """The pods on ``node`` that are work (``namespace/name``): not finished, not a DaemonSet's
    (those run on every node and do not keep one up) and not a static pod's mirror."""
    found = []
    for item in _pods(items):
        meta, status = item.get("metadata") or {}, item.get("status") or {}
        if (item.get("spec") or {}).get("nodeName") != node or status.get("phase") in ("Succeeded", "Failed"):
            continue
        if any(o.get("kind") == "DaemonSet" for o in meta.get("ownerReferences") or []):
            continue
        if MIRROR_ANNOTATION in (meta.get("annotations") or {}):
            continue
        found.append(_pod(item).ref)
    return found


def cordoned(items: Sequence[Obj]) -> set[str]:
    """The nodes marked unschedulable: being drained, or kept out of use by the operator."""
    return {str((i.get("metadata") or {}).get("name")) for i in items
            if i.get("kind") == "Node" and (i.get("spec") or {}).get("unschedulable")}


def why_not(pod: Pod, vm: VmPlan) -> str | None:
    """None when ``pod`` would run on worker ``vm``; else why not, in a few words."""
    bound = pod.spec.get("nodeName")
    if bound and bound != vm.name:
        return f"it names node {bound}"
    labels = node_labels(vm)
    selector = pod.spec.get("nodeSelector") or {}
    wrong = sorted(k for k, v in selector.items() if labels.get(k) != str(v))
    if wrong:
        return f"its nodeSelector {', '.join(f'{k}={selector[k]}' for k in wrong)} does not match"
    required = (((pod.spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    if terms and not any(_term_matches(term, labels, vm.name) for term in terms):
        return "its required node affinity does not match"
    extra = other_resources(pod.spec)
    if extra:
        return f"it asks for {', '.join(extra)}, which the broker cannot tell a worker offers"
    try:
        cpu, memory = requests(pod.spec)
    except ValueError as exc:
        return f"its requests cannot be read ({exc})"
    if cpu > vm.cpu_cores:
        return f"it requests {cpu:g} CPUs, the worker has {vm.cpu_cores}"
    if memory > vm.memory_gb * 2**30:
        return f"it requests {memory / 2**30:.1f} GiB of memory, the worker has {vm.memory_gb} GiB"
    return None


def _term_matches(term: Obj, labels: Mapping[str, str], name: str) -> bool:
    """A nodeSelectorTerm: all its expressions hold (an empty term matches nothing, as in Kubernetes)."""
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False
    return (all(_holds(e, labels) for e in expressions)
            and all(_holds(f, {"metadata.name": name}) for f in fields))


def _holds(expression: Obj, labels: Mapping[str, str]) -> bool:
    key, op, values = expression.get("key", ""), expression.get("operator", ""), expression.get("values") or []
    value = labels.get(key)
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and len(values) == 1:
        try:
            have, bound = int(value), int(values[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False


def requests(spec: Obj) -> tuple[float, int]:
    """The pod's effective requests: (CPUs, bytes of memory), the larger of its containers' sum
    and its largest init container, as the scheduler counts them; ``ValueError`` for a quantity
    that cannot be read."""
    def of(container: Obj) -> tuple[float, int]:
        asked = (container.get("resources") or {}).get("requests") or {}
        return quantity(asked.get("cpu", "0")), int(quantity(asked.get("memory", "0")))

    running = [of(c) for c in spec.get("containers") or []]
    init = [of(c) for c in spec.get("initContainers") or []]
    cpu = max([sum(c for c, _ in running), *(c for c, _ in init)])
    memory = max([sum(m for _, m in running), *(m for _, m in init)])
    return cpu, memory


def other_resources(spec: Obj) -> list[str]:
    """Resources the pod's containers request or limit beyond CPU and memory (``nvidia.com/gpu``,
    ``hugepages-2Mi``, ``ephemeral-storage``...): no worker of the project offers those to the
    scheduler (no device plugin, no hugepages for pods) or the broker does not judge them."""
    names = set()
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            names |= set(resources.get(part) or {}) - {"cpu", "memory"}
    return sorted(names)


QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+))?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": 1e-9, "u": 1e-6,
            "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, None: 1}


def quantity(text: Any) -> float:
    """A Kubernetes resource quantity (``500m``, ``2``, ``512Mi``, ``1G``, ``1e3``, ``0.5``) as a
    plain number (CPUs, bytes); ``ValueError`` when it is not one."""
    found = QUANTITY.match(str(text).strip())
    if not found:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, exponent, suffix = found.groups()
    return float(number) * 10.0 ** int(exponent or 0) * SUFFIXES[suffix]


def workers_to_start(items: Sequence[Obj], off: Sequence[VmPlan], skip: Collection[str] = ()) -> dict[str, list[str]]:
    """For each waiting pod (``unschedulable``) not in ``skip`` (``namespace/name``), the first
    worker of ``off`` (stopped on-demand workers, in the cluster file's order) it would run on:
    ``{worker name: [namespace/name, ...]}``. A pod no stopped worker would take is left to Kubernetes."""
    chosen: dict[str, list[str]] = {}
    for pod in unschedulable(items):
        if pod.ref in skip:
            continue
        worker = next((vm for vm in off if why_not(pod, vm) is None), None)
        if worker is not None:
            chosen.setdefault(worker.name, []).append(pod.ref)
    return chosen

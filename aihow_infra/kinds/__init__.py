"""What differs between the kinds of cluster, in one table: a ``ClusterKind`` per kind, each in
its own module (``hpc``: SLURM; ``cloud``: Kubernetes). Everything outside this package and the
config model that depends on the kind looks it up here, by the cluster's key, rather than
branching on it; a third kind is a module and a row.

A kind answers: its head node's role (the node that answers for the cluster's software), its
workload software and that software's word for each node and health line, how a node is drained
before it stops, its Ansible groups, its playbook (``ansible/<key>.yml``), its image role and
its Pulumi component type (part of every resource's URN: never renamed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import libvirt

from aihow_infra.config import CLUSTER_KEYS, ClusterKey
from aihow_infra.desired import DesiredPower
from aihow_infra.plan import ClusterPlan, Role
from aihow_infra.steps import Progress

Hosts = Mapping[str, Mapping[str, Any]]


class ClusterKind(Protocol):
    """One kind of cluster (see the package's text)."""

    key: ClusterKey
    software: str  # as status names it: "SLURM", "Kubernetes"
    head_role: Role
    image: str  # the image role its nodes boot
    component_type: str  # the Pulumi type token's last part, e.g. "HpcCluster"

    def workload(self, head: libvirt.virDomain | None, plan: ClusterPlan,
                 power: DesiredPower) -> tuple[dict[str, str], str]:
        """Each node's word (by VM name) and the health line, asked on the running ``head`` (None:
        the head is not running)."""

    def drain(self, head: libvirt.virDomain, nodes: list[str], timeout: float, progress: Progress) -> None:
        """Take ``nodes`` out of use before they stop, waiting up to ``timeout`` seconds."""

    def work_on(self, head: libvirt.virDomain, node: str) -> list[str]:
        """What runs on ``node`` that stopping it would cut short (SLURM: job ids; Kubernetes:
        ``namespace/name`` of pods that are not a DaemonSet's); ``GuestError`` when the head's
        software does not answer."""

    def inventory_groups(self, cluster: Mapping[str, Any], hosts: Hosts, by_role: Mapping[str, list[str]],
                         kube_pki_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The kind's group variables and its play groups (Ansible's YAML structure) for the
        running ``hosts`` by role; ``kube_pki_dir`` is where the host keeps a Kubernetes
        cluster's certificates (kubepki.py), for the kinds that have them."""


def kind_of(key: str) -> ClusterKind:
    """The kind of a cluster key (``hpc``, ``cloud``); ``KeyError`` for another (the config model
    admits none)."""
    from aihow_infra.kinds import cloud, hpc

    kinds: dict[str, ClusterKind] = {"hpc": hpc.KIND, "cloud": cloud.KIND}
    return kinds[key]


def head_roles() -> tuple[Role, ...]:
    """The head role of every kind."""
    return tuple(kind_of(key).head_role for key in CLUSTER_KEYS)


def play_group(hosts: Hosts, names: list[str]) -> dict[str, Any]:
    """An Ansible group of ``names`` with their host variables."""
    return {"hosts": {n: dict(hosts[n]) for n in names}}

"""SLURM's view of the HPC cluster, asked on the controller through its guest agent (no IP
traffic from the host): node states, draining before a node stops, and health for status."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import libvirt

from aihow_infra.config import RESUME_TIMEOUT, SUSPEND_TIME, ClusterKey
from aihow_infra.desired import DesiredPower
from aihow_infra.errors import GuestError
from aihow_infra.interrupts import RUNS
from aihow_infra.kinds import Hosts, play_group
from aihow_infra.libvirt import guest
from aihow_infra.libvirt.guest import run
from aihow_infra.plan import ClusterPlan, Role
from aihow_infra.steps import Progress

DRAIN_REASON = "aihow: stopping the VM"
# Where slurmctld's power programs (ansible/files/aihow-power.sh) queue their requests on the controller.
POWER_QUEUE = "/var/spool/aihow-power"
POWER_ACTIONS = ("resume", "suspend", "resume-fail")
# One line per queued request: its file name, then its text (action and nodes), in one agent call.
LIST_QUEUE = (f'cd {POWER_QUEUE} 2>/dev/null || exit 0; for f in *.req; do [ -e "$f" ] && '
              'printf "%s %s\\n" "$f" "$(head -c 4096 "$f")"; done; true')


@dataclass(frozen=True)
class PowerRequest:
    """One request slurmctld's power programs queued: ``resume`` (start these nodes' VMs for a
    job), ``suspend`` (idle past SuspendTime: stop them) or ``resume-fail`` (they did not come up
    within ResumeTimeout). ``ident`` is its file in the queue, oldest first by name."""

    ident: str
    action: str
    nodes: tuple[str, ...]


def power_requests(controller: libvirt.virDomain) -> list[PowerRequest]:
    """The queued requests, oldest first; ``GuestError`` when the controller's agent does not
    answer. A request file that is not one of the three actions is returned with its text as the
    action, for the broker to refuse and acknowledge (so it is said once, not on every pass)."""
    listing = run(controller, ["/bin/sh", "-c", LIST_QUEUE], timeout=60)
    if listing.code != 0:
        raise GuestError(f"reading the power queue on {controller.name()} failed: {listing.err.strip()}")
    found = []
    for line in listing.out.splitlines():
        ident, _, text = line.partition(" ")
        action, *nodes = text.split() or [""]
        found.append(PowerRequest(ident, action, tuple(nodes)))
    return sorted(found, key=lambda r: r.ident)


def acknowledge(controller: libvirt.virDomain, request: PowerRequest) -> None:
    """Take a carried-out request off the queue (removing one already gone is no error)."""
    run(controller, ["/bin/rm", "-f", f"{POWER_QUEUE}/{request.ident}"], timeout=60)


def mark_down(controller: libvirt.virDomain, nodes: list[str], reason: str) -> None:
    """Tell SLURM that ``nodes`` could not be powered up: DOWN with ``reason`` (SLURM requeues
    the jobs that waited for them, and powers them down)."""
    ran = run(controller, ["/usr/bin/scontrol", "update", f"nodename={','.join(nodes)}", "state=down",
                           f"reason={reason[:200]}"], timeout=60)
    if ran.code != 0:
        raise GuestError(f"marking {','.join(nodes)} down failed on {controller.name()}: "
                         f"{ran.err.strip() or ran.out.strip()}")


def power_down_when_idle(controller: libvirt.virDomain, nodes: list[str]) -> None:
    """Ask SLURM to power ``nodes`` down as soon as they are idle (``POWER_DOWN_ASAP``: drained
    meanwhile, so no job starts there): it runs the SuspendProgram, which the broker carries
    out, and the nodes stay in power saving, ready to be resumed for a job later."""
    ran = run(controller, ["/usr/bin/scontrol", "update", f"nodename={','.join(nodes)}", "state=power_down_asap"],
              timeout=60)
    if ran.code != 0:
        raise GuestError(f"asking SLURM to power down {','.join(nodes)} failed on {controller.name()}: "
                         f"{ran.err.strip() or ran.out.strip()}")


def jobs_on(controller: libvirt.virDomain, node: str) -> list[str]:
    """The ids of the jobs SLURM runs (or is starting) on ``node``; ``GuestError`` when it does not answer."""
    ran = run(controller, ["/usr/bin/squeue", "-h", "-w", node, "-o", "%i"], timeout=60)
    if ran.code != 0:
        raise GuestError(f"asking SLURM for the jobs on {node} failed on {controller.name()}: "
                         f"{ran.err.strip() or ran.out.strip()}")
    return ran.out.split()


def node_states(controller: libvirt.virDomain) -> dict[str, str] | None:
    """Each node's SLURM state (``idle``, ``allocated``, ``drained``, ``down*``...), or None when
    SLURM does not answer on the controller (not deployed yet, or the controller is down)."""
    try:
        ran = run(controller, ["/usr/bin/sinfo", "-h", "-N", "-o", "%N %T"], timeout=30)
    except GuestError:
        return None
    if ran.code != 0:
        return None
    return dict(line.split(None, 1) for line in ran.out.splitlines() if " " in line.strip())


# The file the playbook's first run leaves on the controller (ansible/hpc.yml).
DEPLOYED_MARKER = "/etc/munge/.aihow-cluster-key"


def health(states: dict[str, str] | None,
           silent: str = "no answer from the controller (not deployed, or stopped)") -> str:
    """One line for status: ``SLURM: 2/3 nodes up``, ``SLURM: 2/2 nodes up (1 powered down)``
    when power saving has nodes off (SLURM's ``~``: off until a job needs them) or going off
    (``%``, powering down: SuspendTimeout not yet over), or ``silent`` (why SLURM cannot say:
    ``silence``) when ``states`` is None."""
    if states is None:
        return f"SLURM: {silent}"
    off = [s for s in states.values() if s.endswith(("~", "%"))]
    usable = sum(state.rstrip("*~#%!") in ("idle", "allocated", "mixed", "completing")
                 for state in states.values() if state not in off)
    return f"SLURM: {usable}/{len(states) - len(off)} nodes up" + (f" ({len(off)} powered down)" if off else "")


def silence(controller: libvirt.virDomain | None) -> str:
    """Why slurmctld gave no answer: the controller is not running, not deployed, or deployed and
    not answering (with the guest's load)."""
    if controller is None:
        return "controller not running"
    return guest.silence(controller, DEPLOYED_MARKER, "slurmctld")


def drain(controller: libvirt.virDomain, nodes: list[str], timeout: float, progress: Progress) -> None:
    """Drain ``nodes`` (no new jobs) and wait up to ``timeout`` seconds for their running jobs
    to end. Nodes SLURM does not know are left alone."""
    states = node_states(controller)
    known = [n for n in nodes if states and n in states]
    if not known:
        return
    names = ",".join(known)
    progress(f"draining {names} in SLURM (jobs may run up to {timeout:.0f} s more)")
    ran = run(controller, ["/usr/bin/scontrol", "update", f"nodename={names}", "state=drain",
                           f"reason={DRAIN_REASON}"], timeout=60)
    if ran.code != 0:
        raise GuestError(f"draining {names} failed on {controller.name()}: {ran.err.strip() or ran.out.strip()}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = run(controller, ["/usr/bin/squeue", "-h", "-w", names, "-o", "%i"], timeout=60)
        if jobs.code == 0 and not jobs.out.strip():
            return
        RUNS.pause(2, f"draining {names} in SLURM")
    progress(f"jobs still run on {names} after {timeout:.0f} s; stopping anyway")


class _Hpc:
    """The HPC cluster: SLURM, its controller the head."""

    key: ClusterKey = "hpc"
    software = "SLURM"
    head_role: Role = "controller"
    image = "hpc"
    component_type = "HpcCluster"

    def workload(self, head: libvirt.virDomain | None, plan: ClusterPlan,
                 power: DesiredPower) -> tuple[dict[str, str], str]:
        """SLURM's state of each node, and its health line."""
        states = node_states(head) if head is not None else None
        return states or {}, health(states, silence(head) if states is None else "")

    def drain(self, head: libvirt.virDomain, nodes: list[str], timeout: float, progress: Progress) -> None:
        """No new jobs; running ones may end (``drain`` above)."""
        drain(head, nodes, timeout, progress)

    def work_on(self, head: libvirt.virDomain, node: str) -> list[str]:
        """The jobs on the node (``jobs_on`` above)."""
        return jobs_on(head, node)

    def inventory_groups(self, cluster: Mapping[str, Any], hosts: Hosts, by_role: Mapping[str, list[str]],
                         kube_pki_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``slurmctld``, ``slurmd`` and ``slurm_gpu`` (GPU count and type are host variables,
        for GRES) under ``hpc``; partitions and the job time limit as group variables."""
        compute = by_role.get("compute", [])
        children = {"slurmctld": play_group(hosts, by_role.get("controller", [])),
                    "slurmd": play_group(hosts, compute)}
        gpu_nodes = [n for n in compute if hosts[n]["gpu_count"]]
        if gpu_nodes:
            children["slurm_gpu"] = {"hosts": {n: {} for n in gpu_nodes}}
        common = {"slurm_partitions": cluster.get("slurm_partitions") or ["compute"],
                  "slurm_max_time": cluster.get("slurm_max_time") or "INFINITE",
                  "slurm_suspend_time": cluster.get("slurm_suspend_time") or SUSPEND_TIME,
                  "slurm_resume_timeout": cluster.get("slurm_resume_timeout") or RESUME_TIMEOUT}
        return common, {"hpc": {"children": children}}


KIND = _Hpc()

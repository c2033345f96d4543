"""The power broker: starts and stops the on-demand VMs when there is work for them, and when
there is none.

HPC (SLURM's power saving): slurmctld's power programs on the controller queue a request file
(``kinds.hpc.POWER_QUEUE``) for each ``resume``, ``suspend`` and ``resume-fail``; the broker
reads the queue through the controller's guest agent (no IP traffic between host and guests),
carries each request out with the project's own lifecycle and takes it off the queue only then.
That is its acknowledgement: a broker stopped mid-request finds the request again and does it
again, and every step is idempotent (starting a running VM deploys what is missing; stopping one
that is off does nothing).

- ``resume``: the VM is started as ``vm.start`` starts it (its GPU lease first, ready, deployed),
  and slurmd, registering, returns the node to SLURM. A VM that cannot start is left off and its
  node marked DOWN with the reason, so SLURM requeues the job. A GPU held by another VM moves
  when that VM is idle (below); while it is busy the request stays queued and ``status`` says
  who waits for what.
- ``suspend``: the node was idle past SuspendTime: the VM is shut down (SLURM chose it idle, so
  it is not drained) and its GPU lease released.
- ``resume-fail``: the node did not come up within ResumeTimeout: the VM is powered off.

Cloud (Kubernetes): each pass lists the nodes and pods on the control plane (one run of the
image's ``aihow-kube-get`` through its guest agent, ``kinds.cloud.cluster_objects``) and
- ``start``s the first stopped on-demand worker a waiting pod would run on
  (``kinds.podfit``): lease, boot, join, back in scheduling; the pod is then scheduled there. A
  worker that fails to start is left off, said, and tried again after ``RETRY_FAILED_START``
  seconds;
- ``stop``s a running on-demand worker that has had no work (no pod but a DaemonSet's) for the
  cluster's ``scale_down_unneeded_time``: drained, then shut down. A cordoned worker is left
  alone (a stop is draining it, or the operator keeps it out of use). The state is the cluster's
  own at every pass, so a broker restarted mid-way starts again from what it sees.

The GPU follows the work: a start whose GPU another VM holds (either cluster) moves it when
every holder is idle (no job on that SLURM node, no pod but a DaemonSet's on that worker). An
on-demand SLURM node is powered down through SLURM (``POWER_DOWN_ASAP``: drained meanwhile, so
no job lands on it, and left in power saving for later jobs); any other holder is drained and
stopped as ``vm.stop`` does. A busy holder is never preempted: the start waits and is tried
again every pass. The lease itself (its generation) still decides each grant, so two starts
racing for one GPU get it once.

One broker per project and host (a lock); what it did is kept for ``status``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aihow_infra.errors import AihowError, BusyError, LeaseConflictError, LeaseError
from aihow_infra.files import atomic_write
from aihow_infra.gpu.ledger import stack_of, vm_of
from aihow_infra.interrupts import RUNS, Interrupted
from aihow_infra.kinds import cloud, kind_of
from aihow_infra.kinds.hpc import POWER_ACTIONS, PowerRequest, acknowledge, mark_down, power_requests
from aihow_infra.kinds.podfit import cordoned, unschedulable, workers_to_start, workload_pods
from aihow_infra.libvirt.power import is_live
from aihow_infra.ops.access import Operator
from aihow_infra.ops.project import StackView

# What the broker keeps of its past for status: the last hand-overs.
KEPT = 20
# Results that leave their request queued, to be tried again on the next pass.
KEPT_QUEUED = ("waits", "retrying")
# Seconds before a Cloud worker that failed to start is started again for a waiting pod.
RETRY_FAILED_START = 300.0
# Seconds a pod may still wait once the worker started for it runs, before the broker gives up on it.
PLACEMENT_GRACE = 300.0


@dataclass(frozen=True)
class Handled:
    """One node of one request, carried out (or waiting): when, what, and how it went."""

    at: str  # ISO 8601, UTC
    stack: str
    action: str  # HPC: resume, suspend, resume-fail; Cloud: start, stop
    node: str
    result: str  # "started", "stopped", "powered off", "already off", "failed: ...", "waits: ...", "retrying: ..."
    seconds: float


@dataclass(frozen=True)
class BrokerRecord:
    """What ``status`` shows of the broker: requests waiting, and the last ones carried out."""

    updated: str
    waiting: list[Handled]
    recent: list[Handled]

    @classmethod
    def read(cls, path: Path) -> BrokerRecord | None:
        """The record at ``path``; None when no broker ever ran (or the file is unreadable)."""
        try:
            data = json.loads(path.read_text())
            return cls(data["updated"], [Handled(**h) for h in data["waiting"]],
                       [Handled(**h) for h in data["recent"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PowerBroker:
    """Starts and stops the on-demand VMs of every stack of the project that has them."""

    def __init__(self, op: Operator) -> None:
        self.op = op
        self.say = op.progress
        self.record_path = op.state.broker
        self.recent: list[Handled] = (BrokerRecord.read(self.record_path) or BrokerRecord("", [], [])).recent
        self.waiting: dict[tuple[str, str], Handled] = {}
        self._silent: set[str] = set()
        self._idle_since: dict[tuple[str, str], float] = {}  # Cloud workers seen with no work, since when
        self._failed_at: dict[tuple[str, str], float] = {}  # Cloud workers whose start failed, when
        self._started_for: dict[tuple[str, str], tuple[str, float]] = {}  # (stack, pod) -> (worker, started)
        self._gave_up: set[tuple[str, str]] = set()  # (stack, pod) no worker is started for again

    def views(self) -> list[StackView]:
        """The stacks whose cluster has on-demand nodes."""
        return [v for v in self.op.views() if any(vm.on_demand for vm in v.plan.vms)]

    @contextlib.contextmanager
    def only_one(self) -> Iterator[None]:
        """Hold the project's broker lock; ``BusyError`` when another broker holds it."""
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record_path.with_suffix(".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusyError(f"another power broker runs for this project (lock {lock.name}); allowed: one "
                                "broker per project and host") from None
            yield

    def serve(self, interval: float = 5.0, passes: int | None = None) -> None:
        """Pass over the queues every ``interval`` seconds, ``passes`` times (None: until
        interrupted); ``BusyError`` when another broker runs."""
        with self.only_one():
            views = self.views()
            if views:
                self.say(f"power broker: serving {', '.join(v.stack for v in views)} every {interval:g} s")
            else:  # a service set up before the cluster files have on-demand nodes waits for them
                read = ", ".join(f"{s} ({self.op.settings(s).cluster_file})" for s in self.op.configured_stacks())
                self.say(f"power broker: no on-demand node in {read or 'no stack'}; nothing to do until a compute "
                         "node or a worker has on_demand: true (the cluster files are read again every "
                         f"{interval:g} s)")
            done = 0
            try:
                while passes is None or done < passes:
                    self.pass_once()
                    done += 1
                    if passes is None or done < passes:
                        RUNS.pause(interval, "power broker")
            except (Interrupted, KeyboardInterrupt):  # the second: a signal between a pass's engine runs and waits
                self.say("power broker: stopped; a request it was carrying out stays queued for the next broker")

    def pass_once(self) -> list[Handled]:
        """Every queued request of every on-demand stack, carried out in queue order. A stack
        whose controller or libvirt does not answer is said once and passed over; its requests
        wait in its queue."""
        handled: list[Handled] = []
        for view in self.views():
            try:
                handled += self._serve_stack(view)
            except Interrupted:
                raise
            except AihowError as exc:
                self._once(view.stack, f"power broker: {view.stack}: {exc}; its requests wait, retrying")
        self._write()
        return handled

    def _serve_stack(self, view: StackView) -> list[Handled]:
        with self.op.running_head(view) as head:
            if head is None:
                self._once(view.stack, f"power broker: {view.stack}: the {kind_of(view.plan.key).head_role} is not "
                                       "running; requests wait for it")
                return []
            if view.plan.key == "cloud":
                items = cloud.cluster_objects(head)
                self._silent.discard(view.stack)
                return self._serve_workers(view, items)
            requests = power_requests(head)
            self._silent.discard(view.stack)
            return [h for request in requests for h in self._carry_out(view, head, request)]

    def _serve_workers(self, view: StackView, items: list[dict[str, Any]]) -> list[Handled]:
        """Kubernetes: start a stopped on-demand worker for the pods waiting for one, stop one
        with no work for ``scale_down_unneeded_time``."""
        live = self.op.live_states(view)
        workers = [vm for vm in view.plan.vms if vm.on_demand]
        now = time.monotonic()
        placing = self._placing(view.stack, items, now)
        off = [vm for vm in workers if not is_live(live.get(vm.name, "undefined"))
               and now - self._failed_at.get((view.stack, vm.name), -RETRY_FAILED_START) >= RETRY_FAILED_START]
        # A pod a worker was started for waits for that one (or was given up on): it starts no other.
        started_for = {ref for (stack, ref) in self._gave_up | set(self._started_for) if stack == view.stack}
        handled = []
        for node, pods in workers_to_start(items, off, skip=started_for).items():
            self.say(f"power broker: {view.stack}: {', '.join(pods)} waiting for {node}")
            done = self._one(view, None, "start", node)
            handled.append(done)
            if done.result.startswith("failed"):
                self._failed_at[(view.stack, node)] = time.monotonic()
            else:
                self._failed_at.pop((view.stack, node), None)
            if done.result.startswith("started"):
                self._started_for |= {(view.stack, ref): (node, time.monotonic()) for ref in pods}
        # A cordoned worker is being drained (a stop under way) or kept out of use by the
        # operator: not the broker's to stop. One started for a pod the scheduler has not placed
        # yet is not idle either.
        busy = cordoned(items) | {h.node for h in handled} | placing
        for vm in workers:
            key = (view.stack, vm.name)
            if not is_live(live.get(vm.name, "undefined")) or vm.name in busy or workload_pods(items, vm.name):
                self._idle_since.pop(key, None)
                continue
            since = self._idle_since.setdefault(key, now)
            if now - since >= view.plan.scale_down_unneeded_time:
                handled.append(self._one(view, None, "stop", vm.name))
                self._idle_since.pop(key, None)
        return handled

    def _placing(self, stack: str, items: list[dict[str, Any]], now: float) -> set[str]:
        """The workers started for pods that still wait to be placed, within
        ``PLACEMENT_GRACE``. A pod still waiting after that is given up on, said once: something
        the broker does not judge keeps it off the worker (a volume, an affinity between pods, a
        taint), and starting the worker again for it would only stop and start it for ever."""
        waiting = {pod.ref for pod in unschedulable(items)}
        self._started_for = {k: v for k, v in self._started_for.items() if k[0] != stack or k[1] in waiting}
        self._gave_up = {k for k in self._gave_up if k[0] != stack or k[1] in waiting}
        placing = set()
        for (where, ref), (node, since) in self._started_for.items():
            if where != stack or (where, ref) in self._gave_up:
                continue
            if now - since < PLACEMENT_GRACE:
                placing.add(node)
                continue
            self._gave_up.add((where, ref))
            self.say(f"power broker: {stack}: gave up on {ref}: {node} runs, but Kubernetes has not placed it there "
                     f"in {PLACEMENT_GRACE:.0f} s (something the broker does not judge keeps it off: a volume, an "
                     f"affinity between pods, a taint); {node} is not started for it again")
        return placing

    def _once(self, key: str, message: str) -> None:
        """Say why a stack is passed over, once until it answers again."""
        if key not in self._silent:
            self._silent.add(key)
            self.say(message)

    def _carry_out(self, view: StackView, controller: Any, request: PowerRequest) -> list[Handled]:
        on_demand = {vm.name for vm in view.plan.vms if vm.on_demand}
        if request.action not in POWER_ACTIONS or not set(request.nodes) <= on_demand:
            self.say(f"power broker: {view.stack}: request {request.ident} ({request.action} "
                     f"{' '.join(request.nodes)}) refused: allowed: {', '.join(POWER_ACTIONS)} of on-demand nodes "
                     f"({', '.join(sorted(on_demand))}); taken off the queue")
            acknowledge(controller, request)
            return []
        results = [self._one(view, controller, request.action, node) for node in request.nodes]
        if any(r.result.startswith(KEPT_QUEUED) for r in results):
            return results
        acknowledge(controller, request)
        return results

    def _one(self, view: StackView, controller: Any, action: str, node: str) -> Handled:
        """Carry out ``action`` for ``node``; ``controller`` (HPC) is told of a failed resume."""
        began = time.monotonic()
        key = (view.stack, node)

        def done(result: str) -> Handled:
            handled = Handled(_now(), view.stack, action, node, result, round(time.monotonic() - began, 1))
            before = self.waiting.get(key)
            if before is None or before.result != result:  # a wait is said when it begins, not every pass
                self.say(f"power broker: {action} {node}: {result} ({handled.seconds:.0f} s)")
            if result.startswith(KEPT_QUEUED):
                self.waiting[key] = before if before is not None and before.result == result else handled
                self._write()
            else:
                self.waiting.pop(key, None)
                self._remember(handled)
            return handled

        if action in ("resume", "start"):
            return done(self._start(controller, node))
        live = is_live(self.op.live_states(view).get(node, "undefined"))
        if not live and not view.power.wants_running(node, False):  # off, and recorded off: `up` keeps it so
            return done("already off")
        try:
            if action == "stop":  # a Kubernetes worker with no work: drained (nothing but DaemonSets' pods)
                self.op.vm_stop(node)
                return done("stopped")
            if action == "suspend":
                self.op.vm_stop(node, drain=False)
                return done("stopped")
            self.op.vm_stop(node, force=True)  # resume-fail: SLURM gave up on it
            return done("powered off")
        except Interrupted:
            raise
        except AihowError as exc:
            return done(f"retrying: {exc}")

    def _start(self, controller: Any, node: str) -> str:
        """Start ``node``; the result for the record. A GPU held by an idle VM is moved to it."""
        try:
            try:
                self.op.vm_start(node)
                return "started"
            except LeaseConflictError as exc:
                waits = self._free_gpu(node)
                if waits:
                    return f"waits: {exc}; {waits}"
                self.op.vm_start(node)
                return "started (its GPU moved from an idle VM)"
        except LeaseError as exc:
            return f"waits: {exc}"
        except Interrupted:
            raise
        except AihowError as exc:
            RUNS.check("power broker")  # a stop asked for cut the start short: not the node's failure
            self._power_off(node)
            if controller is not None:
                mark_down(controller, [node], f"aihow: could not start the VM: {exc}".replace("\n", " "))
            return f"failed: {exc}"

    def _free_gpu(self, node: str) -> str:
        """Free the GPUs ``node`` needs when every VM holding them is idle: an on-demand SLURM
        node is powered down by SLURM (it stays in power saving; the lease is free once the
        broker has carried out the suspend SLURM then asks for), any other holder is drained
        and stopped now. Returns ``""`` when the GPUs are free now, else why the start waits: a
        busy holder is never preempted, and one whose work cannot be told is kept."""
        holders = self.op.gpu_holders(node)
        for holder in holders:
            work, unknown = self.op.work_on(vm_of(holder))
            if unknown:
                return f"{holder} is kept: whether it is idle cannot be told ({unknown})"
            if work:
                shown = ", ".join(work[:3]) + (f" and {len(work) - 3} more" if len(work) > 3 else "")
                return f"{holder} is busy ({shown}); a busy holder is never preempted"
        try:
            for holder in holders:
                name = vm_of(holder)
                _view, vm = self.op.find_vm(name)
                if vm.on_demand and vm.cluster_key == "hpc":
                    self.op.slurm_power_down(name)
                    return f"{holder} is idle: SLURM powers it down, then its GPU is free"
                began = time.monotonic()
                self.say(f"power broker: {node} needs the GPU of idle {holder}: stopping it (drained first)")
                self.op.vm_stop(name)
                self._remember(Handled(_now(), stack_of(holder), "stop", name,
                                       f"stopped: its GPU went to {node}", round(time.monotonic() - began, 1)))
        except Interrupted:
            raise
        except AihowError as exc:
            return f"moving the GPU failed, tried again next pass: {exc}"
        return ""

    def _remember(self, handled: Handled) -> None:
        self.recent = [*self.recent, handled][-KEPT:]
        self._write()

    def _power_off(self, node: str) -> None:
        """A node that could not come up: off, its lease released (nothing left running)."""
        try:
            self.op.vm_stop(node, force=True)
        except Interrupted:
            raise
        except AihowError as exc:
            self.say(f"power broker: powering off {node} failed too: {exc}")

    def _write(self) -> None:
        record = {"updated": _now(), "waiting": [asdict(h) for h in self.waiting.values()],
                  "recent": [asdict(h) for h in self.recent]}
        atomic_write(self.record_path, json.dumps(record, indent=1), "power broker record")

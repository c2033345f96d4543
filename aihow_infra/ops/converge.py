"""Converging a stack safely: images first, the gate (a risky change is confirmed or refused),
``pulumi up``, the record of the last good run, and putting power records back (and the
stack with them) when a run fails."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aihow_infra.changes import risks
from aihow_infra.crosscheck import bridge_problems, host_words
from aihow_infra.desired import DesiredPower, PowerState
from aihow_infra.errors import AihowError, ConfigError
from aihow_infra.images import ensure_image, find_image, recipe_for
from aihow_infra.lastrun import NO_RECORD, Expected, ExpectedVm
from aihow_infra.libvirt.connection import connect
from aihow_infra.libvirt.inspect import host_addresses, missing_bridge
from aihow_infra.ops.project import ProjectOps, Refused, StackView, ledger_of
from aihow_infra.progress import EngineProgress, describe
from aihow_infra.stacks import Plan
from aihow_infra.steps import Progress, ToolLine


class Converging(ProjectOps):
    """Engine runs of one stack: gated, recorded, and rolled back when they fail."""

    def ensure_images(self, views: list[StackView]) -> None:
        """Build the guest images the stacks' VMs boot from that are not built yet (minutes,
        once; later runs find them in the cache)."""
        for role in sorted({vm.image for view in views for vm in view.plan.vms if vm.image}):
            if find_image(recipe_for(role)) is None:
                self.progress(f"building the {role} guest image (once; a few minutes)")
                image, _built = ensure_image(role, progress=build_phases(self.progress))
                self.progress(f"{role} image ready in {image.built_seconds:.0f} s, "
                              f"{image.disk_bytes / 2**20:.0f} MiB: {image.folder}")

    def gate(self, stack: str) -> None:
        """Before a change: the planned steps that delete a disk, or replace or restart a VM,
        go ahead only when ``confirm`` says so. The engine stops a plan at a protected disk:
        the protection is lifted to see the whole plan, and put back unless confirmed."""
        if not _resources(self.workspace.urns(stack)):
            return  # nothing in the stack yet: nothing to delete or restart, no preview to pay
        plan = self.workspace.preview_plan(stack)
        lifted: list[str] = []
        while plan.protected and not set(plan.protected) <= set(lifted):
            self.workspace.unprotect(stack, plan.protected)
            lifted += plan.protected
            plan = self.workspace.preview_plan(stack)
        found = risks(plan.steps)
        try:
            if found and not self.confirm(found):
                raise Refused("cancelled; nothing was changed")
        except BaseException:
            if lifted:
                self.workspace.protect(stack, lifted)
            raise
        disks = [r.urn for r in found if r.kind == "disk" and r.urn not in lifted]
        if disks:
            self.workspace.unprotect(stack, disks)

    def changes(self, stack: str, settled: bool = False) -> list[str]:
        """Why the stack needs the engine since its last successful up (``lastrun``); empty when
        nothing changed and libvirt agrees."""
        return self.last_runs.changes(stack, self.workspace.state_stamp(stack), settled)

    def refuse_bridge_problems(self, view: StackView) -> None:
        """``ConfigError``, before the engine makes anything, when the cluster joins a host bridge
        (``forward_mode: bridge``) that its libvirt host does not have, or puts a node on the
        host's own address there."""
        plan = view.plan
        if plan.forward_mode != "bridge":
            return
        problems = []
        for uri, here in view.on_hosts().items():  # each host the cluster spreads over has that bridge
            with connect(uri) as conn:
                problems += bridge_problems(here, missing_bridge(conn, plan.bridge), host_addresses(conn, plan.bridge),
                                            host_words(here, uri))
        if problems:
            file = str(self.cluster_file_path(view.settings))
            raise ConfigError(problems, f"cluster file {file}", file=file)

    def nothing_to_do(self, stack: str, settled: bool = False) -> bool:
        """True when nothing changed since the stack's last successful up and libvirt agrees
        (then the engine is not started: see ``lastrun``)."""
        found = self.changes(stack, settled)
        if found:
            if found != [NO_RECORD]:
                self.progress(f"{stack}: {'; '.join(found)}")
            return False
        self.progress(f"{stack}: nothing changed since the last run and libvirt agrees; pulumi is not run")
        return True

    def _save_run(self, stack: str) -> None:
        view = self.view(stack)
        images = sorted({str(found.folder) for vm in view.plan.vms if vm.image
                         and (found := find_image(recipe_for(vm.image))) is not None})
        expected = Expected(
            stack=stack, uri=view.settings.libvirt_uri, network=view.plan.network_name, pool=view.plan.pool_name,
            ledger=ledger_of(view.settings).location, images=images,
            vms=[ExpectedVm(name=vm.name, running=view.power.wants_running(vm.name, vm.auto_start),
                            vcpus=vm.cpu_cores, memory_mib=vm.memory_gb * 1024, disk=f"{vm.name}.qcow2",
                            gpu_functions=[a for c in vm.claims for a in c.functions],
                            **({"uri": uri, "ledger": ledger_of(view.settings, uri).location}
                               if (uri := view.uri_of(vm)) != view.settings.libvirt_uri else {}))
                 for vm in view.plan.vms])
        self.last_runs.save(stack, self.cluster_file_path(view.settings), self.workspace.state_stamp(stack), expected)

    def preview(self, stacks: list[str], diff: bool = False) -> dict[str, str]:
        """What ``up`` would change in each stack, the stacks at once: each planned step in the
        operator's words, and what of it deletes a disk or restarts a VM (``diff``: the engine's
        own preview with every changed property); one line when nothing changed since the
        last run (no engine started)."""
        def one(stack: str) -> str:
            if self.nothing_to_do(stack):
                return f"{stack}: no changes (nothing changed since the last run; libvirt agrees)"
            if diff:
                return self.workspace.preview(stack)
            return planned_changes(stack, self.workspace.preview_plan(stack))

        with ThreadPoolExecutor(max(len(stacks), 1)) as pool:
            return dict(zip(stacks, pool.map(one, stacks), strict=True))

    def _engine_up(self, stack: str, as_left: bool = False) -> str:
        """Gate, ``pulumi up`` with a line per resource step, and the record of a successful run
        (forgotten when it fails). Returns the summary of what changed. ``as_left``: the stack is
        as its last good run left it and libvirt agrees (``changes`` found nothing but the power
        records), so neither the gate's preview nor the engine's refresh would find anything:
        both are left out, as a run with nothing to do leaves out the engine."""
        self.refuse_bridge_problems(self.view(stack))
        if not as_left:
            self.gate(stack)
        self.progress(f"pulumi up -s {stack}")
        seen = EngineProgress(stack, self.progress)
        try:
            self.workspace.up(stack, ["--refresh=false"] if as_left else [], events=seen)
        except AihowError:
            self.last_runs.forget(stack)
            raise
        self._save_run(stack)
        self.progress(f"{stack}: {seen.summary}")
        return seen.summary

    def up(self, stack: str) -> str:
        """``pulumi up`` of one stack (its images built first), after the gate; not even
        started when nothing changed since the last run. Returns what changed, in a line."""
        self.ensure_images([self.view(stack)])
        with self.workspace.hold(stack):
            if self.nothing_to_do(stack):
                return "no changes (as the last run left it; libvirt agrees)"
            return self._engine_up(stack)

    def _apply(self, stack: str, change: Callable[[DesiredPower], DesiredPower]) -> None:
        """Change the stack's power records and converge, in one pulumi run under the stack's
        hold. When the run fails the records are put back and the stack is brought back to
        them, so the records never claim what did not happen."""
        records = self.records(stack)
        with self.workspace.hold(stack):
            before = records.read()
            after = change(before)
            if after == before and self.nothing_to_do(stack):
                return
            # As the last good run left it, the plan differs only in the power records: VMs start
            # or stop and leases move, which never deletes a disk or restarts a running guest
            # (changes.risks), so the gate's preview (a whole engine run) would find nothing.
            as_left = after != before and not self.changes(stack)
            if as_left:
                self.progress(f"{stack}: only its power records change (the rest is as the last run left it; "
                              "libvirt agrees): no preview, no refresh")
            records.write(after)
            try:
                self._engine_up(stack, as_left=as_left)
            except AihowError as exc:
                records.write(before)  # refused (nothing ran) or failed: back to what was
                if not isinstance(exc, Refused):
                    self.progress(f"{stack}: putting the power states back ({exc})")
                    with contextlib.suppress(AihowError):
                        # What failed may fail again: the rest is still put back.
                        self.workspace.up(stack, ["--continue-on-error"])
                raise

    def _apply_power(self, view: StackView, changes: dict[str, PowerState]) -> None:
        self._apply(view.stack, lambda power: power.with_vms(changes))

    def _urns(self, stack: str) -> set[str]:
        return self.workspace.urns(stack)

    def _roll_back(self, stack: str, before: set[str], power: DesiredPower) -> None:
        """Put a stack back as it was: what this run created is destroyed, its power records
        and power states restored."""
        self.progress(f"rolling back {stack}")
        with self.workspace.hold(stack):
            created = sorted(self._urns(stack) - before)
            if not _resources(before):
                self.workspace.destroy(stack)
            elif created:
                self.workspace.unprotect(stack, created)
                targets = [arg for urn in created for arg in ("--target", urn)]
                self.workspace.run(["destroy", "--yes", "--skip-preview", "--target-dependents", *targets], stack)
            if self.records(stack).read() != power:
                self._apply(stack, lambda _now: power)


def planned_changes(stack: str, plan: Plan) -> str:
    """A preview in the operator's words: ``hpc: 1 to create, 1 to update``, a line per step,
    and the steps that lose data or stop a guest."""
    words = {"create": "create", "update": "update", "replace": "replace", "delete": "delete"}
    steps = [(words[step["op"]], what) for step in plan.steps
             if step.get("op") in words and (what := describe(str(step.get("urn", "")))) is not None]
    lines = [f"{stack}: " + (", ".join(f"{n} to {op}" for op, n in Counter(op for op, _ in steps).items())
                              or "no changes")]
    lines += [f"  {op} {what}" for op, what in steps]
    lines += [f"  protected disk {urn.split('::')[-1]} would be deleted; `up` lists it and asks first"
              for urn in plan.protected]
    found = risks(plan.steps)
    if found:
        lines.append("  of these, the ones that lose data or interrupt a guest (`up` asks first):")
        lines += [f"    - {risk}" for risk in found]
    return "\n".join(lines)


def _resources(urns: set[str]) -> set[str]:
    """The URNs of a stack's resources, without the stack's own."""
    return {urn for urn in urns if "::pulumi:pulumi:Stack::" not in urn}


def build_phases(progress: Progress) -> Progress:
    """An image build's progress without its programs' chatter: the builder's own lines (each
    step as it starts, a line every ``QUIET_S`` while one is quiet: the Kubernetes build's
    ``go build`` runs for minutes without a word) and mmdebstrap's phases."""
    steps = ("I: downloading", "I: extracting", "I: installing", "I: cleaning", "I: success")

    def phase(line: str) -> None:
        if not isinstance(line, ToolLine) or line.startswith(steps):
            progress(line.removeprefix("I: "))

    return phase

"""What the operator's tasks do: VM lifecycle, system-wide control, GPU switching, images and deploys.

Pulumi stays the record. A VM's desired power state lives in its stack's power
records (``aihow_infra.desired``: the project's git-ignored state), and every
change goes through ``pulumi up`` of that stack under the stack's hold, so a
later ``pulumi up`` of either stack reports no changes. Only a restart, which
changes nothing Pulumi records, talks to libvirt directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import libvirt
import yaml

from aihow_infra.changes import Risk, risks
from aihow_infra.config import CLUSTER_KEYS, ClusterFile
from aihow_infra.deploy import DeployRecord, DeployResult, fingerprint, project_playbook, run_playbook
from aihow_infra.desired import DesiredPower, PowerRecords, PowerState
from aihow_infra.errors import AihowError, ConfigError, StackError
from aihow_infra.images import ensure_image, find_image, recipe_for
from aihow_infra.interrupts import RUNS
from aihow_infra.inventory import Access, build_inventory
from aihow_infra.kinds import cloud, head_roles, kind_of
from aihow_infra.lastrun import NO_RECORD, Expected, ExpectedVm, LastRuns
from aihow_infra.ledger import Ledger, holder_for
from aihow_infra.libvirt.connection import call, connect, discard, lookup, remove_pool
from aihow_infra.libvirt.guest import console_log_path, probe, wait_ready
from aihow_infra.libvirt.inspect import metadata, network_stack, pool_path
from aihow_infra.libvirt.power import UNDEFINED, start_domain, state_name, stop_domain, undefine
from aihow_infra.loading import load_cluster_file
from aihow_infra.plan import ClusterPlan, VmPlan, plan_cluster, shared_devices
from aihow_infra.progress import EngineProgress, describe
from aihow_infra.settings import DEFAULT_LEDGER, StackSettings, parse_settings
from aihow_infra.sshkeys import LoginKey, login_key
from aihow_infra.stacks import Plan, Workspace
from aihow_infra.state.layout import STATE_ROOT, ProjectState
from aihow_infra.status import ClusterStatus, SharedGpuStatus, StackSummary, SystemStatus, VmStatus

# The node each cluster's software is asked on (and that is never drained).

Progress = Callable[[str], None]
Confirm = Callable[[list[Risk]], bool]


class Refused(AihowError):
    """A planned change was not confirmed; nothing ran."""


def refuse_risks(found: list[Risk]) -> NoReturn:
    """Without a way to ask (a script): a change that loses data or interrupts a guest is refused."""
    raise Refused(f"{len(found)} planned change(s) delete data or interrupt a guest, first: {found[0]}; "
                  "nothing was changed; allowed: run it again with --yes to apply them")


@dataclass(frozen=True)
class StackView:
    """A stack's settings, its cluster's plan and its power records, as they are now."""

    stack: str
    settings: StackSettings
    plan: ClusterPlan
    power: DesiredPower


class Operator:
    """The operations behind ``tasks.py``; each raises an ``AihowError`` with one clear line."""

    def __init__(self, workspace: Workspace | None = None, progress: Progress | None = None,
                 confirm: Confirm = refuse_risks) -> None:
        self.workspace = workspace or Workspace()
        self.progress: Progress = progress or (lambda _msg: None)
        self.confirm = confirm
        self.state = ProjectState(self.workspace.project_dir, STATE_ROOT)
        if self.workspace.waiting is None:
            self.workspace.waiting = self.progress

    # --- reading the stacks ----------------------------------------------------------

    def configured_stacks(self) -> list[str]:
        """The cluster stacks (hpc, cloud) that have a ``Pulumi.<stack>.yaml``, HPC first."""
        return [s for s in CLUSTER_KEYS if (self.workspace.project_dir / f"Pulumi.{s}.yaml").exists()]

    def stack_summaries(self) -> list[StackSummary]:
        """Every configured stack with its cluster file, resource count and last update; a stack
        whose settings or file cannot be read is listed with the error."""
        rows = []
        for stack in self.configured_stacks():
            states = [p for p in self.workspace.state_files(stack) if p.is_file()]
            updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(p.stat().st_mtime for p in states))) \
                if states else None
            count = sum(describe(urn) is not None for urn in self.workspace.urns(stack))
            try:
                view = self.view(stack)
            except AihowError as exc:
                rows.append(StackSummary(stack, "-", "-", count, updated, str(exc)))
                continue
            path = self.cluster_file_path(view.settings)
            shown = path.relative_to(self.workspace.project_dir) if path.is_relative_to(self.workspace.project_dir) \
                else path
            rows.append(StackSummary(stack, str(shown), view.plan.name, count, updated))
        return rows

    def settings(self, stack: str) -> StackSettings:
        """The stack's ``aihow:`` settings, validated. Read from ``Pulumi.<stack>.yaml`` itself
        (the project keeps no secrets there), which saves a pulumi run per call."""
        path = self.workspace.project_dir / f"Pulumi.{stack}.yaml"
        try:
            config = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError([f"{path}: cannot be read ({exc})"], "stack settings") from None
        values = {key.partition(":")[2]: value for key, value in config.items() if key.startswith("aihow:")}
        if any(isinstance(v, dict) and "secure" in v for v in values.values()):
            raise ConfigError([f"{path}: aihow settings are encrypted; allowed: plain values"], "stack settings")
        return parse_settings(values)

    def cluster_file_path(self, settings: StackSettings) -> Path:
        """Where a stack's cluster file is: a relative path is taken from the project folder,
        as the Pulumi program (which runs there) takes it."""
        path = Path(settings.cluster_file)
        return path if path.is_absolute() else self.workspace.project_dir / path

    def cluster_file_paths(self) -> list[Path]:
        """The cluster files the configured stacks name, each once."""
        return sorted({self.cluster_file_path(self.settings(s)) for s in self.configured_stacks()})

    def cluster_file(self, settings: StackSettings) -> ClusterFile:
        """The stack's cluster file, validated."""
        with _cwd(self.workspace.project_dir):
            return load_cluster_file(self.cluster_file_path(settings), allow_system_paths=settings.allow_system_paths)

    def view(self, stack: str) -> StackView:
        """Settings and plan of one stack."""
        settings = self.settings(stack)
        self._check_one_ledger(stack, settings)
        plan = plan_cluster(self.cluster_file(settings), settings.cluster_key(stack),
                            f"cluster file {settings.cluster_file}")
        return StackView(stack, settings, plan, self.records(stack).read())

    def _check_one_ledger(self, stack: str, settings: StackSettings) -> None:
        """Every stack of a host names the same GPU lease ledger: exclusivity depends on it."""
        for other in self.configured_stacks():
            if other == stack:
                continue
            with contextlib.suppress(ConfigError):
                theirs = self.settings(other).ledger_path
                if theirs != settings.ledger_path:
                    raise AihowError(
                        f"aihow:ledgerPath: {settings.ledger_path!r} (stack {stack}) differs from {theirs!r} "
                        f"(stack {other}); allowed: one ledger for every stack of a host, or a GPU could be "
                        "given to two VMs at once")

    def records(self, stack: str) -> PowerRecords:
        """The stack's power records."""
        return PowerRecords(self.workspace.project_dir, stack)

    def views(self) -> list[StackView]:
        """Every configured stack's view, HPC first."""
        return [self.view(s) for s in self.configured_stacks()]

    def find_vm(self, name: str) -> tuple[StackView, VmPlan]:
        """The stack that has VM ``name``; a clear error listing the VMs there are otherwise."""
        known = []
        for view in self.views():
            for vm in view.plan.vms:
                if vm.name == name:
                    return view, vm
                known.append(vm.name)
        raise AihowError(f"no VM named {name!r}; allowed: {', '.join(known) or '(no stack is configured)'}")

    # --- whole stacks --------------------------------------------------------------------

    def ensure_images(self, views: list[StackView]) -> None:
        """Build the guest images the stacks' VMs boot from that are not built yet (minutes,
        once; later runs find them in the cache)."""
        for role in sorted({vm.image for view in views for vm in view.plan.vms if vm.image}):
            if find_image(recipe_for(role)) is None:
                self.progress(f"building the {role} guest image (once; a few minutes)")
                image, _built = ensure_image(role, progress=_phases(self.progress))
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

    @property
    def last_runs(self) -> LastRuns:
        """The record of each stack's last successful up."""
        return LastRuns(self.workspace.project_dir)

    def nothing_to_do(self, stack: str, settled: bool = False) -> bool:
        """True when nothing changed since the stack's last successful up and libvirt agrees
        (then the engine is not started: see ``lastrun``)."""
        found = self.last_runs.changes(stack, self.workspace.state_files(stack), settled)
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
            ledger=view.settings.ledger_path, images=images,
            vms=[ExpectedVm(name=vm.name, running=view.power.wants_running(vm.name, vm.auto_start),
                            vcpus=vm.cpu_cores, memory_mib=vm.memory_gb * 1024, disk=f"{vm.name}.qcow2",
                            gpu_functions=[a for c in vm.claims for a in c.functions]) for vm in view.plan.vms])
        self.last_runs.save(stack, self.cluster_file_path(view.settings), self.workspace.state_files(stack), expected)

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

    def _engine_up(self, stack: str) -> str:
        """Gate, ``pulumi up`` with a line per resource step, and the record of a successful
        run (forgotten when it fails). Returns the summary of what changed."""
        self.gate(stack)
        self.progress(f"pulumi up -s {stack}")
        seen = EngineProgress(stack, self.progress)
        try:
            self.workspace.up(stack, events=seen)
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

    def destroy(self, stack: str) -> None:
        """``pulumi destroy`` of one stack, then what an interrupted run made and never recorded
        (objects whose metadata names this stack). Never reports success while an object of
        the stack remains: it says which, and why."""
        try:
            view: StackView | None = self.view(stack)
        except ConfigError as exc:
            view = None  # the state alone is enough to destroy; only the sweep needs the plan
            self.progress(f"{stack}: {exc}; only what the stack's state records is removed")
        self.progress(f"pulumi destroy -s {stack}")
        with ThreadPoolExecutor(1) as early:
            # Powering a TCG guest off takes libvirt a second or more: done while the engine
            # starts, its disk goes anyway (the destroy was confirmed).
            off = early.submit(self._power_off_all, view) if view is not None else None
            seen = EngineProgress(stack, self.progress)
            self.workspace.destroy(stack, events=seen)
            self.progress(f"{stack}: {seen.summary}")
            if off is not None:
                with contextlib.suppress(AihowError, libvirt.libvirtError):
                    off.result()  # only a head start: the engine's delete is what counts
        self.deploys.forget(stack)
        self.last_runs.forget(stack)
        # A cluster made again is a new cluster: it gets new certificates, and the old admin
        # kubeconfig would name a server that is gone.
        shutil.rmtree(self.kube_pki_path(stack), ignore_errors=True)
        self.kubeconfig_path(stack).unlink(missing_ok=True)
        if view is not None:
            self._sweep(view)

    def _power_off_all(self, view: StackView) -> None:
        """Power off every running VM of the stack at once (the stack's own only)."""
        with connect(view.settings.libvirt_uri) as conn:
            doms = [dom for vm in view.plan.vms
                    if (dom := lookup("looking up domain", conn.lookupByName, vm.name)) is not None
                    and dom.isActive() and metadata(dom).get("stack") == view.stack]
            if doms:
                with ThreadPoolExecutor(len(doms)) as pool:
                    list(pool.map(lambda dom: stop_domain(dom, 0), doms))

    def _sweep(self, view: StackView) -> None:
        remaining = []
        with connect(view.settings.libvirt_uri) as conn:
            for vm in view.plan.vms:
                dom = lookup("looking up domain", conn.lookupByName, vm.name)
                if dom is None:
                    continue
                owner = metadata(dom).get("stack")
                if owner != view.stack:
                    remaining.append(f"domain {vm.name} (its metadata names stack {owner!r}, not {view.stack!r})")
                    continue
                self.progress(f"removing domain {vm.name}, left by an interrupted run")
                stop_domain(dom, 0)  # its disk goes too: nothing to shut down for
                undefine(dom, vm.name)
            Ledger(view.settings.ledger_path).release_all([holder_for(view.stack, vm.name) for vm in view.plan.vms])
            pool = lookup("looking up pool", conn.storagePoolLookupByName, view.plan.pool_name)
            if pool is not None:
                remaining += self._sweep_pool(view, pool)
            net = lookup("looking up network", conn.networkLookupByName, view.plan.network_name)
            if net is not None:
                if network_stack(net) != view.stack:
                    remaining.append(f"network {view.plan.network_name} (not made by stack {view.stack})")
                else:
                    self.progress(f"removing network {view.plan.network_name}, left by an interrupted run")
                    discard(net)
        if remaining:
            raise StackError(f"destroy of {view.stack} left {'; '.join(remaining)}; remove them by hand (virsh) "
                             "if they are no longer needed")

    def _sweep_pool(self, view: StackView, pool: Any) -> list[str]:
        path = view.settings.pool_folder(view.plan.name)
        if pool_path(pool) != path:
            return [f"storage pool {view.plan.pool_name} (on {pool_path(pool)}, not {path})"]
        ours = {f"{vm.name}.qcow2" for vm in view.plan.vms} | {f"{vm.name}-seed.iso" for vm in view.plan.vms}
        with contextlib.suppress(Exception):
            pool.refresh(0)
        for vol in pool.listAllVolumes() if pool.isActive() else []:
            if vol.name() in ours:
                self.progress(f"removing volume {vol.name()}, left by an interrupted run")
                call(f"deleting volume {vol.name()}", vol.delete, 0)
        self.progress(f"removing storage pool {view.plan.pool_name}, left by an interrupted run")
        remove_pool(pool)
        return []

    # --- Ansible -------------------------------------------------------------------------

    @property
    def deploys(self) -> DeployRecord:
        """The last successful deploy of each stack of this workspace."""
        return DeployRecord(self.state.deploys)

    def deploy(self, stack: str, limit: str | None = None, playbook: Path | None = None,
               inventory: dict[str, Any] | None = None) -> DeployResult:
        """Run the stack's playbook (the project's ``ansible/<kind>.yml`` or ``playbook``) on its
        running VMs; a full run of the project's playbook is recorded for ``system.up``."""
        key = self.view(stack).plan.key
        own = project_playbook(key)
        book = playbook or own
        if book is None:
            raise AihowError(f"stack {stack} has no project playbook (ansible/{key}.yml) yet; "
                             "allowed: --playbook FILE (e.g. Kubespray's cluster.yml)")
        inventory = inventory or self.inventory(stack)
        self.progress(f"deploying {stack}: {book.name}" + (f" on {limit}" if limit else ""))
        kubeconfig = self.kubeconfig_path(stack)
        kubeconfig.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # before the fetch writes into it
        env = {**self.workspace.env(), "AIHOW_PROJECT_DIR": str(self.workspace.project_dir),
               "AIHOW_KUBECONFIG": str(kubeconfig)}
        try:
            result = run_playbook(book, stack, env, limit, self.progress)
        finally:
            if kubeconfig.exists():
                kubeconfig.chmod(0o600)
        if book == own and limit is None:
            self.deploys.save(stack, fingerprint(inventory, book), result)
        self.progress(f"{stack} deployed in {result.seconds:.0f} s, {result.changed} change(s)")
        return result

    def kubeconfig_path(self, stack: str) -> Path:
        """Where a deploy of a Kubernetes stack leaves its admin kubeconfig (0600, git-ignored)."""
        return self.state.kubeconfig(stack)

    def kube_pki_path(self, stack: str) -> Path:
        """Where a Kubernetes stack's certificates and kubeconfigs are kept (0700; kubepki.py)."""
        return self.state.kube_pki(stack)

    def kubectl(self, stack: str, args: list[str]) -> tuple[int, str, str]:
        """``kubectl ARGS`` on the stack's control plane, through its guest agent: the exit code,
        standard output and standard error."""
        view = self.view(stack)
        if kind_of(view.plan.key).software != "Kubernetes":
            raise AihowError(f"stack {stack} runs no Kubernetes; allowed: a stack of a cloud cluster")
        with connect(view.settings.libvirt_uri) as conn:
            head = self._head(view, conn)
            if head is None:
                raise AihowError(f"the control plane of {view.plan.name} is not running; "
                                 f"run `aihow system.up` or `aihow up --stack {stack}`")
            ran = cloud.kubectl(head, args, timeout=600)
        return ran.code, ran.out, ran.err

    def deploy_if_changed(self, stack: str) -> DeployResult | None:
        """Deploy when anything the project's playbook depends on changed since the last deploy.
        A stack with a VM that boots no project image (a blank disk, or an image of the operator's
        own) is left to ``aihow deploy``: there may be nothing there to configure."""
        view = self.view(stack)
        book = project_playbook(view.plan.key)
        if book is None:
            return None
        unknown = [vm.name for vm in view.plan.vms if not vm.waits_ready]
        if unknown:
            self.progress(f"{stack}: not deployed ({', '.join(unknown)} boot no project image); "
                          f"run `aihow deploy --stack {stack}` when they are ready for it")
            return None
        inventory = self.inventory(stack)
        if self.deploys.last(stack) == fingerprint(inventory, book):
            self.progress(f"{stack}: nothing changed since the last deploy")
            return None
        return self.deploy(stack, inventory=inventory)

    def _head(self, view: StackView, conn: Any) -> Any:
        """The running domain that answers for the cluster's software (SLURM's controller, the
        Kubernetes control plane), or None."""
        heads = [vm for vm in view.plan.vms if vm.role == kind_of(view.plan.key).head_role]
        dom = lookup("looking up domain", conn.lookupByName, heads[0].name) if heads else None
        return dom if dom is not None and dom.isActive() else None

    def _drain(self, view: StackView, vms: list[VmPlan]) -> None:
        """Drain the nodes among ``vms`` before they stop: SLURM compute nodes get no new jobs
        and their jobs may end; Kubernetes workers are cordoned and their pods evicted."""
        nodes = [vm.name for vm in vms if vm.role != kind_of(view.plan.key).head_role]
        if not nodes:
            return
        with connect(view.settings.libvirt_uri) as conn:
            head = self._head(view, conn)
            if head is None:
                return
            kind_of(view.plan.key).drain(head, nodes, view.settings.drain_timeout, self.progress)

    # --- one VM ----------------------------------------------------------------------------

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
            records.write(after)
            try:
                self._engine_up(stack)
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

    def vm_start(self, name: str) -> None:
        """Start a VM: its GPU leases are taken first; a GPU held elsewhere fails with the holder."""
        view, vm = self.find_vm(name)
        if view.power.cluster == "stopped":
            raise AihowError(f"cluster {view.plan.name} is stopped (system.down); run `aihow system.up` first")
        # A GPU held elsewhere is refused now, not after an engine run (whose lease still decides).
        Ledger(view.settings.ledger_path).check_free(holder_for(view.stack, name), [c.address for c in vm.claims])
        self.ensure_images([view])
        self.progress(f"starting {name}")
        self._apply_power(view, {name: "running"})
        if self.deploys.last(view.stack) is not None and project_playbook(view.plan.key):
            heads = [v.short_name for v in view.plan.vms if v.role == kind_of(view.plan.key).head_role]
            self.deploy(view.stack, limit=",".join(dict.fromkeys([vm.short_name, *heads])))

    def vm_stop(self, name: str, force: bool = False) -> None:
        """Stop a VM (ACPI shutdown with the stack's timeout, then power off; ``force`` powers
        off at once); its GPU leases are released after it is off."""
        view, vm = self.find_vm(name)
        if force:
            self.progress(f"powering off {name} (no drain, no shutdown)")
            with connect(view.settings.libvirt_uri) as conn:
                dom = lookup("looking up domain", conn.lookupByName, name)
                if dom is not None:
                    stop_domain(dom, timeout=0)
        else:
            self._drain(view, [vm])
            self.progress(f"stopping {name}: shutting down (up to {view.settings.stop_timeout:.0f} s, then "
                          "powered off)")
        self._apply_power(view, {name: "stopped"})

    def vm_restart(self, name: str) -> None:
        """Shut down and start again; the VM keeps its leases (nothing Pulumi records changes)."""
        view, vm = self.find_vm(name)
        with connect(view.settings.libvirt_uri) as conn:
            dom = lookup("looking up domain", conn.lookupByName, name)
            if dom is None:
                raise AihowError(f"VM {name} does not exist; run `aihow up --stack {view.stack}`")
            if not view.power.wants_running(name, vm.auto_start):
                raise AihowError(f"VM {name} is meant to be stopped; use `aihow vm.start {name}`")
            self.progress(f"restarting {name}: shutting down (up to {view.settings.stop_timeout:.0f} s, "
                          "then powered off)")
            stop_domain(dom, view.settings.stop_timeout)
            start_domain(dom)
            if vm.waits_ready:
                self.progress(f"waiting for {name} to be ready (up to {view.settings.ready_timeout:.0f} s)")
                wait_ready(dom, view.settings.ready_timeout, console_log_path(name), self.progress)

    def vm_status(self, name: str) -> VmStatus:
        """State, guest, IP, vCPUs, memory, GPUs and who holds each GPU's lease, and SLURM's
        state of an HPC node."""
        view, vm = self.find_vm(name)
        with connect(view.settings.libvirt_uri) as conn:
            row = self._vm_status(view, vm, conn, _holders(view.settings))
            workload = self._workload(view, conn)
        return _with_workload([row], workload)[0]

    def _vm_status(self, view: StackView, vm: VmPlan, conn: Any, holders: dict[str, str | None]) -> VmStatus:
        dom = lookup("looking up domain", conn.lookupByName, vm.name)
        state = state_name(dom) if dom is not None else UNDEFINED
        guest = probe(dom) if dom is not None and vm.boots and state == "running" else None
        return VmStatus.of(vm, view.stack, state, view.power.wants_running(vm.name, vm.auto_start), holders,
                           guest=guest)

    # --- both clusters -----------------------------------------------------------------------

    def system_up(self, deploy: bool = True) -> None:
        """HPC first, then Cloud; when the two share no passthrough device the order changes
        nothing, and both come up at the same time. When a part fails, what this run changed
        in the others is undone (resources it created are destroyed, power put back)."""
        views = self.views()
        if not views:
            raise AihowError("no stack is configured; allowed: Pulumi.hpc.yaml and/or Pulumi.cloud.yaml")
        self.ensure_images(views)
        before = {v.stack: (self._urns(v.stack), v.power) for v in views}

        def attempt(view: StackView) -> AihowError | None:
            try:
                self._apply(view.stack, lambda power: power.with_cluster("running"))
            except AihowError as exc:
                return exc
            return None

        failures: dict[str, AihowError] = {}
        if len(views) > 1 and not shared_devices([v.plan for v in views]):
            with ThreadPoolExecutor(len(views)) as pool:
                results = list(pool.map(attempt, views))
            failures = {v.stack: r for v, r in zip(views, results, strict=True) if r is not None}
        else:
            for view in views:
                error = attempt(view)
                if error is not None:
                    failures[view.stack] = error
                    break
        if not failures:
            for view in views:
                if deploy:
                    self.deploy_if_changed(view.stack)
                    self.last_runs.settle(view.stack)
            return
        if RUNS.interrupted():
            # The operator asked to stop: nothing more is started (no roll-back either).
            left = "; ".join(f"{v.stack}: {'interrupted' if v.stack in failures else 'up'}" for v in views)
            raise StackError(f"system.up interrupted ({left}); the next `aihow system.up` finishes what it left")
        changed = [v.stack for v in views if v.stack not in failures
                   and (self._urns(v.stack), self.records(v.stack).read()) != before[v.stack]]
        for stack in reversed(changed):
            self._roll_back(stack, *before[stack])
        stack, error = next(iter(failures.items()))
        raise StackError(f"system.up failed in {stack}: {error}"
                         + (f" (rolled back {', '.join(changed)})" if changed else "")) from None

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

    def system_down(self) -> None:
        """Both clusters at once (they share nothing a stop could race for): each is drained,
        every VM shut down and its leases released. The first failure is raised once both
        have finished."""
        def down(view: StackView) -> AihowError | None:
            try:
                self._drain(view, list(view.plan.vms))
                self._apply(view.stack, lambda power: power.with_cluster("stopped"))
            except AihowError as exc:
                return exc
            return None

        views = list(reversed(self.views()))
        with ThreadPoolExecutor(max(len(views), 1)) as pool:
            failures = [exc for exc in pool.map(down, views) if exc is not None]
        if failures:
            raise failures[0]

    def system_destroy(self) -> None:
        """Remove every VM, volume, pool and network of both clusters, the two at once (a
        destroy frees GPUs, it never takes one)."""
        stacks = self.configured_stacks()
        with ThreadPoolExecutor(max(len(stacks), 1)) as pool:
            failures = [exc for exc in pool.map(self._try_destroy, stacks) if exc is not None]
        if failures:
            raise failures[0]

    def _try_destroy(self, stack: str) -> AihowError | None:
        try:
            self.destroy(stack)
        except AihowError as exc:
            return exc
        return None

    def system_status(self) -> SystemStatus:
        """Both clusters' VMs, networks, pools and disks with their state, and who owns each
        shared GPU. A stack whose file or settings are bad is shown with its error; the other
        is still shown."""
        views, clusters = [], []
        for stack in self.configured_stacks():
            try:
                view = self.view(stack)
            except AihowError as exc:
                clusters.append(ClusterStatus.unreadable(stack, str(exc)))
                continue
            views.append(view)
            holders = _holders(view.settings)
            with connect(view.settings.libvirt_uri) as conn:
                disks = self._disks(view, conn)
                rows = [replace(self._vm_status(view, vm, conn, holders), disk=disks[vm.name])
                        for vm in view.plan.vms]
                workload = self._workload(view, conn)
                network = _active_word(lookup("looking up network", conn.networkLookupByName, view.plan.network_name))
                pool = _active_word(lookup("looking up pool", conn.storagePoolLookupByName, view.plan.pool_name))
            health = workload[1]
            clusters.append(ClusterStatus.of(view.plan, view.stack, view.power.cluster, _with_workload(rows, workload),
                                             health, network, pool))
        holders = _holders(views[0].settings) if views else {}
        shared = [SharedGpuStatus.of(device, holders.get(device.address))
                  for device in shared_devices([v.plan for v in views])]
        return SystemStatus(clusters, shared)

    def _disks(self, view: StackView, conn: Any) -> dict[str, str]:
        """``present`` or ``missing`` for each VM's disk (as the pool sees its folder now)."""
        pool = lookup("looking up pool", conn.storagePoolLookupByName, view.plan.pool_name)
        names: set[str] = set()
        if pool is not None and pool.isActive():
            with contextlib.suppress(Exception):
                pool.refresh(0)
            names = {vol.name() for vol in pool.listAllVolumes()}
        return {vm.name: "present" if f"{vm.name}.qcow2" in names else "missing" for vm in view.plan.vms}

    def login(self, view: StackView) -> LoginKey:
        """The key (and private key file, when known) that logs into the stack's guests."""
        return login_key(view.settings.ssh_public_key, self.state.root)

    def ssh_config(self) -> str:
        """An ssh_config for every VM that boots and has an address (``ssh -F FILE <vm>``)."""
        blocks = []
        for view in self.views():
            key = self.login(view)
            for vm in view.plan.vms:
                if not (vm.boots and vm.ip):
                    continue
                lines = [f"Host {vm.name}", f"  HostName {vm.ip}", f"  User {view.settings.login_user}",
                         "  StrictHostKeyChecking accept-new",
                         f"  UserKnownHostsFile {self.state.ssh / 'known_hosts'}"]
                if key.private_path:
                    lines += [f"  IdentityFile {key.private_path}", "  IdentitiesOnly yes"]
                blocks.append("\n".join(lines))
        return "\n\n".join(blocks) + "\n" if blocks else ""

    def live_states(self, view: StackView) -> dict[str, str]:
        """libvirt's state of each of the stack's VMs, by name."""
        with connect(view.settings.libvirt_uri) as conn:
            found = {vm.name: lookup("looking up domain", conn.lookupByName, vm.name) for vm in view.plan.vms}
            return {name: state_name(dom) if dom is not None else UNDEFINED for name, dom in found.items()}

    def inventory(self, stack: str) -> dict[str, Any]:
        """The stack's Ansible inventory: its outputs, its VMs' live states, and the access its
        ``aihow:ansibleConnection`` names."""
        view = self.view(stack)
        key = self.login(view).private_path
        access = Access(view.settings.ansible_connection, view.settings.libvirt_uri, str(key) if key else None)
        return build_inventory(self.workspace.outputs(stack), stack, access, self.live_states(view),
                               str(self.kube_pki_path(stack)))

    def write_ssh_config(self) -> Path:
        """``ssh_config`` into the project's state (git-ignored), for ``vm.ssh``."""
        path = self.state.ssh / "config"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(self.ssh_config())
        return path

    def console_command(self, name: str) -> list[str]:
        """The command that attaches to a VM's serial console (leave it with Ctrl-]) ."""
        view, _vm = self.find_vm(name)
        return ["virsh", "-c", view.settings.libvirt_uri, "console", name]

    def _workload(self, view: StackView, conn: Any) -> tuple[dict[str, str], str]:
        """The cluster software's word for each node (SLURM's state, Kubernetes' readiness) and
        its health line, asked on the cluster's head node."""
        return kind_of(view.plan.key).workload(self._head(view, conn), view.plan, view.power)

    def host_ledger(self) -> tuple[Ledger, str]:
        """The host's GPU lease ledger and libvirt URI, as the first configured stack names them."""
        stacks = self.configured_stacks()
        if not stacks:
            return Ledger(DEFAULT_LEDGER), "qemu:///system"
        settings = self.settings(stacks[0])
        return Ledger(settings.ledger_path), settings.libvirt_uri

    def switch(self, to: str) -> None:
        """Give the GPUs to one cluster: stop the other cluster's GPU VMs, then start this one's."""
        views = {v.stack: v for v in self.views()}
        if to not in views:
            raise AihowError(f"--to {to!r} is not a configured stack; allowed: {', '.join(views)}")
        if not any(vm.claims for view in views.values() for vm in view.plan.vms):
            raise AihowError("no VM of any stack passes a GPU through; nothing to switch")
        for stack, view in views.items():
            if stack != to:
                leaving = [vm for vm in view.plan.vms if vm.claims]
                stops: dict[str, PowerState] = {vm.name: "stopped" for vm in leaving}
                if stops:
                    self._drain(view, leaving)
                    self.progress(f"stopping GPU VMs of {stack}: {', '.join(stops)}")
                    self._apply_power(view, stops)
        target = views[to]
        starts: dict[str, PowerState] = {vm.name: "running" for vm in target.plan.vms if vm.claims}
        if starts:
            self.progress(f"starting GPU VMs of {to}: {', '.join(starts)}")
            self._apply_power(self.view(to), starts)


def _with_workload(rows: list[VmStatus], workload: tuple[dict[str, str], str]) -> list[VmStatus]:
    """The rows with the cluster software's word for each node: its own state, or for the
    head node whether the software answers there."""
    states = workload[0]
    return [replace(r, workload=states.get(r.name, "") if r.role not in head_roles() or r.name in states else
                    "answers" if states else "no answer") for r in rows]


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


def _active_word(obj: Any) -> str:
    """``active``, ``inactive`` or ``missing`` for a network or pool (None: it does not exist)."""
    return "missing" if obj is None else "active" if obj.isActive() else "inactive"


def _holders(settings: StackSettings) -> dict[str, str | None]:
    """Who holds each address of the stack's ledger."""
    return {address: lease.holder for address, lease in Ledger(settings.ledger_path).leases().items()}


def _phases(progress: Progress) -> Progress:
    """An image build's progress, its phases only: mmdebstrap's steps and the builder's own lines."""
    steps = ("I: downloading", "I: extracting", "I: installing", "I: cleaning", "I: success")

    def phase(line: str) -> None:
        if line.startswith(steps) or line.startswith(("mmdebstrap ", "mke2fs:", "qemu-img ")):
            progress(line.removeprefix("I: "))

    return phase


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)

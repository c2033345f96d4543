"""The loaded project: its stacks, their settings and cluster files, views of them, and
where its records are. The base of every other part of the Operator (ops/)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import yaml

from aihow_infra.changes import Risk
from aihow_infra.config import CLUSTER_KEYS, ClusterFile
from aihow_infra.deploy import DeployRecord
from aihow_infra.desired import DesiredPower, PowerRecords
from aihow_infra.errors import AihowError, ConfigError
from aihow_infra.gpu.hosts import host_ledger
from aihow_infra.gpu.ledger import Ledger
from aihow_infra.lastrun import LastRuns
from aihow_infra.libvirt.connection import connect, lookup
from aihow_infra.libvirt.power import UNDEFINED, state_name
from aihow_infra.loading import load_cluster_file
from aihow_infra.placement import by_host, placed, vm_uri
from aihow_infra.plan import ClusterPlan, VmPlan, plan_cluster
from aihow_infra.progress import describe
from aihow_infra.settings import DEFAULT_LEDGER, StackSettings, parse_settings
from aihow_infra.sshkeys import LoginKey, login_key
from aihow_infra.stacks import Workspace
from aihow_infra.state.layout import STATE_ROOT, ProjectState
from aihow_infra.status import StackSummary
from aihow_infra.steps import Progress

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

    def uri_of(self, vm: VmPlan) -> str:
        """The libvirt URI of the host ``vm`` runs on."""
        return vm_uri(vm, self.settings.libvirt_uri)

    def on_hosts(self) -> dict[str, ClusterPlan]:
        """By the libvirt URI of each host the cluster runs on (its own first), the cluster's plan
        with only its VMs on that host."""
        return {uri: plans[0] for uri, plans in by_host([self.plan], self.settings.libvirt_uri).items()}


class ProjectOps:
    """The project as the tasks see it: stacks, settings, cluster files, power records and the
    records kept between tasks."""

    def __init__(self, workspace: Workspace | None = None, progress: Progress | None = None,
                 confirm: Confirm = refuse_risks) -> None:
        self.workspace = workspace or Workspace()
        self.progress: Progress = progress or (lambda _msg: None)
        self.confirm = confirm
        self.state = ProjectState(self.workspace.project_dir, STATE_ROOT)
        self._plans: dict[tuple[str, StackSettings, str, int], ClusterPlan] = {}
        if self.workspace.waiting is None:
            self.workspace.waiting = self.progress

    def configured_stacks(self) -> list[str]:
        """The cluster stacks (hpc, cloud) that have a ``Pulumi.<stack>.yaml``, HPC first."""
        return [s for s in CLUSTER_KEYS if (self.workspace.project_dir / f"Pulumi.{s}.yaml").exists()]

    def stack_summaries(self) -> list[StackSummary]:
        """Every configured stack with its cluster file, resource count and last update; a stack
        whose settings or file cannot be read is listed with the error (a state backend that
        cannot be used is one error for all)."""
        rows = []
        self.workspace.stacks()
        for stack in self.configured_stacks():
            when = self.workspace.state_updated(stack)
            updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when is not None else None
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
        return load_cluster_file(self.cluster_file_path(settings), allow_system_paths=settings.allow_system_paths,
                                 pwd=self.workspace.project_dir)

    def view(self, stack: str) -> StackView:
        """Settings and plan of one stack, and its power records as they are now.

        The settings and the cluster file are parsed and validated once per task: a later call
        reuses that work while both files read the same (and the environment their ``${VAR}``
        come from is unchanged); a changed file is loaded again. Power records are read every
        time: the task itself writes them."""
        settings = self.settings(stack)
        self._check_one_ledger(stack, settings)
        path = self.cluster_file_path(settings)
        try:
            text = path.read_bytes()
        except OSError:
            text = b""  # load_cluster_file says why, in the project's words
        key = (stack, settings, hashlib.sha256(text).hexdigest(), hash(frozenset(os.environ.items())))
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_cluster(self.cluster_file(settings), settings.cluster_key(stack),
                                f"cluster file {settings.cluster_file}")
            self._plans = {key: plan, **{k: v for k, v in self._plans.items() if k[0] != stack}}
        return StackView(stack, placed(settings, plan, f"stack {stack}"), plan, self.records(stack).read())

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

    def libvirt_uri(self, stack: str) -> str:
        """The libvirt URI the stack's cluster runs on (its cluster file's host, else the stack's
        ``aihow:libvirtUri``; that one alone when the file cannot be read, which places nothing)."""
        try:
            return self.view(stack).settings.libvirt_uri
        except ConfigError:
            return self.settings(stack).libvirt_uri

    def records(self, stack: str) -> PowerRecords:
        """The stack's power records."""
        return self.workspace.power_records(stack)

    def views(self) -> list[StackView]:
        """Every configured stack's view, HPC first."""
        return [self.view(s) for s in self.configured_stacks()]

    def vm_name(self, name: str) -> str:
        """A VM's libvirt name from itself or its short name (``compute-01``, as the inventory and
        the deploy lines name it) when one VM of the configured stacks has it; ``AihowError``
        naming the VMs there are otherwise (or the VMs a short name fits, when several do)."""
        vms = [vm for view in self.views() for vm in view.plan.vms]
        if any(vm.name == name for vm in vms):
            return name
        fits = [vm.name for vm in vms if vm.short_name == name]
        if len(fits) == 1:
            return fits[0]
        if fits:
            raise AihowError(f"VM name {name!r} fits {len(fits)} VMs; allowed: one of {', '.join(fits)}")
        known = ", ".join(vm.name for vm in vms) or "(no stack is configured)"
        raise AihowError(f"no VM named {name!r}; allowed: {known} (or the part after the cluster's name, "
                         "when one VM has it)")

    def find_vm(self, name: str) -> tuple[StackView, VmPlan]:
        """The stack that has VM ``name``; a clear error listing the VMs there are otherwise."""
        known = []
        for view in self.views():
            for vm in view.plan.vms:
                if vm.name == name:
                    return view, vm
                known.append(vm.name)
        raise AihowError(f"no VM named {name!r}; allowed: {', '.join(known) or '(no stack is configured)'}")

    @property
    def last_runs(self) -> LastRuns:
        """The record of each stack's last successful up."""
        return LastRuns(self.workspace.project_dir)

    @property
    def deploys(self) -> DeployRecord:
        """The last successful deploy of each stack of this workspace."""
        return DeployRecord(self.state.deploys)

    def host_ledger(self) -> tuple[Ledger, str]:
        """The host's GPU lease ledger and libvirt URI, as the first configured stack names them
        (its cluster file's host, else its ``aihow:libvirtUri``; ``AihowError`` when another stack
        names another ledger)."""
        stacks = self.configured_stacks()
        if not stacks:
            return Ledger(DEFAULT_LEDGER), "qemu:///system"
        settings = self.settings(stacks[0])
        self._check_one_ledger(stacks[0], settings)
        uri = self.libvirt_uri(stacks[0])
        return ledger_of(settings, uri), uri

    def live_states(self, view: StackView) -> dict[str, str]:
        """libvirt's state of each of the stack's VMs (on the host each runs on), by name."""
        states = {}
        for uri, here in view.on_hosts().items():
            with connect(uri) as conn:
                for vm in here.vms:
                    dom = lookup("looking up domain", conn.lookupByName, vm.name)
                    states[vm.name] = state_name(dom) if dom is not None else UNDEFINED
        return {vm.name: states[vm.name] for vm in view.plan.vms}

    def login(self, view: StackView) -> LoginKey:
        """The key (and private key file, when known) that logs into the stack's guests."""
        return login_key(view.settings.ssh_public_key, self.state.root)


def ledger_of(settings: StackSettings, uri: str | None = None) -> Ledger:
    """The GPU lease ledger of the libvirt host of ``uri`` (default: the stack's cluster's), as
    gpu/hosts.py keys it by the host's identity."""
    return Ledger(host_ledger(settings.ledger_path, uri or settings.libvirt_uri))


def lease_holders(settings: StackSettings, uri: str | None = None) -> dict[str, str | None]:
    """Who holds each address of the ledger of the host of ``uri`` (default: the cluster's)."""
    return {address: lease.holder for address, lease in ledger_of(settings, uri).leases().items()}

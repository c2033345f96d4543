"""VM and system lifecycle: start, stop (drained first), restart, both clusters up and down,
and handing the GPUs from one cluster to the other."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aihow_infra.deploy import project_playbook
from aihow_infra.desired import PowerState
from aihow_infra.errors import AihowError, CustodyError, StackError
from aihow_infra.gpu.custody import local_host, refuse_blind_handover
from aihow_infra.gpu.homes import place_of, send_home
from aihow_infra.gpu.ledger import DEFAULT_HOME, holder_for
from aihow_infra.interrupts import RUNS
from aihow_infra.kinds import kind_of
from aihow_infra.libvirt.connection import connect, lookup
from aihow_infra.libvirt.guest import console_log_path, wait_ready
from aihow_infra.libvirt.power import is_live, start_domain, stop_domain
from aihow_infra.ops.ansible import Deploying
from aihow_infra.ops.project import StackView, ledger_of
from aihow_infra.plan import VmPlan, shared_devices


class Lifecycle(Deploying):
    """Starting and stopping VMs and whole clusters."""

    def head_of(self, view: StackView, conn: Any) -> Any:
        """The running domain that answers for the cluster's software (SLURM's controller, the
        Kubernetes control plane), or None."""
        heads = [vm for vm in view.plan.vms if vm.role == kind_of(view.plan.key).head_role]
        dom = lookup("looking up domain", conn.lookupByName, heads[0].name) if heads else None
        return dom if dom is not None and dom.isActive() else None

    def head_uri(self, view: StackView) -> str:
        """The libvirt URI of the host the cluster's head (controller, control plane) runs on."""
        heads = [vm for vm in view.plan.vms if vm.role == kind_of(view.plan.key).head_role]
        return view.uri_of(heads[0]) if heads else view.settings.libvirt_uri

    @contextlib.contextmanager
    def running_head(self, view: StackView) -> Iterator[Any]:
        """``head_of`` the stack's cluster, with a connection to its host open while it is used."""
        with connect(self.head_uri(view)) as conn:
            yield self.head_of(view, conn)

    def _drain(self, view: StackView, vms: list[VmPlan]) -> None:
        """Drain the nodes among ``vms`` before they stop: SLURM compute nodes get no new jobs
        and their jobs may end; Kubernetes workers are cordoned and their pods evicted."""
        nodes = [vm.name for vm in vms if vm.role != kind_of(view.plan.key).head_role]
        if not nodes:
            return
        with self.running_head(view) as head:
            if head is None:
                return
            kind_of(view.plan.key).drain(head, nodes, view.settings.drain_timeout, self.progress)

    def report_homes(self, view: StackView, names: Collection[str]) -> None:
        """After VMs of ``names`` stopped (or were removed): say where each device they passed
        through is now. One that is not home (libvirt's reattach and the domain provider's rebind
        both left it elsewhere) is sent home once more; what stops it is said in one line, with
        the command that frees it. The VMs did stop: this warns, it does not fail."""
        here = [vm for vm in view.plan.vms if vm.name in names and local_host(view.uri_of(vm)) is not None]
        host = local_host(view.uri_of(here[0])) if here else None
        if host is None:
            return  # a remote host's sysfs is not read here
        leases = ledger_of(view.settings, view.uri_of(here[0])).leases()
        addresses = dict.fromkeys(d.pci_address for vm in here for d in vm.devices)
        for address in addresses:
            lease = leases.get(address)
            home = lease.home if lease else DEFAULT_HOME
            place = place_of(host, address, home, lease.holder if lease else None)
            if not place.present:
                continue  # no VM ever held it here (status and host.check say the address is wrong)
            if place.stuck:
                try:
                    send_home(host, address, home)
                except (CustodyError, OSError) as exc:
                    self.progress(f"warning: {exc}")
                    continue
                place = place_of(host, address, home, None)
            self.progress(f"device {address}: {place}")

    def vm_start(self, name: str) -> None:
        """Start a VM: its GPU leases are taken first; a GPU held elsewhere fails with the holder."""
        view, vm = self.find_vm(name)
        if view.power.cluster == "stopped":
            raise AihowError(f"cluster {view.plan.name} is stopped (system.down); run `aihow system.up` first")
        # A GPU held elsewhere, or held open by a host process, is refused now, not after an engine
        # run (whose lease and the domain provider still decide).
        ledger = ledger_of(view.settings, view.uri_of(vm))
        ledger.check_free(holder_for(view.stack, name), [c.address for c in vm.claims])
        host = local_host(view.uri_of(vm))
        if host is not None and vm.devices and not is_live(self.live_states(view)[name]):
            refuse_blind_handover(host, name, [d.pci_address for d in vm.devices], ledger)
        self.ensure_images([view])
        self.progress(f"starting {name}")
        self._apply_power(view, {name: "running"})
        if self.deploys.last(view.stack) is not None and project_playbook(view.plan.key):
            heads = [v.short_name for v in view.plan.vms if v.role == kind_of(view.plan.key).head_role]
            self.deploy(view.stack, limit=",".join(dict.fromkeys([vm.short_name, *heads])))

    def vm_stop(self, name: str, force: bool = False, drain: bool = True) -> None:
        """Stop a VM (ACPI shutdown with the stack's timeout, then power off; ``force`` powers
        off at once); its GPU leases are released after it is off. It is drained first unless
        ``drain`` is false (the cluster's software chose it idle: SLURM's power saving)."""
        view, vm = self.find_vm(name)
        if force:
            self.progress(f"powering off {name} (no drain, no shutdown)")
            with connect(view.uri_of(vm)) as conn:
                dom = lookup("looking up domain", conn.lookupByName, name)
                if dom is not None:
                    stop_domain(dom, timeout=0)
        else:
            if drain:
                self._drain(view, [vm])
            self.progress(f"stopping {name}: shutting down (up to {view.settings.stop_timeout:.0f} s, then "
                          "powered off)")
        self._apply_power(view, {name: "stopped"})
        self.report_homes(view, [name])

    def vm_restart(self, name: str) -> None:
        """Shut down and start again; the VM keeps its leases (nothing Pulumi records changes)."""
        view, vm = self.find_vm(name)
        with connect(view.uri_of(vm)) as conn:
            dom = lookup("looking up domain", conn.lookupByName, name)
            if dom is None:
                raise AihowError(f"VM {name} does not exist; run `aihow up --stack {view.stack}`")
            if not view.power.wants_running(name, vm.auto_start):
                raise AihowError(f"VM {name} is meant to be stopped; use `aihow vm.start {name}`")
            host = local_host(view.uri_of(vm))
            for address in [d.pci_address for d in vm.devices if host and host.reset_methods(d.pci_address) == []]:
                self.progress(f"warning: device {address} has no reset method: {name} gets it back as it left it "
                              "(a GPU may hang until the host reboots; `aihow host.check` says what helps)")
            self.progress(f"restarting {name}: shutting down (up to {view.settings.stop_timeout:.0f} s, "
                          "then powered off)")
            stop_domain(dom, view.settings.stop_timeout)
            start_domain(dom)
            if vm.waits_ready:
                self.progress(f"waiting for {name} to be ready (up to {view.settings.ready_timeout:.0f} s)")
                wait_ready(dom, view.settings.ready_timeout, console_log_path(name), self.progress)

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

    def system_down(self) -> None:
        """Both clusters at once (they share nothing a stop could race for): each is drained,
        every VM shut down and its leases released. The first failure is raised once both
        have finished."""
        def down(view: StackView) -> AihowError | None:
            try:
                self._drain(view, list(view.plan.vms))
                self._apply(view.stack, lambda power: power.with_cluster("stopped"))
                self.report_homes(view, [vm.name for vm in view.plan.vms])
            except AihowError as exc:
                return exc
            return None

        views = list(reversed(self.views()))
        with ThreadPoolExecutor(max(len(views), 1)) as pool:
            failures = [exc for exc in pool.map(down, views) if exc is not None]
        if failures:
            raise failures[0]

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
                    self.report_homes(view, stops)
        target = views[to]
        starts: dict[str, PowerState] = {vm.name: "running" for vm in target.plan.vms if vm.claims}
        if starts:
            self.progress(f"starting GPU VMs of {to}: {', '.join(starts)}")
            self._apply_power(self.view(to), starts)

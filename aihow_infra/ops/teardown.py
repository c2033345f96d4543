"""Teardown: ``destroy`` of a stack or both, and the sweep of what an interrupted run made and
never recorded."""

from __future__ import annotations

import contextlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt

from aihow_infra.errors import AihowError, ConfigError, StackError
from aihow_infra.gpu.ledger import holder_for
from aihow_infra.libvirt.connection import call, connect, discard, lookup, remove_pool
from aihow_infra.libvirt.inspect import metadata, network_stack, pool_path
from aihow_infra.libvirt.power import stop_domain, undefine
from aihow_infra.ops.lifecycle import Lifecycle
from aihow_infra.ops.project import StackView, ledger_of
from aihow_infra.plan import ClusterPlan
from aihow_infra.progress import EngineProgress


class Teardown(Lifecycle):
    """Destroying stacks, leaving nothing behind."""

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
            self.report_homes(view, [vm.name for vm in view.plan.vms])

    def _power_off_all(self, view: StackView) -> None:
        """Power off every running VM of the stack at once (the stack's own only), on each host."""
        for uri, here in view.on_hosts().items():
            with connect(uri) as conn:
                doms = [dom for vm in here.vms
                        if (dom := lookup("looking up domain", conn.lookupByName, vm.name)) is not None
                        and dom.isActive() and metadata(dom).get("stack") == view.stack]
                if doms:
                    with ThreadPoolExecutor(len(doms)) as pool:
                        list(pool.map(lambda dom: stop_domain(dom, 0), doms))

    def _sweep(self, view: StackView) -> None:
        remaining: list[str] = []
        for uri, here in view.on_hosts().items():
            remaining += self._sweep_host(view, uri, here)
        if remaining:
            raise StackError(f"destroy of {view.stack} left {'; '.join(remaining)}; remove them by hand (virsh) "
                             "if they are no longer needed")

    def _sweep_host(self, view: StackView, uri: str, here: ClusterPlan) -> list[str]:
        """Remove what an interrupted run left of the stack on the host of ``uri`` (``here``: the
        cluster's plan with its VMs there); what is there but not the stack's own, a line each."""
        remaining = []
        with connect(uri) as conn:
            for vm in here.vms:
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
            ledger_of(view.settings, uri).release_all([holder_for(view.stack, vm.name) for vm in here.vms])
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
        return remaining

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

    def system_destroy(self) -> None:
        """Remove every VM, volume, pool and network of both clusters, the two at once (a
        destroy frees GPUs, it never takes one)."""
        stacks = self.configured_stacks()
        self.workspace.stacks()  # a state backend that cannot be used is one line, before anything
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

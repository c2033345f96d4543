"""Status: each VM's state, disk, GPU holder and its cluster software's word for it, each
cluster's health, and the GPUs both clusters share."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

from aihow_infra.errors import AihowError, LibvirtError
from aihow_infra.gpu.custody import local_host
from aihow_infra.gpu.homes import place_of
from aihow_infra.gpu.ledger import DEFAULT_HOME, vm_of
from aihow_infra.kinds import head_roles, kind_of
from aihow_infra.libvirt.connection import call, connect, lookup
from aihow_infra.libvirt.guest import probe
from aihow_infra.libvirt.power import UNDEFINED, state_name
from aihow_infra.ops.project import StackView, lease_holders, ledger_of
from aihow_infra.ops.teardown import Teardown
from aihow_infra.plan import VmPlan, shared_devices
from aihow_infra.status import ClusterStatus, DeviceHome, SharedGpuStatus, SystemStatus, VmStatus


def _homes(views: list[StackView], running: set[str]) -> list[DeviceHome]:
    """Each passthrough device of the stacks on this machine against its home, on its sysfs (a VM
    holds it when its lease's holder runs, or its qemu has the device open); a remote host's
    devices are not read here."""
    here = [view for view in views if local_host(view.settings.libvirt_uri) is not None]
    host = local_host(here[0].settings.libvirt_uri) if here else None
    if host is None:
        return []
    ledger = ledger_of(here[0].settings)
    leases = ledger.leases()
    rows = []
    for address in sorted({d.pci_address for view in here for vm in view.plan.vms for d in vm.devices}):
        lease = leases.get(address)
        holder = lease.holder if lease and lease.holder and vm_of(lease.holder) in running else None
        place = place_of(host, address, lease.home if lease else DEFAULT_HOME, holder)
        rows.append(DeviceHome(address, place.home, str(place), place.stuck, place.fix))
    return rows


class Status(Teardown):
    """What is running and how it is."""

    def system_status(self) -> SystemStatus:
        """Both clusters' VMs, networks, pools and disks with their state, and who owns each
        shared GPU. A stack whose file or settings are bad, or a host of which does not answer,
        is shown with its error; the other is still shown; a state backend that cannot be used
        is one error for both."""
        views, clusters = [], []
        self.workspace.stacks()
        for stack in self.configured_stacks():
            try:
                view = self.view(stack)
            except AihowError as exc:
                clusters.append(ClusterStatus.unreadable(stack, str(exc)))
                continue
            try:
                clusters.append(self._cluster_status(view))
            except LibvirtError as exc:  # a host it runs on does not answer: said, the other stack shown
                clusters.append(ClusterStatus.unreadable(stack, str(exc)))
                continue
            views.append(view)
        holders = lease_holders(views[0].settings) if views else {}
        shared = [SharedGpuStatus.of(device, holders.get(device.address))
                  for device in shared_devices([v.plan for v in views])]
        running = {vm.name for cluster in clusters for vm in cluster.vms if vm.state == "running"}
        return SystemStatus(clusters, shared, _homes(views, running))

    def _cluster_status(self, view: StackView) -> ClusterStatus:
        """One stack's cluster: each VM as the host it runs on says, the network and pool of the
        cluster's own host, and what the cluster's software says through its head."""
        found: dict[str, VmStatus] = {}
        network = pool = host = "-"
        on_hosts = view.on_hosts()
        for uri, here in on_hosts.items():
            with connect(uri) as conn:
                disks, holders = self._disks(view, conn), lease_holders(view.settings, uri)
                found |= {vm.name: replace(self._vm_status(view, vm, conn, holders), disk=disks[vm.name])
                          for vm in here.vms}
                if uri != next(iter(on_hosts)):  # the network and pool shown: the cluster's own host's
                    continue
                network = _active_word(lookup("looking up network", conn.networkLookupByName, view.plan.network_name))
                pool = _active_word(lookup("looking up pool", conn.storagePoolLookupByName, view.plan.pool_name))
                host = f"{call('reading the host name', conn.getHostname)} ({uri})"
                host = f"{view.plan.host}: {host}" if view.plan.host else host
        with self.running_head(view) as head:
            workload = kind_of(view.plan.key).workload(head, view.plan, view.power)
        rows = [found[vm.name] for vm in view.plan.vms]
        return ClusterStatus.of(view.plan, view.stack, view.power.cluster, _with_workload(rows, workload),
                                workload[1], network, pool, host)

    def vm_status(self, name: str) -> VmStatus:
        """State, guest, IP, vCPUs, memory, GPUs and who holds each GPU's lease, and SLURM's
        state of an HPC node."""
        view, vm = self.find_vm(name)
        with connect(view.uri_of(vm)) as conn:
            row = self._vm_status(view, vm, conn, lease_holders(view.settings, view.uri_of(vm)))
        with self.running_head(view) as head:
            workload = kind_of(view.plan.key).workload(head, view.plan, view.power)
        return _with_workload([row], workload)[0]

    def _vm_status(self, view: StackView, vm: VmPlan, conn: Any, holders: dict[str, str | None]) -> VmStatus:
        dom = lookup("looking up domain", conn.lookupByName, vm.name)
        state = state_name(dom) if dom is not None else UNDEFINED
        guest = probe(dom) if dom is not None and vm.boots and state == "running" else None
        return VmStatus.of(vm, view.stack, state, view.power.wants_running(vm.name, vm.auto_start), holders,
                           guest=guest)

    def _disks(self, view: StackView, conn: Any) -> dict[str, str]:
        """``present`` or ``missing`` for each VM's disk (as the pool sees its folder now)."""
        pool = lookup("looking up pool", conn.storagePoolLookupByName, view.plan.pool_name)
        names: set[str] = set()
        if pool is not None and pool.isActive():
            with contextlib.suppress(Exception):
                pool.refresh(0)
            names = {vol.name() for vol in pool.listAllVolumes()}
        return {vm.name: "present" if f"{vm.name}.qcow2" in names else "missing" for vm in view.plan.vms}


def _with_workload(rows: list[VmStatus], workload: tuple[dict[str, str], str]) -> list[VmStatus]:
    """The rows with the cluster software's word for each node: its own state, or for the
    head node whether the software answers there."""
    states = workload[0]
    return [replace(r, workload=states.get(r.name, "") if r.role not in head_roles() or r.name in states else
                    "answers" if states else "no answer") for r in rows]


def _active_word(obj: Any) -> str:
    """``active``, ``inactive`` or ``missing`` for a network or pool (None: it does not exist)."""
    return "missing" if obj is None else "active" if obj.isActive() else "inactive"

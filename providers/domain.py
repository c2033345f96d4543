"""A libvirt domain (VM) as a Pulumi resource, with a desired power state.

``running: false`` means defined and left shut off, and it stays so on every
later ``pulumi up`` (unlike pulumi-libvirt, which always starts domains).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal, TypedDict
from urllib.parse import urlparse

import libvirt
import pulumi
from pulumi.dynamic import CheckFailure, CreateResult, Resource, UpdateResult

from aihow_infra.host import Host, VirtChoice, choose_virt_type
from aihow_infra.ledger import LeaseRef
from aihow_infra.libvirt.connection import call, connect, kvm_usable, lookup
from aihow_infra.libvirt.guest import probe, wait_ready
from aihow_infra.libvirt.power import start_domain, state_name, stop_domain
from aihow_infra.libvirt.render import domain_xml
from aihow_infra.status import GuestState
from providers.base import Input, LibvirtProvider


class HostDevice(TypedDict):
    """A host PCI function passed through by VFIO."""

    address: str
    type: str


class Mount(TypedDict):
    """A host folder shared with virtiofs."""

    tag: str
    host_path: str


class Acceleration(TypedDict):
    """CPU model, topology and memory backing (the cluster's ``hardware.acceleration``)."""

    cpu_model: str | None
    enable_nested: bool
    cpu_features: list[str]
    sockets: int
    threads: int
    enable_hugepages: bool
    hugepage_size: str | None
    cpu_pinning: bool
    memory_backing: str | None


class Boot(TypedDict):
    """Direct kernel boot of a project image."""

    kernel: str
    initrd: str
    cmdline: str


class DomainArgs(TypedDict):
    """The inputs of a ``Domain``."""

    uri: str
    name: str
    stack: str
    cluster: str
    role: str
    vcpus: int
    memory_mib: int
    disk_path: Input[str]
    disk_gb: int
    seed_path: Input[str] | None
    boot: Boot | None
    console_log: str
    mac: str
    network: Input[str]
    devices: list[HostDevice]
    acceleration: Acceleration
    mounts: list[Mount]
    running: bool
    stop_timeout: float
    virt_type: Literal["auto", "kvm", "qemu"]
    lease: LeaseRef | None
    wait_ready: bool
    ready_timeout: float

# Inputs that change the domain's definition (applied by redefining it).
DEFINITION_KEYS = frozenset({"vcpus", "memory_mib", "mac", "network", "devices", "acceleration", "mounts",
                             "cluster", "role", "stack", "virt_type", "seed_path", "boot", "console_log"})
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def resolve_virt_type(conn: libvirt.virConnect, wanted: str) -> VirtChoice | None:
    """The acceleration for ``aihow:virtType`` (None on libvirt's test driver). The host's
    modules are read only when libvirt runs on this host."""
    if conn.getType() != "QEMU":
        return None
    local = urlparse(conn.getURI()).hostname in (None, "", "localhost")
    host = Host(Path("/") if local else Path("/nonexistent"))
    return choose_virt_type(wanted, host, kvm_usable(conn))


class DomainProvider(LibvirtProvider):
    """Defines a domain from ``templates/domain.xml.j2`` and keeps it in its desired power state."""

    INPUTS = DomainArgs
    REPLACE = frozenset({"uri", "name", "disk_path", "disk_gb"})
    UPDATE = DEFINITION_KEYS | {"running", "wait_ready", "ready_timeout"}
    KIND = "domain"

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """Positive sizes."""
        return [CheckFailure(key, f"{key}: {news[key]}; allowed: a positive number")
                for key in ("vcpus", "memory_mib") if isinstance(news.get(key), int) and news[key] <= 0]

    def _outs(self, props: dict[str, Any], dom: libvirt.virDomain, choice: VirtChoice | None,
              guest: GuestState | None = None) -> dict[str, Any]:
        guest = guest or (probe(dom) if props.get("wait_ready") else None)
        return {**props, "uuid": dom.UUIDString(), "state": state_name(dom), "running": bool(dom.isActive()),
                "actual_virt_type": choice.virt_type if choice else "test",
                "virt_type_reason": choice.reason if choice else "libvirt test driver",
                "ready": bool(guest and guest.ready), "addresses": guest.addresses if guest else {}}

    def _converge(self, dom: libvirt.virDomain, props: dict[str, Any]) -> GuestState | None:
        """Start when it should run (leases first were taken by Pulumi), and wait for a VM
        with an image to be ready."""
        if not props["running"]:
            stop_domain(dom, props["stop_timeout"])
            return None
        start_domain(dom, props.get("lease"))
        if not props.get("wait_ready"):
            return None
        return wait_ready(dom, props.get("ready_timeout") or 600, Path(props["console_log"]))

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Define the domain, start it when ``running`` and wait until it is ready; when
        anything fails, undefine it (its leases are released: nothing is left behind)."""
        name = props["name"]
        with connect(props["uri"]) as conn:
            self.refuse_existing(conn, props, f"virsh destroy {name}; virsh undefine {name}")
            choice = resolve_virt_type(conn, props.get("virt_type", "auto"))
            virt_type = choice.virt_type if choice else "test"
            dom = call(f"defining domain {name}", conn.defineXML, domain_xml(props, virt_type))
            try:
                guest = self._converge(dom, props)
                return CreateResult(name, self._outs(props, dom, choice, guest))
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(_UNDEFINE_FLAGS)
                raise

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Redefine when the definition changed (restarting a running domain to apply it), then
        bring the domain to its desired power state."""
        name = news["name"]
        with connect(news["uri"]) as conn:
            choice = resolve_virt_type(conn, news.get("virt_type", "auto"))
            virt_type = choice.virt_type if choice else "test"
            dom = self.find(conn, news)
            if dom is None:
                # Removed behind Pulumi's back since the last refresh: define it again.
                dom = call(f"defining domain {name}", conn.defineXML, domain_xml(news, virt_type))
            elif any(olds.get(k) != news.get(k) for k in DEFINITION_KEYS):
                xml = domain_xml(news, virt_type, uuid=dom.UUIDString())
                dom = call(f"redefining domain {name}", conn.defineXML, xml)
                if dom.isActive() and news["running"]:
                    stop_domain(dom, news["stop_timeout"])
            guest = self._converge(dom, news)
            return UpdateResult(self._outs(news, dom, choice, guest))

    def find(self, conn: libvirt.virConnect, props: dict[str, Any]) -> libvirt.virDomain | None:
        """The domain named in the inputs."""
        return lookup("looking up domain", conn.lookupByName, props["name"])

    def remove(self, dom: libvirt.virDomain, props: dict[str, Any]) -> None:
        """Shut down (graceful, then forced) and undefine."""
        stop_domain(dom, props.get("stop_timeout", 60))
        try:
            dom.undefineFlags(_UNDEFINE_FLAGS)
        except libvirt.libvirtError:
            call(f"undefining domain {props['name']}", dom.undefine)

    def observe(self, dom: libvirt.virDomain, props: dict[str, Any]) -> dict[str, Any]:
        """The domain's actual power state (``running``, ``state``)."""
        choice = VirtChoice(props["actual_virt_type"], props.get("virt_type_reason", "")) \
            if props.get("actual_virt_type") in ("kvm", "qemu") else None
        return self._outs(props, dom, choice)


class Domain(Resource, module="libvirt", name="Domain"):
    """A libvirt domain with a desired power state (``running``)."""

    name: pulumi.Output[str]
    state: pulumi.Output[str]
    running: pulumi.Output[bool]
    uuid: pulumi.Output[str]
    ready: pulumi.Output[bool]
    addresses: pulumi.Output[dict[str, list[str]]]
    actual_virt_type: pulumi.Output[str]

    def __init__(self, resource_name: str, props: DomainArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(DomainProvider(), resource_name,
                         {**props, "uuid": None, "state": None, "actual_virt_type": None, "virt_type_reason": None,
                          "ready": None, "addresses": None}, opts)

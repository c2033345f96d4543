"""A libvirt domain (VM) as a Pulumi resource, with a desired power state.

``running: false`` means defined and left shut off, and it stays so on every
later ``pulumi up`` (unlike pulumi-libvirt, which always starts domains).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, TypedDict

import libvirt
import pulumi
from pulumi.dynamic import CheckFailure, CreateResult, Resource, UpdateResult

from aihow_infra.ledger import LeaseRef
from aihow_infra.libvirt.connection import call, connect, kvm_usable, lookup
from aihow_infra.libvirt.power import start_domain, state_name, stop_domain
from aihow_infra.libvirt.render import domain_xml
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
    mac: str
    network: Input[str]
    devices: list[HostDevice]
    acceleration: Acceleration
    mounts: list[Mount]
    running: bool
    stop_timeout: float
    virt_type: Literal["auto", "kvm", "qemu"]
    lease: LeaseRef | None

# Inputs that change the domain's definition (applied by redefining it).
DEFINITION_KEYS = frozenset({"vcpus", "memory_mib", "mac", "network", "devices", "acceleration", "mounts",
                             "cluster", "role", "stack", "virt_type"})
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

def resolve_virt_type(conn: libvirt.virConnect, wanted: str) -> str:
    """'kvm' or 'qemu': ``auto`` takes KVM when libvirt reports it usable."""
    if conn.getType() != "QEMU":
        return "test" if conn.getType() == "TEST" else wanted
    if wanted == "auto":
        return "kvm" if kvm_usable(conn) else "qemu"
    return wanted


class DomainProvider(LibvirtProvider):
    """Defines a domain from ``templates/domain.xml.j2`` and keeps it in its desired power state."""

    INPUTS = DomainArgs
    REPLACE = frozenset({"uri", "name", "disk_path", "disk_gb"})
    UPDATE = DEFINITION_KEYS | {"running"}
    KIND = "domain"

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """Positive sizes."""
        return [CheckFailure(key, f"{key}: {news[key]}; allowed: a positive number")
                for key in ("vcpus", "memory_mib") if isinstance(news.get(key), int) and news[key] <= 0]

    def _outs(self, props: dict[str, Any], dom: libvirt.virDomain, virt_type: str) -> dict[str, Any]:
        return {**props, "uuid": dom.UUIDString(), "state": state_name(dom), "running": bool(dom.isActive()),
                "actual_virt_type": virt_type}

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Define the domain and start it when ``running``; when anything fails, undefine it."""
        name = props["name"]
        with connect(props["uri"]) as conn:
            self.refuse_existing(conn, props, f"virsh destroy {name}; virsh undefine {name}")
            virt_type = resolve_virt_type(conn, props.get("virt_type", "auto"))
            dom = call(f"defining domain {name}", conn.defineXML, domain_xml(props, virt_type))
            try:
                if props["running"]:
                    start_domain(dom, props.get("lease"))
                return CreateResult(name, self._outs(props, dom, virt_type))
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
            virt_type = resolve_virt_type(conn, news.get("virt_type", "auto"))
            dom = self.find(conn, news)
            if dom is None:
                # Removed behind Pulumi's back since the last refresh: define it again.
                dom = call(f"defining domain {name}", conn.defineXML, domain_xml(news, virt_type))
            elif any(olds.get(k) != news.get(k) for k in DEFINITION_KEYS):
                xml = domain_xml(news, virt_type, uuid=dom.UUIDString())
                dom = call(f"redefining domain {name}", conn.defineXML, xml)
                if dom.isActive() and news["running"]:
                    stop_domain(dom, news["stop_timeout"])
            if news["running"]:
                start_domain(dom, news.get("lease"))
            else:
                stop_domain(dom, news["stop_timeout"])
            return UpdateResult(self._outs(news, dom, virt_type))

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
        return self._outs(props, dom, props.get("actual_virt_type", ""))


class Domain(Resource, module="libvirt", name="Domain"):
    """A libvirt domain with a desired power state (``running``)."""

    name: pulumi.Output[str]
    state: pulumi.Output[str]
    running: pulumi.Output[bool]
    uuid: pulumi.Output[str]

    def __init__(self, resource_name: str, props: DomainArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(DomainProvider(), resource_name,
                         {**props, "uuid": None, "state": None, "actual_virt_type": None}, opts)

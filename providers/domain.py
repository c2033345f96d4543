"""A libvirt domain (VM) as a Pulumi resource, with a desired power state.

``running: false`` means defined and left shut off, and it stays so on every
later ``pulumi up`` (unlike pulumi-libvirt, which always starts domains).
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal, TypedDict

import libvirt
import pulumi
from pulumi.dynamic import CheckFailure, CreateResult, Resource, UpdateResult

from aihow_infra.changes import (
    DOMAIN_DEFINITION_KEYS,
    DOMAIN_METADATA_KEYS,
    DOMAIN_NETWORK_KEYS,
    changed_keys,
    reboot_keys,
)
from aihow_infra.errors import CustodyError, LeaseError, LibvirtError
from aihow_infra.gpu.custody import local_host, refuse_blind_handover
from aihow_infra.gpu.homes import send_home
from aihow_infra.gpu.ledger import LeaseRef, Ledger
from aihow_infra.host import VirtChoice
from aihow_infra.libvirt.connection import call, connect, lookup, resolve_virt_type
from aihow_infra.libvirt.guest import GuestState, probe, wait_ready
from aihow_infra.libvirt.inspect import metadata, read_definition
from aihow_infra.libvirt.power import start_domain, state_name, stop_domain, undefine
from aihow_infra.libvirt.render import METADATA_NS, domain_xml
from providers.base import Input, LibvirtProvider
from providers.network import read_hosts


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
    address: str | None  # what the seed tells the guest; a change restarts a running guest to apply it
    network: Input[str]
    network_id: Input[str]
    devices: list[HostDevice]
    acceleration: Acceleration
    mounts: list[Mount]
    running: bool
    stop_timeout: float
    virt_type: Literal["auto", "kvm", "qemu"]
    graphics: Literal["none", "vnc-socket"]
    lease: LeaseRef | None
    wait_ready: bool
    ready_timeout: float


def _send_devices_home(props: dict[str, Any]) -> None:
    """After the domain stopped: each device it passed through goes to its home as the ledger
    records it (libvirt's managed reattach took it to the host's driver already; a device whose
    home is vfio-pci is bound back). What does not get there is left for the operator's command
    to report (``aihow vm.stop`` says so and how to free it; ``system.status`` shows it): the VM
    did stop, which is what this resource is asked."""
    host = local_host(props["uri"])
    lease = props.get("lease")
    if host is None or not lease:
        return
    ledger = Ledger(lease["ledger"])
    for device in props.get("devices") or []:
        with contextlib.suppress(CustodyError, LeaseError, OSError):
            send_home(host, device["address"], ledger.home_of(device["address"]))


def _needs_restart(dom: libvirt.virDomain, olds: dict[str, Any], news: dict[str, Any]) -> bool:
    """True when the running instance differs from ``news`` in a key it takes only at boot
    (vCPUs and memory as it runs now, the other keys as ``olds`` recorded them)."""
    return bool(reboot_keys({**olds, **read_definition(dom, live=True), "running": True}, news))


def _reserved_address(conn: libvirt.virConnect, props: dict[str, Any]) -> str | None:
    """The address the domain's network reserves for its MAC, or None."""
    name = props.get("network")
    net = lookup("looking up network", conn.networkLookupByName, name) if isinstance(name, str) else None
    if net is None:
        return None
    return next((h["ip"] for h in read_hosts(net) if h["mac"] == props.get("mac")), None)


def _interface_xml(domain_definition: str) -> str:
    iface = ET.fromstring(domain_definition).find("./devices/interface")
    return ET.tostring(iface, encoding="unicode") if iface is not None else ""


class DomainProvider(LibvirtProvider):
    """Defines a domain from ``templates/domain.xml.j2`` and keeps it in its desired power state."""

    INPUTS = DomainArgs
    REPLACE = frozenset({"uri", "name", "disk_path"})
    UPDATE = DOMAIN_DEFINITION_KEYS | {"running", "wait_ready", "ready_timeout", "disk_gb"}
    KIND = "domain"

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """Positive sizes."""
        return [CheckFailure(key, f"{key}: {news[key]}; allowed: a positive number")
                for key in ("vcpus", "memory_mib") if isinstance(news.get(key), int) and news[key] <= 0]

    def _outs(self, props: dict[str, Any], dom: libvirt.virDomain, choice: VirtChoice | None,
              guest: GuestState | None = None) -> dict[str, Any]:
        guest = guest or (probe(dom) if props.get("wait_ready") else None)
        defined = read_definition(dom)
        wanted = {d["address"]: d for d in props.get("devices") or []}
        devices = [wanted.get(a) or {"address": a, "type": "unknown"} for a in defined["addresses"]]
        return {**props, "vcpus": defined["vcpus"], "memory_mib": defined["memory_mib"], "devices": devices,
                **{k: v for k, v in metadata(dom).items() if k in DOMAIN_METADATA_KEYS},
                "uuid": dom.UUIDString(), "state": state_name(dom), "running": bool(dom.isActive()),
                "actual_virt_type": choice.virt_type if choice else "test",
                "virt_type_reason": choice.reason if choice else "libvirt test driver",
                "ready": bool(guest and guest.ready), "addresses": guest.addresses if guest else {}}

    def _converge(self, dom: libvirt.virDomain, props: dict[str, Any]) -> GuestState | None:
        """Start when it should run (leases first were taken by Pulumi), and wait for a VM
        with an image to be ready."""
        if not props["running"]:
            stop_domain(dom, props["stop_timeout"])
            _send_devices_home(props)
            return None
        host = local_host(props["uri"])
        if host is not None and props.get("devices") and not dom.isActive():
            lease = props.get("lease")
            refuse_blind_handover(host, props["name"], [d["address"] for d in props["devices"]],
                                  Ledger(lease["ledger"]) if lease else None)
        start_domain(dom)
        if not props.get("wait_ready"):
            return None
        return wait_ready(dom, props.get("ready_timeout") or 600, Path(props["console_log"]))

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Define the domain, start it when ``running`` and wait until it is ready. A domain of
        that name whose metadata names this stack (left by an interrupted run) is taken over;
        any other is refused. When anything fails, a domain this call defined is undefined and
        the VM's leases are released: nothing is left behind."""
        name = props["name"]
        with connect(props["uri"]) as conn:
            existing = self.refuse_existing(conn, props, f"virsh destroy {name}; virsh undefine {name}")
            choice = resolve_virt_type(conn, props.get("virt_type", "auto"))
            virt_type = choice.virt_type if choice else "test"
            dom = None
            try:
                uuid = existing.UUIDString() if existing is not None else None
                dom = call(f"defining domain {name}", conn.defineXML, domain_xml(props, virt_type, uuid=uuid))
                if existing is not None and dom.isActive() and _needs_restart(dom, props, props):
                    stop_domain(dom, props["stop_timeout"])
                guest = self._converge(dom, props)
                return CreateResult(name, self._outs(props, dom, choice, guest))
            except BaseException:
                if dom is not None and existing is None:
                    with contextlib.suppress(libvirt.libvirtError, LibvirtError):
                        if dom.isActive():
                            dom.destroy()
                        undefine(dom, name)
                self._release_unless_running(dom, props)
                raise

    def _release_unless_running(self, dom: libvirt.virDomain | None, props: dict[str, Any]) -> None:
        """After a failed define or start: a VM that does not run holds no GPU."""
        lease = props.get("lease")
        with contextlib.suppress(libvirt.libvirtError):
            if dom is not None and dom.isActive():
                return
        if lease:
            Ledger(lease["ledger"]).release(lease["holder"], lease["addresses"])

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Bring the definition up to date and the domain to its desired power state. Metadata
        and the network apply to a running domain live; other definition changes restart it."""
        name = news["name"]
        with connect(news["uri"]) as conn:
            choice = resolve_virt_type(conn, news.get("virt_type", "auto"))
            virt_type = choice.virt_type if choice else "test"
            dom = self.find(conn, news)
            try:
                if dom is None:
                    # Removed behind Pulumi's back since the last refresh: define it again.
                    dom = call(f"defining domain {name}", conn.defineXML, domain_xml(news, virt_type))
                elif changed_keys(olds, news, DOMAIN_DEFINITION_KEYS):
                    xml = domain_xml(news, virt_type, uuid=dom.UUIDString())
                    dom = call(f"redefining domain {name}", conn.defineXML, xml)
                    if dom.isActive():
                        self._apply_live(dom, olds, news, xml)
                if dom.isActive() and news.get("disk_gb", 0) > olds.get("disk_gb", 0):
                    self._grow_disk(dom, news)
                guest = self._converge(dom, news)
            except BaseException:
                self._release_unless_running(dom, news)
                raise
            return UpdateResult(self._outs(news, dom, choice, guest))

    def _apply_live(self, dom: libvirt.virDomain, olds: dict[str, Any], news: dict[str, Any], xml: str) -> None:
        """Give a running domain what it can take live; stop it when the rest needs a boot
        (``_converge`` starts it again)."""
        name = news["name"]
        element = ET.fromstring(xml).find(f"./metadata/{{{METADATA_NS}}}vm")
        if changed_keys(olds, news, DOMAIN_METADATA_KEYS) and element is not None:
            call(f"updating metadata of domain {name}", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                 ET.tostring(element, encoding="unicode"), "aihow", METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        if _needs_restart(dom, olds, news) and news["running"]:
            stop_domain(dom, news["stop_timeout"])
        elif changed_keys(olds, news, DOMAIN_NETWORK_KEYS):
            # The network was made anew: put the interface on its bridge again.
            call(f"re-attaching domain {name} to network {news['network']}", dom.updateDeviceFlags,
                 _interface_xml(xml), libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def _grow_disk(self, dom: libvirt.virDomain, news: dict[str, Any]) -> None:
        """Tell a running guest its disk grew (the volume was resized first)."""
        call(f"growing the disk of domain {news['name']}", dom.blockResize, news["disk_path"],
             int(news["disk_gb"]) * 2**30, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    def is_ours(self, obj: libvirt.virDomain, props: dict[str, Any]) -> bool:
        """A domain whose metadata names this stack."""
        return bool(metadata(obj).get("stack") == props["stack"])

    def find(self, conn: libvirt.virConnect, props: dict[str, Any]) -> libvirt.virDomain | None:
        """The domain named in the inputs."""
        return lookup("looking up domain", conn.lookupByName, props["name"])

    def remove(self, dom: libvirt.virDomain, props: dict[str, Any]) -> None:
        """Power off at once and undefine: a domain is removed only with its disk (a name change
        or a destroy, both listed and confirmed first), so a shutdown would only wait for a
        guest whose data goes anyway."""
        stop_domain(dom, 0)
        _send_devices_home(props)
        undefine(dom, props["name"])

    def observe(self, dom: libvirt.virDomain, props: dict[str, Any]) -> dict[str, Any]:
        """The domain's actual power state (``running``, ``state``). A state written before
        domains recorded their ``address`` gets the one the network reserves for the domain's MAC
        (what its seed said), so a later change of it is seen and restarts the guest."""
        choice = VirtChoice(props["actual_virt_type"], props.get("virt_type_reason", "")) \
            if props.get("actual_virt_type") in ("kvm", "qemu") else None
        if "address" not in props and props.get("seed_path"):
            props = {**props, "address": _reserved_address(dom.connect(), props)}
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

"""A libvirt domain (VM) as a Pulumi resource, with a desired power state.

``running: false`` means defined and left shut off, and it stays so on every
later ``pulumi up`` (unlike pulumi-libvirt, which always starts domains).
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from typing import Any, ClassVar

import libvirt
import pulumi
from pulumi.dynamic import CheckFailure, CreateResult, Resource, UpdateResult

from providers.base import LibvirtProvider
from providers.libvirt_conn import call, connect, kvm_usable, lookup
from providers.power import start_domain, state_name, stop_domain
from providers.render import domain_xml

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


def _with_uuid(xml: str, uuid: str) -> str:
    root = ET.fromstring(xml)
    element = ET.Element("uuid")
    element.text = uuid
    root.insert(1, element)
    return ET.tostring(root, encoding="unicode")


class DomainProvider(LibvirtProvider):
    """Defines a domain from ``templates/domain.xml.j2`` and keeps it in its desired power state."""

    REQUIRED: ClassVar = {"uri": str, "name": str, "vcpus": int, "memory_mib": int, "disk_path": str,
                          "mac": str, "network": str, "running": bool, "stop_timeout": (int, float)}
    REPLACE = frozenset({"uri", "name", "disk_path", "disk_gb"})
    UPDATE = DEFINITION_KEYS | {"running"}
    KIND = "domain"

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """Positive sizes and a known virtualization type."""
        failures = []
        for key in ("vcpus", "memory_mib"):
            value = news.get(key)
            if isinstance(value, int) and value <= 0:
                failures.append(CheckFailure(key, f"{key}: {value}; allowed: a positive number"))
        if news.get("virt_type", "auto") not in ("auto", "kvm", "qemu"):
            failures.append(CheckFailure("virt_type", f"virt_type: {news.get('virt_type')!r}; "
                                                      "allowed: 'auto', 'kvm' or 'qemu'"))
        return failures

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
                xml = _with_uuid(domain_xml(news, virt_type), dom.UUIDString())
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

    def __init__(self, resource_name: str, props: dict[str, Any],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(DomainProvider(), resource_name,
                         {**props, "uuid": None, "state": None, "actual_virt_type": None}, opts)

"""Reading what libvirt holds: a domain's metadata and definition, a pool's folder, the
stack a network belongs to. Shared by the providers, the tasks' status and their checks."""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt

from aihow_infra.libvirt.connection import translate
from aihow_infra.libvirt.render import METADATA_NS


def metadata(dom: libvirt.virDomain, flags: int = libvirt.VIR_DOMAIN_XML_INACTIVE) -> dict[str, str]:
    """The project's metadata of a domain (cluster, role, stack); empty for a domain not ours."""
    root = ET.fromstring(dom.XMLDesc(flags))
    found = root.find(f"./metadata/{{{METADATA_NS}}}vm")
    return {child.tag.split("}")[-1]: child.text or "" for child in found} if found is not None else {}


def read_definition(dom: libvirt.virDomain, live: bool = False) -> dict[str, Any]:
    """vCPUs, memory and passed-through devices as libvirt holds them (the running instance
    with ``live``, else the definition the next boot takes)."""
    root = ET.fromstring(dom.XMLDesc(0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE))
    memory = root.find("memory")
    scale = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}.get(memory.get("unit", "KiB") if memory is not None else "KiB", 1)
    addresses = []
    for src in root.iterfind("./devices/hostdev[@type='pci']/source/address"):
        addresses.append("{:04x}:{:02x}:{:02x}.{:x}".format(
            *(int(src.get(k, "0"), 16) for k in ("domain", "bus", "slot", "function"))))
    return {"vcpus": int(root.findtext("vcpu") or 0),
            "memory_mib": int(int(memory.text or 0) * scale) if memory is not None else 0,
            "addresses": addresses}


def pool_path(pool: libvirt.virStoragePool) -> str:
    """The folder of a directory pool."""
    return ET.fromstring(pool.XMLDesc(0)).findtext("./target/path") or ""


def network_stack(net: libvirt.virNetwork) -> str | None:
    """The stack a network's metadata names (None for a network this project did not make)."""
    root = ET.fromstring(net.XMLDesc(0))
    return root.findtext(f"./metadata/{{{METADATA_NS}}}network/{{{METADATA_NS}}}stack")


def network_subnets(conn: libvirt.virConnect) -> list[tuple[str, str, str]]:
    """(network name, bridge, subnet) of every IPv4 subnet of every libvirt network, active or
    not (an inactive one takes its subnet back when it starts, as libvirt's stock ``default``).
    A network removed between the listing and its read (another stack's destroy) is passed over."""
    found = []
    for net in conn.listAllNetworks(0):
        try:
            root = ET.fromstring(net.XMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                continue
            raise
        bridge = root.find("./bridge")
        for ip in root.iterfind("./ip"):
            if ip.get("family", "ipv4") != "ipv4" or not ip.get("address"):
                continue
            prefix = ip.get("prefix") or ip.get("netmask") or "24"
            subnet = ipaddress.IPv4Network(f"{ip.get('address')}/{prefix}", strict=False)
            found.append((net.name(), bridge.get("name", "") if bridge is not None else "", str(subnet)))
    return found


def missing_bridge(conn: libvirt.virConnect, name: str) -> str | None:
    """Why the host of ``conn`` cannot take guests on its bridge ``name`` (None when it can): no
    such interface, or one that is not a bridge. Read through libvirt's interface API, so it
    holds for a remote host as for this one."""
    try:
        iface = conn.interfaceLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_INTERFACE:
            return f"the host has no interface '{name}'"
        raise
    kind = ET.fromstring(iface.XMLDesc(0)).get("type")
    return None if kind == "bridge" else f"the host's interface '{name}' is not a bridge (libvirt says: {kind})"


def interface_addresses(xml: str) -> list[str]:
    """The IPv4 addresses a host interface's libvirt XML gives it (``<protocol family='ipv4'>``)."""
    root = ET.fromstring(xml)
    return [ip.get("address", "") for proto in root.iterfind("./protocol") if proto.get("family") == "ipv4"
            for ip in proto.iterfind("./ip") if ip.get("address")]


def host_addresses(conn: libvirt.virConnect, name: str) -> list[str]:
    """The host's own IPv4 addresses on its interface ``name`` (none when it has no such one)."""
    try:
        return interface_addresses(conn.interfaceLookupByName(name).XMLDesc(0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_INTERFACE:
            return []
        raise


@dataclass(frozen=True)
class PciFunction:
    """A host PCI function as libvirt's node-device API describes it (``virsh nodedev-dumpxml``)."""

    vendor_id: str  # four hex digits, lower case
    device_id: str
    iommu_group: int | None  # None: the host's IOMMU is off


def pci_function(conn: libvirt.virConnect, address: str) -> PciFunction | None:
    """The PCI function at ``address`` (``DDDD:BB:SS.F``) of the host of ``conn``, or None when
    that host has none there: read through libvirt, so it holds for a host that is not this
    machine."""
    try:
        node = conn.nodeDeviceLookupByName("pci_" + address.replace(":", "_").replace(".", "_"))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NODE_DEVICE:
            return None
        raise translate(exc, f"looking up host device {address}") from None
    pci = ET.fromstring(node.XMLDesc(0)).find("./capability[@type='pci']")
    if pci is None:
        return None
    group = pci.find("iommuGroup")
    return PciFunction(vendor_id=_hex_id(pci, "vendor"), device_id=_hex_id(pci, "product"),
                       iommu_group=int(group.get("number", "0")) if group is not None else None)


def _hex_id(capability: ET.Element, tag: str) -> str:
    """A node device's ``<vendor id='0x10de'>`` as ``10de``."""
    found = capability.find(tag)
    return (found.get("id", "") if found is not None else "").lower().removeprefix("0x")

"""A libvirt network as a Pulumi resource: bridge, subnet, DHCP and a reservation per VM."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, ClassVar, TypedDict

import libvirt
import pulumi
from pulumi.dynamic import CreateResult, Resource, UpdateResult

from aihow_infra.errors import LibvirtError
from aihow_infra.libvirt.connection import call, connect, discard, lookup
from aihow_infra.libvirt.inspect import missing_bridge, network_stack
from aihow_infra.libvirt.render import dhcp_host_xml, network_xml
from aihow_infra.libvirt_names import ForwardMode
from providers.base import LibvirtProvider


class DhcpHost(TypedDict):
    """A static DHCP reservation."""

    mac: str
    name: str
    ip: str


class NetworkArgs(TypedDict):
    """The inputs of a ``Network``."""

    uri: str
    name: str
    stack: str
    bridge: str
    forward_mode: ForwardMode
    dns_domain: str
    dns_servers: list[str]
    gateway: str
    netmask: str
    dhcp_start: str
    dhcp_end: str
    hosts: list[DhcpHost]


_SECTION = libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST
_LIVE_AND_CONFIG = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG


def _key(host: DhcpHost) -> tuple[str, str, str]:
    return host["mac"], host["name"], host["ip"]


def read_hosts(net: libvirt.virNetwork) -> list[DhcpHost]:
    """The static DHCP reservations libvirt holds for a network."""
    root = ET.fromstring(net.XMLDesc(0))
    return [DhcpHost(mac=h.get("mac", ""), name=h.get("name", ""), ip=h.get("ip", ""))
            for h in root.iterfind("./ip/dhcp/host")]


class NetworkProvider(LibvirtProvider):
    """Creates, updates (reservations, live) and removes a libvirt network."""

    INPUTS = NetworkArgs
    REPLACE = frozenset({"uri", "name", "bridge", "forward_mode", "gateway", "netmask", "dhcp_start",
                         "dhcp_end", "dns_domain", "dns_servers"})
    UPDATE = frozenset({"hosts"})
    UNORDERED = frozenset({"hosts"})
    MUST_HOLD: ClassVar[dict[str, Any]] = {"active": True}
    KIND = "network"

    def is_ours(self, obj: libvirt.virNetwork, props: dict[str, Any]) -> bool:
        """A network whose metadata names this stack (or none: networks made before the
        metadata was written are this stack's, as the state that records them says)."""
        return network_stack(obj) in (props.get("stack"), None)

    def left_by_us(self, obj: libvirt.virNetwork, props: dict[str, Any]) -> bool:
        """Taken over by a create only when its metadata names this stack."""
        return bool(network_stack(obj) == props["stack"])

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Define, start and autostart the network (or take over this stack's own, left by an
        interrupted run); on any failure remove what this call made."""
        name = props["name"]
        with connect(props["uri"]) as conn:
            if props["forward_mode"] == "bridge" and (why := missing_bridge(conn, props["bridge"])):
                raise LibvirtError(f"network {name}: forward_mode 'bridge' joins the host bridge "
                                   f"'{props['bridge']}', but {why}; nothing was made; allowed: an existing "
                                   "bridge of that host (e.g. `ip link add NAME type bridge`)")
            net = self.refuse_existing(conn, props, f"virsh net-destroy {name}; virsh net-undefine {name}")
            made = net is None
            if net is None:
                net = call(f"defining network {name}", conn.networkDefineXML, network_xml(props))
            try:
                if not net.isActive():
                    call(f"starting network {name}", net.create)
                call(f"marking network {name} autostart", net.setAutostart, 1)
            except LibvirtError:
                if made:
                    discard(net)
                raise
            return CreateResult(name, self.observe(net, props))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Start the network when it was stopped behind Pulumi's back; add and remove DHCP
        reservations on the running network and in its definition."""
        name = news["name"]
        old = {_key(h): h for h in olds.get("hosts") or []}
        new = {_key(h): h for h in news.get("hosts") or []}
        with connect(news["uri"]) as conn:
            net = call(f"looking up network {name}", conn.networkLookupByName, name)
            if not net.isActive():
                call(f"starting network {name} again", net.create)
            present = {_key(h) for h in read_hosts(net)}
            for key in old.keys() - new.keys():
                if key in present:
                    call(f"removing reservation {key} from {name}", net.update,
                         libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, _SECTION, -1, dhcp_host_xml(dict(old[key])),
                         _LIVE_AND_CONFIG)
            for key in new.keys() - old.keys():
                if key not in present:
                    call(f"adding reservation {key} to {name}", net.update,
                         libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, _SECTION, -1, dhcp_host_xml(dict(new[key])),
                         _LIVE_AND_CONFIG)
            return UpdateResult(self.observe(net, news))

    def find(self, conn: libvirt.virConnect, props: dict[str, Any]) -> libvirt.virNetwork | None:
        """The network named in the inputs."""
        return lookup("looking up network", conn.networkLookupByName, props["name"])

    def remove(self, net: libvirt.virNetwork, props: dict[str, Any]) -> None:
        """Stop and undefine."""
        if net.isActive():
            call(f"stopping network {props['name']}", net.destroy)
        call(f"undefining network {props['name']}", net.undefine)

    def observe(self, net: libvirt.virNetwork, props: dict[str, Any]) -> dict[str, Any]:
        """Reservations and state as libvirt holds them."""
        return {**props, "hosts": read_hosts(net), "active": bool(net.isActive()), "uuid": net.UUIDString()}


class Network(Resource, module="libvirt", name="Network"):
    """A libvirt network; type ``pulumi-python:dynamic/libvirt:Network``."""

    name: pulumi.Output[str]
    bridge: pulumi.Output[str]
    active: pulumi.Output[bool]
    uuid: pulumi.Output[str]

    def __init__(self, resource_name: str, props: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(NetworkProvider(), resource_name, {**props, "active": None, "uuid": None}, opts)

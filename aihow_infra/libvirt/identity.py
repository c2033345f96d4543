"""Which machine a libvirt URI reaches, as a key kept across restarts (gpu/hosts.py keys a
shared ledger's GPU leases by it)."""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET

import libvirt

from aihow_infra.libvirt.connection import call, connect


@functools.cache
def host_identity(uri: str) -> str:
    """The host's SMBIOS system UUID as libvirt reports it (``virsh sysinfo``), lower case; on a
    host without SMBIOS (some VMs, libvirt's test driver) ``hostname:<name>`` (``virsh
    hostname``): libvirt's own host UUID is then made up anew at each daemon start, so it cannot
    key anything kept. ``LibvirtError`` when the host cannot be reached. Cached per URI."""
    with connect(uri) as conn:
        try:
            sysinfo = ET.fromstring(conn.getSysinfo(0))
        except (libvirt.libvirtError, ET.ParseError):
            sysinfo = None
        uuid = sysinfo.findtext("./system/entry[@name='uuid']") if sysinfo is not None else None
        if uuid and uuid.strip().strip("0-"):
            return uuid.strip().lower()
        return f"hostname:{call('reading the host name', conn.getHostname)}"


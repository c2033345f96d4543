"""A VM's cloud-init NoCloud seed: what it says (meta-data, user-data, network-config) and the
ISO 9660 image (volume label ``cidata``) that carries it, written in Python with pycdlib.

The seed gives the guest its name, a login user with an SSH key and password-less sudo,
the planned address on the planned MAC, and an /etc/hosts naming every node of its
cluster. A cluster file may add ``cloud_init`` user-data (packages already in the image,
files, commands) per cluster and per node; the project's own keys come first.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

SEED_FILES = ("meta-data", "user-data", "network-config")
DEFAULT_USER = "aihow"


@dataclass(frozen=True)
class SeedSpec:
    """What one VM's seed says."""

    hostname: str
    mac: str
    ip: str | None  # static, or (``dhcp``) the address the network's DHCP reserves for this MAC
    subnet: str
    gateway: str | None
    dns_servers: tuple[str, ...]
    domain: str
    user: str
    ssh_keys: tuple[str, ...]
    hosts: tuple[tuple[str, str], ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    dhcp: bool = False
    mounts: tuple[tuple[str, str, str], ...] = ()  # virtiofs shares: (tag, mount point, mount options)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so a seed reads like the files it writes."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def meta_data(spec: SeedSpec) -> str:
    """The instance id (the VM's name: cloud-init runs its first boot once per VM) and host name."""
    return _dump({"instance-id": spec.hostname, "local-hostname": spec.hostname})


def hosts_file(spec: SeedSpec) -> str:
    """/etc/hosts: localhost, this VM, and every node of the cluster with an address."""
    own = spec.ip or "127.0.1.1"
    lines = ["127.0.0.1 localhost", f"{own} {spec.hostname}.{spec.domain} {spec.hostname}"]
    lines += [f"{ip} {name}.{spec.domain} {name}" for ip, name in spec.hosts if name != spec.hostname]
    lines += ["::1 localhost ip6-localhost ip6-loopback", "ff02::1 ip6-allnodes", "ff02::2 ip6-allrouters"]
    return "\n".join(lines) + "\n"


def user_data(spec: SeedSpec) -> str:
    """``#cloud-config``: host name, the login user, /etc/hosts, then the cluster file's additions."""
    config: dict[str, Any] = {
        "hostname": spec.hostname,
        "fqdn": f"{spec.hostname}.{spec.domain}",
        "prefer_fqdn_over_hostname": False,
        "users": [{
            "name": spec.user,
            "gecos": "ai-how operator",
            "shell": "/bin/bash",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": True,
            "ssh_authorized_keys": list(spec.ssh_keys),
        }],
        "ssh_pwauth": False,
        "disable_root": True,
        "write_files": [{"path": "/etc/hosts", "content": hosts_file(spec), "permissions": "0644"}],
        # The instance id is stable on purpose (a new one would run the first boot again: new SSH
        # host keys, the operator's runcmd once more), so the network is applied on every boot
        # instead: a changed address reaches the guest at its next boot (the domain restarts for it).
        "updates": {"network": {"when": ["boot-new-instance", "boot"]}},
    }
    if spec.mounts:
        # cloud-init's mounts module writes them to /etc/fstab and makes the mount points.
        config["mounts"] = [[tag, point, "virtiofs", options, "0", "0"] for tag, point, options in spec.mounts]
    for key, value in spec.extra.items():
        if key in ("write_files", "runcmd", "packages", "bootcmd") and isinstance(value, list):
            config[key] = [*config.get(key, []), *value]
        else:
            config[key] = value
    return "#cloud-config\n" + _dump(config)


def network_config(spec: SeedSpec) -> str:
    """Network config v2: the interface with the planned MAC, static or DHCP (the network reserves
    the planned address for the MAC). The default route is written ``0.0.0.0/0``: cloud-init 22.4
    (Debian 12) refuses netplan's ``default`` ("Address default is not a valid ip address") and
    then configures no network at all."""
    net = ipaddress.IPv4Network(spec.subnet)
    eth: dict[str, Any] = {"match": {"macaddress": spec.mac}, "set-name": "eth0"}
    if spec.ip and not spec.dhcp:
        eth["addresses"] = [f"{spec.ip}/{net.prefixlen}"]
        if spec.gateway:
            eth["routes"] = [{"to": "0.0.0.0/0", "via": spec.gateway}]
        eth["nameservers"] = {**({"addresses": list(spec.dns_servers)} if spec.dns_servers else {}),
                              "search": [spec.domain]}
    else:
        eth["dhcp4"] = True
    return _dump({"version": 2, "ethernets": {"eth0": eth}})


def seed_files(spec: SeedSpec) -> dict[str, str]:
    """The three files of a NoCloud seed."""
    return {"meta-data": meta_data(spec), "user-data": user_data(spec), "network-config": network_config(spec)}


def seed_iso(files: Mapping[str, str]) -> bytes:
    """An ISO 9660 image labelled ``cidata`` (Joliet and Rock Ridge, so names keep their dashes)."""
    import pycdlib  # only the seed provider writes ISOs

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata", sys_ident="LINUX")
    for name in sorted(files):
        data = files[name].encode()
        short = name.upper().replace("-", "_")[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), f"/{short}", rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()

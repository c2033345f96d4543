"""libvirt XML: rendered against golden files, and validated against libvirt's own schemas.

Set AIHOW_UPDATE_GOLDEN=1 to rewrite the golden files after an intended template change.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from aihow_infra.libvirt.render import dhcp_host_xml, domain_xml, network_xml, pool_xml, volume_xml

GOLDEN = Path(__file__).parent / "golden"

NETWORK = {"name": "hpc-cluster-network", "stack": "hpc", "bridge": "virbr100", "forward_mode": "nat",
           "dns_domain": "hpc-cluster.local", "dns_servers": ["192.168.100.1"], "gateway": "192.168.100.1",
           "netmask": "255.255.255.0", "dhcp_start": "192.168.100.10", "dhcp_end": "192.168.100.254",
           "hosts": [{"mac": "72:55:52:1e:8f:d9", "name": "hpc-cluster-controller", "ip": "192.168.100.10"}]}
GPU_DOMAIN = {
    "name": "hpc-cluster-compute-01", "cluster": "hpc-cluster", "role": "compute", "stack": "hpc",
    "vcpus": 8.0, "memory_mib": 16384.0, "disk_path": "/var/lib/libvirt/images/aihow/hpc-cluster/c.qcow2",
    "mac": "66:a4:f5:05:88:3a", "network": "hpc-cluster-network",
    "devices": [{"address": "0000:01:00.0", "type": "gpu"}, {"address": "0000:01:00.1", "type": "audio"}],
    "acceleration": {"cpu_model": "host-passthrough", "cpu_features": ["+avx2", "-hle"], "sockets": 2,
                     "threads": 1, "enable_hugepages": True, "hugepage_size": "1G", "cpu_pinning": True},
    "mounts": [],
}
PLAIN_DOMAIN = {**GPU_DOMAIN, "name": "hpc-cluster-controller", "role": "controller", "vcpus": 3, "devices": [],
                "acceleration": {"cpu_model": "host-model", "enable_nested": True, "sockets": 2},
                "mounts": [{"tag": "datasets", "host_path": "/srv/data"}], "graphics": "vnc-socket"}
BOOTING_DOMAIN = {**PLAIN_DOMAIN, "name": "aihow-hpc-compute-01", "vcpus": 1, "memory_mib": 1024, "mounts": [],
                  "graphics": "none",
                  "acceleration": {"cpu_model": "qemu64"}, "seed_path": "/var/lib/aihow/c-seed.iso",
                  "boot": {"kernel": "/var/lib/aihow/images/hpc-1/vmlinuz",
                           "initrd": "/var/lib/aihow/images/hpc-1/initrd.img",
                           "cmdline": "root=LABEL=root rw console=ttyS0,115200 net.ifnames=0"},
                  "console_log": "/var/log/libvirt/qemu/aihow-hpc-compute-01-console.log"}

CASES: dict[str, tuple[str, str]] = {
    "network-nat.xml": ("network", network_xml(NETWORK)),
    "network-isolated.xml": ("network", network_xml({**NETWORK, "forward_mode": "isolated", "dns_servers": []})),
    "pool.xml": ("storagepool", pool_xml({"name": "hpc-cluster-pool", "path": "/var/lib/libvirt/images/aihow/hpc"})),
    "volume-overlay.xml": ("storagevol", volume_xml({"name": "c.qcow2", "size_gb": 200.0,
                                                     "base_image": "/images/base.qcow2"}, "qcow2")),
    "volume-blank.xml": ("storagevol", volume_xml({"name": "c.qcow2", "size_gb": 1, "base_image": None})),
    "domain-gpu-kvm.xml": ("domain", domain_xml(GPU_DOMAIN, "kvm")),
    "domain-plain-kvm.xml": ("domain", domain_xml(PLAIN_DOMAIN, "kvm")),
    "domain-gpu-qemu.xml": ("domain", domain_xml(GPU_DOMAIN, "qemu")),
    "domain-image-qemu.xml": ("domain", domain_xml(BOOTING_DOMAIN, "qemu")),
    "volume-seed.xml": ("storagevol", volume_xml({"name": "c-seed.iso", "size_bytes": 69632, "format": "raw"})),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_xml_matches_golden_file(name: str) -> None:
    _schema, xml = CASES[name]
    golden = GOLDEN / name
    if os.environ.get("AIHOW_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(xml)
    assert xml == golden.read_text()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_xml_is_valid_for_libvirt(name: str, tmp_path: Path) -> None:
    schema, xml = CASES[name]
    path = tmp_path / name
    path.write_text(xml)
    proc = subprocess.run(["virt-xml-validate", str(path), schema], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_gpu_domain_details() -> None:
    xml = CASES["domain-gpu-kvm.xml"][1]
    assert "<vcpu placement='static'>8</vcpu>" in xml
    assert "<topology sockets='2' dies='1' cores='4' threads='1'/>" in xml  # 2 x 4 x 1 = 8 vCPUs
    assert "<feature policy='require' name='avx2'/>" in xml and "<feature policy='disable' name='hle'/>" in xml
    assert "<graphics" not in xml  # a GPU VM shows its own display
    assert "<hidden state='on'/>" in xml and "<memballoon model='none'/>" in xml
    assert xml.count("<rom bar='on'/>") == 1  # the GPU function only


def test_plain_domain_details() -> None:
    xml = CASES["domain-plain-kvm.xml"][1]
    assert "<topology sockets='1' dies='1' cores='3' threads='1'/>" in xml  # 3 is not divisible by 2
    assert "<listen type='socket'/>" in xml and "autoport" not in xml  # VNC when asked, never on TCP
    assert "<feature policy='optional' name='vmx'/>" in xml and "<feature policy='optional' name='svm'/>" in xml
    assert "<source dir='/srv/data'/>" in xml and "<access mode='shared'/>" in xml


def test_no_console_but_the_serial_one_by_default() -> None:
    xml = CASES["domain-image-qemu.xml"][1]
    assert "<graphics" not in xml and "<model type='none'/>" in xml


def test_software_emulation_has_no_host_cpu_settings() -> None:
    xml = CASES["domain-gpu-qemu.xml"][1]
    assert xml.startswith("<domain type='qemu'>")
    assert "mode='host-passthrough'" not in xml and "<feature policy" not in xml and "vmport" not in xml


def test_only_a_software_emulated_guest_skips_the_timer_check() -> None:
    def cmdline(virt_type: str) -> str:
        return domain_xml(BOOTING_DOMAIN, virt_type).split("<cmdline>")[1].split("</cmdline>")[0]

    assert cmdline("qemu") == f"{BOOTING_DOMAIN['boot']['cmdline']} no_timer_check"  # type: ignore[index]
    assert cmdline("kvm") == BOOTING_DOMAIN["boot"]["cmdline"]  # type: ignore[index]


def test_values_are_escaped() -> None:
    nasty: dict[str, Any] = {**NETWORK, "hosts": [{"mac": "52:54:00:00:00:01", "name": "a'b<c", "ip": "10.0.0.5"}]}
    assert "name='a&#39;b&lt;c'" in network_xml(nasty)


def test_a_dhcp_reservation_is_escaped_like_the_network_it_joins() -> None:
    """virNetworkUpdate takes a reservation alone: the same template as the network's own, so a
    quote or an ampersand in a value stays data."""
    host = {"mac": "52:54:00:00:00:01", "name": "o'brien&co", "ip": "10.0.0.5"}
    element = ET.fromstring(dhcp_host_xml(host))
    assert (element.tag, element.attrib) == ("host", host)

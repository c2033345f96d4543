"""A GPU workstation, simulated: an outer VM with QEMU's virtual Intel IOMMU and a two-function
PCI device standing in for a GPU (QEMU's ``edu``: "video" at ``.0``, "audio" at ``.1``, no host
driver), beside a device the host has a driver for (QEMU's ``vmxnet3`` NIC, driven by the
kernel's ``vmxnet3``, with no network behind it), with libvirt and qemu inside it. The project's
own checkout, virtualenv and engine are shared into it read-only, at the same path, and run there
against its libvirtd: inner domains get the devices through the real VFIO path (libvirt's managed
detach, vfio-pci, ``/dev/vfio/<group>``).

Test equipment, not a product feature: the outer VM is defined here, not by the project, and
needs no network at all (its NIC has no backend) (every command goes through its guest agent). See
``../shared/notes/vfio-nested.md`` for what was measured before this was built.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import yaml

from aihow_infra.host import TCG_CMDLINE
from aihow_infra.images import KERNEL_CMDLINE, Image
from aihow_infra.libvirt.guest import Ran, console_log_path, run, wait_ready
from aihow_infra.state.layout import CHECKOUT
from tests.sandbox import Sandbox

# The stand-in GPU: its functions sit on the root bus at this slot (without an explicit address
# edu takes slot 1, where libvirt's first root port must go).
GPU_SLOT = "0000:00:1e"
EDU_IDS = ("1234", "11e8")
# A device with an in-tree host driver, to show a round trip home (host driver -> vfio-pci -> VM ->
# host driver). The simulator's kernel (Debian's cloud flavour) has vmxnet3 but not e1000e.
NIC = "0000:00:1d.0"
NIC_IDS = ("15ad", "07b0")
NIC_DRIVER = "vmxnet3"
SHARE_TAG = "aihow-checkout"
# Inside the simulator: where the project keeps what it writes (the checkout is read-only there).
SIM = "/opt/aihow-sim"
SIM_ENV = {
    "PATH": f"{SIM}/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    # The checkout is mounted read-only and holds few compiled modules (this machine sets
    # PYTHONDONTWRITEBYTECODE): every Python start inside compiled the project again, under
    # emulation. Bytecode kept in a folder of the simulator's own: import providers.domain 9.1-9.4 s
    # -> 6.2-6.6 s, aihow --list 6.3-6.5 s -> 5.2-5.4 s (2026-12-02, 3 runs each; once 22 s to fill).
    "PYTHONPYCACHEPREFIX": f"{SIM}/pycache",
    "AIHOW_PROJECT_DIR": f"{SIM}/project",
    "AIHOW_STATE_DIR": f"{SIM}/state",
    "PULUMI_HOME": f"{SIM}/pulumi-home",
    "PULUMI_BACKEND_URL": f"file://{SIM}/backend",
    "PULUMI_CONFIG_PASSPHRASE": "",
    "COLUMNS": "200",
}
OUTER_MEMORY_MIB = 4096
SIM_MAC = "52:54:00:a1:40:02"  # the NIC a test reaches the simulator's libvirtd by (outer_xml's tap)
# Polling an agent that is not up yet fails on purpose; libvirt would print each failure.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"  # the checkout's virtualenv's


def edu_passthrough() -> dict[str, Any]:
    """A cluster file's ``pcie_passthrough`` block for the stand-in GPU, both functions."""
    vendor, device = EDU_IDS
    return {"enabled": True, "devices": [
        {"pci_address": f"{GPU_SLOT}.0", "device_type": "gpu", "vendor_id": vendor, "device_id": device},
        {"pci_address": f"{GPU_SLOT}.1", "device_type": "audio", "vendor_id": vendor, "device_id": device}]}


def nic_passthrough() -> dict[str, Any]:
    """A cluster file's ``pcie_passthrough`` block for the simulator's NIC."""
    vendor, device = NIC_IDS
    return {"enabled": True, "devices": [
        {"pci_address": NIC, "device_type": "network", "vendor_id": vendor, "device_id": device}]}


def outer_xml(name: str, image: Image, disk: Path, checkout: Path, tap: str | None = None) -> str:
    """The simulator's domain: q35 with an IOMMU (interrupt remapping and caching mode, which
    VFIO inside needs), the stand-in GPU as a multi-function device, the checkout over virtiofs.
    Without AMD-V: software emulation offers it (and /dev/kvm appears inside), but a KVM guest
    inside one that is itself emulated hangs it; the inner domains run emulated too. With
    ``tap`` (a tap device made beforehand), a virtio NIC on it (``SIM_MAC``): the path a test
    moves into a network namespace of its own to reach the simulator's libvirtd."""
    nic = (f"<interface type='ethernet'><mac address='{SIM_MAC}'/><target dev='{tap}' managed='no'/>"
           "<model type='virtio'/></interface>") if tap else ""
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{OUTER_MEMORY_MIB}</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{KERNEL_CMDLINE} {TCG_CMDLINE} intel_iommu=on iommu=pt</cmdline>
  </os>
  <features><acpi/><apic/><ioapic driver='qemu'/></features>
  <cpu mode='custom' match='exact'>
    <model fallback='allow'>qemu64</model>
    <feature policy='disable' name='svm'/>
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      <source dir='{checkout}'/>
      <target dir='{SHARE_TAG}'/>
    </filesystem>
    <serial type='pty'>
      <log file='{console_log_path(name)}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    {nic}
    <video><model type='none'/></video>
    <memballoon model='none'/>
    <iommu model='intel'><driver intremap='on' caching_mode='on'/></iommu>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='edu,bus=pcie.0,addr=0x1e.0,multifunction=on'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='edu,bus=pcie.0,addr=0x1e.1'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='vmxnet3,bus=pcie.0,addr=0x1d.0'/>
  </qemu:commandline>
</domain>
"""


@dataclass
class GpuHost:
    """The running simulator, driven through its guest agent."""

    dom: libvirt.virDomain
    checkout: Path

    def sh(self, script: str, timeout: float = 300) -> Ran:
        """Run a shell script inside, with the project's environment."""
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in SIM_ENV.items())
        return run(self.dom, ["/bin/sh", "-c", f"export {exports}; {script}"], timeout=timeout)

    def check(self, script: str, timeout: float = 300) -> str:
        """Run a script that must succeed; its output."""
        ran = self.sh(script, timeout)
        if ran.code != 0:
            raise AssertionError(f"in the simulator, `{script}` exited {ran.code}:\n{ran.out}\n{ran.err}")
        return ran.out

    def write(self, path: str, text: str) -> None:
        """Write a file inside."""
        data = base64.b64encode(text.encode()).decode()
        self.check(f"mkdir -p {shlex.quote(str(Path(path).parent))} && echo {data} | base64 -d > {shlex.quote(path)}")

    def aihow(self, *args: str, timeout: float = 1200) -> Ran:
        """The operator's command inside: ``aihow ARGS`` with the shared checkout."""
        return self.sh(" ".join(shlex.quote(a) for a in ("aihow", *args)), timeout)

    # What libvirt and sysfs say inside.

    def driver(self, address: str) -> str | None:
        """The kernel driver the device is bound to, or None."""
        out = self.check(f"readlink /sys/bus/pci/devices/{address}/driver || true").strip()
        return out.rsplit("/", 1)[-1] if out else None

    def iommu_group(self, address: str) -> str:
        """The device's IOMMU group number."""
        return self.check(f"readlink /sys/bus/pci/devices/{address}/iommu_group").strip().rsplit("/", 1)[-1]

    def domain_state(self, name: str) -> str:
        """``virsh domstate`` of an inner domain."""
        return self.check(f"virsh -q domstate {shlex.quote(name)}").strip()

    def live_hostdevs(self, name: str) -> list[str]:
        """The PCI addresses of the hostdevs in an inner domain's XML: the live one while it runs (the
        definition when it is off: that it holds a device is shown by ``vfio_users``)."""
        root = ET.fromstring(self.check(f"virsh -q dumpxml {shlex.quote(name)}"))
        found = []
        for source in root.iterfind("devices/hostdev[@type='pci']/source/address"):
            found.append("{:04x}:{:02x}:{:02x}.{:x}".format(*(int(source.get(k, "0"), 16)
                                                               for k in ("domain", "bus", "slot", "function"))))
        return sorted(found)

    def vfio_users(self, group: str) -> list[str]:
        """The inner domains whose qemu holds ``/dev/vfio/<group>`` open (from /proc)."""
        script = (f"for pidfile in /run/libvirt/qemu/*.pid; do pid=$(cat $pidfile); "
                  f"if ls -l /proc/$pid/fd 2>/dev/null | grep -q ' /dev/vfio/{group}$'; then "
                  f"basename $pidfile .pid; fi; done")
        return sorted(self.check(script).split())


def _prepare(host: GpuHost) -> None:
    """Mount the checkout read-only at its own path, give the project an interpreter there (the
    simulator's Python, same minor version, with the checkout's packages on its path) and a
    project folder of its own where the engine may write."""
    checkout = shlex.quote(str(host.checkout))
    site = host.checkout / ".venv" / "lib" / PYTHON / "site-packages"
    host.check(f"mkdir -p {checkout} && (mountpoint -q {checkout} || mount -t virtiofs -o ro {SHARE_TAG} {checkout})")
    minor = host.check("python3 -c 'import sys; print(sys.version_info[:2])'").strip()
    if minor != str(sys.version_info[:2]):
        raise AssertionError(f"the simulator's Python is {minor}, the checkout's virtualenv {sys.version_info[:2]}")
    # No pip: nothing runs it inside, and ensurepip took 43 s of every start under emulation (1 s
    # without; measured inside, 2026-12-02).
    host.check(f"python3 -m venv --without-pip {SIM}/venv", timeout=600)
    host.write(f"{SIM}/venv/lib/{PYTHON}/site-packages/checkout.pth",
               f"import site; site.addsitedir({str(site)!r})\n")
    host.write(f"{SIM}/venv/bin/aihow",
               f"#!{SIM}/venv/bin/python\nimport sys\n\nfrom tasks import program\n\nsys.exit(program.run())\n")
    host.check(f"chmod +x {SIM}/venv/bin/aihow && mkdir -p {SIM}/state {SIM}/pulumi-home {SIM}/backend "
               f"{SIM}/project && ln -sfn {checkout}/__main__.py {SIM}/project/__main__.py")
    project = yaml.safe_load((host.checkout / "Pulumi.yaml").read_text())
    project["runtime"]["options"]["virtualenv"] = f"{SIM}/venv"
    project.pop("backend", None)
    host.write(f"{SIM}/project/Pulumi.yaml", yaml.safe_dump(project, sort_keys=False))


def configure(host: GpuHost, clusters: dict[str, Any], **settings: str) -> str:
    """Write the simulator's cluster file and both stacks' settings; the file's path inside."""
    path = f"{SIM}/cluster.yaml"
    host.write(path, yaml.safe_dump({"version": "1.0", "clusters": clusters}, sort_keys=False))
    for stack in clusters:
        config = {"aihow:clusterFile": path, "aihow:stopTimeout": "3", **{f"aihow:{k}": v for k, v in settings.items()}}
        host.write(f"{SIM}/project/Pulumi.{stack}.yaml", yaml.safe_dump({"config": config}, sort_keys=False))
    return path


@contextlib.contextmanager
def gpu_host(box: Sandbox, image: Image, checkout: Path = CHECKOUT, boot_timeout: float = 600,
             tap: str | None = None) -> Iterator[GpuHost]:
    """Boot the simulator from the ``gpuhost`` image (an overlay in the sandbox's folder), ready
    to run the project (with a NIC on ``tap``, see ``outer_xml``); everything is removed by the
    sandbox's cleanup."""
    box.images_dir.mkdir(parents=True, exist_ok=True)
    disk = box.images_dir / "gpuhost.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), str(disk), "8G"],
                   check=True)
    dom = box.conn.defineXML(outer_xml(f"{box.prefix}-gpuhost", image, disk, checkout, tap))
    try:
        dom.create()
        wait_ready(dom, boot_timeout, console_log_path(dom.name()))  # as for any project VM
        host = GpuHost(dom, checkout)
        _prepare(host)
        yield host
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()


def _ledger_entries(host: GpuHost, ledger: str) -> dict[str, dict[str, Any]]:
    text = host.check(f"cat {ledger} 2>/dev/null || echo '{{}}'")
    entries: dict[str, dict[str, Any]] = json.loads(text).get("devices", {})
    return entries


def lease_holders(host: GpuHost, ledger: str = "/var/lib/aihow/gpu-leases.json") -> dict[str, str | None]:
    """Who holds each address in a ledger inside, as the ledger file says."""
    return {address: lease.get("holder") for address, lease in _ledger_entries(host, ledger).items()}


def ledger_homes(host: GpuHost, ledger: str = "/var/lib/aihow/gpu-leases.json") -> dict[str, str]:
    """Each address's home in a ledger inside (``host`` where none was set)."""
    return {address: lease.get("home", "host") for address, lease in _ledger_entries(host, ledger).items()}


@contextlib.contextmanager
def remote_libvirt(host: GpuHost, tap: str, netns: str,
                   subnet: str = "10.251.0.0/30") -> Iterator[tuple[str, list[str]]]:
    """The simulator as a remote libvirt host: its NIC's tap moved into a network namespace of
    the caller's own (the host's root namespace sends the simulator no IP traffic), an address
    each side of ``subnet``, and the simulator's libvirtd listening on TCP without
    authentication (test equipment: only that namespace reaches it). Yields the URI that reaches
    it and the command prefix that runs a program in the namespace; the namespace (and the tap
    in it) is removed afterwards."""
    net = ipaddress.IPv4Network(subnet)
    here, there = (f"{a}/{net.prefixlen}" for a in list(net.hosts())[:2])
    inside = ["ip", "netns", "exec", netns]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    ip("netns", "add", netns)
    try:
        ip("link", "set", tap, "netns", netns)
        for args in (["link", "set", "lo", "up"], ["addr", "add", here, "dev", tap], ["link", "set", tap, "up"]):
            ip("-n", netns, *args)
        host.check(f"nic=$(ip -o link | awk -F': ' '/{SIM_MAC}/ {{print $2}}') && ip addr add {there} dev $nic && "
                   "ip link set $nic up && echo 'auth_tcp = \"none\"' >> /etc/libvirt/libvirtd.conf && "
                   "systemctl stop libvirtd.service && systemctl start libvirtd-tcp.socket libvirtd.service")
        uri = f"qemu+tcp://{there.split('/')[0]}/system"
        for _ in range(60):
            ran = subprocess.run([*inside, "virsh", "-c", uri, "version"], capture_output=True, text=True, check=False)
            if ran.returncode == 0:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"the simulator's libvirtd does not answer at {uri}: {ran.stderr}")
        yield uri, inside
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)

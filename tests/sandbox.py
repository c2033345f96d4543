"""What the end-to-end tests share: a libvirt sandbox that cleans up after itself, a Pulumi
workspace kept outside the work tree, the passthrough device every GPU test uses, the tasks run
as a user runs them, and the phase times of the slow tests.
The fixtures that hand them out are in ``conftest.py``."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import libvirt
import pytest
import yaml

from aihow_infra.stacks import Workspace
from aihow_infra.state.layout import CHECKOUT

SYSTEM_URI = "qemu:///system"
# Every test sandbox's names start with this, then six hex digits of its own.
SANDBOX_MARK = "aiht"
# The GPU of the e2e tests: video and audio functions of one device (no host has it).
GPU_SLOT = "0000:41:00"


def gpu_passthrough(slot: str = GPU_SLOT) -> dict[str, Any]:
    """A cluster file's ``pcie_passthrough`` block for a GPU with its audio function."""
    return {"enabled": True, "devices": [
        {"pci_address": f"{slot}.0", "device_type": "gpu", "vendor_id": "10de", "device_id": "2805"},
        {"pci_address": f"{slot}.1", "device_type": "audio", "vendor_id": "10de", "device_id": "22bd"}]}
IMAGES_ROOT = Path("/var/lib/libvirt/images")


def shared_gpu_clusters(box: Sandbox, cloud_auto_start: bool) -> dict[str, Any]:
    """Both clusters of a cluster file passing the same GPU: an HPC compute node (auto start) and
    a Cloud GPU worker (``cloud_auto_start``) beside a CPU worker."""
    hpc_net, cloud_net = box.subnet(), box.subnet()
    h, c = list(hpc_net.hosts()), list(cloud_net.hosts())
    return {
        "hpc": box.cluster("hpc", hpc_net, [box.node(str(h[10]), pcie_passthrough=gpu_passthrough())]),
        "cloud": box.cluster("cloud", cloud_net, [
            box.node(str(c[10])),
            box.node(str(c[11]), auto_start=cloud_auto_start, pcie_passthrough=gpu_passthrough()),
        ]),
    }


def system_libvirt() -> libvirt.virConnect | None:
    try:
        return libvirt.open(SYSTEM_URI)
    except libvirt.libvirtError:
        return None


def _used_subnets(conn: libvirt.virConnect) -> list[ipaddress.IPv4Network]:
    used = []
    for net in conn.listAllNetworks():
        with contextlib.suppress(libvirt.libvirtError, ValueError):
            for ip in ET.fromstring(net.XMLDesc(0)).iterfind("ip"):
                if ip.get("address") and ip.get("netmask"):
                    used.append(ipaddress.IPv4Network(f"{ip.get('address')}/{ip.get('netmask')}", strict=False))
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
    for line in routes.splitlines():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(line.split()[0], strict=False))
    return [n for n in used if n.prefixlen > 0]


@dataclass
class Sandbox:
    """Names and subnets for one test, unique on this host, and the cleanup of everything
    carrying its prefix (domains, networks, pools and their volumes, images folder)."""

    conn: libvirt.virConnect
    prefix: str = field(default_factory=lambda: f"{SANDBOX_MARK}{uuid.uuid4().hex[:6]}")
    _subnets: list[ipaddress.IPv4Network] = field(default_factory=list)

    def subnet(self) -> ipaddress.IPv4Network:
        """A /24 in 10.213.0.0/16 that no libvirt network or host route uses. Tests that run at
        the same time in pytests of their own (``AIHOW_TEST_LANE`` 0, 1: aihow_infra/cli/dev.py)
        take from halves of their own, so two cannot both find one free before either uses it."""
        used = _used_subnets(self.conn) + self._subnets
        lane = os.environ.get("AIHOW_TEST_LANE")
        first, last = (30, 256) if lane is None else (30 + 113 * int(lane), 143 + 113 * int(lane))
        for third in range(first + int(self.prefix[-2:], 16) % (last - first - 20), last):
            candidate = ipaddress.IPv4Network(f"10.213.{third}.0/24")
            if not any(candidate.overlaps(u) for u in used):
                self._subnets.append(candidate)
                return candidate
        raise RuntimeError("no free test subnet in 10.213.0.0/16")

    @property
    def images_dir(self) -> Path:
        """Under libvirt's images folder, so qemu (another user) can reach the disks."""
        return IMAGES_ROOT / self.prefix

    def snapshot(self) -> dict[str, set[str]]:
        """Names of every domain, network and pool on the host (to compare before/after), but
        those of other test sandboxes, which may come and go meanwhile in a pytest beside this one."""
        def mine(name: str) -> bool:
            return not name.startswith(SANDBOX_MARK) or name.startswith(self.prefix)

        return {
            "domains": {n for d in self.conn.listAllDomains() if mine(n := d.name())},
            "networks": {n for net in self.conn.listAllNetworks() if mine(n := net.name())},
            "pools": {n for p in self.conn.listAllStoragePools() if mine(n := p.name())},
        }

    def leftovers(self) -> list[str]:
        """Every libvirt object of this sandbox still on the host."""
        snap = self.snapshot()
        return sorted(n for names in snap.values() for n in names if n.startswith(self.prefix))

    def cleanup(self) -> None:
        """Remove everything of this sandbox, whatever state a failed test left."""
        for dom in self.conn.listAllDomains():
            if dom.name().startswith(self.prefix):
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        for net in self.conn.listAllNetworks():
            if net.name().startswith(self.prefix):
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isActive():
                        net.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    net.undefine()
        for pool in self.conn.listAllStoragePools():
            if pool.name().startswith(self.prefix):
                with contextlib.suppress(libvirt.libvirtError):
                    if not pool.isActive():
                        pool.create(0)
                    pool.refresh(0)
                    for vol in pool.listAllVolumes():
                        vol.delete(0)
                with contextlib.suppress(libvirt.libvirtError):
                    if pool.isActive():
                        pool.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    pool.undefine()
        shutil.rmtree(self.images_dir, ignore_errors=True)

    def node(self, ip: str | None, **extra: Any) -> dict[str, Any]:
        """A small node (1 vCPU, 1 GiB, 1 GiB blank disk)."""
        return {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, **({"ip": ip} if ip else {}), **extra}

    def cluster(self, kind: str, subnet: ipaddress.IPv4Network, workers: list[dict[str, Any]]) -> dict[str, Any]:
        """An isolated cluster named ``<prefix>-<kind>`` with a portable CPU model."""
        hosts = list(subnet.hosts())
        head = {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip_address": str(hosts[9])}
        body: dict[str, Any] = {
            "name": f"{self.prefix}-{kind}",
            "network": {"subnet": str(subnet), "bridge": f"{self.prefix}{kind[0]}", "forward_mode": "isolated"},
            "hardware": {"acceleration": {"cpu_model": "qemu64"}},
        }
        if kind == "hpc":
            body |= {"controller": head, "compute_nodes": workers}
        else:
            body |= {"control_plane": head, "worker_nodes": workers}
        return body


@dataclass
class E2E:
    """A Pulumi workspace for one test: project folder, backend, stack config files, ledger."""

    workspace: Workspace
    root: Path
    sandbox: Sandbox
    shared_ledger: str | None = None  # a PostgreSQL ledger the test shares between project folders

    @property
    def ledger(self) -> Path:
        """The test's own GPU lease ledger file (see ``ledger_path`` for the one its stacks name)."""
        return self.root / "ledger" / "gpu-leases.json"

    @property
    def ledger_path(self) -> str:
        """The ledger its stacks name: the shared one, else its own file."""
        return self.shared_ledger or str(self.ledger)

    def write_cluster_file(self, clusters: dict[str, Any], name: str = "cluster.yaml") -> Path:
        """Write a cluster file and point every stack at it."""
        path = self.root / name
        path.write_text(yaml.safe_dump({"version": "1.0", "clusters": clusters}, sort_keys=False))
        return path

    def configure(self, stack: str, cluster_file: Path, **settings: Any) -> None:
        """Write ``Pulumi.<stack>.yaml`` for the test (outside the work tree). On libvirt's test
        driver the project does not refresh: that driver keeps its objects only for the life of
        one provider process, so a refresh by the next run would find none of them."""
        if str(settings.get("libvirtUri", "")).startswith("test:"):
            project = self.root / "project" / "Pulumi.yaml"
            data = yaml.safe_load(project.read_text())
            data.get("options", {}).pop("refresh", None)
            project.write_text(yaml.safe_dump(data))
        config = {
            "aihow:clusterFile": str(cluster_file),
            "aihow:imagesDir": str(self.sandbox.images_dir),
            "aihow:ledgerPath": self.ledger_path,
            "aihow:stopTimeout": "2",
            # The network rule: Ansible reaches test guests through the agent, never over IP.
            "aihow:ansibleConnection": "agent",
            **{f"aihow:{k}": v for k, v in settings.items()},
        }
        path = self.root / "project" / f"Pulumi.{stack}.yaml"
        existing = yaml.safe_load(path.read_text()) if path.exists() else {}
        existing = existing or {}
        existing.setdefault("config", {}).update(config)
        path.write_text(yaml.safe_dump(existing, sort_keys=False))


def at_once(calls: dict[str, Callable[[], object]], errors: tuple[type[BaseException], ...] = ()) -> dict[str, str]:
    """Run every call in a thread of its own, released together; by name, ``ok`` or the message
    of one of ``errors`` it raised (any other error fails the test: it is re-raised here)."""
    results: dict[str, str] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def run(name: str, call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
            results[name] = "ok"
        except errors as exc:
            results[name] = str(exc)
        except BaseException as exc:  # re-raised in the test's own thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results


def dead_pid() -> int:
    """The pid of a process that has ended (what a killed engine leaves in its lock)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def cpu_reference() -> float:
    """Seconds this machine takes, now, for a fixed piece of single-threaded work (hashing and a
    Python loop, about a second on a quiet host here): printed beside phase times, it tells a
    slow machine (a busy neighbour, a throttled host) from slow code when runs are compared."""
    began = time.monotonic()
    digest = hashlib.sha256()
    block = b"\xa5" * (1 << 20)
    for _ in range(256):
        digest.update(block)
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    return time.monotonic() - began


class Phases:
    """Times named phases of a test; they go into its report as ``phase`` properties."""

    def __init__(self, node: pytest.Item) -> None:
        self.node = node

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the block (kept also when it fails, marked so)."""
        began = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.add(name if ok else f"{name} (failed)", time.monotonic() - began)

    def add(self, name: str, seconds: float) -> None:
        """Keep a phase timed elsewhere."""
        self.node.user_properties.append(("phase", f"{seconds:7.1f} s  {name}"))

    def note(self, line: str) -> None:
        """A line under the last phase (what a slow step said as it went)."""
        self.node.user_properties.append(("phase", f"{'':11}{line}"))

    def reference(self, when: str) -> None:
        """Keep the machine's ``cpu_reference`` now, as a phase of its own."""
        self.add(f"CPU reference {when} (fixed work; a slower machine takes longer)", cpu_reference())


@dataclass
class Task:
    """``invoke ARGS`` of this checkout on an E2E workspace, started in a session of its own."""

    e2e: E2E

    def env(self) -> dict[str, str]:
        """The environment that points the task at the test's project folder and backend."""
        return {**os.environ, "AIHOW_PROJECT_DIR": str(self.e2e.workspace.project_dir),
                "PULUMI_BACKEND_URL": self.e2e.workspace.backend_url or ""}

    def start(self, *args: str, output: IO[str] | int = subprocess.PIPE) -> subprocess.Popen[str]:
        """Start the task; its output (stderr too) goes to ``output``."""
        return subprocess.Popen([sys.executable, "-m", "invoke", "-r", str(CHECKOUT), *args], env=self.env(),
                                text=True, stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the task to its end (15 minutes at most)."""
        proc = self.start(*args)
        out, _ = proc.communicate(timeout=900)
        return subprocess.CompletedProcess(args, proc.returncode, out)


@contextlib.contextmanager
def network_namespace(name: str, bridge: str, address: ipaddress.IPv4Interface) -> Iterator[list[str]]:
    """A network namespace of the test's own, wired into a libvirt network's bridge by a veth
    pair, holding ``address``: SSH from inside it reaches the guests while this host's root
    namespace sends them no IP traffic (its end of the pair has no address and no IPv6).
    Yields the command prefix that runs a program inside; removed whatever happens."""
    outside, inside = f"{name[:10]}o", f"{name[:10]}i"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        subprocess.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{outside}.disable_ipv6=1"], check=True)
        ip("link", "set", inside, "netns", name)
        ip("link", "set", outside, "master", bridge, "up")
        prefix = ["ip", "netns", "exec", name]
        for args in (["link", "set", "lo", "up"], ["addr", "add", str(address), "dev", inside],
                     ["link", "set", inside, "up"]):
            subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)
        # libvirt's bridges run STP: a new port listens and learns (2 x forward delay) first.
        for _ in range(120):
            shown = subprocess.run(["bridge", "link", "show", "dev", outside], capture_output=True, text=True).stdout
            if "state forwarding" in shown:
                break
            time.sleep(0.25)
        yield prefix
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

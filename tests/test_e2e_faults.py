"""Fault injection on real libvirt: an ``invoke up`` is killed or cut at its worst moments, and
one plain ``invoke up`` afterwards converges with nothing done by hand; ``invoke destroy`` then
leaves the host as it was, and no process the task started is still alive.

Each case runs the real task (``python -m invoke up``) in its own session, watches libvirt
for the moment to strike, strikes, and then checks the recovery.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests.sandbox import E2E, Sandbox, Task, dead_pid

pytestmark = pytest.mark.e2e


def hpc_cluster(box: Sandbox) -> dict[str, object]:
    """A controller and two compute nodes on blank disks (nothing to boot: quick)."""
    net = box.subnet()
    hosts = list(net.hosts())
    return {"hpc": box.cluster("hpc", net, [box.node(str(hosts[10])), box.node(str(hosts[11]))])}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren...)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def processes_of(workspace_root: Path) -> list[str]:
    """Live processes whose command line or working folder is in the test's workspace."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        cmd = command_of(int(entry.name))
        if str(workspace_root) in cwd or (str(workspace_root) in cmd and "pytest" not in cmd):
            found.append(f"{entry.name}: {cmd[:160]}")
    return found


def wait_for(what: str, condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the task ended before {what}: {out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def fault(e2e: E2E) -> Iterator[tuple[E2E, Task]]:
    e2e.configure("hpc", e2e.write_cluster_file(hpc_cluster(e2e.sandbox)))
    e2e.workspace.ensure_stack("hpc")
    yield e2e, Task(e2e)


def exists(box: Sandbox, kind: str, name: str) -> Callable[[], bool]:
    lookups = {"network": box.conn.networkLookupByName, "domain": box.conn.lookupByName,
               "pool": box.conn.storagePoolLookupByName}

    def check() -> bool:
        try:
            lookups[kind](f"{box.prefix}-{name}")
        except libvirt.libvirtError:
            return False
        return True

    return check


ENGINE, PROVIDER = "pulumi up ", "-m pulumi.dynamic"


def engine(task: subprocess.Popen[str], marker: str = ENGINE) -> Callable[[], int | None]:
    """The pid of the task's process whose command line has ``marker`` (the engine, or the
    dynamic provider)."""
    def find() -> int | None:
        for pid in descendants(task.pid):
            if marker in command_of(pid):
                return pid
        return None

    return find


def converges(e2e: E2E, task: Task, before: dict[str, set[str]]) -> str:
    """One plain up converges; destroy leaves the host as it was; no process is left. Returns
    what the up printed."""
    box = e2e.sandbox
    done = task.run("up", "--stack", "hpc", "--yes")
    assert done.returncode == 0, done.stdout
    p = box.prefix
    assert {n: box.conn.lookupByName(f"{p}-hpc-{n}").isActive() for n in ("controller", "compute-01", "compute-02")} \
        == {"controller": True, "compute-01": True, "compute-02": True}
    assert box.conn.networkLookupByName(f"{p}-hpc-network").isActive()
    steps = e2e.workspace.planned_steps("hpc")
    assert steps == {}, steps
    gone = task.run("destroy", "--stack", "hpc", "--yes")
    assert gone.returncode == 0, gone.stdout
    assert box.leftovers() == []
    assert box.snapshot() == before
    assert processes_of(e2e.root) == []
    return done.stdout


def interrupted_up(e2e: E2E, task: Task, kind: str, name: str,
                   strike: Callable[[subprocess.Popen[str]], None]) -> subprocess.CompletedProcess[str]:
    """``invoke up``, struck (``strike``) as soon as libvirt holds the ``kind`` named ``name``."""
    proc = task.start("up", "--stack", "hpc", "--yes")
    wait_for(f"the {kind}", exists(e2e.sandbox, kind, name), proc)
    strike(proc)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def kill(marker: str, killed: list[int]) -> Callable[[subprocess.Popen[str]], None]:
    """A strike that SIGKILLs the task's process whose command line has ``marker``."""
    def strike(proc: subprocess.Popen[str]) -> None:
        pid = engine(proc, marker)()
        assert pid is not None, [command_of(p) for p in descendants(proc.pid)]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    return strike


@pytest.mark.parametrize(("kind", "name"), [("network", "hpc-network"), ("pool", "hpc-pool"),
                                            ("domain", "hpc-controller")])
def test_engine_killed_during_up(fault: tuple[E2E, Task], kind: str, name: str) -> None:
    e2e, task = fault
    before = e2e.sandbox.snapshot()
    killed: list[int] = []
    assert interrupted_up(e2e, task, kind, name, kill(ENGINE, killed)).returncode != 0
    assert list((e2e.root / "state" / ".pulumi" / "locks").rglob("*.json")), "the killed engine left its lock"
    recovered = converges(e2e, task, before)
    assert f"cleared the lock of stack hpc left by pulumi process {killed[0]}, which is gone" in recovered


def test_state_cut_while_saving_is_mended(fault: tuple[E2E, Task]) -> None:
    """What an engine killed between the store's two writes leaves (seen in one run of the kills
    above): the state's ``.attrs`` sidecar cut to nothing, a temporary file and a dead lock. The
    engine alone then fails every run with 'failed to load checkpoint: EOF'."""
    e2e, task = fault
    before = e2e.sandbox.snapshot()
    assert task.run("up", "--stack", "hpc", "--yes").returncode == 0
    pulumi = e2e.root / "state" / ".pulumi"
    (pulumi / "stacks" / "aihow" / "hpc.json.attrs").write_text("")
    (pulumi / "stacks" / "aihow" / "hpc.json.0123456789abcdef.tmp").write_text('{"vers')
    lock = pulumi / "locks" / "organization" / "aihow" / "hpc" / "8c1f0b4e.json"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": dead_pid(), "hostname": socket.gethostname()}))
    recovered = converges(e2e, task, before)
    assert "removed hpc.json.attrs" in recovered and "removed hpc.json.0123456789abcdef.tmp" in recovered


def test_provider_killed_during_up(fault: tuple[E2E, Task]) -> None:
    e2e, task = fault
    before = e2e.sandbox.snapshot()
    assert interrupted_up(e2e, task, "domain", "hpc-controller", kill(PROVIDER, [])).returncode != 0
    converges(e2e, task, before)


# Ctrl-C: what a terminal sends to the foreground process group; SIGTERM (kill, a service
# manager) and SIGHUP (a closed terminal, an ssh session cut) to the task's process alone.
SIGNALS = {"SIGINT": (signal.SIGINT, True), "SIGTERM": (signal.SIGTERM, False), "SIGHUP": (signal.SIGHUP, False)}


def send(name: str) -> Callable[[subprocess.Popen[str]], None]:
    sig, group = SIGNALS[name]
    return lambda proc: os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_to_the_task_cancels_cleanly(fault: tuple[E2E, Task], sig: str) -> None:
    e2e, task = fault
    before = e2e.sandbox.snapshot()
    done = interrupted_up(e2e, task, "pool", "hpc-pool", send(sig))
    assert done.returncode != 0
    assert f"{sig}: asking pulumi to cancel" in done.stdout and "the next run finishes what it left" in done.stdout
    assert "Traceback" not in done.stdout, done.stdout
    assert processes_of(e2e.root) == []
    converges(e2e, task, before)


@pytest.mark.alone
def test_libvirt_connection_cut_during_up(fault: tuple[E2E, Task]) -> None:
    e2e, task = fault
    before = e2e.sandbox.snapshot()
    interrupted_up(e2e, task, "domain", "hpc-controller", lambda _proc: restart_libvirtd())
    e2e.sandbox.conn = libvirt.open("qemu:///system")  # the sandbox's own connection was cut too
    converges(e2e, task, before)


@pytest.mark.alone
def test_an_unreachable_libvirtd_is_an_error_not_up_to_date(fault: tuple[E2E, Task]) -> None:
    e2e, task = fault
    assert task.run("up", "--stack", "hpc", "--yes").returncode == 0
    stop_libvirtd()
    try:
        done = task.run("up", "--stack", "hpc", "--yes")
    finally:
        start_libvirtd()
        e2e.sandbox.conn = libvirt.open("qemu:///system")
    assert done.returncode == 1, done.stdout
    assert "connecting to libvirt at qemu:///system" in done.stdout and "up to date" not in done.stdout


def stop_libvirtd() -> None:
    """Kill libvirtd: every client connection drops; running guests keep running."""
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    for _ in range(100):
        if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0:
            return
        time.sleep(0.05)


def restart_libvirtd() -> None:
    """Kill libvirtd and start it again."""
    stop_libvirtd()
    start_libvirtd()


def start_libvirtd() -> None:
    subprocess.run(["libvirtd", "-d"], check=True)
    for _ in range(100):
        if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("libvirtd did not come back")


def test_destroy_right_after_an_interrupted_up_leaves_nothing(fault: tuple[E2E, Task]) -> None:
    """What the killed engine made but never recorded is removed by destroy too (its metadata
    names the stack), and the leases its VMs may hold are freed."""
    e2e, task = fault
    box = e2e.sandbox
    before = box.snapshot()
    interrupted_up(e2e, task, "domain", "hpc-controller", kill(ENGINE, []))
    gone = task.run("destroy", "--stack", "hpc", "--yes")
    assert gone.returncode == 0, gone.stdout
    assert "left by an interrupted run" in gone.stdout
    assert box.leftovers() == [] and box.snapshot() == before
    assert processes_of(e2e.root) == []


def test_destroy_says_what_it_could_not_remove(fault: tuple[E2E, Task]) -> None:
    e2e, task = fault
    box = e2e.sandbox
    assert task.run("up", "--stack", "hpc", "--yes").returncode == 0
    # Someone else's domain now carries a name of the stack (it was removed and made by hand).
    name = f"{box.prefix}-hpc-compute-02"
    dom = box.conn.lookupByName(name)
    dom.destroy()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    dom.undefine()
    foreign = box.conn.defineXML(xml.replace("<aihow:stack>hpc</aihow:stack>", "<aihow:stack>lab</aihow:stack>"))
    gone = task.run("destroy", "--stack", "hpc", "--yes")
    assert gone.returncode == 1
    assert f"destroy of hpc left domain {name} (its metadata names stack 'lab', not 'hpc')" in gone.stdout
    assert foreign.name() in {d.name() for d in box.conn.listAllDomains()}


@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP"])
def test_a_signal_while_both_stacks_come_up_stops_every_engine(e2e: E2E, sig: str) -> None:
    """system.up runs the two stacks' engines at once, from worker threads: a Ctrl-C (SIGINT to
    the task's process group, as a terminal sends it; the engines are in sessions of their own)
    or a SIGHUP to the task reaches both as a clean cancel. No traceback, no roll-back, one line saying what was left;
    no process of the run outlives it; the same command then finishes, and destroy leaves the
    host as it was."""
    box = e2e.sandbox
    before = box.snapshot()
    net = box.subnet()
    cloud = box.cluster("cloud", net, [box.node(str(list(net.hosts())[10]))])
    both = e2e.write_cluster_file({**hpc_cluster(box), "cloud": cloud})
    for stack in ("hpc", "cloud"):
        e2e.configure(stack, both)
        e2e.workspace.ensure_stack(stack)
    task = Task(e2e)
    proc = task.start("system.up", "--yes")
    wait_for("both engines", lambda: exists(box, "pool", "hpc-pool")() and exists(box, "pool", "cloud-pool")(), proc)
    send(sig)(proc)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    assert f"{sig}: asking pulumi to cancel" in out and "Traceback" not in out, out
    assert "system.up interrupted (hpc: interrupted; cloud: interrupted); the next `aihow system.up` finishes " \
           "what it left" in out, out
    assert "rolling back" not in out
    assert processes_of(e2e.root) == []

    done = task.run("system.up", "--yes", "--no-deploy")
    assert done.returncode == 0, done.stdout
    gone = task.run("system.destroy", "--yes")
    assert gone.returncode == 0, gone.stdout
    assert box.leftovers() == [] and box.snapshot() == before
    assert processes_of(e2e.root) == []

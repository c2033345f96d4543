"""Clusters on two libvirt hosts, their state and GPU leases in one PostgreSQL: this machine's
qemu:///system and the GPU-host simulator's libvirtd, reached as a remote host
(``qemu+tcp://``).

The HPC cluster is placed on this machine, but its GPU node on the simulator (a cluster spread
over two hosts, so on a host bridge of one name on each); the Cloud cluster on the simulator,
its GPU worker sharing the simulator's stand-in GPU (tests/gpuhost.py) with the HPC node, both
on demand. The seed's hand-over runs across hosts from this machine: the second start refused,
``switch``, ``vm.stop``. Then the power broker moves the GPU to the work: a job and
a pod asking for it at once, a busy holder kept, each idle one handed over, with the heads'
software played by stand-ins (tests/scripted_heads.py: the simulator's nodes boot nothing). Every
step is checked from the simulator's own view (domains, the functions' drivers, which qemu holds
the VFIO group) and the ledger in PostgreSQL; a watcher inside samples the running domains
through the whole broker run, for a moment where both held the GPU.

The network rule: the engine and every task run in a network namespace the test makes; the
simulator's NIC is a tap moved into it, so this host's root namespace sends it no IP traffic.
The inner domains boot nothing (a blank disk), but a stopped Cloud CPU worker boots the project's
``base`` image: ``up`` copies the image to the simulator through libvirt. Last, the link to the
simulator is cut during an ``up``: one plain ``up`` afterwards finishes it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aihow_infra.gpu.ledger import Ledger, for_host
from aihow_infra.images import ensure_image
from aihow_infra.plan import gpu_type
from aihow_infra.state.layout import CHECKOUT
from tests.conftest import open_e2e
from tests.gpuhost import EDU_IDS, GPU_SLOT, SIM, GpuHost, edu_passthrough, gpu_host, remote_libvirt
from tests.sandbox import E2E, Phases, Sandbox, Task
from tests.scripted_heads import ScriptedHeads

pytestmark = [pytest.mark.e2e, pytest.mark.gpuhost, pytest.mark.timeout(2400)]

FUNCTIONS = (f"{GPU_SLOT}.0", f"{GPU_SLOT}.1")


def two_host_file(prefix: str, bridge: str, sim_uri: str) -> dict[str, Any]:
    """The cluster file: hosts ``here`` and ``sim``; HPC on here but its GPU node on sim, both on
    ``bridge``; Cloud on sim, its GPU worker sharing the GPU (both GPU nodes on demand: the power
    broker starts them), and a CPU worker (not started) that boots the ``base`` image."""
    def node(ip: str, **extra: Any) -> dict[str, Any]:
        return {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 3, "ip": ip, **extra}

    accel = {"acceleration": {"cpu_model": "qemu64"}}
    return {"version": "1.0",
            "hosts": {"here": {"uri": "qemu:///system"}, "sim": {"uri": sim_uri}},
            "clusters": {
                "hpc": {"name": f"{prefix}-hpc", "host": "here", "hardware": accel,
                        "network": {"subnet": "10.77.1.0/24", "bridge": bridge, "forward_mode": "bridge"},
                        "controller": node("10.77.1.10"),
                        "compute_nodes": [node("10.77.1.11", host="sim", on_demand=True,
                                               pcie_passthrough=edu_passthrough())]},
                "cloud": {"name": f"{prefix}-cloud", "host": "sim", "hardware": accel,
                          "network": {"subnet": "10.77.2.0/24", "bridge": f"{prefix}c", "forward_mode": "isolated"},
                          "control_plane": node("10.77.2.10"),
                          "worker_nodes": {
                              "cpu": [node("10.77.2.12", auto_start=False, image="base")],
                              "gpu": [node("10.77.2.11", on_demand=True, pcie_passthrough=edu_passthrough())]}},
            }}


class Inside:
    """The operator's ``aihow`` of this checkout, run in the test's network namespace."""

    def __init__(self, e2e: E2E, prefix: list[str], phases: Phases) -> None:
        self.env, self.prefix, self.phases = Task(e2e).env(), prefix, phases

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "invoke", "-r", str(CHECKOUT), *args]

    def aihow(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        began = time.monotonic()
        ran = subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True, timeout=1200,
                             check=False, stdin=subprocess.DEVNULL)
        self.phases.add(f"aihow {' '.join(args)}", time.monotonic() - began)
        if ok:
            assert ran.returncode == 0, f"aihow {' '.join(args)} exited {ran.returncode}:\n{ran.stdout}\n{ran.stderr}"
        return ran


def cut_during(run: Inside, inside: list[str], tap: str, phases: Phases) -> subprocess.CompletedProcess[str]:
    """``aihow up --stack cloud`` with the simulator's link taken down once the engine starts
    making something there, and brought back after the run has failed."""
    began = time.monotonic()
    proc = subprocess.Popen(run.command("up", "--stack", "cloud"), env=run.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "creating" in line:
            subprocess.run([*inside, "ip", "link", "set", tap, "down"], check=True)
            break
    rest, _ = proc.communicate(timeout=600)
    subprocess.run([*inside, "ip", "link", "set", tap, "up"], check=True)
    phases.add("aihow up --stack cloud, the link cut once it makes something", time.monotonic() - began)
    for line in rest.strip().splitlines()[-3:]:  # how the run ended, said as the operator reads it
        phases.note(line)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + rest)


@pytest.fixture
def bridges(sandbox: Sandbox) -> Iterator[str]:
    """A host bridge of one name here (no address: no traffic) for the spread HPC cluster; the
    simulator's is made inside it. Removed afterwards."""
    name = f"{sandbox.prefix}b"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


@pytest.fixture
def tap(sandbox: Sandbox) -> Iterator[str]:
    """The tap device of the simulator's NIC; removed afterwards if it is still here."""
    name = f"{sandbox.prefix}t"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def domain_states(sim: GpuHost) -> dict[str, str]:
    """Every inner domain's state, by name, as the simulator's libvirt says."""
    out = sim.check("virsh -q list --all | awk '{print $2\"=\"$3}'")
    return dict(line.split("=", 1) for line in out.split())


def held_by(sim: GpuHost, ledger: str, vm: str) -> None:
    """``vm`` runs on the simulator with both functions through VFIO and is the only one, and the
    simulator's leases in the shared ledger (kept under its SMBIOS UUID: the outer domain's) say
    so."""
    group = sim.iommu_group(FUNCTIONS[0])
    assert [sim.driver(f) for f in FUNCTIONS] == ["vfio-pci", "vfio-pci"]
    assert sim.live_hostdevs(vm) == sorted(FUNCTIONS)
    assert sim.vfio_users(group) == [vm]
    leases = Ledger(for_host(ledger, sim.dom.UUIDString().lower())).leases()
    assert {f: leases[f].holder for f in FUNCTIONS} == dict.fromkeys(FUNCTIONS, f"{vm.split('-')[1]}/{vm}")


def until(what: str, check: Callable[[], Any], timeout: float = 300) -> Any:
    """``check()``'s value once it raises no ``AssertionError``, tried every 2 s for ``timeout``
    seconds; then the last failure, with ``what`` was waited for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not so after {timeout:.0f} s: {exc}") from None
        time.sleep(2)


@contextlib.contextmanager
def watching(sim: GpuHost, names: tuple[str, ...]) -> Iterator[list[set[str]]]:
    """Which of ``names`` run in the simulator, sampled inside it every half second while the
    block runs (qemu's pid files under /run/libvirt/qemu: libvirt writes one as a domain starts
    and removes it once its qemu has exited). The samples are there when the block ends."""
    script, log = f"{SIM}/watch.sh", f"{SIM}/watch.log"  # in the simulator's folder for the project's files
    sim.write(script, "while :; do for f in /run/libvirt/qemu/*.pid; do [ -e \"$f\" ] && "
                      "printf '%s ' \"$(basename \"$f\" .pid)\"; done; echo .; sleep 0.5; done\n")
    pid = sim.check(f"setsid sh {script} > {log} 2>&1 < /dev/null & echo $!").strip()
    samples: list[set[str]] = []
    try:
        yield samples
    finally:
        sim.sh(f"kill {pid}")  # (a watcher already gone must not hide the block's own failure)
        samples += [set(line.split()) & set(names) for line in sim.check(f"cat {log}").splitlines()]


@contextlib.contextmanager
def serving(run: Inside, state: Path, log: Path) -> Iterator[subprocess.Popen[str]]:
    """``aihow broker --interval 1`` in the namespace, its heads answered from ``state``
    (tests/scripted_heads.py), its output in ``log``; stopped with SIGINT (as Ctrl-C) at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen([*run.prefix, sys.executable, "-m", "tests.scripted_heads", str(state), "--",
                                 "broker", "--interval", "1"], cwd=CHECKOUT, env=run.env, text=True, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def broker_waits(run: Inside, node: str) -> str:
    """What ``system.status --json`` says ``node``'s start waits for (the broker's queue)."""
    ran = subprocess.run(run.command("system.status", "--json"), env=run.env, capture_output=True, text=True,
                         timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert ran.returncode == 0, ran.stderr  # (a status cut short is asked again)
    waiting = {h["node"]: h["result"] for h in (json.loads(ran.stdout)["broker"] or {"waiting": []})["waiting"]}
    assert node in waiting, waiting
    return str(waiting[node])


def broker_moves_the_gpu(sim: GpuHost, run: Inside, ledger: str, tmp_path: Path, phases: Phases,
                         prefix: str) -> None:
    """The power broker moves the GPU to the work, across the two clusters (both GPU nodes on
    demand, both off when it begins): a job and a pod ask for it at once, the job's node gets
    it and the pod waits while the job runs; the job done, SLURM powers that node down and the
    pod's worker takes the GPU; a job then waits while the pod runs, and gets the GPU once the
    pod is done (the idle worker drained and stopped). Never two holders at once."""
    hpc_node, gpu_worker = f"{prefix}-hpc-compute-01", f"{prefix}-cloud-gpu-worker-01"
    heads = ScriptedHeads.create(tmp_path / "heads.json", {f"{prefix}-hpc-controller": "hpc",
                                                           f"{prefix}-cloud-control-plane": "cloud"}, [hpc_node])
    heads.submit("1", hpc_node)
    heads.pod_waits("train", nodeSelector={"aihow.dev/gpu": gpu_type(*EDU_IDS)})
    log = tmp_path / "broker.log"

    def passes() -> int:  # each pass reads SLURM's power queue once
        return int(heads.read()["hpc"]["queue_reads"])

    def queue_empty() -> None:
        queue = heads.read()["hpc"]["queue"]
        assert queue == {}, queue

    began = time.monotonic()
    with watching(sim, (hpc_node, gpu_worker)) as samples, serving(run, heads.path, log) as broker:
        until("the job's node holding the GPU", lambda: held_by(sim, ledger, hpc_node))
        waits = until("the pod's worker waiting", lambda: broker_waits(run, gpu_worker))
        assert f"hpc/{hpc_node} is busy (1); a busy holder is never preempted" in waits, waits
        phases.add("a job and a pod at once: the job's node started, the pod's worker waits", time.monotonic() - began)

        # The job runs: the holder is kept, pass after pass.
        heads.job_runs("1")
        seen = passes()

        def three_more() -> None:
            assert passes() >= seen + 3, passes()

        until("three more passes", three_more)
        held_by(sim, ledger, hpc_node)
        assert domain_states(sim)[gpu_worker] == "shut"

        # The job done: SLURM powers its node down (the broker asks, SLURM queues the
        # suspend), and the pod's worker takes the GPU. The scheduler places the pod there.
        began = time.monotonic()
        heads.job_ends("1")
        until("the pod's worker holding the GPU", lambda: held_by(sim, ledger, gpu_worker))
        phases.add("job done: its node powered down by SLURM, the GPU to the pod's worker", time.monotonic() - began)
        assert f"{prefix}-hpc-controller: /usr/bin/scontrol update nodename={hpc_node} state=power_down_asap" in \
            heads.read()["asked"]
        heads.pod_runs("train", gpu_worker)

        # A job for the powered-down node waits while the pod runs; the pod done, the idle
        # worker is drained and stopped, and the job's node gets the GPU.
        heads.submit("2", hpc_node)
        waits = until("the job's node waiting", lambda: broker_waits(run, hpc_node))
        assert f"cloud/{gpu_worker} is busy (default/train); a busy holder is never preempted" in waits, waits
        held_by(sim, ledger, gpu_worker)
        began = time.monotonic()
        heads.pod_ends("train")
        until("the job's node holding the GPU again", lambda: held_by(sim, ledger, hpc_node))
        phases.add("pod done: its worker drained and stopped, the GPU to the job's node", time.monotonic() - began)
        assert heads.read()["cloud"]["nodes"][gpu_worker]["unschedulable"]  # drained before it stopped
        until("every request carried out and acknowledged", queue_empty)
        broker.send_signal(signal.SIGINT)
        assert broker.wait(timeout=120) == 0, log.read_text()
    said = log.read_text()
    assert "power broker: stopped; a request it was carrying out stays queued for the next broker" in said, said
    assert not [line for line in said.splitlines()
                if "power broker:" in line and ("failed" in line or "retrying" in line)], said

    # The watcher's view: never both at once, and the GPU went job -> pod -> job.
    assert len(samples) > 20 and not [s for s in samples if len(s) > 1], samples
    holders = [next(iter(s)) for s in samples if s]
    assert [h for i, h in enumerate(holders) if i == 0 or holders[i - 1] != h] == [hpc_node, gpu_worker, hpc_node]


def test_two_hosts_one_postgresql_the_gpu_handed_over_across_them(
        sandbox: Sandbox, tmp_path: Path, postgres_server: str, bridges: str, tap: str, phases: Phases) -> None:
    image, _built = ensure_image("gpuhost", progress=print)
    base, _built = ensure_image("base", progress=print)
    prefix = sandbox.prefix
    backend = postgres_server.replace("postgresql://", "postgres://", 1) + f"&table=state_{tmp_path.name}"
    ledger = f"{postgres_server}&ledger={tmp_path.name}"
    began = time.monotonic()
    with gpu_host(sandbox, image, tap=tap) as sim, remote_libvirt(sim, tap, f"{prefix}-hosts") as (uri, inside), \
            open_e2e(sandbox, tmp_path, backend_url=backend, shared_ledger=ledger) as e2e:
        phases.add("the simulator booted, its libvirtd reached from the namespace", time.monotonic() - began)
        sim.check(f"ip link add {bridges} type bridge && ip link set {bridges} up")
        path = tmp_path / "two-hosts.yaml"
        path.write_text(yaml.safe_dump(two_host_file(prefix, bridges, uri), sort_keys=False))
        for stack in ("hpc", "cloud"):
            e2e.configure(stack, path)
        run = Inside(e2e, inside, phases)
        hpc_node, controller = f"{prefix}-hpc-compute-01", f"{prefix}-hpc-controller"
        gpu_worker, cpu_worker = f"{prefix}-cloud-gpu-worker-01", f"{prefix}-cloud-cpu-worker-01"
        try:
            run.aihow("validate")  # both hosts answer, each has the bridge, no subnet taken there

            # Up: the HPC controller here, its GPU node and the whole Cloud cluster on the
            # simulator; the base image copied there for the CPU worker. The on-demand GPU node
            # is left off; started by hand across hosts, it takes the GPU.
            run.aihow("system.up", "--no-deploy")
            assert sandbox.conn.lookupByName(controller).isActive()
            assert {n for n in (d.name() for d in sandbox.conn.listAllDomains()) if n.startswith(prefix)} == {
                controller, f"{prefix}-gpuhost"}
            assert domain_states(sim) == {hpc_node: "shut", f"{prefix}-cloud-control-plane": "running",
                                          gpu_worker: "shut", cpu_worker: "shut"}
            run.aihow("vm.start", hpc_node)
            held_by(sim, ledger, hpc_node)
            copied = sim.check(f"md5sum {base.disk}").split()[0]
            assert copied == subprocess.run(["md5sum", str(base.disk)], capture_output=True, text=True,
                                            check=True).stdout.split()[0]
            status = json.loads(run.aihow("system.status", "--json").stdout)
            hosts = {vm["name"]: vm["host"] for cluster in status["clusters"] for vm in cluster["vms"]}
            assert hosts == {controller: "here", hpc_node: "sim", f"{prefix}-cloud-control-plane": "sim",
                             gpu_worker: "sim", cpu_worker: "sim"}

            # The seed's hand-over, across hosts: the second start refused, naming the holder.
            refused = run.aihow("vm.start", gpu_worker, ok=False)
            assert refused.returncode == 1 and f"GPU {FUNCTIONS[0]} is held by hpc/{hpc_node} since " in refused.stderr
            held_by(sim, ledger, hpc_node)
            run.aihow("switch", "--to", "cloud")
            held_by(sim, ledger, gpu_worker)
            assert domain_states(sim)[hpc_node] == "shut"
            run.aihow("vm.stop", gpu_worker)

            # Then the power broker hands it over for work (it ends held by the HPC node). Here,
            # before more Cloud workers run in the simulator: each takes some of its CPU.
            broker_moves_the_gpu(sim, run, ledger, tmp_path, phases, prefix)

            # The network to the simulator cut during an up that makes two more Cloud workers
            # there: the run fails; the link back, one plain `up` finishes it; nothing else moved.
            data = two_host_file(prefix, bridges, uri)
            data["clusters"]["cloud"]["worker_nodes"]["cpu"] += [
                {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 1, "ip": f"10.77.2.{n}"} for n in (13, 14)]
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            cut = cut_during(run, inside, tap, phases)
            assert cut.returncode != 0, cut.stdout
            run.aihow("up", "--stack", "cloud")
            added = [f"{prefix}-cloud-cpu-worker-0{n}" for n in (2, 3)]
            assert {n: domain_states(sim)[n] for n in added} == dict.fromkeys(added, "running")
            assert domain_states(sim)[hpc_node] == "running"
            held_by(sim, ledger, hpc_node)

            run.aihow("system.destroy", "--yes")
            leases = Ledger(for_host(ledger, sim.dom.UUIDString().lower())).leases()
            assert {f: leases[f].holder for f in FUNCTIONS} == dict.fromkeys(FUNCTIONS, None)
            assert sim.check("virsh -q list --all --name").split() == []
            assert [p for p in sim.check("virsh -q pool-list --all --name").split() if p.startswith(prefix)] == []
            assert [n for n in sim.check("virsh -q net-list --all --name").split() if n.startswith(prefix)] == []
            assert [n for n in sandbox.leftovers() if n != f"{prefix}-gpuhost"] == []
        finally:
            run.aihow("system.destroy", "--yes", ok=False)  # in the namespace: the simulator is reached there

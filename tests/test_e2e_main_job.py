"""The README's main job as a test: the default example's two clusters (config/default.yaml, on
the sandbox's names and subnets) from nothing with one ``system.up``, both deployed through the
guest agent (no IP traffic from the host): SLURM runs a job across the compute nodes and every
Kubernetes node is Ready. The scenarios that do not break a cluster then share that one booted
pair, in this file's order:

- Guests: every VM as cloud-init left it (host name, address, keys, sudo, /etc/hosts), the DHCP
  compute node on its reserved address; a second system.up boots and deploys nothing.
- Kubernetes: a pod from the image made here runs on the worker with an address of its pod
  subnet; a deploy changes nothing; the on-demand worker (the example plus one worker with
  ``on_demand: true``) is started by ``aihow broker`` for a pod only it could run and joins, is
  drained and cordoned before it stops by hand, is back in scheduling when a pod starts it again,
  and is drained and stopped by the broker once idle. Nothing after this needs the Cloud
  cluster: it is destroyed then, so the SLURM scenarios do not share the emulated CPUs with its
  control plane (`aihow test` starts a group of short tests beside them then).
- SLURM: nothing changed, nothing deployed; a deploy changes nothing; a compute node stopped is
  drained first and rejoins when started, its data kept; a broken playbook is one line and stops
  nothing; the same deploy over SSH from a network namespace of the test's own.
- SLURM power saving: a job for the powered-down on-demand node starts its VM through
  ``aihow broker``; idle, the node is powered down again; a node that cannot start is left off
  and marked DOWN with the reason.
- Last, as it changes the cluster: a running compute node given a new address is restarted (asked
  first), keeps its data, and SLURM runs jobs on it at the new address.

Every check runs on a head node through the guest agent. Phase times are printed at the end of
the run (the ``phases`` fixture) for the measurements the README quotes."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from aihow_infra.cli.dev import SPARE_CPU_ENV
from aihow_infra.errors import DeployError, GuestError
from aihow_infra.images import BUSYBOX_IMAGE
from aihow_infra.kinds.cloud import ADMIN_KUBECONFIG, KUBE_GET
from aihow_infra.libvirt.guest import agent_command, read_file, run
from aihow_infra.ops import Operator
from aihow_infra.ops.broker import BrokerRecord
from aihow_infra.plan import mac_for
from aihow_infra.sshkeys import project_key
from aihow_infra.state.layout import CHECKOUT
from tests.conftest import open_e2e, open_sandbox
from tests.sandbox import E2E, Phases, Task, network_namespace

# Both clusters boot, deploy and run every scenario here in about 15 minutes under software
# emulation (phase times at the end of each run); the limit leaves room for a slow day.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


@dataclass
class MainJob:
    """The booted pair every test of this file shares."""

    e2e: E2E
    op: Operator
    lines: list[str]
    cluster_file: Path
    clusters: dict[str, Any]
    up_seconds: float
    key_file: Path
    names: dict[str, str] = field(default_factory=dict)

    def vm(self, short: str) -> str:
        """The VM's libvirt name, e.g. ``hpc-controller``."""
        return f"{self.e2e.sandbox.prefix}-{short}"

    def on(self, short: str, *argv: str, ok: bool = True) -> str:
        """A command on a VM through the guest agent; its output."""
        ran = run(self.e2e.sandbox.conn.lookupByName(self.vm(short)), list(argv), timeout=300)
        assert not ok or ran.code == 0, (argv, ran.out, ran.err)
        return ran.out


def default_example_on(e2e: E2E) -> dict[str, Any]:
    """config/default.yaml's clusters on the sandbox's names, bridges and subnets (each address
    keeps its place in the subnet), the second compute node on DHCP, plus two on-demand compute
    nodes (SLURM powers one down after 30 s idle) and an on-demand Cloud worker (stopped after
    30 s with no work)."""
    box = e2e.sandbox
    clusters: dict[str, Any] = yaml.safe_load((CHECKOUT / "config" / "default.yaml").read_text())["clusters"]
    for key, cluster in clusters.items():
        old, new = ipaddress.IPv4Network(cluster["network"]["subnet"]), box.subnet()

        def moved(address: str, old: ipaddress.IPv4Network = old, new: ipaddress.IPv4Network = new) -> str:
            return str(new.network_address + (int(ipaddress.IPv4Address(address)) - int(old.network_address)))

        cluster["name"] = f"{box.prefix}-{key}"
        cluster["network"] |= {"subnet": str(new), "bridge": f"{box.prefix}{key[0]}"}
        head = cluster.get("controller") or cluster["control_plane"]
        head["ip_address"] = moved(head["ip_address"])
        for node in cluster.get("compute_nodes") or cluster.get("worker_nodes") or []:
            node["ip"] = moved(node["ip"])
    del clusters["hpc"]["compute_nodes"][1]["ip"]  # asks DHCP: the network reserves it an address
    computes = clusters["hpc"]["compute_nodes"]
    for more in (2, 3):  # compute-03 starts for a job; compute-04 cannot start (its disk made immutable)
        computes.append({**computes[0], "ip": str(ipaddress.IPv4Address(computes[0]["ip"]) + more),
                         "on_demand": True})
    clusters["hpc"]["slurm_config"] |= {"suspend_time": 30, "resume_timeout": 900}
    workers = clusters["cloud"]["worker_nodes"]
    workers.append({**workers[0], "ip": str(ipaddress.IPv4Address(workers[0]["ip"]) + 1), "on_demand": True})
    clusters["cloud"].setdefault("kubernetes_config", {})["scale_down_unneeded_time"] = 30
    return clusters


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MainJob]:
    """Both clusters up and deployed; destroyed at the end, leaving the host as it was."""
    root = tmp_path_factory.mktemp("main-job")
    with open_sandbox() as box, open_e2e(box, root) as e2e:
        clusters = default_example_on(e2e)
        cluster_file = e2e.write_cluster_file(clusters)
        key = project_key(root / "keys")
        for stack in ("hpc", "cloud"):
            e2e.configure(stack, cluster_file, sshPublicKey=f"{key.private_path}.pub", ansibleConnection="agent",
                          stopTimeout="60")
        lines: list[str] = []
        op = Operator(e2e.workspace, progress=lines.append)
        began = time.monotonic()
        op.system_up()
        job = MainJob(e2e, op, lines, cluster_file, clusters, time.monotonic() - began, Path(f"{key.private_path}.pub"))
        yield job
        op.system_destroy()
        assert box.leftovers() == []


# Seconds before asking the API server again, when it did not answer. A kubectl run on the control
# plane costs about 1.1 s of its emulated CPU (user + sys, measured inside during a main job,
# 2026-12-03), nearly all of it kubectl's own start: a wait is one `kubectl wait` (a watch),
# not a look every few seconds (every 3 s, they took a third of a vCPU from the join being timed).
KUBECTL_POLL = 6


def wait_until(what: str, check: Callable[[], bool], timeout: float = 300, every: float = 3) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


def sinfo(job: MainJob) -> dict[str, str]:
    out = job.on("hpc-controller", "/usr/bin/sinfo", "-h", "-N", "-o", "%N %T")
    return dict(line.split() for line in out.splitlines())


def slurm_states(job: MainJob, want: dict[str, str], timeout: float = 180) -> dict[str, str]:
    """SLURM's states of the nodes of ``want`` once they match it (a state, or a prefix ending in
    '-'), or the last seen. 'idle*' (not responding) is not 'idle'."""
    def matches(state: str, wanted: str) -> bool:
        return state.startswith(wanted[:-1]) if wanted.endswith("-") else state == wanted

    deadline = time.monotonic() + timeout
    states = sinfo(job)
    while time.monotonic() < deadline:
        if all(matches(states.get(node, ""), state) for node, state in want.items()):
            break
        time.sleep(3)
        states = sinfo(job)
    return {node: states.get(node, "") for node in want}


def stop_broker(broker: subprocess.Popen[str], log: IO[str], tmp_path: Path) -> None:
    """Ctrl-C to a broker the test started: its normal end, exit 0 (its log printed for the record)."""
    broker.send_signal(signal.SIGINT)
    try:
        broker.wait(timeout=300)
    finally:
        broker.kill()
        log.close()
        print((tmp_path / "broker.log").read_text()[-3000:])
    said = (tmp_path / "broker.log").read_text()
    assert broker.returncode == 0 and "power broker: stopped" in said, said[-3000:]


def kubectl(job: MainJob, *args: str) -> str:
    code, out, err = job.op.kubectl("cloud", list(args))
    assert code == 0, (args, out, err)
    return out


def k8s_nodes(job: MainJob) -> dict[str, str]:
    code, out, _err = job.op.kubectl("cloud", ["get", "nodes", "-o", "json"])
    items = json.loads(out)["items"] if code == 0 else []
    return {i["metadata"]["name"]: next(c["status"] for c in i["status"]["conditions"] if c["type"] == "Ready")
            + (",cordoned" if i["spec"].get("unschedulable") else "") for i in items}


def test_both_clusters_deployed_a_job_runs_and_every_node_is_ready(main_job: MainJob, phases: Phases) -> None:
    job = main_job
    box = job.e2e.sandbox
    phases.reference("with both clusters up")
    phases.add("system.up of both clusters to deployed", job.up_seconds)
    for stack, what in (("hpc", "SLURM"), ("cloud", "Kubernetes")):  # each deploy's own time, within it
        deployed = [line for line in job.lines if line.startswith(f"{stack} deployed in ")]
        assert len(deployed) == 1, job.lines
        phases.add(f"{what} first deploy (both clusters booted)", float(deployed[0].split()[3]))
    computes = [job.vm("hpc-compute-01"), job.vm("hpc-compute-02")]
    assert slurm_states(job, dict.fromkeys(computes, "idle")) == dict.fromkeys(computes, "idle")
    out = job.on("hpc-controller", "/usr/bin/srun", "-N2", "-p", "debug", "/usr/bin/hostname")
    assert sorted(out.split()) == computes
    control, worker = job.vm("cloud-control-plane"), job.vm("cloud-cpu-worker-01")
    assert k8s_nodes(job) == {control: "True", worker: "True"}

    hpc, cloud = job.op.system_status().clusters
    assert hpc.health == "SLURM: 2/2 nodes up (2 powered down)"
    assert [vm.workload for vm in hpc.vms if vm.role == "compute"] == ["idle", "idle", "idle~", "idle~"]
    assert [vm.state_word for vm in hpc.vms if vm.on_demand] == ["powered down (on demand)"] * 2
    assert cloud.health == "Kubernetes: healthy, 2/2 nodes Ready"
    assert {vm.name: vm.workload for vm in cloud.vms} == {control: "Ready", worker: "Ready",
                                                          job.vm("cloud-cpu-worker-02"): ""}
    assert kubectl(job, "get", "node", control, "-o", "jsonpath={.spec.taints[0].key}") == \
        "node-role.kubernetes.io/control-plane"
    # The image carries the reader that status and the broker ask (kubectl would answer them the
    # same on an image without it), and it answers on the control plane.
    ran = run(box.conn.lookupByName(control), [KUBE_GET, "-kubeconfig", ADMIN_KUBECONFIG, "/readyz"])
    assert (ran.code, json.loads(ran.out)) == (0, [{"path": "/readyz", "code": 200, "body": "ok"}]), ran.err

    # Every VM as cloud-init left it, seen through the guest agent.
    key = job.key_file.read_text().strip()
    for cluster in (hpc, cloud):
        running = [vm for vm in cluster.vms if vm.state == "running"]
        for vm in running:
            dom = box.conn.lookupByName(vm.name)
            assert agent_command(dom, "guest-get-host-name")["host-name"] == vm.name
            interfaces = {i["hardware-address"]: [a["ip-address"] for a in i.get("ip-addresses", [])]
                          for i in agent_command(dom, "guest-network-get-interfaces")}
            assert vm.ip in interfaces[mac_for(vm.name)], interfaces
            assert json.loads(read_file(dom, "/run/cloud-init/result.json") or "{}")["v1"]["errors"] == []
            assert (read_file(dom, "/home/aihow/.ssh/authorized_keys") or "").strip() == key
            assert "NOPASSWD: ALL" in job.on(vm.name.removeprefix(f"{box.prefix}-"), "/usr/bin/sudo", "-l", "-U",
                                             "aihow")
            hosts = read_file(dom, "/etc/hosts") or ""
            assert all(other.name in hosts for other in running), hosts
    # The DHCP node has the address its network reserved, as the stack's outputs say.
    nodes = job.e2e.workspace.outputs("hpc")["nodes"]
    assert all(node["ready"] and node["addresses"]["eth0"] == [node["ip"]] for node in nodes.values()
               if not node["on_demand"])

    # Nothing changed: system.up boots nothing and deploys neither cluster.
    ids = {d.name(): d.ID() for d in box.conn.listAllDomains() if d.name().startswith(box.prefix)}
    with phases.time("system.up with nothing changed"):
        Operator(job.e2e.workspace, progress=job.lines.append).system_up()
    assert {"hpc: nothing changed since the last deploy", "cloud: nothing changed since the last deploy"} \
        <= set(job.lines)
    assert {d.name(): d.ID() for d in box.conn.listAllDomains() if d.name().startswith(box.prefix)} == ids
    for stack in ("hpc", "cloud"):
        assert job.e2e.workspace.planned_steps(stack) == {}, stack


def test_kubernetes_runs_pods_and_an_on_demand_worker_starts_for_a_pod_drains_and_stops(
        main_job: MainJob, phases: Phases, tmp_path: Path) -> None:
    """A pod from the image made here runs on the worker; with `aihow broker` running (its own
    process), a pod only the stopped on-demand worker could run starts it (first join); stopped by
    hand it is drained and cordoned first; a pod for it again starts it again, back in
    scheduling; idle 30 s after, the broker drains and stops it."""
    job = main_job
    op, box = job.op, job.e2e.sandbox
    worker, spare = job.vm("cloud-cpu-worker-01"), job.vm("cloud-cpu-worker-02")

    def run_pod(name: str, node: str, *command: str) -> None:
        kubectl(job, "run", name, f"--image={BUSYBOX_IMAGE}", "--image-pull-policy=Never", "--restart=Never",
                "--overrides", json.dumps({"spec": {"nodeSelector": {"kubernetes.io/hostname": node}}}),
                "--", *command)

    def wait_for_phase(name: str, phase: str, timeout: float) -> None:
        """Until the pod's phase is ``phase``, through `kubectl wait`, again while the API
        server does not answer (a worker's join can keep it busy past kubectl's TLS handshake
        timeout under emulation: seen in bench/on_demand.py) or the control plane's guest agent
        is busy ("not available for now": seen with the machine's two cores shared by three test
        runs); ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                code, _out, _err = job.op.kubectl("cloud", [
                    "wait", f"pod/{name}", f"--for=jsonpath={{.status.phase}}={phase}",
                    f"--timeout={max(1, int(min(left, 300)))}s"])
            except GuestError:
                code = -1
            if code == 0:
                return
            time.sleep(min(KUBECTL_POLL, max(0.0, deadline - time.monotonic())))
        raise AssertionError(f"pod {name}: not {phase} within {timeout:.0f} s")

    # A pod from the image made here, on the worker, with an address of the worker's pod subnet.
    began = time.monotonic()
    run_pod("hello", worker, "sh", "-c", "echo hello from $(hostname)")
    wait_for_phase("hello", "Succeeded", timeout=300)
    phases.add("pod created to succeeded", time.monotonic() - began)
    assert kubectl(job, "logs", "hello").strip() == "hello from hello"
    assert kubectl(job, "get", "pod", "hello", "-o", "jsonpath={.status.podIP}").startswith("10.244.1.")

    job.lines.clear()
    with phases.time("Kubernetes deploy with nothing to change"):
        again = op.deploy("cloud")
    assert again.changed == 0, [line for line in job.lines if line.lstrip().startswith("changed")]

    # The broker at its default interval (5 s): each of its passes is one run of the reader
    # (aihow-kube-get) on the control plane.
    log = (tmp_path / "broker.log").open("w")
    broker = Task(job.e2e).start("broker", output=log)
    try:
        # A pod for the stopped on-demand worker: the broker starts it, it joins, the pod runs there.
        began = time.monotonic()
        run_pod("sleeper", spare, "sleep", "3600")
        wait_for_phase("sleeper", "Running", timeout=900)
        phases.add("pod Pending to Running on a stopped on-demand worker (boot and first join)",
                   time.monotonic() - began)
        assert k8s_nodes(job)[spare] == "True"
        assert op.system_status().clusters[1].health == "Kubernetes: healthy, 3/3 nodes Ready"

        # Stopped by hand, it is drained and cordoned first; the pod on it is evicted.
        with phases.time("vm.stop of the on-demand worker by hand (drained first)"):
            op.vm_stop(spare)
        assert any(line.startswith(f"draining {spare} in Kubernetes") for line in job.lines)
        assert not box.conn.lookupByName(spare).isActive()
        assert k8s_nodes(job)[spare].endswith(",cordoned")
        assert kubectl(job, "get", "pods", "--field-selector", f"spec.nodeName={spare}", "-o", "name") == ""
        # Said at once, before Kubernetes notices the node gone (its grace period, 40 s or more).
        assert op.system_status().clusters[1].health == "Kubernetes: healthy, 2/3 nodes Ready (1 stopped)"

        # A pod for it again: started again, back in scheduling, the pod runs; then, idle 30 s,
        # the broker drains and stops it.
        began = time.monotonic()
        run_pod("again", spare, "echo", "back")
        wait_for_phase("again", "Succeeded", timeout=900)
        phases.add("pod Pending to done on the on-demand worker stopped by hand", time.monotonic() - began)
        began = time.monotonic()
        wait_until("idle, the on-demand worker is stopped", lambda: not box.conn.lookupByName(spare).isActive(),
                   timeout=600)
        phases.add("pod done to the on-demand worker stopped (idle 30 s, drained)", time.monotonic() - began)
        assert k8s_nodes(job)[spare].endswith(",cordoned")
        record = BrokerRecord.read(job.op.state.broker)
        assert record is not None and record.waiting == []
        assert [(h.action, h.node, h.result) for h in record.recent] == [
            ("start", spare, "started"), ("start", spare, "started"), ("stop", spare, "stopped")]
    finally:
        stop_broker(broker, log, tmp_path)
    said = (tmp_path / "broker.log").read_text()
    assert f"power broker: cloud: default/sleeper waiting for {spare}" in said, said[-3000:]
    assert "deploying cloud: cloud.yml on cpu-worker-02,control-plane" in said, said[-3000:]

    # Nothing after this needs the Cloud cluster: destroyed now, as the teardown would, so the
    # SLURM scenarios do not share the emulated CPUs with a busy Kubernetes control plane; the
    # project keeps the HPC stack alone, so a system.up after this does not make it again.
    with phases.time("destroy of the Cloud cluster"):
        op.destroy("cloud")
    assert [d.name() for d in box.conn.listAllDomains() if d.name().startswith(job.vm("cloud"))] == []
    (job.e2e.workspace.project_dir / "Pulumi.cloud.yaml").unlink()
    assert op.configured_stacks() == ["hpc"]
    # From here one single-vCPU compute node boots at a time: `aihow test` starts a group of
    # short tests beside the SLURM scenarios when told (aihow_infra/cli/dev.py).
    if spare := os.environ.get(SPARE_CPU_ENV):
        Path(spare).touch()


def test_slurm_deploys_nothing_twice_drains_and_rejoins(main_job: MainJob, phases: Phases, tmp_path: Path) -> None:
    job = main_job
    op, box = job.op, job.e2e.sandbox
    computes = [job.vm("hpc-compute-01"), job.vm("hpc-compute-02")]
    job.lines.clear()
    with phases.time("SLURM deploy with nothing to change, through the guest agent"):
        again = op.deploy("hpc")
    assert again.changed == 0, [line for line in job.lines if line.lstrip().startswith("changed")]

    # Stopping a compute node drains it first; SLURM sees it drained and down; start brings it
    # back, with what was written on its disk.
    job.on("hpc-compute-02", "/bin/sh", "-c", "echo kept > /var/tmp/data && sync")
    with phases.time("vm.stop of a compute node (drained first)"):
        op.vm_stop(computes[1])
    assert not box.conn.lookupByName(computes[1]).isActive()
    state = slurm_states(job, {computes[1]: "drain-"})[computes[1]]
    assert state.startswith(("drained", "down")), state
    with phases.time("vm.start of a compute node (rejoins)"):
        op.vm_start(computes[1])
    assert slurm_states(job, {computes[1]: "idle"})[computes[1]] == "idle"
    assert job.on("hpc-compute-02", "/bin/cat", "/var/tmp/data") == "kept\n"
    assert sorted(job.on("hpc-controller", "/usr/bin/srun", "-N2", "/usr/bin/hostname").split()) == computes

    # A broken playbook: host, task and message; nothing stops.
    broken = tmp_path / "broken.yml"
    broken.write_text("- hosts: slurmctld\n  gather_facts: false\n  tasks:\n"
                      "    - name: use a variable nobody set\n"
                      "      ansible.builtin.debug: {msg: '{{ slurm_partition_typo }}'}\n")
    with pytest.raises(DeployError, match=r"deploy of hpc failed on controller, task 'use a variable nobody "
                                          r"set': .*slurm_partition_typo.* is undefined"):
        op.deploy("hpc", playbook=broken)
    assert all(box.conn.lookupByName(job.vm(name)).isActive()
               for name in ("hpc-controller", "hpc-compute-01", "hpc-compute-02"))

    # The same deploy over SSH, from a network namespace of this test's own: nothing to change.
    job.e2e.configure("hpc", job.cluster_file, ansibleConnection="ssh")
    try:
        net = ipaddress.IPv4Network(job.clusters["hpc"]["network"]["subnet"])
        address = ipaddress.IPv4Interface(f"{list(net.hosts())[199]}/{net.prefixlen}")
        with (network_namespace(f"{box.prefix}n", job.clusters["hpc"]["network"]["bridge"], address) as inside,
              phases.time("SLURM deploy with nothing to change, over SSH")):
            proc = subprocess.run([*inside, sys.executable, "-m", "invoke", "-r", str(CHECKOUT), "deploy",
                                   "--stack", "hpc"], env=Task(job.e2e).env(), capture_output=True, text=True,
                                  timeout=1200)
    finally:
        job.e2e.configure("hpc", job.cluster_file, ansibleConnection="agent", stopTimeout="60")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hpc deployed in" in proc.stdout and "0 change(s)" in proc.stdout, proc.stdout
    assert "changed=0" in proc.stderr and "unreachable=0" in proc.stderr


def job_state(job: MainJob, job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, Reason, Restarts, NodeList...)."""
    out = job.on("hpc-controller", "/usr/bin/scontrol", "show", "job", job_id, "-o")
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_an_on_demand_node_starts_for_a_job_and_powers_down_when_idle(main_job: MainJob, phases: Phases,
                                                                     tmp_path: Path) -> None:
    """SLURM's power saving through `aihow broker` (its own process, as an operator runs it):
    a job for the powered-down node starts its VM (lease, boot, first deploy), runs, and 30 s
    idle later the VM is off and SLURM shows the node powered down, and the broker's record says
    both hand-overs. A job for a node that cannot start leaves it off and DOWN with the reason,
    the job pending."""
    job = main_job
    box = job.e2e.sandbox
    node, broken = job.vm("hpc-compute-03"), job.vm("hpc-compute-04")
    pool = box.conn.storagePoolLookupByName(f"{job.vm('hpc')}-pool")
    disk = Path(pool.storageVolLookupByName(f"{broken}.qcow2").path())
    failing = ""
    log = (tmp_path / "broker.log").open("w")
    broker = Task(job.e2e).start("broker", "--interval", "3", output=log)
    try:
        began = time.monotonic()
        job_id = job.on("hpc-controller", "/usr/bin/sbatch", "--parsable", "-p", "debug", "-w", node,
                        "--wrap", "hostname").strip()
        wait_until("the job runs on the on-demand node", lambda: job_state(job, job_id)["JobState"] in
                   ("RUNNING", "COMPLETING", "COMPLETED"), timeout=1200)
        phases.add("sbatch to RUNNING on a powered-down node (boot and first deploy)", time.monotonic() - began)
        wait_until("the job completes", lambda: job_state(job, job_id)["JobState"] == "COMPLETED")
        assert box.conn.lookupByName(node).isActive()
        assert job.on("hpc-controller", "/usr/bin/sinfo", "-h", "-n", node, "-o", "%T").strip() in ("idle", "mixed")

        # Powering down (idle%) is enough once the VM is off: powered down (idle~) only says
        # SuspendTimeout (120 s) is over, a wait of SLURM's own.
        began = time.monotonic()
        wait_until("idle, the node's VM is stopped and SLURM powers it down",
                   lambda: not box.conn.lookupByName(node).isActive() and sinfo(job).get(node) in ("idle%", "idle~"),
                   timeout=600)
        phases.add("job done to VM off and node powering down (SuspendTime 30 s)", time.monotonic() - began)
        status = job.op.system_status()
        assert status.clusters[0].health == "SLURM: 2/2 nodes up (2 powered down)"
        record = BrokerRecord.read(job.op.state.broker)
        assert record is not None and record.waiting == []
        assert [(h.action, h.result) for h in record.recent if h.node == node] == [("resume", "started"),
                                                                                   ("suspend", "stopped")]

        # A node that cannot start (its disk immutable: qemu cannot open it): the broker leaves
        # the VM off and marks the node DOWN with why; the job waits, not lost, and runs nowhere.
        subprocess.run(["chattr", "+i", str(disk)], check=True)
        began = time.monotonic()
        failing = job.on("hpc-controller", "/usr/bin/sbatch", "--parsable", "-p", "debug", "-w", broken,
                         "--wrap", "hostname").strip()
        # Seen while it is DOWN: SuspendTime (30 s) later SLURM powers the down node off and, with
        # idle_on_node_suspend, makes it idle again, to be tried for a later job.
        wait_until("the node that cannot start is marked down",
                   lambda: node_field(job, broken, "State").startswith("DOWN")
                   and "aihow: could not start the VM" in node_field(job, broken, "Reason"), timeout=600)
        phases.add("sbatch to DOWN with the reason, for a node that cannot start", time.monotonic() - began)
        assert not box.conn.lookupByName(broken).isActive()
        # Requeued (SLURM's JobRequeue=1 default), held or not, and not yet cleaned up: never failed or lost.
        assert job_state(job, failing)["JobState"] in ("PENDING", "REQUEUED", "REQUEUE_HOLD"), job_state(job, failing)
        record = BrokerRecord.read(job.op.state.broker)
        assert record is not None and any(h.node == broken and h.action == "resume" and h.result.startswith("failed")
                                          for h in record.recent), record
    finally:
        subprocess.run(["chattr", "-i", str(disk)], check=False)
        if failing:
            job.on("hpc-controller", "/usr/bin/scancel", failing, ok=False)
        stop_broker(broker, log, tmp_path)


def node_field(job: MainJob, node: str, name: str) -> str:
    """A field of ``scontrol show node`` (State, Reason...); the Reason runs to the line's end."""
    out = job.on("hpc-controller", "/usr/bin/scontrol", "show", "node", node)
    for line in out.splitlines():
        line = line.strip()
        if name == "Reason" and line.startswith("Reason="):
            return line.removeprefix("Reason=")
        for pair in line.split():
            if pair.startswith(f"{name}="):
                return pair.split("=", 1)[1]
    return ""


def test_a_running_node_given_a_new_address_restarts_with_its_data_and_runs_jobs(main_job: MainJob,
                                                                                 phases: Phases) -> None:
    """Last: it changes the cluster (and leaves it deployed)."""
    job = main_job
    name = job.vm("hpc-compute-01")
    job.on("hpc-compute-01", "/bin/sh", "-c", "echo kept > /var/tmp/data && sync")
    moved = str(list(ipaddress.IPv4Network(job.clusters["hpc"]["network"]["subnet"]).hosts())[30])
    job.clusters["hpc"]["compute_nodes"][0]["ip"] = moved
    job.e2e.write_cluster_file(job.clusters)
    asked: list[str] = []

    def confirm(risks: list[Any]) -> bool:
        asked.extend(str(r) for r in risks)
        return True

    op = Operator(job.e2e.workspace, progress=job.lines.append, confirm=confirm)
    with phases.time("system.up after a compute node's address change (restart and deploy)"):
        op.system_up()
    assert asked == [f"VM {name}: restarted to apply address"]
    dom = job.e2e.sandbox.conn.lookupByName(name)
    interfaces = {i["hardware-address"]: [a["ip-address"] for a in i.get("ip-addresses", [])]
                  for i in agent_command(dom, "guest-network-get-interfaces")}
    assert [a for a in interfaces[mac_for(name)] if ":" not in a] == [moved], interfaces  # the old one is gone
    assert job.on("hpc-compute-01", "/bin/cat", "/var/tmp/data") == "kept\n"
    computes = [name, job.vm("hpc-compute-02")]
    assert slurm_states(job, dict.fromkeys(computes, "idle")) == dict.fromkeys(computes, "idle")
    assert sorted(job.on("hpc-controller", "/usr/bin/srun", "-N2", "/usr/bin/hostname").split()) == computes
    phases.reference("at the end")

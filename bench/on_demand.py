"""Nodes that run only when there is work: how long a job or a pod waits for a powered-down node.

    .venv/bin/python bench/on_demand.py [--rounds 2] [--out FILE.json]

Boots config/default.yaml's two clusters (on names and subnets of its own, isolated networks)
down to their heads and one on-demand node each: an HPC compute node (SLURM SuspendTime 10 s)
and a Cloud worker (``scale_down_unneeded_time`` 10 s), both deployed, both off. With
``aihow broker --interval 3`` running (its own process, as an operator runs it), ``--rounds``
times each:

- SLURM: ``sbatch -w`` the powered-down node: submitted -> RUNNING; then the wait until SLURM
  has it powered down again (``idle~``, after SuspendTimeout), so the next round starts alike;
- Kubernetes: a pod selecting the stopped worker: created -> Running (or done, when it ends
  between two looks); the pod deleted, then the wait until the broker has stopped the worker.

The baseline, run in the same script with the broker stopped: ``vm.start`` of the same two nodes
by hand (boot, ready, the node's deploy: the floor under the broker's figure), ``--rounds``
times each, each followed by a ``vm.stop``. The ratio says what the request's path (SLURM's
power programs or the pending pod, the broker's poll, SLURM or the scheduler placing the work)
adds to that floor.

With KVM (not measurable here: kvm_pvm cannot run a guest kernel) the figure is estimated as the
broker's overhead over the floor, taken as measured, plus the floor scaled by the boot under KVM
over the boot here (``BOOT_SECONDS``: 60 s estimated, 215 s measured): an estimate, said so.

About 45 minutes here with two rounds (2 vCPUs, software emulation). Needs ./bootstrap and the
images (``aihow image.build``, or a first ``aihow system.up``).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aihow_infra.config import BOOT_SECONDS  # noqa: E402
from aihow_infra.images import BUSYBOX_IMAGE  # noqa: E402
from aihow_infra.libvirt.guest import run  # noqa: E402
from aihow_infra.ops import Operator  # noqa: E402
from tests.conftest import open_e2e, open_sandbox  # noqa: E402
from tests.sandbox import E2E, Task  # noqa: E402
from tests.test_e2e_main_job import default_example_on  # noqa: E402


def wait(what: str, check: Callable[[], bool], timeout: float = 1500) -> float:
    """Seconds until ``check`` holds (polled every 2 s); ``RuntimeError`` past ``timeout``."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(2)
    return time.monotonic() - began


def small_clusters(e2e: E2E) -> dict[str, Any]:
    """The main job's example with each cluster's head and its first on-demand node only."""
    clusters = default_example_on(e2e)
    hpc, cloud = clusters["hpc"], clusters["cloud"]
    hpc["compute_nodes"] = [n for n in hpc["compute_nodes"] if n.get("on_demand")][:1]
    hpc["slurm_config"] |= {"suspend_time": 10}
    cloud["worker_nodes"] = [n for n in cloud["worker_nodes"] if n.get("on_demand")][:1]
    cloud["kubernetes_config"]["scale_down_unneeded_time"] = 10
    return clusters


class Bench:
    """The booted pair and the commands the rounds need."""

    def __init__(self, e2e: E2E, op: Operator) -> None:
        self.e2e, self.op = e2e, op
        box = e2e.sandbox
        self.controller = f"{box.prefix}-hpc-controller"
        self.node = f"{box.prefix}-hpc-compute-01"
        self.worker = f"{box.prefix}-cloud-cpu-worker-01"

    def on_controller(self, *argv: str) -> str:
        ran = run(self.e2e.sandbox.conn.lookupByName(self.controller), list(argv), timeout=300)
        if ran.code != 0:
            raise RuntimeError(f"{' '.join(argv)}: {ran.err.strip()}")
        return ran.out.strip()

    def kubectl(self, *args: str) -> str:
        code, out, err = self.op.kubectl("cloud", list(args))
        if code != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {err.strip()}")
        return out.strip()

    def phase(self, name: str) -> str:
        """The pod's phase; "" while the API server does not answer (a worker's join can keep
        it busy past kubectl's TLS handshake timeout under emulation)."""
        code, out, _err = self.op.kubectl("cloud", ["get", "pod", name, "-o", "jsonpath={.status.phase}"])
        return out.strip() if code == 0 else ""

    def running(self, name: str) -> bool:
        return bool(self.e2e.sandbox.conn.lookupByName(name).isActive())

    def slurm_round(self) -> float:
        job = self.on_controller("/usr/bin/sbatch", "--parsable", "-p", "debug", "-w", self.node, "--wrap",
                                 "hostname")
        began = time.monotonic()

        def state() -> str:
            out = self.on_controller("/usr/bin/scontrol", "show", "job", job, "-o")
            return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "")

        wait("the job runs", lambda: state() in ("RUNNING", "COMPLETING", "COMPLETED"))
        seconds = time.monotonic() - began
        wait("the node powered down", lambda: not self.running(self.node) and self.on_controller(
            "/usr/bin/sinfo", "-h", "-n", self.node, "-o", "%T") == "idle~")
        return seconds

    def kubernetes_round(self, index: int) -> float:
        name = f"bench-{index}"
        self.kubectl("run", name, f"--image={BUSYBOX_IMAGE}", "--image-pull-policy=Never", "--restart=Never",
                     "--overrides", json.dumps({"spec": {"nodeSelector": {"kubernetes.io/hostname": self.worker}}}),
                     "--", "sleep", "5")
        began = time.monotonic()
        wait("the pod runs", lambda: self.phase(name) in ("Running", "Succeeded"))
        seconds = time.monotonic() - began
        wait("the pod deleted", lambda: self.op.kubectl("cloud", ["delete", "pod", name, "--wait=false"])[0] == 0)
        wait("the worker stopped", lambda: not self.running(self.worker))
        return seconds

    def by_hand(self, name: str) -> float:
        began = time.monotonic()
        self.op.vm_start(name)
        seconds = time.monotonic() - began
        self.op.vm_stop(name)
        return seconds


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(samples), 1), "max": round(max(samples), 1)}


def main() -> int:
    """Boot, measure, print the table (and write it as JSON with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"slurm": [], "kubernetes": [], "slurm by hand": [], "kubernetes by hand": []}
    with tempfile.TemporaryDirectory(prefix="aihow-bench-on-demand-") as tmp, open_sandbox() as box, \
            open_e2e(box, Path(tmp)) as e2e:
        cluster_file = e2e.write_cluster_file(small_clusters(e2e))
        for stack in ("hpc", "cloud"):
            e2e.configure(stack, cluster_file, ansibleConnection="agent", stopTimeout="60")
        op = Operator(e2e.workspace, progress=lambda line: print(f"  {line}", flush=True))
        began = time.monotonic()
        op.system_up()
        print(f"both clusters up and deployed in {time.monotonic() - began:.0f} s", flush=True)
        bench = Bench(e2e, op)
        log = (Path(tmp) / "broker.log").open("w")
        broker = Task(e2e).start("broker", "--interval", "3", output=log)
        try:
            for index in range(args.rounds):
                figures["slurm"].append(bench.slurm_round())
                figures["kubernetes"].append(bench.kubernetes_round(index))
                print({k: v for k, v in figures.items() if v}, flush=True)
        finally:
            broker.send_signal(signal.SIGINT)
            try:
                broker.wait(300)
            except subprocess.TimeoutExpired:
                broker.kill()
            log.close()
        for _ in range(args.rounds):
            figures["slurm by hand"].append(bench.by_hand(bench.node))
            figures["kubernetes by hand"].append(bench.by_hand(bench.worker))
            print({k: v for k, v in figures.items() if v}, flush=True)
        op.system_destroy()
    kvm = BOOT_SECONDS["kvm"] / BOOT_SECONDS["qemu"]
    table: dict[str, dict[str, Any]] = {}
    for side, what in (("slurm", "sbatch -> RUNNING, powered-down compute node"),
                       ("kubernetes", "pod Pending -> Running, stopped on-demand worker")):
        broker_path, floor = summary(figures[side]), summary(figures[f"{side} by hand"])
        overhead = broker_path["median"] - floor["median"]
        table[side] = {"what": what, "broker": broker_path, "vm.start by hand": floor,
                       "ratio (median)": round(broker_path["median"] / floor["median"], 2),
                       "KVM estimate (median)": round(overhead + floor["median"] * kvm, 1)}
    print(f"\n{args.rounds} rounds each, seconds (median / max)")
    for row in table.values():
        print(f"- {row['what']}: {row['broker']['median']:.0f} / {row['broker']['max']:.0f} through the broker; "
              f"vm.start by hand {row['vm.start by hand']['median']:.0f} / {row['vm.start by hand']['max']:.0f}; "
              f"ratio {row['ratio (median)']:.2f}; with KVM about {row['KVM estimate (median)']:.0f} (estimated)")
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "samples": figures, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU custody under faults, and how long a hand-over takes: a soak in the GPU-host simulator.

    .venv/bin/python bench/custody.py [--handovers 30] [--kills 10] [--seed 1] [--baseline 3]

The simulator (tests/gpuhost.py) runs the seed's shape (the stand-in GPU in the HPC compute node
and the Cloud GPU worker, home ``host``). The soak repeats the cycle host -> HPC VM (``vm.start``),
HPC VM -> Cloud VM (``switch --to cloud``), Cloud VM -> host (``vm.stop``), host -> Cloud VM,
Cloud VM -> HPC VM (``switch --to hpc``), HPC VM -> host, until ``--handovers`` hand-overs ran. In
``--kills`` of them, chosen at random (``--seed``), the ``aihow`` process or the Pulumi engine is
SIGKILLed at a random moment of the step; the same plain command is then run once more and must
finish the step. Throughout, a watcher inside the simulator samples every 0.2 s which qemu holds
the device's VFIO group and which driver each function is on: at no sample may two VMs hold it,
and after every finished step no function may be left on vfio-pci with no holder.

Latency: each unkilled step's command, as the operator waits for it (median and max per kind),
and the device's own gap as the watcher saw it (from the last sample where the old holder had it,
or it was home, to the first where the new one has it, or it is home). The baseline, run in the
same script: libvirt alone (``virsh start`` / ``virsh destroy`` of the same domain, ``--baseline``
rounds), the floor any tool on this host pays; a hand-over's figure is also given as a ratio of it.

About an hour here (58 min on 2026-12-01; software emulation, 2 vCPUs; the first run builds the
``gpuhost`` image).
Needs ./bootstrap. Prints a summary and writes it as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aihow_infra.images import ensure_image  # noqa: E402
from tests.conftest import open_sandbox  # noqa: E402
from tests.gpuhost import SIM, GpuHost, configure, gpu_host  # noqa: E402
from tests.test_e2e_gpuhost import CLOUD_VM, FUNCTIONS, HPC_VM, simulated_clusters  # noqa: E402

# One cycle: (kind, command, who holds the device afterwards).
CYCLE: list[tuple[str, list[str], str | None]] = [
    ("host -> VM", ["vm.start", HPC_VM], HPC_VM),
    ("VM -> VM", ["switch", "--to", "cloud"], CLOUD_VM),
    ("VM -> host", ["vm.stop", CLOUD_VM], None),
    ("host -> VM", ["vm.start", CLOUD_VM], CLOUD_VM),
    ("VM -> VM", ["switch", "--to", "hpc"], HPC_VM),
    ("VM -> host", ["vm.stop", HPC_VM], None),
]
KILL_TARGETS = ("aihow", "engine")
WATCH_LOG = f"{SIM}/watch.log"
WATCHER = r"""
group=$(basename "$(readlink /sys/bus/pci/devices/{first}/iommu_group)")
while true; do
  holders=""
  for pidfile in /run/libvirt/qemu/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if ls -l /proc/$pid/fd 2>/dev/null | grep -q " /dev/vfio/$group$"; then
      holders="$holders,$(basename $pidfile .pid)"
    fi
  done
  drivers=""
  for f in {functions}; do d=$(readlink /sys/bus/pci/devices/$f/driver); drivers="$drivers,${{d##*/}}"; done
  echo "$(date +%s.%N) ${{holders#,}} ${{drivers#,}}"
  sleep 0.2
done
"""


@dataclass
class Step:
    """One hand-over: what ran, how long, whether it was killed and how it was finished."""

    index: int
    kind: str
    command: list[str]
    holder_after: str | None
    started: float = 0.0
    seconds: float = 0.0
    killed: str = ""  # the target killed, and when ("aihow at 12.3 s")
    finish_seconds: float = 0.0
    finish_code: int = 0
    notes: list[str] = field(default_factory=list)


def run_step(host: GpuHost, step: Step, kill: tuple[str, float] | None) -> None:
    """Run the step's command inside; with ``kill``, SIGKILL the target that many seconds in,
    then run the same command again to finish it."""
    command = " ".join(shlex.quote(a) for a in ("aihow", *step.command))
    step.started = time.time()
    if kill is None:
        ran = host.sh(command, timeout=1200)
        step.seconds = time.time() - step.started
        if ran.code != 0:
            step.notes.append(f"exited {ran.code}: {ran.err.strip()[-400:]}")
        return
    target, delay = kill
    victim = "kill -KILL $pid" if target == "aihow" else "pkill -KILL -x pulumi"
    script = (f"{command} > {SIM}/step.out 2>&1 & pid=$!; sleep {delay:.1f}; "
              f"if kill -0 $pid 2>/dev/null; then {victim} && echo killed; else echo finished-first; fi; "
              "wait $pid; echo rc=$?")
    ran = host.sh(script, timeout=1200)
    step.seconds = time.time() - step.started
    planned = f"{target} at {delay:.1f} s"
    step.killed = planned if "killed" in ran.out else f"none ({planned}: it finished first)"
    again = time.time()
    finished = host.sh(command, timeout=1200)
    step.finish_seconds = time.time() - again
    step.finish_code = finished.code
    if finished.code != 0:
        step.notes.append(f"the plain command again exited {finished.code}: {finished.err.strip()[-400:]}")


def observe(host: GpuHost) -> tuple[list[str], list[str | None]]:
    """The domains whose qemu holds the device's group, and each function's driver, now."""
    line = host.check(f"tail -n 1 {WATCH_LOG}").split(" ")
    holders = [h for h in (line[1].split(",") if len(line) > 1 else []) if h]
    drivers = [d or None for d in (line[2].split(",") if len(line) > 2 else [])]
    return holders, drivers


def check_after(host: GpuHost, step: Step) -> None:
    """After a finished step: the expected VM holds the device, or none does and it is home."""
    time.sleep(0.5)  # one watcher sample
    holders, drivers = observe(host)
    want = [step.holder_after] if step.holder_after else []
    if holders != want:
        step.notes.append(f"held by {holders or 'nobody'}, expected {want or 'nobody'}")
    if not holders and any(d == "vfio-pci" for d in drivers):
        step.notes.append(f"left on vfio-pci with no holder (home host): drivers {drivers}")


def samples(host: GpuHost) -> list[tuple[float, list[str], list[str | None]]]:
    """Every watcher sample: (time, holders, drivers)."""
    rows = []
    for line in host.check(f"cat {WATCH_LOG}", timeout=120).splitlines():
        parts = line.split(" ")
        if len(parts) < 3:
            continue
        rows.append((float(parts[0]), [h for h in parts[1].split(",") if h], [d or None for d in parts[2].split(",")]))
    return rows


def device_gap(rows: list[tuple[float, list[str], list[str | None]]], step: Step, before: str | None) -> float | None:
    """Seconds from the last sample (within the step) with the old state to the first with the
    new one: the device's own hand-over time, 0.2 s resolution."""
    window = [r for r in rows if step.started <= r[0] <= step.started + step.seconds + 1]
    old = [before] if before else []
    new = [step.holder_after] if step.holder_after else []
    last_old = max((r[0] for r in window if r[1] == old), default=None)
    first_new = min((r[0] for r in window if r[1] == new and (last_old is None or r[0] > last_old)), default=None)
    return None if last_old is None or first_new is None else first_new - last_old


def baseline(host: GpuHost, rounds: int) -> dict[str, list[float]]:
    """libvirt alone: ``virsh start`` and ``virsh destroy`` of the HPC node (the device moved by
    libvirt's managed detach and reattach), ``rounds`` times."""
    found: dict[str, list[float]] = {"virsh start": [], "virsh destroy": []}
    for _ in range(rounds):
        for verb in ("start", "destroy"):
            started = time.time()
            host.check(f"virsh {verb} {HPC_VM}")
            found[f"virsh {verb}"].append(time.time() - started)
    return found


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": statistics.median(values), "max": max(values)} if values else {"n": 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handovers", type=int, default=30)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", type=int, default=3, help="rounds of virsh start/destroy")
    parser.add_argument("--out", default="", help="write the summary as JSON here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    killed_at = set(rng.sample(range(args.handovers), args.kills))
    image, _built = ensure_image("gpuhost", progress=print)
    with open_sandbox() as box, gpu_host(box, image) as host:
        configure(host, simulated_clusters())
        watcher = WATCHER.format(first=FUNCTIONS[0], functions=" ".join(FUNCTIONS))
        host.check(f"nohup sh -c {shlex.quote(watcher)} > {WATCH_LOG} 2>&1 &")
        print("system.up (the HPC node takes the device), then the libvirt baseline", flush=True)
        host.check("aihow system.up", timeout=1200)
        host.check(f"aihow vm.stop {HPC_VM}", timeout=1200)
        floor = baseline(host, args.baseline)
        steps: list[Step] = []
        before: list[str | None] = []
        holder: str | None = None
        for index in range(args.handovers):
            kind, command, after = CYCLE[index % len(CYCLE)]
            step = Step(index, kind, command, after)
            kill = None
            if index in killed_at:
                kill = (rng.choice(KILL_TARGETS), rng.uniform(2.0, 25.0))
            run_step(host, step, kill)
            check_after(host, step)
            print(f"{index:2d} {kind:10s} {' '.join(command):28s} {step.seconds:6.1f} s"
                  + (f"  killed {step.killed}, finished in {step.finish_seconds:.1f} s (rc {step.finish_code})"
                     if kill else "") + ("  PROBLEM: " + "; ".join(step.notes) if step.notes else ""), flush=True)
            steps.append(step)
            before.append(holder)
            holder = after
        rows = samples(host)
        host.sh("aihow system.destroy --yes", timeout=1200)
    double = [r for r in rows if len(r[1]) > 1]
    latency: dict[str, Any] = {}
    for kind in dict.fromkeys(k for k, _c, _a in CYCLE):
        clean = [(s, b) for s, b in zip(steps, before, strict=True) if s.kind == kind and not s.killed and not s.notes]
        gaps = [g for s, b in clean if (g := device_gap(rows, s, b)) is not None]
        latency[kind] = {"command": summary([s.seconds for s, _b in clean]), "device": summary(gaps)}
    result = {
        "handovers": len(steps), "killed": sum(1 for s in steps if s.killed.split(" ")[0] in KILL_TARGETS),
        "problems": [f"{s.index} {' '.join(s.command)}: {n}" for s in steps for n in s.notes],
        "samples": len(rows), "samples_with_two_holders": len(double),
        "latency": latency, "baseline": {k: summary(v) for k, v in floor.items()},
    }
    print(json.dumps(result, indent=1))
    start = summary(floor["virsh start"]).get("median", 0.0)
    for kind, figures in latency.items():
        command = figures["command"]
        if command["n"]:
            print(f"{kind:10s} command median {command['median']:.1f} s, max {command['max']:.1f} s "
                  f"({command['median'] / max(start, 0.01):.1f}x virsh start's {start:.1f} s); device "
                  + (f"median {figures['device']['median']:.1f} s, max {figures['device']['max']:.1f} s"
                     if figures["device"]["n"] else "not seen"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["problems"] or double else 0


if __name__ == "__main__":
    sys.exit(main())

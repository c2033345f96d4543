"""What the main job's idle clusters cost the host: the five guests of config/default.yaml booted
and not yet deployed (the operating system's own floor), deployed by a baseline commit's
playbooks, then by this checkout's (taking the same clusters over), nothing to do, in one run.

    .venv/bin/python bench/idle.py [--baseline REV] [--settle 120] [--window 30] [--windows 3] [--again]

Needs ./bootstrap and the images (``aihow image.build``); about 20 minutes here (30 with
``--windows 3 --again``). For each state it waits ``--settle`` seconds, then over ``--windows``
windows of ``--window`` seconds: each guest's qemu process CPU on the host (% of one host core,
every thread: vCPUs and I/O), the host's whole CPU, and inside each guest (through the guest
agent, no IP traffic) the processes that used the most CPU and how many journal lines were
written. Under software emulation a guest's work costs the host many times what it would under
KVM, so idle work inside a guest is what this looks for. A state's figure is the median of its
windows (the spread is printed beside it); ``--again`` deploys the baseline once more at the end
and measures it again, so a drift over the run shows apart from a change.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deploy import baseline_ansible, playbook_run  # noqa: E402  (bench/deploy.py)

from aihow_infra.inventory import to_yaml  # noqa: E402
from aihow_infra.libvirt.guest import run  # noqa: E402
from aihow_infra.ops import Operator  # noqa: E402
from tests.conftest import open_e2e, open_sandbox  # noqa: E402
from tests.test_e2e_main_job import default_example_on  # noqa: E402

HZ = 100  # USER_HZ: /proc's clock ticks per second on Linux

# Runs in each guest: per-command CPU over the window, the guest's whole CPU, journal lines.
IN_GUEST = r"""
import json, os, subprocess, sys, time
window = float(sys.argv[1])
def snap():
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                text = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            comm = text[text.index("(") + 1:text.rindex(")")]
            fields = text[text.rindex(")") + 2:].split()
            out[pid] = (comm, int(fields[11]) + int(fields[12]))
    return out
def busy():
    parts = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(parts) - parts[3] - parts[4], sum(parts)
a, (b0, t0) = snap(), busy()
time.sleep(window)
b, (b1, t1) = snap(), busy()
per = {}
for pid, (comm, ticks) in b.items():
    per[comm] = per.get(comm, 0) + ticks - (a[pid][1] if pid in a and a[pid][0] == comm else 0)
top = sorted(per.items(), key=lambda kv: -kv[1])[:6]
lines = subprocess.run(["journalctl", "-q", "--since", f"-{int(window)}s", "-o", "json",
                        "--output-fields=SYSLOG_IDENTIFIER"], capture_output=True, text=True).stdout.splitlines()
writers = {}
for line in lines:
    who = json.loads(line).get("SYSLOG_IDENTIFIER", "?")
    writers[who] = writers.get(who, 0) + 1
print(json.dumps({"busy": 100 * (b1 - b0) / max(t1 - t0, 1), "journal": len(lines),
                  "writers": sorted(writers.items(), key=lambda kv: -kv[1])[:3],
                  "top": [(c, round(100 * t / 100 / window, 1)) for c, t in top if t > 0]}))
"""


def qemu_ticks(name: str) -> int:
    pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def host_busy() -> tuple[int, int]:
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(parts) - parts[3] - parts[4], sum(parts)


def sample(box: Any, names: list[str], window: float) -> dict[str, Any]:
    """One window: per guest host CPU %, in-guest busy %, top commands, journal lines."""
    doms = {name: box.conn.lookupByName(name) for name in names}
    before = {name: qemu_ticks(name) for name in names}
    busy0, total0 = host_busy()
    began = time.monotonic()
    with ThreadPoolExecutor(len(names)) as pool:
        inside = dict(zip(names, pool.map(
            lambda n: run(doms[n], ["/usr/bin/python3", "-c", IN_GUEST, str(window)], timeout=window + 120),
            names), strict=True))
    seconds = time.monotonic() - began
    busy1, total1 = host_busy()
    result: dict[str, Any] = {"host_busy": 100 * (busy1 - busy0) / max(total1 - total0, 1), "guests": {}}
    for name in names:
        ran = inside[name]
        data = json.loads(ran.out) if ran.code == 0 else {"busy": float("nan"), "journal": -1, "top": [ran.err]}
        data["host"] = 100 * (qemu_ticks(name) - before[name]) / HZ / seconds
        result["guests"][name] = data
    return result


def measure(box: Any, names: list[str], args: argparse.Namespace, title: str) -> float:
    """Settle, then ``args.windows`` windows; the median of the guests' total, with each window shown."""
    time.sleep(args.settle)
    totals = [show(f"{title}, window {n + 1}/{args.windows}", sample(box, names, args.window), box.prefix)
              for n in range(args.windows)]
    median = statistics.median(totals)
    print(f"{title}: median {median:.0f} % of one host core (windows {', '.join(f'{t:.0f}' for t in totals)})")
    return median


def show(title: str, result: dict[str, Any], prefix: str) -> float:
    total: float = sum(g["host"] for g in result["guests"].values())
    print(f"\n{title}: the five guests' qemu {total:.0f} % of one host core; the host {result['host_busy']:.0f} % busy")
    for name, g in result["guests"].items():
        top = ", ".join(f"{c} {p}" for c, p in g["top"])
        writers = ", ".join(f"{w} {n}" for w, n in g.get("writers", []))
        print(f"  {name.removeprefix(prefix + '-'):24} host {g['host']:5.1f} %  in guest {g['busy']:5.1f} %  "
              f"journal {g['journal']:4d} lines ({writers})  top: {top}")
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=120, help="seconds to wait before each state's windows")
    parser.add_argument("--window", type=float, default=30, help="seconds in one window")
    parser.add_argument("--windows", type=int, default=1, help="windows per state (their median is its figure)")
    parser.add_argument("--baseline", default="736b56d", help="the commit whose ansible/ deploys first")
    parser.add_argument("--again", action="store_true", help="deploy the baseline again at the end, and measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aihow-bench-idle-") as tmp, \
            tempfile.TemporaryDirectory(prefix="aihow-bench-idle-baseline-") as baseline, open_sandbox() as box, \
            open_e2e(box, Path(tmp)) as e2e:
        old = Path(baseline)
        baseline_ansible(args.baseline, old)
        clusters = default_example_on(e2e)
        cluster_file = e2e.write_cluster_file(clusters)
        for stack in ("hpc", "cloud"):
            e2e.configure(stack, cluster_file, ansibleConnection="agent", stopTimeout="60")
        op = Operator(e2e.workspace, progress=lambda line: print(f"  {line}", flush=True))
        op.system_up(deploy=False)
        names = sorted(d.name() for d in box.conn.listAllDomains() if d.isActive() and d.name().startswith(box.prefix))

        def deploy_baseline() -> None:
            for stack in ("hpc", "cloud"):
                inventory = old / f"{stack}-inventory.yml"
                inventory.write_text(to_yaml(op.inventory(stack)))
                playbook_run(old, stack, inventory)

        floor = measure(box, names, args, "booted, not deployed")
        deploy_baseline()
        before = measure(box, names, args, f"deployed by {args.baseline}, idle")
        op.system_up()
        idle = measure(box, names, args, "deployed by this checkout, idle")
        print(f"\nidle, deployed: {args.baseline} {before:.0f} %, this checkout {idle:.0f} % of one host core "
              f"({before / max(idle, 0.1):.2f}x); the booted floor {floor:.0f} %")
        if args.again:
            deploy_baseline()
            again = measure(box, names, args, f"deployed by {args.baseline} again, idle")
            print(f"idle, {args.baseline} again: {again:.0f} % ({again / max(idle, 0.1):.2f}x this checkout's)")
        op.system_destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

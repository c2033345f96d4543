"""What the Kubernetes deploy's last step costs the control plane while it waits: a baseline
commit's ``cluster-ready.py`` (kubectl runs to poll) against this checkout's (HTTPS GETs from its
own process), each waiting ``--window`` seconds for a node that never registers, against the
control plane with nothing running, interleaved, in one run.

    .venv/bin/python bench/cluster_ready_wait.py [--baseline REV] [--window 60] [--rounds 2]

Needs ./bootstrap and the cloud image (``aihow image.build``); about 5 minutes to bring up and
deploy the Cloud cluster of config/default.yaml on a sandbox of its own, then ``3 x --rounds x
--window`` seconds. The figure is the control plane's qemu process CPU on the host (every thread)
over each window, in % of one host core: under software emulation the guest's work costs the host
many times what it would under KVM, and the deploy's wait shares the control plane's vCPUs with the
API server it waits for. The sandbox is removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from idle import HZ, qemu_ticks  # noqa: E402  (bench/idle.py)

from aihow_infra.libvirt.guest import run  # noqa: E402
from aihow_infra.ops import Operator  # noqa: E402
from tests.conftest import open_e2e, open_sandbox  # noqa: E402
from tests.test_e2e_main_job import default_example_on  # noqa: E402

SCRIPT = "ansible/roles/cluster_ready/files/cluster-ready.py"


def qemu_seconds(name: str) -> float:
    """The CPU seconds the domain's qemu process has used, every thread."""
    return qemu_ticks(name) / HZ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="f2fcbc8", help="the commit whose cluster-ready.py polls with kubectl")
    parser.add_argument("--window", type=float, default=60, help="seconds each version waits, and the idle window")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (idle, baseline, this checkout)")
    args = parser.parse_args()
    texts = {args.baseline: subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:{SCRIPT}"],
                                           check=True, capture_output=True, text=True).stdout,
             "this checkout": (ROOT / SCRIPT).read_text()}
    with tempfile.TemporaryDirectory(prefix="aihow-bench-ready-") as tmp, open_sandbox() as box, \
            open_e2e(box, Path(tmp)) as e2e:
        clusters = default_example_on(e2e)
        del clusters["hpc"]
        e2e.configure("cloud", e2e.write_cluster_file(clusters), ansibleConnection="agent", stopTimeout="60")
        op = Operator(e2e.workspace, progress=lambda line: print(f"  {line}", flush=True))
        op.system_up()
        name = f"{box.prefix}-cloud-control-plane"
        dom = box.conn.lookupByName(name)
        seen: dict[str, list[float]] = {"idle": [], **{what: [] for what in texts}}
        for round_ in range(1, args.rounds + 1):
            for what in seen:
                before, began = qemu_seconds(name), time.monotonic()
                if what == "idle":
                    time.sleep(args.window)
                else:  # `timeout` ends the wait (exit 124); the node "ghost" never registers
                    ran = run(dom, ["timeout", str(int(args.window)), "python3", "-c", texts[what], "ghost="],
                              timeout=args.window + 120)
                    if ran.code != 124:
                        raise SystemExit(f"{what}'s cluster-ready.py ended early (exit {ran.code}): {ran.err[-500:]}")
                share = 100 * (qemu_seconds(name) - before) / (time.monotonic() - began)
                seen[what].append(share)
                print(f"round {round_}, {what}: the control plane {share:.0f} % of one host core", flush=True)
        idle = statistics.median(seen["idle"])
        print(f"\n| waiting for a node ({args.window:.0f} s windows, median of {args.rounds}) "
              "| control plane, % of one host core | over idle |\n| --- | --- | --- |")
        for what, shares in seen.items():
            print(f"| {what} | {statistics.median(shares):.0f} ({', '.join(f'{s:.0f}' for s in shares)}) "
                  f"| {statistics.median(shares) - idle:+.0f} |")
        op.system_destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

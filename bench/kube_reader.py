"""What the power broker's look at the Cloud cluster costs the control plane: a pass every
``--interval`` seconds (the broker's default 5), each reading every node and pod, made with
kubectl (``kubectl get nodes,pods --all-namespaces -o json``, as before) or with the image's
reader (``aihow-kube-get /api/v1/nodes /api/v1/pods``, as now), against the control plane
with nothing running, interleaved, in one run.

    .venv/bin/python bench/kube_reader.py [--window 60] [--rounds 3] [--interval 5]

Needs ./bootstrap and the cloud image (``aihow image.build``); about 5 minutes to bring up and
deploy the Cloud cluster of config/default.yaml on a sandbox of its own, then ``3 x --rounds x
--window`` seconds; the figure is the control plane's qemu CPU (bench/control_plane.py). Each
pass goes through the guest agent, as the broker's do. Printed too: each variant's time per pass
as the host waits for it (median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import cloud_alone, interleave, table

from aihow_infra.kinds.cloud import ADMIN_KUBECONFIG, KUBE_GET, KUBECTL
from aihow_infra.libvirt.guest import run

LOOKS = {
    "kubectl get nodes,pods": [KUBECTL, "--kubeconfig", ADMIN_KUBECONFIG, "get", "nodes,pods", "--all-namespaces",
                               "-o", "json"],
    "aihow-kube-get nodes, pods": [KUBE_GET, "-kubeconfig", ADMIN_KUBECONFIG, "/api/v1/nodes", "/api/v1/pods"],
}


def passes(dom: libvirt.virDomain, what: str, argv: list[str], interval: float,
           took: dict[str, list[float]]) -> Callable[[float], None]:
    """A pass every ``interval`` seconds for a window, as the broker makes them."""
    def loop(window: float) -> None:
        end = time.monotonic() + window
        while (left := end - time.monotonic()) > 0:
            began = time.monotonic()
            ran = run(dom, argv, timeout=120)
            if ran.code != 0 or '"items"' not in ran.out:
                raise SystemExit(f"{what}: exit {ran.code}: {ran.err[-500:]}")
            took[what].append(time.monotonic() - began)
            time.sleep(max(0.0, min(left, interval - (time.monotonic() - began))))
    return loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=60, help="seconds of each variant, and of the idle window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (idle, kubectl, reader)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between passes (the broker's default)")
    args = parser.parse_args()
    with cloud_alone() as (name, dom):
        took: dict[str, list[float]] = {what: [] for what in LOOKS}
        seen = interleave(name, {what: passes(dom, what, argv, args.interval, took) for what, argv in LOOKS.items()},
                          args.window, args.rounds)
        print("\n" + table(f"a look every {args.interval:g} s ({args.window:.0f} s windows, median of "
                           f"{args.rounds})", seen))
        for what, seconds in took.items():
            print(f"{what}: {statistics.median(seconds):.2f} s a pass, as the host waits (median of {len(seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

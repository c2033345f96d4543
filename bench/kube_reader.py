"""What the power broker's look at the Cloud cluster costs the control plane: a pass every
``--interval`` seconds (the broker's default 5), each reading every node and pod, made with
kubectl (``kubectl get nodes,pods --all-namespaces -o json``, as before) or with the image's
reader (``aihow-kube-get /api/v1/nodes /api/v1/pods``, as now: the broker's own
``kinds.cloud.cluster_objects``), against the control plane with nothing running, interleaved,
in one run.

    .venv/bin/python bench/kube_reader.py [--window 60] [--rounds 3] [--interval 5]

Needs ./bootstrap and the cloud image (``aihow image.build``); about 5 minutes to bring up and
deploy the Cloud cluster of config/default.yaml on a sandbox of its own, then ``3 x --rounds x
--window`` seconds; the figure is the control plane's qemu CPU (bench/control_plane.py). Each
pass goes through the guest agent, as the broker's do. Printed too: each variant's time per pass
as the host waits for it (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import cloud_alone, interleave, table

from aihow_infra.kinds.cloud import ADMIN_KUBECONFIG, KUBECTL, cluster_objects
from aihow_infra.libvirt.guest import run

KUBECTL_PASS = [KUBECTL, "--kubeconfig", ADMIN_KUBECONFIG, "get", "nodes,pods", "--all-namespaces", "-o", "json"]


def with_kubectl(dom: libvirt.virDomain) -> int:
    """The pass before the reader: one kubectl run; the objects it listed."""
    ran = run(dom, KUBECTL_PASS, timeout=120)
    if ran.code != 0:
        raise SystemExit(f"kubectl: exit {ran.code}: {ran.err[-500:]}")
    return len(json.loads(ran.out)["items"])


def with_reader(dom: libvirt.virDomain) -> int:
    """The broker's pass now (``kinds.cloud.cluster_objects``); the objects it listed."""
    return len(cluster_objects(dom))


LOOKS = {"kubectl get nodes,pods": with_kubectl, "aihow-kube-get nodes, pods": with_reader}


def passes(dom: libvirt.virDomain, what: str, look: Callable[[libvirt.virDomain], int], interval: float,
           took: dict[str, list[float]]) -> Callable[[float], None]:
    """A pass every ``interval`` seconds for a window, as the broker makes them."""
    def loop(window: float) -> None:
        end = time.monotonic() + window
        while end - time.monotonic() > 0:
            began = time.monotonic()
            if look(dom) == 0:
                raise SystemExit(f"{what}: listed no node")
            took[what].append(time.monotonic() - began)
            time.sleep(max(0.0, min(end - time.monotonic(), interval - (time.monotonic() - began))))
    return loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=60, help="seconds of each variant, and of the idle window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (idle, kubectl, reader)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between passes (the broker's default)")
    args = parser.parse_args()
    with cloud_alone() as (name, dom):
        took: dict[str, list[float]] = {what: [] for what in LOOKS}
        seen = interleave(name, {what: passes(dom, what, look, args.interval, took) for what, look in LOOKS.items()},
                          args.window, args.rounds)
        print("\n" + table(f"a look every {args.interval:g} s ({args.window:.0f} s windows, median of "
                           f"{args.rounds})", seen))
        for what, seconds in took.items():
            print(f"{what}: {statistics.median(seconds):.2f} s a pass, as the host waits (median of {len(seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

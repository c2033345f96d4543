"""What the Kubernetes deploy's last step costs the control plane while it waits: a baseline
commit's ``cluster-ready.py`` (kubectl runs to poll) against this checkout's (HTTPS GETs from its
own process), each waiting ``--window`` seconds for a node that never registers, against the
control plane with nothing running, interleaved, in one run.

    .venv/bin/python bench/cluster_ready_wait.py [--baseline REV] [--window 60] [--rounds 2]

Needs ./bootstrap and the cloud image (``aihow image.build``); about 5 minutes to bring up and
deploy the Cloud cluster of config/default.yaml on a sandbox of its own, then ``3 x --rounds x
--window`` seconds; the figure is the control plane's qemu CPU (bench/control_plane.py). The
sandbox is removed at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import ROOT, cloud_alone, interleave, table

from aihow_infra.libvirt.guest import run

SCRIPT = "ansible/roles/cluster_ready/files/cluster-ready.py"


def waiting(dom: libvirt.virDomain, what: str, text: str) -> Callable[[float], None]:
    """The script waiting a window for the node "ghost", which never registers (``timeout``
    ends it: exit 124)."""
    def wait(window: float) -> None:
        ran = run(dom, ["timeout", str(int(window)), "python3", "-c", text, "ghost="], timeout=window + 120)
        if ran.code != 124:
            raise SystemExit(f"{what}'s cluster-ready.py ended early (exit {ran.code}): {ran.err[-500:]}")
    return wait


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="f2fcbc8", help="the commit whose cluster-ready.py polls with kubectl")
    parser.add_argument("--window", type=float, default=60, help="seconds each version waits, and the idle window")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (idle, baseline, this checkout)")
    args = parser.parse_args()
    texts = {args.baseline: subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:{SCRIPT}"],
                                           check=True, capture_output=True, text=True).stdout,
             "this checkout": (ROOT / SCRIPT).read_text()}
    with cloud_alone() as (name, dom):
        seen = interleave(name, {what: waiting(dom, what, text) for what, text in texts.items()},
                          args.window, args.rounds)
        print("\n" + table(f"waiting for a node ({args.window:.0f} s windows, median of {args.rounds})", seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())

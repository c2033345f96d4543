"""``broker``: the power broker in the foreground (on-demand nodes: SLURM's power saving, pending pods)."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke.context import Context

from aihow_infra.cli.common import err, operator, out, task
from aihow_infra.errors import AihowError

UNIT = """[Unit]
Description=ai-how power broker: starts and stops on-demand VMs for SLURM jobs and pending Kubernetes pods
After=libvirtd.service
Wants=libvirtd.service

[Service]
WorkingDirectory={project}
ExecStart={aihow} broker --interval {interval:g}
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
"""


def _positive(flag: str, text: str, kind: type[float] | type[int], allowed: str) -> float:
    """The number an option gives, greater than 0; ``AihowError`` naming the option otherwise."""
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise AihowError(f"{flag}: {text!r} is not {allowed}; allowed: a number greater than 0")
    return value


@task(help={"interval": "seconds between passes over the power queues and pending pods (default 5)",
            "passes": "stop after this many passes (default: run until interrupted, Ctrl-C)",
            "unit": "print a systemd unit that runs the broker for this project, and exit"})
def broker(c: Context, interval: str = "5", passes: str = "", unit: bool = False) -> None:
    """Start and stop on-demand nodes: compute nodes as SLURM's power saving asks, Kubernetes workers
    for pending pods and when idle (foreground)."""
    seconds = _positive("--interval", interval, float, "a number of seconds")
    count = int(_positive("--passes", passes, int, "a whole number of passes")) if passes else None
    op = operator()
    if unit:
        aihow = Path(sys.executable).parent / "aihow"  # the console script of this project's environment
        out.print(UNIT.format(project=op.workspace.project_dir, aihow=aihow, interval=seconds),
                  highlight=False, soft_wrap=True, end="")
        return
    from aihow_infra.ops.broker import PowerBroker

    PowerBroker(op).serve(seconds, count)
    err.print("power broker: done", highlight=False)

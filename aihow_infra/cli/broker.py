"""``broker``: the power broker in the foreground (SLURM power saving of on-demand nodes)."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke.context import Context

from aihow_infra.cli.common import err, operator, out, task
from aihow_infra.errors import AihowError

UNIT = """[Unit]
Description=ai-how power broker: starts and stops on-demand VMs for SLURM's power saving
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


@task(help={"interval": "seconds between passes over the controllers' power queues (default 5)",
            "passes": "stop after this many passes (default: run until interrupted)",
            "unit": "print a systemd unit that runs the broker for this project, and exit"})
def broker(c: Context, interval: float = 5.0, passes: int = 0, unit: bool = False) -> None:
    """Start and stop on-demand compute nodes as SLURM's power saving asks (foreground)."""
    if interval <= 0:
        raise AihowError(f"--interval: {interval:g} is not a time; allowed: seconds greater than 0")
    op = operator()
    if unit:
        aihow = Path(sys.executable).parent / "aihow"  # the console script of this project's environment
        out.print(UNIT.format(project=op.workspace.project_dir, aihow=aihow, interval=interval),
                  highlight=False, soft_wrap=True, end="")
        return
    from aihow_infra.ops.broker import PowerBroker

    PowerBroker(op).serve(interval, passes or None)
    err.print("power broker: done", highlight=False)

"""Running one step of a build (mmdebstrap, go build, gcc...): its output passed on as progress
lines, a line of its own when the step has been quiet for a while (``go build`` of the kubelet
prints nothing for minutes on a cold machine), the operator's signal stopping the whole step
(``interrupts``), and a failure that names the step and ends with its last lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from aihow_infra.errors import AihowError
from aihow_infra.interrupts import RUNS, Stop

# Told one line for the operator at a time (a step, a phase, a wait); the project's one such type.
Progress = Callable[[str], None]
# A step quiet for this long (seconds) gets a line saying it still runs, and for how long: with
# the look every half second, the operator hears something at least every 15 s (15.6 s was
# measured with 15 and a look every 3 s).
QUIET_S = 14.0


class ToolLine(str):
    """A line the step's program printed, as it printed it: a caller that shows the operator
    only phases can drop these and keep the builder's own lines (what starts, what still runs)."""


class Heartbeat:
    """Says ``<what>: still running (N s)`` whenever the step printed nothing for ``QUIET_S``
    (N: since the step, or the part of it ``heard`` last named, began)."""

    def __init__(self, what: str, say: Progress) -> None:
        self.what, self.say = what, say
        self.started = self.last = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="step-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(0.5):
            now = time.monotonic()
            if now - self.last >= QUIET_S:
                self.last = now
                self.say(f"{self.what}: still running ({now - self.started:.0f} s)")

    def heard(self, now_doing: str | None = None) -> None:
        """The step printed a line; ``now_doing``: it began a part of its own (an Ansible task),
        which later lines name and time instead."""
        self.last = time.monotonic()
        if now_doing is not None:
            self.what, self.started = now_doing, self.last

    def stop(self) -> None:
        """The step ended."""
        self.done.set()
        self.thread.join()


def run_step(cmd: list[str], say: Progress, what: str, env: Mapping[str, str] | None = None,
             cwd: Path | None = None, error: type[AihowError] = AihowError) -> None:
    """Run ``cmd`` in a session of its own; ``error`` naming ``what`` when it cannot run or fails,
    ``Interrupted`` when the operator's signal stopped it (or came before it started)."""
    RUNS.check(what)
    if shutil.which(cmd[0], path=(env if env is not None else os.environ).get("PATH")) is None:
        raise error(f"{what}: {cmd[0]} cannot run (not found); run ./bootstrap")
    tail: list[str] = []
    heartbeat = Heartbeat(what, say)
    try:
        with RUNS.started(what, cmd, Stop.TERMINATE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(env) if env is not None else None, cwd=cwd) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail = [*tail[-9:], line]
                heartbeat.heard()
                say(ToolLine(line))
            code = proc.wait()
    finally:
        heartbeat.stop()
    RUNS.check(what)
    if code != 0:
        raise error(f"{what} failed (exit {code}): {' | '.join(tail[-3:]) or 'no output'}")

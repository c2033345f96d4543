"""Running one step of a build (mmdebstrap, go build, gcc...): its output passed on as progress
lines, an interrupt stopping the whole step, and a failure that names the step and ends with
its last lines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from aihow_infra.errors import AihowError

Progress = Callable[[str], None]


def run_step(cmd: list[str], say: Progress, what: str, env: Mapping[str, str] | None = None,
             cwd: Path | None = None, error: type[AihowError] = AihowError) -> None:
    """Run ``cmd`` in a session of its own; ``error`` naming ``what`` when it cannot run or fails."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
    except OSError as exc:
        raise error(f"{what}: {cmd[0]} cannot run ({exc.strerror}); run ./bootstrap") from None
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-9:], line]
            say(line)
        code = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    if code != 0:
        raise error(f"{what} failed (exit {code}): {' | '.join(tail[-3:]) or 'no output'}")

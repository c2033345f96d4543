"""Measuring one command the way every benchmark here does: wall time, CPU and the largest
resident set of its whole process tree, taken in a helper process so they are its own."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One run of a command."""

    seconds: float
    cpu: float  # user + system, every process of the tree
    peak_mib: float  # the largest process's resident set


_HELPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
    "t = time.perf_counter() - t\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(p.returncode, t, u.ru_utime + u.ru_stime, u.ru_maxrss)\n"
    "sys.stderr.write(p.stdout[-3000:])\n"
)


def measured(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
             ok: tuple[int, ...] = (0,)) -> Sample:
    """Run ``cmd``; an exit code not in ``ok`` raises ``RuntimeError`` with its output's tail."""
    proc = subprocess.run([sys.executable, "-c", _HELPER, *cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)
    code, seconds, cpu, kib = proc.stdout.split()
    if int(code) not in ok:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}: {proc.stderr.strip()[-1500:]}")
    return Sample(float(seconds), float(cpu), int(kib) / 1024)

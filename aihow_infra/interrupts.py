"""An operator's Ctrl-C (SIGINT), SIGTERM or SIGHUP, wherever the task is: the programs it runs
(pulumi, ansible-playbook, a build step) each in a session of its own, and the waits of its
threads.

The task's main thread takes the three signals over (``RUNS.install``). The first one is passed
to each program that runs as the signal that makes it stop cleanly: SIGINT to pulumi, which
finishes the resource operations in flight, saves the stack and exits; SIGINT to
ansible-playbook's process group, as a terminal's Ctrl-C; SIGTERM to a build step's (it has
nothing to save). A second signal terminates them at once. When a program has exited, what is
left of its session is killed, so no process of the run outlives it. A wait (``RUNS.pause``) in
any thread ends with ``Interrupted``; with nothing running and the main thread in a plain wait,
the main thread gets ``KeyboardInterrupt`` as Python gives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from aihow_infra.errors import AihowError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(Enum):
    """How a program stops cleanly when the operator's first signal comes."""

    # pulumi: SIGINT to the engine alone; it finishes the resource operations in flight, saves
    # the stack and stops its plugins itself.
    ENGINE = "SIGINT to the program"
    # ansible-playbook: SIGINT to its whole process group, as a terminal's Ctrl-C; it ends its tasks.
    TERMINAL = "SIGINT to its group"
    # A build step: SIGTERM to its group (nothing to save, and a shell's background jobs ignore SIGINT).
    TERMINATE = "SIGTERM to its group"

    def doing(self, name: str) -> str:
        """What the line printed at the first signal says the program ``name`` does."""
        if self is Stop.ENGINE:
            return f"asking {name} to cancel; it finishes the operations in flight and saves the stack"
        return f"stopping {name}"


class Interrupted(AihowError):
    """The operator's signal ended a wait or a program of the task; nothing more is started."""


class _Runs:
    """The programs the task runs (each the leader of a session of its own) and the signals
    that stop them."""

    def __init__(self) -> None:
        # Reentrant: the handler runs in the main thread, which may hold the lock when it fires.
        self.lock = threading.RLock()
        self.live: dict[subprocess.Popen[str], tuple[str, Stop]] = {}
        self.starting = 0  # programs being started: a signal now is theirs too, not a plain interrupt
        self.signals = 0
        self.installed = False

    def install(self) -> None:
        """Take over the signals (from the main thread only; the handlers stay for the process)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.installed = True

    def _on_signal(self, signum: int, _frame: object) -> None:
        with self.lock:
            self.signals += 1
            first = self.signals == 1
            live, starting = dict(self.live), self.starting
        if not live and not starting:
            raise KeyboardInterrupt
        if first:
            doing = "; ".join(sorted({stop.doing(name) for name, stop in live.values()})
                              or ["stopping what starts"])
            print(f"{signal.Signals(signum).name}: {doing} (signal again to stop at once)", file=sys.stderr,
                  flush=True)
        for proc, (_name, stop) in live.items():
            _stop(proc, stop, first)

    @contextlib.contextmanager
    def started(self, name: str, cmd: list[str], stop: Stop, **popen: Any) -> Iterator[subprocess.Popen[str]]:
        """``cmd`` started (``subprocess.Popen`` with ``popen``) in a session of its own; the
        operator's signals stop it as ``stop`` says while the block runs, also one that comes
        while it starts (``name``: as the operator knows it, for the line that says so); its
        session is reaped after. ``OSError`` when it cannot start."""
        with self.lock:
            self.starting += 1
        try:
            proc: subprocess.Popen[str] = subprocess.Popen(cmd, start_new_session=True, **popen)
        except BaseException:
            with self.lock:
                self.starting -= 1
            raise
        with self.lock:  # one step from starting to live: no signal falls between
            self.starting -= 1
            self.live[proc] = (name, stop)
            seen = self.signals
        if seen:  # the signal came while it started: it stops as the others did
            _stop(proc, stop, seen == 1)
        try:
            yield proc
        finally:
            with self.lock:
                self.live.pop(proc, None)
            reap(proc)

    def interrupted(self) -> bool:
        """True once a signal asked the task to stop."""
        with self.lock:
            return self.signals > 0

    def check(self, doing: str) -> None:
        """``Interrupted`` naming ``doing`` when a signal asked the task to stop."""
        if self.interrupted():
            raise Interrupted(f"{doing}: interrupted; the same command again goes on from where it stopped")

    def pause(self, seconds: float, doing: str) -> None:
        """``time.sleep`` for a wait's poll that ends early, with ``Interrupted``, on a signal."""
        deadline = time.monotonic() + seconds
        while True:
            self.check(doing)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))


def _stop(proc: subprocess.Popen[str], stop: Stop, first: bool) -> None:
    """The signal that stops a program cleanly as ``stop`` says (the first time), or at once
    (after)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if not first:
            os.killpg(proc.pid, signal.SIGTERM)
        elif stop is Stop.ENGINE:
            os.kill(proc.pid, signal.SIGINT)
        elif stop is Stop.TERMINAL:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGTERM)


def reap(proc: subprocess.Popen[str]) -> None:
    """Stop a program (when still running) and everything left in its session: pulumi puts each
    plugin (language host, providers) in a process group of its own, ansible-playbook its
    workers, but they all stay in the session the task started the program in."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in session_members(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def session_members(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
    return members


RUNS = _Runs()

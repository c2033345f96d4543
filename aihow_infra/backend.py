"""The local backend's files (a ``file://`` backend's ``.pulumi`` folder), where the project
reads or mends them directly: what a pulumi process that is gone (killed, or its session
closed) left behind, cleared before the next run. tests/test_engine_contract.py pins the layout
to the engine this checkout builds."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path


def recover_from_dead_engines(pulumi: Path, project: str, stack: str, say: Callable[[str], None]) -> None:
    """Remove the engine's locks on ``stack`` left by a pulumi process that is gone, then mend
    what such a process may have cut short; a lock of a live process is left to the engine."""
    locks = pulumi / "locks"
    dead = False
    for lock in locks.glob(f"*/*/{stack}/*.json"):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(lock.read_text())
            pid, host = int(info.get("pid", 0)), info.get("hostname")
            if host == socket.gethostname() and pid > 0 and not _alive(pid):
                lock.unlink()
                dead = True
                say(f"cleared the lock of stack {stack} left by pulumi process {pid}, which is gone")
    if not any(locks.glob(f"*/*/{stack}/*.json")):
        mend(pulumi, project, stack, dead, say)


def mend(pulumi: Path, project: str, stack: str, dead_writer: bool, say: Callable[[str], None]) -> None:
    """The local backend's store writes a file's ``.attrs`` sidecar in place before it renames
    the file into place: an engine killed in between leaves an empty or cut sidecar, and every
    later run fails with 'failed to load checkpoint: EOF'. A sidecar that is not JSON, or whose
    file is gone, is removed (a file without one is read as plain data, as the store intends).
    The state's own are looked at before every task; after a dead writer, also those of the
    stack's history, backups and locks, and its temporary files go too."""
    places = [(pulumi / "stacks" / project, f"{stack}.json")]
    if dead_writer:
        places += [(pulumi / "history" / project / stack, ""), (pulumi / "backups" / project / stack, ""),
                   *((d, "") for d in pulumi.glob(f"locks/*/*/{stack}"))]
    for place, prefix in places:
        for sidecar in place.glob(f"{prefix}*.attrs"):
            if not sidecar.with_suffix("").exists() or not _is_json(sidecar):
                with contextlib.suppress(OSError):
                    sidecar.unlink()
                    say(f"removed {sidecar.name}, a broken or orphaned attributes file of stack {stack}'s "
                        "state left by a pulumi process that was stopped while saving")
        for temp in place.glob(f"{prefix}*.tmp") if dead_writer else ():
            with contextlib.suppress(OSError):
                temp.unlink()
                say(f"removed {temp.name}, a temporary file of stack {stack}'s state left by that process")


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

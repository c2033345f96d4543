"""Small state files that several processes share: written atomically, changed under a lock
whose wait is bounded.

A writer writes a temp file beside the target, fsyncs it, renames it over the target and
fsyncs the folder, so a reader (without a lock) sees the old or the new content, never half
of one. Writers hold an exclusive ``flock`` on a lock file beside the target; a writer killed
mid-write leaves only a temp file, which the next holder of the lock removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from aihow_infra.errors import AihowError, BusyError, StateFileError

Waiting = Callable[[str], None]


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def atomic_write(path: Path, text: str, what: str, mode: int = 0o644,
                 error: type[AihowError] = StateFileError) -> None:
    """Replace ``path`` with ``text`` atomically; a full or read-only disk is a one-line
    ``error`` naming ``what`` and the path, and the old content stays."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    except OSError as exc:
        raise error(f"{what} {path} cannot be written ({exc.strerror}); nothing was changed") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        hint = "; free some space" if exc.errno == errno.ENOSPC else ""
        raise error(f"{what} {path} cannot be written ({exc.strerror}); the previous content is kept{hint}") \
            from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: Path, what: str, timeout: float, waiting: Waiting | None = None,
           error: type[AihowError] = StateFileError) -> Iterator[None]:
    """Hold the exclusive lock that guards ``path`` (``<path>.lock``). When another process
    holds it, say so once through ``waiting`` and wait at most ``timeout`` seconds, then raise
    ``BusyError`` naming the holder's pid. Temp files of killed writers are removed."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise error(f"{what} lock {lock_path} cannot be opened ({exc.strerror}); allowed: a writable folder") \
            from None
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if time.monotonic() >= deadline:
                    raise BusyError(f"{what} {path} is locked by {holder} for more than {timeout:.0f} s; "
                                    "wait for it to finish, or stop it") from None
                if not told and waiting is not None:
                    waiting(f"waiting for {holder} to release {what} {path} (up to {timeout:.0f} s)")
                    told = True
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        _remove_stale_temps(path)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f"process {pid}"
    return "another process"


def _remove_stale_temps(path: Path) -> None:
    """Under the lock no writer is running: any temp file is a killed writer's."""
    for stale in path.parent.glob(_temp_prefix(path) + "*"):
        with contextlib.suppress(OSError):
            stale.unlink()

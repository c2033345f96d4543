"""The engine's state backend: where the stacks' Pulumi state lives, and what the project reads
or mends there directly (each read costs milliseconds, a ``pulumi`` run about a second).

- A folder (``file://``; by default the checkout's ``.state``): the engine's files. What a pulumi
  process that is gone (killed, or its session closed) left behind is cleared before the next run.
- A PostgreSQL database (``postgres://``; the engine's own PostgreSQL backend, table
  ``pulumi_state``, one row per file): shared by operators and hosts. A task holds its stack
  with a PostgreSQL advisory lock (freed by the server when the holder's connection ends, so a
  killed task never leaves it), and the lock rows of a dead pulumi process are cleared.

Which backend: ``PULUMI_BACKEND_URL`` in the environment, else ``backend.url`` in ``Pulumi.yaml``
(the engine's own order), else the checkout's ``.state``. tests/test_engine_contract.py pins
both layouts to the engine this checkout builds.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml
from typing_extensions import override

from aihow_infra.database import SCHEMES, Database, checked_name, redacted
from aihow_infra.errors import BusyError, ConfigError, StackError
from aihow_infra.files import Waiting

ALLOWED = "file://FOLDER, or postgres://USER@HOST/DATABASE (the engine's PostgreSQL backend)"
HOLD_TIMEOUT = 3600.0  # seconds a task waits for another operator's task on the same stack
Say = Callable[[str], None]


def configured_url(project_dir: Path, environ: dict[str, str], default: str) -> tuple[str, str]:
    """The backend URL and where it was set (``PULUMI_BACKEND_URL``, ``Pulumi.yaml backend.url``
    or ``default``), in the engine's order. A Pulumi.yaml that cannot be read is left to the
    engine, which says why."""
    if environ.get("PULUMI_BACKEND_URL"):
        return _absolute(environ["PULUMI_BACKEND_URL"], Path.cwd()), "PULUMI_BACKEND_URL"
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, TypeError):
        url = (yaml.safe_load((project_dir / "Pulumi.yaml").read_text()) or {}).get("backend", {}).get("url")
        if isinstance(url, str) and url:
            return _absolute(url, project_dir), "backend.url in Pulumi.yaml"
    return default, "the default"


def _absolute(url: str, base: Path) -> str:
    """A ``file://`` URL with a relative folder made absolute against ``base`` (the project
    folder for Pulumi.yaml's, as the engine reads it; the working folder for the environment's),
    so that it names the same folder from wherever a task or a shell runs."""
    folder = url.removeprefix("file://")
    if not url.startswith("file://") or folder.startswith("/"):
        return url
    return f"file://{(base / folder).resolve()}"


def engine_url(url: str, source: str) -> str:
    """``url`` as the engine takes it: ``postgresql://`` spelled ``postgres://`` (the engine knows
    only that), and ``sslmode=disable`` over a unix socket, where TLS has no meaning and the
    engine's driver would otherwise ask for it. ``ConfigError`` in one line for any other kind."""
    if url.startswith("file://"):
        return url
    if not url.startswith(SCHEMES):
        raise ConfigError([f"{source}: {redacted(url)!r} is not allowed; allowed: {ALLOWED}"], source="state backend")
    parsed = urlsplit("postgres://" + url.split("://", 1)[1])
    query = parse_qsl(parsed.query)
    table = dict(query).get("table", "pulumi_state")
    try:
        checked_name(table, f"{source}: table")
    except ValueError as exc:
        raise ConfigError([str(exc)], source="state backend") from None
    if dict(query).get("host", "").startswith("/") and "sslmode" not in dict(query):
        query.append(("sslmode", "disable"))
    return parsed._replace(query=urlencode(query, safe="/")).geturl()


def open_backend(url: str, project_dir: Path) -> StateBackend:
    """The backend ``url`` (as ``engine_url`` returns it) names."""
    if url.startswith("file://"):
        folder = Path(url.removeprefix("file://"))
        return FolderBackend(url, folder if folder.is_absolute() else project_dir / folder)
    return DatabaseBackend(url)


class StateBackend(ABC):
    """What the project reads of the engine's state without running the engine."""

    def __init__(self, url: str) -> None:
        self.url = url

    @abstractmethod
    def stacks(self, project: str) -> set[str]:
        """The names of the project's stacks."""

    @abstractmethod
    def checkpoint(self, project: str, stack: str) -> dict[str, Any] | None:
        """The stack's state file as the engine wrote it (None when it has none)."""

    @abstractmethod
    def stamp(self, project: str, stack: str) -> str:
        """A digest that changes whenever the stack's state does (no-op detection)."""

    @abstractmethod
    def updated(self, project: str, stack: str) -> float | None:
        """When the stack's state was last written (seconds since the epoch)."""

    @contextlib.contextmanager
    def hold(self, project: str, stack: str, waiting: Waiting | None) -> Iterator[None]:
        """Hold the stack against other operators' tasks (a folder's is the project's own lock)."""
        yield

    @abstractmethod
    def recover(self, project: str, stack: str, say: Say) -> None:
        """Clear what a pulumi process that is gone left on ``stack``; said through ``say``."""


class FolderBackend(StateBackend):
    """The engine's local backend: files under ``<folder>/.pulumi``."""

    def __init__(self, url: str, folder: Path) -> None:
        super().__init__(url)
        self.folder = folder

    def state_files(self, project: str, stack: str) -> list[Path]:
        """The files of a stack's state (plain or gzipped)."""
        base = self.folder / ".pulumi" / "stacks" / project
        return [base / f"{stack}.json", base / f"{stack}.json.gz"]

    @override
    def stacks(self, project: str) -> set[str]:
        return {p.name.removesuffix(".gz").removesuffix(".json")
                for p in (self.folder / ".pulumi" / "stacks" / project).glob("*.json*")
                if p.name.endswith((".json", ".json.gz"))}

    @override
    def checkpoint(self, project: str, stack: str) -> dict[str, Any] | None:
        for path in self.state_files(project, stack):
            if path.is_file():
                return _checkpoint(path.read_bytes(), path.suffix == ".gz")
        return None

    @override
    def stamp(self, project: str, stack: str) -> str:
        digest = hashlib.sha256()
        for path in self.state_files(project, stack):
            digest.update(path.read_bytes() if path.is_file() else b"(none)")
        return digest.hexdigest()

    @override
    def updated(self, project: str, stack: str) -> float | None:
        times = [p.stat().st_mtime for p in self.state_files(project, stack) if p.is_file()]
        return max(times) if times else None

    @override
    def recover(self, project: str, stack: str, say: Say) -> None:
        recover_from_dead_engines(self.folder / ".pulumi", project, stack, say)


class DatabaseBackend(StateBackend):
    """The engine's PostgreSQL backend: a table of ``key`` (a file's path under ``<database>/``),
    ``data`` (``{"data": base64}``) and ``updated_at``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.database = Database(url, own=("table",))
        self.table = checked_name(self.database.param("table", "pulumi_state"), "table")
        self.prefix = f"{urlsplit(url).path.strip('/')}/.pulumi/"

    def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of one statement on the state table (none before the engine's first run made it)."""
        return self.database.rows("Pulumi state backend", StackError, sql.replace("{table}", self.table), args)

    def _state_keys(self, project: str, stack: str) -> list[str]:
        return [f"{self.prefix}stacks/{project}/{stack}.json", f"{self.prefix}stacks/{project}/{stack}.json.gz"]

    @override
    def stacks(self, project: str) -> set[str]:
        folder = f"{self.prefix}stacks/{project}/"
        keys = [k for (k,) in self._rows("SELECT key FROM {table} WHERE key LIKE %s", _like(folder) + "%")]
        return {k.removeprefix(folder).removesuffix(".gz").removesuffix(".json") for k in keys
                if k.endswith((".json", ".json.gz")) and "/" not in k.removeprefix(folder)}

    @override
    def checkpoint(self, project: str, stack: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT key, data->>'data' FROM {table} WHERE key = ANY(%s) ORDER BY key",
                          self._state_keys(project, stack))
        for key, data in rows:
            return _checkpoint(base64.b64decode(data), key.endswith(".gz"))
        return None

    @override
    def stamp(self, project: str, stack: str) -> str:
        rows = self._rows("SELECT key, md5(data::text), updated_at FROM {table} WHERE key = ANY(%s) ORDER BY key",
                          self._state_keys(project, stack))
        return hashlib.sha256(repr(rows).encode()).hexdigest()

    @override
    def updated(self, project: str, stack: str) -> float | None:
        rows = self._rows("SELECT max(updated_at) FROM {table} WHERE key = ANY(%s)", self._state_keys(project, stack))
        return rows[0][0].timestamp() if rows and rows[0][0] is not None else None

    @override
    @contextlib.contextmanager
    def hold(self, project: str, stack: str, waiting: Waiting | None,
             timeout: float = HOLD_TIMEOUT) -> Iterator[None]:
        key = f"aihow stack {self.prefix}{project}/{stack}"
        with self.database.connect("Pulumi state backend", StackError, autocommit=True) as conn:
            deadline, told = time.monotonic() + timeout, False
            while not conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]:
                holder = _lock_holder(conn, key)
                if time.monotonic() >= deadline:
                    raise BusyError(f"stack {stack} is held by {holder} for more than {timeout:.0f} s; wait for it "
                                    "to finish, or stop it")
                if not told and waiting is not None:
                    waiting(f"waiting for {holder} to release stack {stack} (up to {timeout:.0f} s)")
                    told = True
                time.sleep(0.5)
            yield  # the server frees the lock when this connection closes, however the task ends

    @override
    def recover(self, project: str, stack: str, say: Say) -> None:
        locks = self._rows("SELECT key, data->>'data' FROM {table} WHERE key LIKE %s",
                           f"{_like(self.prefix)}locks/%/{_like(project)}/{_like(stack)}/%.json")
        for key, data in locks:
            with contextlib.suppress(ValueError, TypeError):
                info = json.loads(base64.b64decode(data))
                pid, host = int(info.get("pid", 0)), info.get("hostname")
                if host == socket.gethostname() and pid > 0 and not _alive(pid):
                    self._rows("DELETE FROM {table} WHERE key = %s", key)
                    say(f"cleared the lock of stack {stack} left by pulumi process {pid}, which is gone")


def _lock_holder(conn: Any, key: str) -> str:
    """Who holds an advisory lock, as its connection named itself (``Database.connect``)."""
    row = conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND "
        "(l.classid::bigint << 32 | l.objid::bigint) = hashtextextended(%s, 0) LIMIT 1", (key,)).fetchone()
    return row[0] if row and row[0] else "another task"


def _like(text: str) -> str:
    """``text`` matched literally in a LIKE pattern."""
    return re.sub(r"([\\%_])", r"\\\1", text)


def _checkpoint(raw: bytes, gzipped: bool) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(gzip.decompress(raw) if gzipped else raw)
        return data if isinstance(data, dict) else None
    return None


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

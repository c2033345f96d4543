"""A private PostgreSQL server for tests: Debian's postgresql-15 (./bootstrap installs it), a
cluster made with ``initdb`` in a temp folder, listening on a unix socket in that folder and on no
TCP port at all; stopped and removed afterwards, also when the test fails. See
``../shared/notes/postgres-offline.md`` for what was measured before this was built."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "aihow"
DATABASE = "aihow"


def _as_server_user(argv: list[str]) -> list[str]:
    """PostgreSQL's programs refuse to run as root: as root they run as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class Server:
    """A running private server: its URL, and a restart as an operator (or a crash) does it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data, self.log = folder / "data", folder / "server.log"
        self.url = f"postgresql://{USER}@/{DATABASE}?host={folder}"

    def run(self, *argv: str) -> None:
        done = subprocess.run(_as_server_user(list(argv)), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")

    def start(self) -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o",
                 f"-k {self.folder} -c listen_addresses='' -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop it: ``fast`` ends every session, ``immediate`` as a crash does."""
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop it (every client's session ends) and start it again."""
        self.stop(mode)
        self.start()


@contextlib.contextmanager
def private_postgres() -> Iterator[Server]:
    """Start a server (its URL: ``postgresql://aihow@/aihow?host=FOLDER``); stop it and remove
    its folder afterwards."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"{PG_BIN}/initdb is missing: run ./bootstrap (it installs postgresql-15)")
    # Not under pytest's tmp_path: the server's user must reach the folder (and a socket path
    # must stay under 108 bytes).
    folder = Path(tempfile.mkdtemp(prefix="aihow-pg-"))
    if os.geteuid() == 0:
        server_user = pwd.getpwnam("postgres")
        os.chown(folder, server_user.pw_uid, server_user.pw_gid)
    server = Server(folder)
    try:
        server.run(str(PG_BIN / "initdb"), "-D", str(server.data), "-A", "trust", "-U", USER, "--no-sync")
        server.start()
        server.run(str(PG_BIN / "createdb"), "-h", str(folder), "-U", USER, DATABASE)
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            subprocess.run(_as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "-w",
                                            "stop"]), capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)

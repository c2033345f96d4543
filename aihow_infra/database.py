"""A PostgreSQL server the project shares with other hosts and operators (psycopg 3): where the
GPU lease ledger and the Pulumi state live when a lab outgrows one workstation.

A URL is libpq's (``postgresql://USER@HOST/DB``, or over a unix socket
``postgresql://USER@/DB?host=/run/postgresql``), plus query parameters that are the project's
or the engine's, not libpq's (``ledger=``, ``table=``): those are taken out before connecting.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from aihow_infra.errors import AihowError

SCHEMES = ("postgresql://", "postgres://")
# A ledger URL's parameter naming the libvirt host its leases belong to (gpu/ledger.py for_host):
# set by the project, refused from an operator.
HOST_PARAM = "libvirt_host"
CONNECT_TIMEOUT = 10  # seconds; a server that does not answer in this time is called unreachable
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def is_database_url(location: str) -> bool:
    """Whether ``location`` names a PostgreSQL database (rather than a file or folder)."""
    return location.startswith(SCHEMES)


class Database:
    """Where a PostgreSQL database is, and how to reach it: cheap to create, connects on demand.

    ``own`` names the query parameters that are not libpq's; ``param(name)`` reads them.
    """

    def __init__(self, url: str, own: Iterable[str] = ()) -> None:
        parsed = urlsplit(url)
        query = parse_qsl(parsed.query)
        own = set(own)
        self.params = {k: v for k, v in query if k in own}
        rest = urlencode([(k, v) for k, v in query if k not in own], safe="/")
        self.conninfo = f"{parsed.scheme}://{parsed.netloc}{parsed.path}" + (f"?{rest}" if rest else "")
        self.shown = redacted(url, hide=(HOST_PARAM,))
        self.host = self.params.get(HOST_PARAM, "")
        if self.host:
            self.shown += f" (leases of host {self.host})"

    def param(self, name: str, default: str) -> str:
        """One of the project's own query parameters."""
        return self.params.get(name, default)

    def connect(self, what: str, error: type[AihowError], autocommit: bool = False) -> Any:
        """An open psycopg connection, named after this process (``application_name``: who holds
        a lock shows in ``pg_stat_activity``); ``error`` saying ``what`` cannot reach the server,
        in one line, when it cannot be reached."""
        import psycopg

        try:
            return psycopg.connect(self.conninfo, connect_timeout=CONNECT_TIMEOUT, autocommit=autocommit,
                                   application_name=holder_name())
        except psycopg.Error as exc:
            raise error(f"{what} {self.shown} cannot be used ({first_line(exc)}); allowed: the URL of a "
                        "running PostgreSQL server, and a database and role on it this user may connect as") \
                from None

    def rows(self, what: str, error: type[AihowError], sql: str, args: Sequence[Any] = (),
             makes: str | None = None, said: str | None = None) -> list[tuple[Any, ...]]:
        """The rows of one statement, in a connection of its own (none for a statement that
        returns none, and none while a table it reads does not exist yet); ``makes`` names a
        table made first (``ensure_document_table``) for a statement that writes it. ``error``
        in one line when the server cannot be used (``what``) or refuses the statement
        (``said``, by default ``what`` and the URL)."""
        import psycopg

        with self.connect(what, error, autocommit=True) as conn:
            if makes is not None:
                ensure_document_table(conn, makes)
            try:
                cursor = conn.execute(sql, args)
                return list(cursor.fetchall()) if cursor.description else []
            except psycopg.errors.UndefinedTable:
                return []
            except psycopg.Error as exc:
                raise error(f"{said or f'{what} {self.shown}'}: {first_line(exc)}") from None


def redacted(url: str, hide: Iterable[str] = ()) -> str:
    """``url`` as an operator is shown it: without the password (in the user part or a
    ``password=`` parameter) and without the parameters in ``hide``."""
    parsed = urlsplit(url)
    credentials, at, where = parsed.netloc.rpartition("@")
    user = f"{credentials.split(':', 1)[0]}@" if at else ""
    query = [(k, "****" if k == "password" else v) for k, v in parse_qsl(parsed.query) if k not in set(hide)]
    rest = urlencode(query, safe="/*")
    return f"{parsed.scheme}://{user}{where}{parsed.path}" + (f"?{rest}" if rest else "")


def holder_name() -> str:
    """This process as another one is told it (``aihow root@host pid 123``), at most the 63
    characters PostgreSQL keeps of an application name."""
    return f"aihow {getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"[:63]


def first_line(exc: BaseException) -> str:
    """The first line of a driver's message (psycopg's run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checked_name(value: str, key: str) -> str:
    """A table name from a URL (it goes into SQL as an identifier): letters, digits and ``_``."""
    if not _NAME.match(value):
        raise ValueError(f"{key}: {value!r} is not allowed; allowed: a table name of letters, digits and _")
    return value


def ensure_document_table(conn: Any, table: str) -> None:
    """Make ``table`` (``name`` -> a JSON ``document``, with ``updated_at``) unless it exists: the
    shape of every table the project keeps (the GPU ledger, power records)."""
    import psycopg

    try:
        with conn.transaction():
            conn.execute(f"CREATE TABLE IF NOT EXISTS {checked_name(table, 'table')} (name text PRIMARY KEY, "
                         "document jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
        pass  # made by another process at the same moment

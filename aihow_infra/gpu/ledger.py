"""The GPU lease ledger: one document that every stack consults, kept in a JSON file on the host
(the default) or in a PostgreSQL database that several hosts and operators share.

For each PCI address it records the holder (``<stack>/<vm>``), a generation bumped on every
grant, when the lease was granted, the device's home and the card first handed over there.

- A file: every change happens under an exclusive ``flock`` on a lock file beside the ledger, and
  is written atomically (temp file, fsync, rename, fsync of the folder), so a reader never sees a
  half-written ledger and a process killed mid-write loses nothing.
- PostgreSQL (psycopg 3): the same document in one row of table ``aihow_gpu_ledger``; every
  change is one transaction holding that row (``SELECT ... FOR UPDATE``), so a process killed
  mid-change leaves the row as it was (the server rolls the transaction back).

A ledger that cannot be parsed stops every change with a clear error; it is never overwritten
(a file's copy is kept aside for the operator).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypedDict, cast
from urllib.parse import urlencode

from aihow_infra.database import HOST_PARAM, Database, ensure_document_table, first_line, is_database_url
from aihow_infra.errors import BusyError, LeaseConflictError, LeaseError
from aihow_infra.files import Waiting, atomic_write, locked

FORMAT_VERSION = 1
# Where a device lives when no VM holds it (gpu/homes.py): the host's own driver, or vfio-pci.
Home = Literal["host", "vfio-pci"]
HOMES: tuple[Home, ...] = ("host", "vfio-pci")
DEFAULT_HOME: Home = "host"  # what libvirt's managed reattach does by itself
# Every change holds the lock for milliseconds: a longer wait means a stuck process.
LOCK_TIMEOUT = 30.0


class LeaseRef(TypedDict):
    """A holder's claim on PCI addresses in a ledger: a GpuLease's inputs, and what a domain
    releases when its start fails."""

    ledger: str
    holder: str
    addresses: list[str]


def for_host(location: str, host: str) -> str:
    """The ledger at ``location`` as one libvirt host sees it (``host``: its identity,
    libvirt/identity.py). In a database every host has its own row (``<ledger>@<host>``): two
    URIs naming one host share leases, and one address on two hosts is two GPUs. A file ledger
    serves the host it is on and is returned unchanged."""
    if not is_database_url(location):
        return location
    return f"{location}{'&' if '?' in location else '?'}{urlencode({HOST_PARAM: host})}"


def holder_for(stack: str, vm: str) -> str:
    """The holder string the ledger records for a VM of a stack: ``<stack>/<vm>``."""
    return f"{stack}/{vm}"


def stack_of(holder: str) -> str:
    """The stack of a holder string (``""`` for a holder without a stack)."""
    return holder.split("/", 1)[0] if "/" in holder else ""


def vm_of(holder: str) -> str:
    """The VM name of a holder string (a holder without a stack is taken as the VM name)."""
    return holder.split("/", 1)[-1]


@dataclass(frozen=True)
class Lease:
    """The ledger's record of one PCI address."""

    address: str
    holder: str | None
    generation: int
    granted_at: str | None
    home: Home = DEFAULT_HOME

    @property
    def vm(self) -> str | None:
        """The holder's VM name (after the ``<stack>/``)."""
        return vm_of(self.holder) if self.holder else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _parse(text: str) -> dict[str, dict[str, Any]]:
    """The devices of a ledger document; ``ValueError`` saying what is wrong with it."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or \
            not isinstance(data.get("devices"), dict):
        raise ValueError(f"not a version-{FORMAT_VERSION} ledger")
    devices: dict[str, dict[str, Any]] = data["devices"]
    for address, entry in devices.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("generation"), int):
            raise ValueError(f"entry {address!r} is malformed")
        if entry.get("home", DEFAULT_HOME) not in HOMES:
            raise ValueError(f"entry {address!r} has home {entry['home']!r}; allowed: {', '.join(HOMES)}")
    return devices


def _document(devices: dict[str, dict[str, Any]]) -> str:
    return json.dumps({"version": FORMAT_VERSION, "devices": devices}, indent=2, sort_keys=True)


class _FileStore:
    """The ledger as one JSON file: ``flock`` on a lock file beside it, atomic writes."""

    def __init__(self, path: Path, lock_timeout: float, waiting: Waiting | None) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self.waiting = waiting

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LeaseError(f"GPU lease ledger {self.path} cannot be read ({exc.strerror}); "
                             "allowed: a readable file (check its permissions)") from None
        try:
            return _parse(text)
        except (ValueError, json.JSONDecodeError) as exc:
            kept = self._keep_aside(text)
            raise LeaseError(
                f"GPU lease ledger {self.path} is corrupt ({exc}); nothing was changed and a copy is kept at "
                f"{kept}; repair the file by hand or move it away once no VM holds a GPU") from None

    def _keep_aside(self, text: str) -> Path:
        """One copy per corrupt content, however often it is read."""
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        kept = self.path.with_name(f"{self.path.name}.corrupt-{digest}")
        if not kept.exists():
            with contextlib.suppress(OSError):
                kept.write_text(text, encoding="utf-8")
        return kept

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        with locked(self.path, "GPU lease ledger", self.lock_timeout, self.waiting, LeaseError):
            devices = self.load()
            before = json.dumps(devices, sort_keys=True)
            yield devices
            if json.dumps(devices, sort_keys=True) != before:
                atomic_write(self.path, _document(devices) + "\n", "GPU lease ledger", error=LeaseError)


# One row per ledger (the URL's ``ledger`` parameter names it, ``default`` otherwise), holding the
# same document the file holds: every change is one transaction on that row (SELECT ... FOR UPDATE),
# as every change of the file is one flock.
LEDGER_TABLE = "aihow_gpu_ledger"


class _DatabaseStore:
    """The ledger as a row of a PostgreSQL table (psycopg 3): shared by every host and operator
    that names the same database, each change one transaction."""

    def __init__(self, url: str, lock_timeout: float) -> None:
        self.database = Database(url, own=("ledger", HOST_PARAM))
        host = self.database.param(HOST_PARAM, "")
        self.name = self.database.param("ledger", "default") + (f"@{host}" if host else "")
        self.shown = self.database.shown
        self.lock_timeout = lock_timeout

    def _connect(self) -> Any:

        conn = self.database.connect("GPU lease ledger", LeaseError)
        ensure_document_table(conn, LEDGER_TABLE)
        return conn

    def _devices(self, document: Any) -> dict[str, dict[str, Any]]:
        try:
            return _parse(json.dumps(document)) if document is not None else {}
        except ValueError as exc:
            raise LeaseError(f"GPU lease ledger {self.shown} is corrupt ({exc}); nothing was changed; repair row "
                             f"{self.name!r} of table {LEDGER_TABLE} by hand") from None

    def load(self) -> dict[str, dict[str, Any]]:
        with self._connect() as conn:
            row = conn.execute(f"SELECT document FROM {LEDGER_TABLE} WHERE name = %s", (self.name,)).fetchone()
            return self._devices(row[0] if row else None)

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        import psycopg

        with self._connect() as conn:
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout * 1000)}")
                    conn.execute(f"INSERT INTO {LEDGER_TABLE} (name, document) VALUES (%s, %s) "
                                 "ON CONFLICT (name) DO NOTHING", (self.name, _document({})))
                    row = conn.execute(f"SELECT document FROM {LEDGER_TABLE} WHERE name = %s FOR UPDATE",
                                       (self.name,)).fetchone()
                    devices = self._devices(row[0] if row else None)
                    before = json.dumps(devices, sort_keys=True)
                    yield devices
                    if json.dumps(devices, sort_keys=True) != before:
                        conn.execute(f"UPDATE {LEDGER_TABLE} SET document = %s, updated_at = now() WHERE name = %s",
                                     (_document(devices), self.name))
            except psycopg.errors.LockNotAvailable:
                raise BusyError(f"GPU lease ledger {self.shown} is locked by another transaction for more than "
                                f"{self.lock_timeout:.0f} s; wait for it to finish, or stop it") from None
            except psycopg.OperationalError as exc:
                raise LeaseError(f"GPU lease ledger {self.shown}: the server broke the transaction off "
                                 f"({first_line(exc)}); nothing was changed") from None


class Ledger:
    """Arbitrates PCI devices between stacks. Cheap to create: it holds only where the ledger is,
    a file's path or a PostgreSQL URL (``postgresql://USER@HOST/DB``, or over a unix socket
    ``postgresql://USER@/DB?host=/run/postgresql``; ``&ledger=NAME`` keeps several ledgers in one
    database)."""

    def __init__(self, path: str | os.PathLike[str], lock_timeout: float = LOCK_TIMEOUT,
                 waiting: Waiting | None = None) -> None:
        self.location = str(path)
        self._store: _FileStore | _DatabaseStore = (
            _DatabaseStore(self.location, lock_timeout) if is_database_url(self.location)
            else _FileStore(Path(path), lock_timeout, waiting))

    @property
    def path(self) -> Path:
        """The ledger file (``TypeError`` for a ledger kept in PostgreSQL)."""
        if isinstance(self._store, _FileStore):
            return self._store.path
        raise TypeError(f"the GPU lease ledger {self.shown} is a database, not a file")

    @property
    def shown(self) -> str:
        """Where the ledger is, as the operator is told (a URL without its password)."""
        return self._store.shown if isinstance(self._store, _DatabaseStore) else str(self._store.path)

    # --- reading ------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Any]]:
        return self._store.load()

    def leases(self) -> dict[str, Lease]:
        """Every address the ledger knows, held or free (a consistent snapshot, no lock needed)."""
        return {address: Lease(address, e.get("holder"), e["generation"], e.get("granted_at"), _home(e))
                for address, e in sorted(self._load().items())}

    def home_of(self, address: str) -> Home:
        """The home recorded for ``address`` (``host`` when none was set)."""
        entry = self._load().get(address)
        return _home(entry) if entry else DEFAULT_HOME

    def set_home(self, addresses: list[str], home: Home) -> dict[str, Home]:
        """Record ``home`` for every address (the functions of one card); returns the homes they
        had before."""
        with self._locked() as devices:
            before = {}
            for address in addresses:
                entry = devices.setdefault(address, {"holder": None, "generation": 0, "granted_at": None})
                before[address] = _home(entry)
                entry["home"] = home
            return before

    def holder_of(self, address: str) -> Lease | None:
        """The lease on ``address`` when someone holds it."""
        lease = self.leases().get(address)
        return lease if lease and lease.holder else None

    # --- changing -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The devices, exclusively: written back when the block changed them."""
        with self._store.locked() as devices:
            yield devices

    def check_free(self, holder: str, addresses: list[str]) -> None:
        """Raise the ``LeaseConflictError`` that ``acquire`` would, from a snapshot: an early,
        cheap answer before a run that would take the leases (which still decides)."""
        _refuse_held(self._load(), holder, addresses)

    def acquire(self, holder: str, addresses: list[str], renew: bool = False) -> list[Lease]:
        """Grant every address to ``holder`` in one transaction, or none: a conflict raises
        ``LeaseConflictError`` naming the address, its holder, since when, and how to free it.
        Addresses the holder already has keep their generation, unless ``renew`` (a new grant:
        a release that names the older generation then leaves them alone)."""
        with self._locked() as devices:
            _refuse_held(devices, holder, addresses)
            now = _now()
            for address in addresses:
                entry = devices.setdefault(address, {"holder": None, "generation": 0, "granted_at": None})
                if renew or entry.get("holder") != holder:
                    entry.update(holder=holder, generation=entry["generation"] + 1, granted_at=now)
            return [Lease(a, holder, devices[a]["generation"], devices[a]["granted_at"]) for a in addresses]

    def known_card(self, address: str, found: dict[str, str]) -> tuple[dict[str, str], str] | None:
        """The card recorded at ``address`` with when it was recorded, when it differs from
        ``found`` (ids and serial as custody.card_identity reads them); None when it matches. The
        first card seen at an address is recorded (the start that hands it to a VM the first time)."""
        with self._locked() as devices:
            entry = devices.setdefault(address, {"holder": None, "generation": 0, "granted_at": None})
            recorded = entry.get("card")
            if not isinstance(recorded, dict):
                entry["card"] = {**found, "recorded_at": _now()}
                return None
            card = {k: v for k, v in recorded.items() if k != "recorded_at"}
            return None if card == found else (card, str(recorded.get("recorded_at")))

    def forget_card(self, address: str) -> dict[str, str] | None:
        """Forget the card recorded at ``address`` (it was replaced on purpose): the next start
        records the card found there. Refused while a VM holds the address. Returns what was
        recorded."""
        with self._locked() as devices:
            entry = devices.get(address) or {}
            if entry.get("holder"):
                raise LeaseConflictError(f"GPU {address} is held by {entry['holder']}; stop that VM first "
                                         f"(`aihow vm.stop {vm_of(entry['holder'])}`), then forget the card")
            card = entry.pop("card", None)
            return card if isinstance(card, dict) else None

    def release(self, holder: str, addresses: list[str], generations: dict[str, int] | None = None) -> list[str]:
        """Free the addresses ``holder`` holds; others are left alone (never a steal). With
        ``generations``, an address granted again since (a newer generation, even to the same
        holder) is left alone too. Returns the addresses freed."""
        freed = []
        with self._locked() as devices:
            for address in addresses:
                entry = devices.get(address)
                if not entry or entry.get("holder") != holder:
                    continue
                if generations is not None and entry["generation"] != generations.get(address, entry["generation"]):
                    continue
                entry.update(holder=None, granted_at=None)
                freed.append(address)
        return freed

    def release_all(self, holders: list[str]) -> list[str]:
        """Free every address any of ``holders`` holds (their VMs are gone). Returns them."""
        freed = []
        with self._locked() as devices:
            for address, entry in sorted(devices.items()):
                if entry.get("holder") in holders:
                    entry.update(holder=None, granted_at=None)
                    freed.append(address)
        return freed

    def reclaim(self, address: str) -> list[Lease]:
        """Operator's override: free the device at ``address`` whoever holds it — every function
        of that device (``0000:41:00.*``) its holder holds. Returns the leases freed."""
        slot = address.rsplit(".", 1)[0]
        with self._locked() as devices:
            entry = devices.get(address)
            holder = entry.get("holder") if entry else None
            if not holder:
                return []
            freed = []
            for other, e in sorted(devices.items()):
                if other.rsplit(".", 1)[0] == slot and e.get("holder") == holder:
                    freed.append(Lease(other, holder, e["generation"], e.get("granted_at")))
                    e.update(holder=None, granted_at=None)
            return freed


def _home(entry: dict[str, Any]) -> Home:
    """An entry's home (``_parse`` refused any other value)."""
    return cast(Home, entry.get("home", DEFAULT_HOME))


def _refuse_held(devices: dict[str, dict[str, Any]], holder: str, addresses: list[str]) -> None:
    """``LeaseConflictError`` naming the first address someone else holds, since when, and how
    to free it."""
    for address in addresses:
        entry = devices.get(address) or {}
        other = entry.get("holder")
        if other and other != holder:
            raise LeaseConflictError(
                f"GPU {address} is held by {other} since {entry.get('granted_at')}; "
                f"free it with `aihow vm.stop {vm_of(other)}` (or `aihow gpu.reclaim {address}` if that VM "
                "is gone or shut off)")

"""Desired power: what the operator asked of each VM and each cluster, kept in the project's
git-ignored state (``.state/power/<stack>.json``), never in the tracked stack files; where the
stacks' Pulumi state is in PostgreSQL (several operators share it), in that database beside it
(table ``aihow_power``, one row per state table, project and stack), so every operator's tasks see
one record.

One record per VM (``running`` or ``stopped``; no record means the cluster file's
``auto_start``) and one for the cluster (``stopped`` after ``system.down``). Records are
written atomically, so the Pulumi program reads them without a lock; tasks change them
under the stack's lock and hold it across the ``pulumi up`` that applies them, so two
tasks on different VMs of one stack never lose each other's record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from aihow_infra.database import Database, is_database_url
from aihow_infra.errors import StateFileError
from aihow_infra.files import Waiting, atomic_write, locked
from aihow_infra.state.layout import ProjectState

PowerState = Literal["running", "stopped"]
POWER_STATES: tuple[PowerState, ...] = ("running", "stopped")
# A task waits this long for another task on the same stack (a first up can take minutes).
STACK_LOCK_TIMEOUT = 3600.0
POWER_TABLE = "aihow_power"
STATE_TABLE = "pulumi_state"  # the engine's table of the stacks' state, unless the URL says ``&table=``


def power_folder(project_dir: Path) -> Path:
    """Where a project keeps its power records."""
    return ProjectState(project_dir).power


@dataclass(frozen=True)
class DesiredPower:
    """A stack's power records."""

    cluster: PowerState = "running"
    vms: Mapping[str, PowerState] = field(default_factory=dict)

    def wants_running(self, vm_name: str, auto_start: bool) -> bool:
        """Nothing runs while the cluster is stopped; otherwise the VM's record, else ``auto_start``."""
        if self.cluster == "stopped":
            return False
        record = self.vms.get(vm_name)
        return auto_start if record is None else record == "running"

    def with_vms(self, changes: Mapping[str, PowerState]) -> DesiredPower:
        """These records with ``changes`` applied."""
        return replace(self, vms={**self.vms, **changes})

    def with_cluster(self, power: PowerState) -> DesiredPower:
        """These records with the cluster's record set."""
        return replace(self, cluster=power)


class PowerRecords:
    """The power records of one stack of a project: in its folder, or in the database that holds
    the stacks' state (``backend_url``, a ``postgres://`` URL; ``project`` names the row)."""

    def __init__(self, project_dir: Path, stack: str, backend_url: str | None = None, project: str = "aihow") -> None:
        self.path = power_folder(project_dir) / f"{stack}.json"
        self.stack = stack
        self._database = Database(backend_url, own=("table",)) \
            if backend_url and is_database_url(backend_url) else None
        # Projects kept apart in one database by the state's table (``&table=``) keep their power
        # records apart too; the engine's default table keeps the rows it always had.
        table = self._database.param("table", STATE_TABLE) if self._database else STATE_TABLE
        self._row = f"{project}/{stack}" if table == STATE_TABLE else f"{table}/{project}/{stack}"

    @property
    def shown(self) -> str:
        """Where the records are, as the operator is told."""
        if self._database is None:
            return str(self.path)
        return f"{self._database.shown} (table {POWER_TABLE}, row {self._row})"

    def _text(self) -> str | None:
        """The records as stored (None when none were written)."""
        if self._database is None:
            try:
                return self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise StateFileError(f"power records {self.path} cannot be read ({exc.strerror}); allowed: a "
                                     "readable file") from None
        rows = self._query(f"SELECT document::text FROM {POWER_TABLE} WHERE name = %s", self._row)
        return str(rows[0][0]) if rows else None

    def _query(self, sql: str, *args: Any, writes: bool = False) -> list[tuple[Any, ...]]:
        """Rows of one statement; a statement that ``writes`` makes the table first."""
        assert self._database is not None
        return self._database.rows("power records in the Pulumi state backend", StateFileError, sql, args,
                                   makes=POWER_TABLE if writes else None, said=f"power records {self.shown}")

    def stamp(self) -> str:
        """A digest that changes whenever the records do."""
        return hashlib.sha256((self._text() or "(none)").encode()).hexdigest()

    def read(self) -> DesiredPower:
        """The records (defaults when none were written); a corrupt record is a one-line error."""
        text = self._text()
        if text is None:
            return DesiredPower()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateFileError(f"power records {self.shown} cannot be read ({exc}); allowed: JSON written by "
                                 "the tasks (remove it to go back to the cluster file's auto_start)") from None
        cluster, vms = data.get("cluster", "running"), data.get("vms", {})
        if cluster not in POWER_STATES or not isinstance(vms, dict) or \
                any(v not in POWER_STATES for v in vms.values()):
            raise StateFileError(f"power records {self.shown}: unexpected content; allowed: cluster and vms "
                                 f"set to {' or '.join(POWER_STATES)}")
        return DesiredPower(cast(PowerState, cluster), {str(k): cast(PowerState, v) for k, v in vms.items()})

    def write(self, power: DesiredPower) -> None:
        """Replace the records (call under ``locked``; in a database, one statement)."""
        payload = json.dumps({"cluster": power.cluster, "vms": dict(sorted(power.vms.items()))}, indent=2) + "\n"
        if self._database is not None:
            self._query(f"INSERT INTO {POWER_TABLE} (name, document) VALUES (%s, %s) ON CONFLICT (name) "
                        "DO UPDATE SET document = EXCLUDED.document, updated_at = now()", self._row, payload,
                        writes=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, payload, "power records")

    @contextlib.contextmanager
    def locked(self, waiting: Waiting | None = None, timeout: float = STACK_LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the stack for one task of this project folder: its records and the pulumi runs
        that apply them (other operators' tasks: the state backend's hold, backend.py)."""
        with locked(self.path, f"stack {self.stack}", timeout, waiting):
            yield

"""Desired power: what the operator asked of each VM and each cluster, kept in the project's
git-ignored state (``.state/power/<stack>.json``), never in the tracked stack files.

One record per VM (``running`` or ``stopped``; no record means the cluster file's
``auto_start``) and one for the cluster (``stopped`` after ``system.down``). Records are
written atomically, so the Pulumi program reads them without a lock; tasks change them
under the stack's lock and hold it across the ``pulumi up`` that applies them, so two
tasks on different VMs of one stack never lose each other's record.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast

from aihow_infra.errors import StateFileError
from aihow_infra.files import Waiting, atomic_write, locked
from aihow_infra.state.layout import ProjectState

PowerState = Literal["running", "stopped"]
POWER_STATES: tuple[PowerState, ...] = ("running", "stopped")
# A task waits this long for another task on the same stack (a first up can take minutes).
STACK_LOCK_TIMEOUT = 3600.0


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
    """The power records of one stack of a project."""

    def __init__(self, project_dir: Path, stack: str) -> None:
        self.path = power_folder(project_dir) / f"{stack}.json"
        self.stack = stack

    def read(self) -> DesiredPower:
        """The records (defaults when none were written); a corrupt file is a one-line error."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return DesiredPower()
        except (OSError, ValueError) as exc:
            raise StateFileError(f"power records {self.path} cannot be read ({exc}); allowed: a JSON file "
                                 "written by the tasks (remove it to go back to the cluster file's auto_start)") \
                from None
        cluster, vms = data.get("cluster", "running"), data.get("vms", {})
        if cluster not in POWER_STATES or not isinstance(vms, dict) or \
                any(v not in POWER_STATES for v in vms.values()):
            raise StateFileError(f"power records {self.path}: unexpected content; allowed: cluster and vms "
                                 f"set to {' or '.join(POWER_STATES)}")
        return DesiredPower(cast(PowerState, cluster), {str(k): cast(PowerState, v) for k, v in vms.items()})

    def write(self, power: DesiredPower) -> None:
        """Replace the records (call under ``locked``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"cluster": power.cluster, "vms": dict(sorted(power.vms.items()))}
        atomic_write(self.path, json.dumps(payload, indent=2) + "\n", "power records")

    @contextlib.contextmanager
    def locked(self, waiting: Waiting | None = None, timeout: float = STACK_LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the stack for one task: its records and the pulumi runs that apply them."""
        with locked(self.path, f"stack {self.stack}", timeout, waiting):
            yield

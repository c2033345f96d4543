"""Running Ansible on a stack: the project's playbooks in ``ansible/`` (or the operator's own),
over the inventory the stack's outputs make, with a live line per task and one clear error.

Whether a deploy is needed is decided by a fingerprint of what it depends on (the inventory:
hosts, their state and variables; and every file under ``ansible/``): ``system.up`` deploys
only when it differs from the last successful deploy's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aihow_infra.errors import DeployError
from aihow_infra.files import atomic_write
from aihow_infra.interrupts import RUNS, Stop
from aihow_infra.state.layout import CHECKOUT
from aihow_infra.steps import Heartbeat, Progress

ANSIBLE_DIR = CHECKOUT / "ansible"


def project_playbook(key: str) -> Path | None:
    """The project's playbook for a kind of cluster (``ansible/<key>.yml``), when it has one."""
    path = ANSIBLE_DIR / f"{key}.yml"
    return path if path.is_file() else None


def fingerprint(inventory: Mapping[str, Any], playbook: Path) -> str:
    """A hash of everything a deploy depends on."""
    digest = hashlib.sha256(json.dumps(inventory, sort_keys=True).encode())
    digest.update(str(playbook.resolve()).encode())
    folders = [ANSIBLE_DIR] if playbook.resolve().is_relative_to(ANSIBLE_DIR) else [ANSIBLE_DIR, playbook.parent]
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class DeployResult:
    """What a playbook run did."""

    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        """Tasks that changed something, over all hosts."""
        return sum(host.get("changed", 0) for host in self.recap.values())


def run_playbook(playbook: Path, stack: str, env: Mapping[str, str], limit: str | None = None,
                 progress: Progress | None = None, inventory: Path | None = None) -> DeployResult:
    """``ansible-playbook`` on the stack's live inventory (or ``inventory``); ``DeployError``
    naming the host, the task and the message of the first failure."""
    say = progress or (lambda _line: None)
    if not playbook.is_file():
        raise DeployError(f"playbook {playbook} does not exist; allowed: a playbook file")
    tool = Path(sys.executable).parent / "ansible-playbook"
    with tempfile.TemporaryDirectory(prefix="aihow-deploy-") as tmp:
        summary = Path(tmp) / "summary.json"
        run_env = {**env, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "AIHOW_DEPLOY_SUMMARY": str(summary),
                   "ANSIBLE_FORCE_COLOR": "0", "PYTHONUNBUFFERED": "1"}
        source = inventory or ANSIBLE_DIR / "inventory" / f"{stack}.yml"
        cmd = [str(tool), "-i", str(source), str(playbook),
               *(["--limit", limit] if limit else [])]
        started = time.monotonic()
        tail: list[str] = []
        cut, task = False, ""
        # A task may wait minutes (the Kubernetes check, for the API server under emulation).
        heartbeat = Heartbeat(f"deploy of {stack}", say)
        try:
            with RUNS.started("ansible-playbook", cmd, Stop.TERMINAL, cwd=ANSIBLE_DIR, env=run_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    line = line.rstrip()
                    if line:
                        tail = [*tail[-4:], line]
                        task = line.removeprefix("TASK ") if line.startswith("TASK ") else task
                        heartbeat.heard(f"task '{task}'" if line.startswith("TASK ") else None)
                        say(line)
                proc.wait()
        except KeyboardInterrupt:  # a signal in a moment no program ran (its session is reaped)
            cut = True
        finally:
            heartbeat.stop()
        if cut or RUNS.interrupted():
            where = f" at task '{task}'" if task else ""
            raise DeployError(f"deploy of {stack} interrupted{where}; its VMs stay up, and "
                              f"`aihow deploy --stack {stack}` finishes it")
        code = proc.returncode
        data: dict[str, Any] = json.loads(summary.read_text()) if summary.exists() else {}
    result = DeployResult(seconds=time.monotonic() - started, recap=data.get("recap") or {})
    failures = data.get("failures") or []
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise DeployError(f"deploy of {stack} failed on {first['host']}, task '{first['task']}': {first['msg']}{more}")
    if code != 0:
        raise DeployError(f"deploy of {stack} failed (ansible-playbook exit {code}): {' | '.join(tail[-2:])}")
    return result


class DeployRecord:
    """The fingerprint of each stack's last successful deploy, in the project's state folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, stack: str) -> Path:
        return self.folder / f"{stack}.json"

    def last(self, stack: str) -> str | None:
        """The fingerprint recorded for ``stack``, if any."""
        try:
            return str(json.loads(self._path(stack).read_text())["fingerprint"])
        except (OSError, ValueError, KeyError):
            return None

    def save(self, stack: str, print_: str, result: DeployResult) -> None:
        """Record a successful deploy (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(stack), json.dumps({"fingerprint": print_, "seconds": round(result.seconds, 1),
                                                    "changed": result.changed,
                                                    "at": time.strftime("%Y-%m-%dT%H:%M:%S")}), "deploy record")

    def forget(self, stack: str) -> None:
        """A stack destroyed needs a full deploy next time."""
        self._path(stack).unlink(missing_ok=True)

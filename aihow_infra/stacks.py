"""Running the Pulumi CLI for the tasks (and the end-to-end tests): one place for its
environment, its offline settings, and turning its failures into one clear line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aihow_infra.backend import StateBackend, configured_url, engine_url, open_backend
from aihow_infra.desired import PowerRecords
from aihow_infra.errors import StackError
from aihow_infra.eventlog import EventFollower, Events
from aihow_infra.files import Waiting
from aihow_infra.interrupts import RUNS, Stop
from aihow_infra.state.layout import CHECKOUT

_STACKS_LOCK = threading.Lock()
_PROTECTED = re.compile(r'resource "(urn:[^"]+)"(?: as part of replacing "[^"]+")? as it is currently marked for '
                        r"protection")
# Stacks this process's threads hold (Workspace.hold): project folder, stack, thread.
_HELD: set[tuple[Path, str, int]] = set()
_HELD_LOCK = threading.Lock()
_OWN_ERROR = re.compile(r"aihow_infra\.errors\.(\w+): (.*)$")
_ENGINE_ERROR = re.compile(r"^\s*error: (.*)$")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception): .+")
# The engine's lock on a stack (backend/diy/lock.go): one line per lock after the error.
_LOCKED_BY = re.compile(r": created by (\S+) \(pid (\d+)\) at (\S+)")


# Settings that keep the engine offline; always these values.
_OFFLINE = {
    "PULUMI_SKIP_UPDATE_CHECK": "true",
    "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
    "PULUMI_AUTOMATION_API_SKIP_VERSION_CHECK": "true",
}


def _defaults(root: Path) -> dict[str, str]:
    """Settings an operator may override from the environment."""
    return {
        "PULUMI_HOME": str(root / ".tools" / "pulumi-home"),
        "PULUMI_CONFIG_PASSPHRASE": "",
    }


def default_backend_url(root: Path = CHECKOUT) -> str:
    """The state backend when nothing names one: the checkout's ``.state`` folder."""
    return f"file://{root / '.state'}"


def offline_env(root: Path = CHECKOUT, backend_url: str | None = None,
                environ: Mapping[str, str] | None = None, project_dir: Path | None = None) -> dict[str, str]:
    """The environment the project's pulumi runs in (``environ``, by default this process's,
    with its own tools first on PATH, nothing that reaches the internet, and the state backend:
    ``backend_url``, else the one ``backend.configured_url`` finds for ``project_dir``).
    ``ConfigError`` when that backend is not one the project can use."""
    env = dict(os.environ if environ is None else environ)
    env["PATH"] = os.pathsep.join([str(root / ".tools" / "bin"), str(Path(sys.executable).parent), env["PATH"]])
    for key, value in _defaults(root).items():
        if not env.get(key) and not (key == "PULUMI_CONFIG_PASSPHRASE" and key in env):
            env[key] = value
    url, source = (backend_url, "the backend") if backend_url else \
        configured_url(project_dir or root, env, default_backend_url(root))
    env["PULUMI_BACKEND_URL"] = engine_url(url, source)
    env.update(_OFFLINE)
    return env


def shell_env_file(root: Path = CHECKOUT) -> str:
    """The same settings as a file to source from a shell (``. .tools/env``), written by ./bootstrap."""
    lines = ["# Source this file to use the project's pulumi from a shell: . .tools/env",
             f'export PATH="{root / ".tools" / "bin"}:{Path(sys.executable).parent}:$PATH"']
    for key, value in _defaults(root).items():
        keep = "-" if key == "PULUMI_CONFIG_PASSPHRASE" else ":-"  # an empty passphrase is a choice
        lines.append(f'export {key}="${{{key}{keep}{value}}}"')
    # No PULUMI_BACKEND_URL: the engine then reads backend.url in Pulumi.yaml, as the tasks do
    # (backend.configured_url), whatever it says when pulumi runs.
    lines += [f"export {key}={value}" for key, value in _OFFLINE.items()]
    return "\n".join(lines) + "\n"


def summarize_failure(output: str) -> str:
    """The cause of a failed pulumi run in one line: our own error when a provider raised one,
    else the engine's first error line."""
    ours = [m.group(2) for line in output.splitlines() if (m := _OWN_ERROR.search(line))]
    if ours:
        return ours[0]
    locks = _LOCKED_BY.findall(output) if "the stack is currently locked" in output else []
    if locks:
        holders = ", ".join(f"{who} (pid {pid}) since {when}" for who, pid, when in locks)
        return (f"the stack is locked by another pulumi run: {holders}; wait for it to end "
                "(if that process is gone: `pulumi cancel`)")
    engine = [m.group(1).strip() for line in output.splitlines() if (m := _ENGINE_ERROR.match(line))]
    generic = ("update failed", "preview failed", "destroy failed", "an unhandled error occurred")
    specific = [e for e in engine if not e.startswith(generic)]
    crash = [line.strip() for line in output.splitlines() if _EXCEPTION_LINE.match(line.strip())]
    if specific and crash and specific[0].endswith(":"):
        # "Program failed with an unhandled exception:" announces a traceback: its last line says why.
        return f"{specific[0]} {crash[-1]}"
    if specific:
        return specific[0]
    if crash:
        return crash[-1]
    if engine:
        return engine[0]
    tail = [line.strip() for line in output.splitlines() if line.strip()]
    return tail[-1] if tail else "pulumi failed without output"


@dataclass(frozen=True)
class Plan:
    """A preview: its steps, and the protected resources (disks) it would have to delete."""

    steps: list[dict[str, Any]]
    protected: list[str]


@dataclass
class Workspace:
    """A Pulumi project folder and the backend its stacks live in.

    The folder defaults to this checkout (``AIHOW_PROJECT_DIR`` overrides it); the state
    backend is ``backend_url``, else ``PULUMI_BACKEND_URL``, else ``backend.url`` in the project's
    ``Pulumi.yaml``, else the checkout's ``.state`` (backend.py).
    """

    project_dir: Path = field(default_factory=lambda: Path(os.environ.get("AIHOW_PROJECT_DIR", CHECKOUT)))
    backend_url: str | None = None
    # Show the engine's whole output (AIHOW_ECHO_PULUMI=1), for debugging.
    echo: bool = field(default_factory=lambda: bool(os.environ.get("AIHOW_ECHO_PULUMI")))
    waiting: Waiting | None = None
    _stacks: set[str] | None = field(default=None, repr=False)
    _backend: StateBackend | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The environment pulumi runs in."""
        return offline_env(CHECKOUT, self.backend_url, project_dir=self.project_dir)

    @property
    def backend(self) -> StateBackend:
        """Where the stacks' state lives (``ConfigError`` for a backend the project cannot use)."""
        if self._backend is None:
            self._backend = open_backend(self.env()["PULUMI_BACKEND_URL"], self.project_dir)
        return self._backend

    def run(self, args: Sequence[str], stack: str | None = None, check: bool = True,
            timeout: float = 1800, events: Events | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``pulumi ARGS`` (with ``--stack``) in a session of its own, reaped when it ends;
        raise ``StackError`` with the cause in one line when it fails and ``check`` is set.
        ``events`` is given each engine event as it happens (``--event-log``)."""
        cmd = ["pulumi", *args, "--non-interactive"]
        if stack is not None:
            cmd += ["--stack", stack]
        RUNS.install()
        if RUNS.interrupted():  # a thread that gets here after the operator's signal starts nothing
            raise StackError(f"pulumi {args[0]} -s {stack}: not started, the task was interrupted; "
                             "the next run finishes what it left")
        with tempfile.TemporaryDirectory(prefix="aihow-events-") as tmp:
            log = Path(tmp) / "events.jsonl"
            env = self.env()
            if events is not None:
                cmd += ["--event-log", str(log)]
                env["PULUMI_DEBUG_COMMANDS"] = "true"  # the engine offers --event-log only then
            follower = EventFollower(log, events) if events is not None else None
            with RUNS.started("pulumi", cmd, Stop.ENGINE, cwd=self.project_dir, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
                try:
                    output, _ = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise StackError(f"pulumi {args[0]} -s {stack}: no result after {timeout:.0f} s; it was "
                                     "stopped (the next run finishes what it left)") from None
                finally:
                    if follower is not None:
                        follower.finish()
        if self.echo:
            print(output, file=sys.stderr)
        done = subprocess.CompletedProcess(cmd, proc.returncode, output)
        if check and proc.returncode != 0:
            raise StackError(f"pulumi {args[0]} -s {stack}: {self._cause(output)}")
        return done

    def _cause(self, output: str) -> str:
        cause = summarize_failure(output)
        if RUNS.interrupted():
            return f"interrupted ({cause}); the next run finishes what it left"
        return cause

    @contextlib.contextmanager
    def hold(self, stack: str) -> Iterator[None]:
        """Hold the stack for this task (its power records and the pulumi runs applying them);
        another task on it (another process, or another thread) waits. Re-entrant in a thread."""
        key = (self.project_dir.resolve(), stack, threading.get_ident())
        with _HELD_LOCK:
            mine = key in _HELD
            _HELD.add(key)
        if mine:
            yield
            return
        try:
            with PowerRecords(self.project_dir, stack).locked(self.waiting), \
                    self.backend.hold(self.project_name(), stack, self.waiting):
                self.backend.recover(self.project_name(), stack, self._say)
                yield
        finally:
            with _HELD_LOCK:
                _HELD.discard(key)

    def _say(self, message: str) -> None:
        if self.waiting is not None:
            self.waiting(message)

    def stacks(self) -> set[str]:
        """Names of the stacks the backend holds for this project (read once, from the backend
        itself: ``pulumi stack ls`` costs a second; this project adds stacks only through
        ``ensure_stack`` and never removes one)."""
        if self._stacks is None:
            self._stacks = self.backend.stacks(self.project_name())
        return set(self._stacks)

    def project_name(self) -> str:
        """The project's name (``Pulumi.yaml``; ``aihow`` without one, where the engine will say
        what is missing)."""
        try:
            text = (self.project_dir / "Pulumi.yaml").read_text()
        except OSError:
            text = ""
        match = re.search(r"^name:\s*(\S+)", text, re.M)
        return match.group(1) if match else "aihow"

    def urns(self, stack: str) -> set[str]:
        """The URNs the stack's state records (read from the backend directly)."""
        if not self.has_stack(stack):
            return set()
        latest = (self.backend.checkpoint(self.project_name(), stack) or {}).get("checkpoint", {}).get("latest") or {}
        return {r["urn"] for r in latest.get("resources") or []}

    def state_stamp(self, stack: str) -> str:
        """A digest that changes whenever the stack's state or its power records do (whoever
        wrote them)."""
        return self.backend.stamp(self.project_name(), stack) + self.power_records(stack).stamp()

    def power_records(self, stack: str) -> PowerRecords:
        """The stack's power records, kept beside its state (desired.py)."""
        return PowerRecords(self.project_dir, stack, self.backend.url, self.project_name())

    def state_updated(self, stack: str) -> float | None:
        """When the stack's state was last written (seconds since the epoch; None before any)."""
        return self.backend.updated(self.project_name(), stack)

    def ensure_stack(self, stack: str) -> None:
        """Create the stack when the backend does not have it yet: safe from several threads,
        and from other operators sharing the backend (a stack one of them made since this
        workspace listed the stacks is read again, or found by ``stack init`` and kept)."""
        with _STACKS_LOCK:
            if stack not in self.stacks():
                self._stacks = None  # another operator may have made it since
            known = self.stacks()
        if stack not in known:
            proc = self.run(["stack", "init", stack], check=False)
            if proc.returncode != 0 and "already exists" not in proc.stdout:
                raise StackError(f"pulumi stack init -s {stack}: {self._cause(proc.stdout)}")
            with _STACKS_LOCK:
                self._stacks = {*self.stacks(), stack}

    def up(self, stack: str, extra: Sequence[str] = (), events: Events | None = None) -> str:
        """``pulumi up --yes`` under the stack's hold. Returns the engine's output."""
        args = ["up", "--yes", "--skip-preview", *extra]
        with self.hold(stack):
            if self._stacks is not None and stack not in self._stacks:
                self.ensure_stack(stack)
            proc = self.run(args, stack, check=False, events=events)
            if proc.returncode != 0 and f"no stack named '{stack}' found" in proc.stdout:
                # Looking the stack up first would cost a pulumi run on every task: only a new stack pays.
                self.ensure_stack(stack)
                proc = self.run(args, stack, check=False, events=events)
        if proc.returncode != 0:
            raise StackError(f"pulumi up -s {stack}: {self._cause(proc.stdout)}")
        return proc.stdout

    def preview(self, stack: str, extra: Sequence[str] = ()) -> str:
        """``pulumi preview``; returns the engine's output."""
        self.ensure_stack(stack)
        return self.run(["preview", "--diff", *extra], stack).stdout

    def preview_plan(self, stack: str) -> Plan:
        """What ``pulumi preview --json`` plans: its steps (with their old and new state), and
        the protected resources it stopped at; any other error raises ``StackError``."""
        self.ensure_stack(stack)
        proc = self.run(["preview", "--json"], stack, check=False)
        try:
            data = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            raise StackError(f"pulumi preview -s {stack}: {self._cause(proc.stdout)}") from None
        errors = [d.get("message", "") for d in data.get("diagnostics", []) if d.get("severity") == "error"]
        protected = sorted({m.group(1) for e in errors if (m := _PROTECTED.search(e))})
        others = [e for e in errors if not _PROTECTED.search(e) and not e.startswith(("error: preview failed",))]
        if proc.returncode != 0 and not protected:
            raise StackError(f"pulumi preview -s {stack}: {summarize_failure(chr(10).join(others) or proc.stdout)}")
        return Plan(data.get("steps", []), protected)

    def preview_steps(self, stack: str) -> list[dict[str, Any]]:
        """The steps ``pulumi preview --json`` plans (with their old and new state)."""
        return self.preview_plan(stack).steps

    def planned_steps(self, stack: str) -> dict[str, str]:
        """What ``pulumi preview`` would do, as resource name -> operation (``update``,
        ``replace``, ``create``, ``delete``, ...); unchanged resources are left out."""
        return {step["urn"].split("::")[-1]: step["op"] for step in self.preview_steps(stack)
                if step.get("op") not in ("same", "read", "refresh")}

    def unprotect(self, stack: str, urns: Sequence[str] = ()) -> None:
        """Lift the protection of ``urns`` (every resource when none are named), so that a
        confirmed change or a destroy may delete them."""
        self.run(["state", "unprotect", "--yes", *(urns or ["--all"])], stack)

    def protect(self, stack: str, urns: Sequence[str]) -> None:
        """Protect ``urns`` again (a change that was not confirmed)."""
        self.run(["state", "protect", "--yes", *urns], stack)

    def refresh(self, stack: str) -> str:
        """``pulumi refresh --yes`` under the stack's hold."""
        with self.hold(stack):
            return self.run(["refresh", "--yes", "--skip-preview"], stack).stdout

    def destroy(self, stack: str, events: Events | None = None) -> str:
        """``pulumi destroy --yes`` under the stack's hold; a stack the backend does not have
        is already destroyed."""
        if not self.has_stack(stack):
            return ""
        with self.hold(stack):
            self.unprotect(stack)  # the disks: a destroy is the one change that deletes them all
            # No refresh: deleting what is already gone succeeds, and the engine's reads would
            # only cost time.
            return self.run(["destroy", "--yes", "--skip-preview", "--refresh=false"], stack, events=events).stdout

    def has_stack(self, stack: str) -> bool:
        """True when the backend holds the stack."""
        return stack in self.stacks()

    def outputs(self, stack: str) -> dict[str, Any]:
        """The stack's outputs (empty before the first ``up``)."""
        if not self.has_stack(stack):
            return {}
        proc = self.run(["stack", "output", "--json"], stack)
        data: dict[str, Any] = json.loads(proc.stdout or "{}")
        return data

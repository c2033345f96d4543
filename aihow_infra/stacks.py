"""Running the Pulumi CLI for the tasks (and the end-to-end tests): one place for its
environment, its offline settings, and turning its failures into one clear line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aihow_infra.errors import StackError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_STACKS_LOCK = threading.Lock()
_OWN_ERROR = re.compile(r"aihow_infra\.errors\.(\w+): (.*)$")
_ENGINE_ERROR = re.compile(r"^\s*error: (.*)$")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception): .+")


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
        "PULUMI_BACKEND_URL": f"file://{root / '.state'}",
        "PULUMI_CONFIG_PASSPHRASE": "",
    }


def offline_env(root: Path = PROJECT_ROOT, backend_url: str | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the project's pulumi runs in (``environ``, by default this process's,
    with its own tools first on PATH, a local backend, and nothing that reaches the internet)."""
    env = dict(os.environ if environ is None else environ)
    env["PATH"] = os.pathsep.join([str(root / ".tools" / "bin"), str(Path(sys.executable).parent), env["PATH"]])
    for key, value in _defaults(root).items():
        if not env.get(key) and not (key == "PULUMI_CONFIG_PASSPHRASE" and key in env):
            env[key] = value
    if backend_url:
        env["PULUMI_BACKEND_URL"] = backend_url
    env.update(_OFFLINE)
    return env


def shell_env_file(root: Path = PROJECT_ROOT) -> str:
    """The same settings as a file to source from a shell (``. .tools/env``), written by ./bootstrap."""
    lines = ["# Source this file to use the project's pulumi from a shell: . .tools/env",
             f'export PATH="{root / ".tools" / "bin"}:{Path(sys.executable).parent}:$PATH"']
    for key, value in _defaults(root).items():
        keep = "-" if key == "PULUMI_CONFIG_PASSPHRASE" else ":-"  # an empty passphrase is a choice
        lines.append(f'export {key}="${{{key}{keep}{value}}}"')
    lines += [f"export {key}={value}" for key, value in _OFFLINE.items()]
    return "\n".join(lines) + "\n"


def summarize_failure(output: str) -> str:
    """The cause of a failed pulumi run in one line: our own error when a provider raised one,
    else the engine's first error line."""
    ours = [m.group(2) for line in output.splitlines() if (m := _OWN_ERROR.search(line))]
    if ours:
        return ours[0]
    engine = [m.group(1).strip() for line in output.splitlines() if (m := _ENGINE_ERROR.match(line))]
    generic = ("update failed", "preview failed", "destroy failed", "an unhandled error occurred")
    specific = [e for e in engine if not e.startswith(generic)]
    if specific:
        return specific[0]
    crash = [line.strip() for line in output.splitlines() if _EXCEPTION_LINE.match(line.strip())]
    if crash:
        return crash[-1]
    if engine:
        return engine[0]
    tail = [line.strip() for line in output.splitlines() if line.strip()]
    return tail[-1] if tail else "pulumi failed without output"


@dataclass
class Workspace:
    """A Pulumi project folder and the backend its stacks live in.

    The folder defaults to this checkout (``AIHOW_PROJECT_DIR`` overrides it), the
    backend to ``PULUMI_BACKEND_URL`` or the checkout's ``.state``.
    """

    project_dir: Path = field(default_factory=lambda: Path(os.environ.get("AIHOW_PROJECT_DIR", PROJECT_ROOT)))
    backend_url: str | None = None
    echo: bool = False
    _stacks: set[str] | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The environment pulumi runs in."""
        return offline_env(PROJECT_ROOT, self.backend_url)

    def run(self, args: Sequence[str], stack: str | None = None, check: bool = True,
            timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        """Run ``pulumi ARGS`` (with ``--stack``); raise ``StackError``
        with the cause in one line when it fails and ``check`` is set."""
        cmd = ["pulumi", *args, "--non-interactive"]
        if stack is not None:
            cmd += ["--stack", stack]
        proc = subprocess.run(cmd, cwd=self.project_dir, env=self.env(), text=True, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if self.echo:
            print(proc.stdout, file=sys.stderr)
        if check and proc.returncode != 0:
            raise StackError(f"pulumi {args[0]} -s {stack}: {summarize_failure(proc.stdout)}")
        return proc

    def stacks(self) -> set[str]:
        """Names of the stacks the backend holds for this project (listed once; this project
        adds stacks only through ``ensure_stack`` and never removes one)."""
        if self._stacks is None:
            proc = self.run(["stack", "ls", "--json"])
            self._stacks = {s["name"].split("/")[-1] for s in json.loads(proc.stdout)}
        return set(self._stacks)

    def ensure_stack(self, stack: str) -> None:
        """Create the stack when the backend does not have it yet (safe from several threads)."""
        with _STACKS_LOCK:
            known = self.stacks()
        if stack not in known:
            self.run(["stack", "init", stack])
            with _STACKS_LOCK:
                self._stacks = {*self.stacks(), stack}

    def up(self, stack: str, extra: Sequence[str] = (), config: dict[str, str] | None = None) -> str:
        """``pulumi up --yes``; ``config`` (path keys such as ``aihow:power.vm``) is saved to the
        stack's config by the same run. Returns the engine's output."""
        flags = ["--config-path", *[f for k, v in (config or {}).items() for f in ("-c", f"{k}={v}")]] \
            if config else []
        args = ["up", "--yes", "--skip-preview", *flags, *extra]
        if self._stacks is not None and stack not in self._stacks:
            self.ensure_stack(stack)
        proc = self.run(args, stack, check=False)
        if proc.returncode != 0 and f"no stack named '{stack}' found" in proc.stdout:
            # Looking the stack up first would cost a pulumi run on every task: only a new stack pays.
            self.ensure_stack(stack)
            proc = self.run(args, stack, check=False)
        if proc.returncode != 0:
            raise StackError(f"pulumi up -s {stack}: {summarize_failure(proc.stdout)}")
        return proc.stdout

    def preview(self, stack: str, extra: Sequence[str] = ()) -> str:
        """``pulumi preview``; returns the engine's output."""
        self.ensure_stack(stack)
        return self.run(["preview", "--diff", *extra], stack).stdout

    def planned_steps(self, stack: str) -> dict[str, str]:
        """What ``pulumi preview`` would do, as resource name -> operation (``update``,
        ``replace``, ``create``, ``delete``, ...); unchanged resources are left out."""
        self.ensure_stack(stack)
        data = json.loads(self.run(["preview", "--json"], stack).stdout)
        return {step["urn"].split("::")[-1]: step["op"] for step in data.get("steps", [])
                if step.get("op") not in ("same", "read")}

    def refresh(self, stack: str) -> str:
        """``pulumi refresh --yes``."""
        return self.run(["refresh", "--yes", "--skip-preview"], stack).stdout

    def destroy(self, stack: str) -> str:
        """``pulumi destroy --yes``; a stack the backend does not have is already destroyed."""
        if not self.has_stack(stack):
            return ""
        return self.run(["destroy", "--yes", "--skip-preview"], stack).stdout

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

    def config_set(self, stack: str, key: str, value: str, path: bool = False) -> None:
        """``pulumi config set`` (``path`` for keys like ``aihow:power.vm``)."""
        self.ensure_stack(stack)
        self.run(["config", "set", *(["--path"] if path else []), key, value], stack)

    def config_rm(self, stack: str, key: str, path: bool = False) -> None:
        """``pulumi config rm``; a key that is not set is fine."""
        self.run(["config", "rm", *(["--path"] if path else []), key], stack, check=False)

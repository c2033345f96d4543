#!/usr/bin/python3
"""Ansible module: bring one node to its deployed state in a single module run.

Under software emulation every module run costs seconds inside the guest (Python's start and
the module's own imports), so a node's whole converge is one run: folders, files (written only
when their content or mode differ), one-time commands, a systemd reload when a unit changed,
restarts of the units whose files changed, every listed unit enabled and running, and files
read back for other nodes. Idempotent: a second run with the same arguments changes nothing.

A restart a change asked for is owed until it is done: the units are recorded on the node
(C(restarts_owed)) before the change that asks for them, and each is struck off once restarted.
A run cut short (a later file, a command or a restart failed, the run was killed) leaves them
recorded, and the next run restarts them though it finds every file already as asked.
"""

from __future__ import annotations

import base64
import functools
import grp
import os
import pwd
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: aihow_converge
short_description: a node's files, one-time commands and systemd units, in one run
description:
  - Steps, in order, stopping at the first failure with its step named
    (folders, files, commands, daemon-reload, restarts, enable and start, reads).
options:
  folders:
    description: folders made when missing (path, mode, owner, group); mode and owner set when they differ.
    type: list
    elements: dict
    default: []
  files:
    description:
      - files written when their content, mode or owner differ (dest, content or content_base64 for
        bytes that are not text, mode, owner, group, restarts); C(restarts) names units restarted
        when the file changed. Content is never logged.
    type: list
    elements: dict
    default: []
  commands:
    description:
      - shell commands run (C(/bin/sh -e)) only while their C(creates) path is missing; C(restarts)
        names units restarted when the command ran.
    type: list
    elements: dict
    default: []
  services:
    description: systemd units enabled and running after the run.
    type: list
    elements: str
    default: []
  read:
    description: files returned base64-encoded in C(contents), read after everything else.
    type: list
    elements: str
    default: []
  restarts_owed:
    description: the node's record of restarts asked for and not yet done, a unit a line.
    type: str
    default: /var/lib/aihow/restarts-owed
"""

RETURN = r"""
changed_files: {description: files written, type: list}
ran: {description: the C(creates) path of each command that ran, type: list}
restarted: {description: units restarted, type: list}
started: {description: units started or enabled, type: list}
contents: {description: path -> base64 content of each file in C(read), type: dict}
"""

SPEC: dict[str, Any] = {
    "folders": {"type": "list", "elements": "dict", "default": [], "options": {
        "path": {"type": "str", "required": True},
        "mode": {"type": "str", "default": "0755"},
        "owner": {"type": "str", "default": "root"},
        "group": {"type": "str", "default": "root"},
    }},
    "files": {"type": "list", "elements": "dict", "default": [], "options": {
        "dest": {"type": "str", "required": True},
        "content": {"type": "str", "no_log": True},
        "content_base64": {"type": "str", "no_log": True},
        "mode": {"type": "str", "default": "0644"},
        "owner": {"type": "str", "default": "root"},
        "group": {"type": "str", "default": "root"},
        "restarts": {"type": "list", "elements": "str", "default": []},
    }},
    "commands": {"type": "list", "elements": "dict", "default": [], "options": {
        "run": {"type": "str", "required": True},
        "creates": {"type": "str", "required": True},
        "restarts": {"type": "list", "elements": "str", "default": []},
    }},
    "services": {"type": "list", "elements": "str", "default": []},
    "read": {"type": "list", "elements": "str", "default": []},
    "restarts_owed": {"type": "str", "default": "/var/lib/aihow/restarts-owed"},
}


class StepFailed(Exception):
    """A step failed; the message names it."""


def _ids(owner: str, group: str) -> tuple[int, int]:
    try:
        return pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise StepFailed(f"owner {owner}:{group} does not exist on this node") from None


def _attributes_differ(path: str, mode: int, uid: int, gid: int) -> bool:
    st = os.lstat(path)
    return st.st_mode & 0o7777 != mode or (st.st_uid, st.st_gid) != (uid, gid)


def _set_attributes(path: str, mode: int, uid: int, gid: int) -> bool:
    st = os.lstat(path)
    changed = False
    if st.st_mode & 0o7777 != mode:
        os.chmod(path, mode)
        changed = True
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
        changed = True
    return changed


def _folder(spec: dict[str, Any]) -> bool:
    path, mode = spec["path"], int(spec["mode"], 8)
    uid, gid = _ids(spec["owner"], spec["group"])
    made = not os.path.isdir(path)
    if made:
        os.makedirs(path, mode=mode)
    return _set_attributes(path, mode, uid, gid) or made


def _file(spec: dict[str, Any], before_change: Callable[[], None]) -> bool:
    """Write the file when its content, mode or owner differ, calling ``before_change`` first;
    whether it changed."""
    dest, mode = spec["dest"], int(spec["mode"], 8)
    if (spec["content"] is None) == (spec["content_base64"] is None):
        raise StepFailed(f"{dest}: give content (text) or content_base64 (bytes, e.g. a key), one of them")
    content = (base64.b64decode(spec["content_base64"]) if spec["content"] is None
               else spec["content"].encode())
    uid, gid = _ids(spec["owner"], spec["group"])
    try:
        with open(dest, "rb") as f:
            same = f.read() == content
    except FileNotFoundError:
        same = False
    if same and not _attributes_differ(dest, mode, uid, gid):
        return False
    before_change()
    if same:
        return _set_attributes(dest, mode, uid, gid)
    folder = os.path.dirname(dest)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    # Written beside the target and renamed over it: a cut run leaves the old file or the new one.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".aihow-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.chown(tmp, uid, gid)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


# `systemctl is-enabled` states for which `is-enabled --quiet` exits 0 (systemd 252,
# src/systemctl/systemctl-is-enabled.c); the action plugin's check takes the same ones.
ENABLED = frozenset({"enabled", "enabled-runtime", "static", "alias", "indirect", "generated"})


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def _must(what: str, *args: str) -> None:
    done = _systemctl(*args)
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split())[:300]
        raise StepFailed(f"{what}: systemctl {' '.join(args)} exited {done.returncode}: {detail}")


def _states(query: str, units: list[str]) -> dict[str, str]:
    """``systemctl is-enabled`` or ``is-active`` of every unit in one run (a systemctl start
    costs hundreds of milliseconds under emulation): unit -> state. systemd prints no line for
    a unit it does not know; then each is asked alone, and such a unit's state is ""."""
    if not units:
        return {}
    lines = _systemctl(query, "--", *units).stdout.splitlines()
    if len(lines) == len(units):
        return dict(zip(units, lines, strict=True))
    return {unit: _systemctl(query, "--", unit).stdout.strip() for unit in units}


# A unit file changed: systemd reads it again before any restart (owed like a restart; no unit
# name has parentheses).
RELOAD = "(daemon-reload)"
UNIT_FOLDERS = ("/etc/systemd/", "/lib/systemd/")


class Owed:
    """The restarts asked for and not yet done, kept in a file on the node (a unit a line, in
    the order asked); the file is gone when none is owed."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path) as f:
                self.units = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            self.units = []

    def add(self, units: list[str]) -> None:
        """Record ``units`` as owed (before the change that asks for them is made)."""
        more = [u for u in units if u not in self.units]
        if more:
            self._write([*self.units, *more])

    def done(self, unit: str) -> None:
        """Strike ``unit`` off."""
        self._write([u for u in self.units if u != unit])

    def _write(self, units: list[str]) -> None:
        if not units:
            if os.path.exists(self.path):
                os.unlink(self.path)
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, scratch = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".restarts-")
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{u}\n" for u in units))
                f.flush()
                os.fsync(f.fileno())
            os.replace(scratch, self.path)
        self.units = units


def converge(params: dict[str, Any]) -> dict[str, Any]:
    """Carry out every step; the result Ansible reports."""
    changed_files: list[str] = []
    ran: list[str] = []
    owed = Owed(params["restarts_owed"])
    for spec in params["folders"]:
        if _folder(spec):
            changed_files.append(spec["path"])
    for spec in params["files"]:
        try:
            reload = [RELOAD] if spec["dest"].startswith(UNIT_FOLDERS) else []
            if _file(spec, functools.partial(owed.add, [*reload, *spec["restarts"]])):
                changed_files.append(spec["dest"])
        except OSError as exc:
            raise StepFailed(f"writing {spec['dest']}: {exc.strerror or exc}") from None
    for spec in params["commands"]:
        if os.path.exists(spec["creates"]):
            continue
        owed.add(spec["restarts"])
        done = subprocess.run(["/bin/sh", "-ec", spec["run"]], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            detail = " ".join((done.stderr or done.stdout).split())[-400:]
            raise StepFailed(f"command for {spec['creates']} exited {done.returncode}: {detail}")
        if not os.path.exists(spec["creates"]):
            raise StepFailed(f"command for {spec['creates']} succeeded but did not make it")
        ran.append(spec["creates"])
    units: list[str] = params["services"]
    if RELOAD in owed.units:
        _must("reloading systemd", "daemon-reload")
        owed.done(RELOAD)
    restart = list(owed.units)
    # A unit that is neither running nor wanted here is only rewritten, not started.
    running = _states("is-active", [unit for unit in restart if unit not in units])
    restarted: list[str] = []
    for unit in restart:  # one at a time, in the order asked (kernel settings before the kubelet)
        if unit in units or running[unit] == "active":
            _must(f"restarting {unit}", "restart", unit)
            restarted.append(unit)
        owed.done(unit)  # restarted, or stopped and not wanted: it reads its files when it starts
    # Every unit to enable in one run, without the reload `systemctl enable` does by itself: a
    # reload re-runs systemd's generators and reads every unit again, 6-9 s under emulation, and a
    # control plane's first deploy reloaded nine times, eight of them one per unit it enabled
    # (2026-12-03). A unit needs no reload to start; its file, when written here, had the one
    # above. After the restarts, so that a unit refusing to be enabled leaves no changed unit
    # unrestarted (the next run would find its file as asked and not restart it).
    to_enable = [unit for unit, state in _states("is-enabled", units).items() if state not in ENABLED]
    if to_enable:
        _must(f"enabling {' '.join(to_enable)}", "enable", "--no-reload", *to_enable)
    stopped = [unit for unit, state in _states("is-active", [u for u in units if u not in restarted]).items()
               if state != "active"]
    if stopped:
        _must(f"starting {' '.join(stopped)}", "start", *stopped)
    started = [unit for unit in units if unit in to_enable or unit in stopped]
    contents: dict[str, str] = {}
    for path in params["read"]:
        try:
            with open(path, "rb") as f:
                contents[path] = base64.b64encode(f.read()).decode()
        except OSError as exc:
            raise StepFailed(f"reading {path}: {exc.strerror or exc}") from None
    return {"changed": bool(changed_files or ran or restarted or started), "changed_files": changed_files,
            "ran": ran, "restarted": restarted, "started": started, "contents": contents}


def main() -> None:
    """Ansible's entry point."""
    module = AnsibleModule(argument_spec=SPEC, supports_check_mode=False)
    try:
        module.exit_json(**converge(module.params))
    except StepFailed as exc:
        module.fail_json(msg=str(exc))


if __name__ == "__main__":
    main()

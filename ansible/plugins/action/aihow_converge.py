"""Ansible action for ``aihow_converge`` (runs on the controller): a node that already is as
asked is found so by one shell command in the guest, and the module is not run at all.

Under software emulation the module run is most of a deploy with nothing to change (Python's
start in the guest and the module's payload through the guest agent, seconds each); the check
is one ``sh`` command of five programs whatever the node's size: one ``stat`` of every folder
and file (type, owner, group, mode), one ``sha256sum`` of every file against the content the
module would write, each command's ``creates`` path (the shell's own test), and one
``systemctl is-enabled`` and one ``is-active`` of every unit (the states the module takes as
enabled and running), and the node's record of restarts owed (read by the shell itself: a run
cut short left some, and only the module does them). A process start in an emulated guest
costs tens of milliseconds and ``systemctl`` hundreds, so the check does not grow a process per
file or unit. When everything
matches, the result is the module's for a run that changed nothing (with ``checked_only``);
otherwise, and whenever files are to be read back, the module runs as always and decides.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from typing import Any

from ansible.plugins.action import ActionBase

MODULE = "aihow_converge"
UNCHANGED = {"changed": False, "changed_files": [], "ran": [], "restarted": [], "started": [], "contents": {}}
SECTION = "--aihow--"  # between the check's parts; no path, hash or unit state reads so
OWED = "/var/lib/aihow/restarts-owed"  # the module's default record of restarts not yet done
# `systemctl is-enabled` states for which `is-enabled --quiet` exits 0 (systemd 252,
# src/systemctl/systemctl-is-enabled.c): what the module takes as enabled.
ENABLED = frozenset({"enabled", "enabled-runtime", "static", "alias", "indirect", "generated"})


def _content(spec: dict[str, Any]) -> bytes | None:
    if (spec.get("content") is None) == (spec.get("content_base64") is None):
        return None  # the module says what is wrong with it
    if spec.get("content") is not None:
        return str(spec["content"]).encode()
    return base64.b64decode(spec["content_base64"])


def _owner(spec: dict[str, Any], mode: str) -> str:
    return f"{spec.get('owner', 'root')}:{spec.get('group', 'root')} {int(spec.get('mode', mode), 8):o}"


def expected_parts(args: dict[str, Any]) -> list[list[str]] | None:
    """What each part of ``check_command`` prints for a node that is as ``args`` ask (stat,
    sha256sum, creates, is-enabled as "enabled", is-active, no restart owed); None when only the
    module can tell (files to read back, a file without valid content)."""
    if args.get("read"):
        return None
    stats = [f"directory {_owner(spec, '0755')} {spec['path']}" for spec in args.get("folders") or []]
    sums = []
    for spec in args.get("files") or []:
        content = _content(spec)
        if content is None:
            return None
        kind = "regular file" if content else "regular empty file"  # stat's %F
        stats.append(f"{kind} {_owner(spec, '0644')} {spec['dest']}")
        sums.append(f"{hashlib.sha256(content).hexdigest()}  {spec['dest']}")
    units = list(args.get("services") or [])
    return [stats, sums, [f"yes {spec['creates']}" for spec in args.get("commands") or []],
            ["enabled"] * len(units), ["active"] * len(units), []]


def check_command(args: dict[str, Any]) -> str:
    """One POSIX shell command printing the parts ``expected_parts`` expects, ``SECTION``
    between them. A missing path or unit prints nothing (or another state) in its part."""
    def quoted(paths: list[str]) -> str:
        return " ".join(shlex.quote(p) for p in paths)

    files = [spec["dest"] for spec in args.get("files") or []]
    stats = [spec["path"] for spec in args.get("folders") or []] + files
    creates = [spec["creates"] for spec in args.get("commands") or []]
    units = quoted(list(args.get("services") or []))
    parts = [
        f"stat -c '%F %U:%G %a %n' -- {quoted(stats)} 2>/dev/null" if stats else "",
        f"sha256sum -- {quoted(files)} 2>/dev/null" if files else "",
        f"for p in {quoted(creates)}; do if [ -e \"$p\" ]; then echo \"yes $p\"; else echo \"no $p\"; fi; done"
        if creates else "",
        f"systemctl is-enabled -- {units} 2>/dev/null" if units else "",
        f"systemctl is-active -- {units} 2>/dev/null" if units else "",
        # The shell's own read: no program started.
        f"{{ while IFS= read -r u; do echo \"$u\"; done < {shlex.quote(args.get('restarts_owed') or OWED)}; }} "
        "2>/dev/null",
    ]
    return f"; echo {SECTION}; ".join(p or "true" for p in parts) + "; true"


def matches(expected: list[list[str]], stdout: str) -> bool:
    """Whether the check's output says the node is as asked."""
    found: list[list[str]] = [[]]
    for line in stdout.splitlines():
        if line == SECTION:
            found.append([])
        else:
            found[-1].append(line)
    if len(found) != len(expected):
        return False
    stats, sums, creates, enabled, active, owed = found
    return ([stats, sums, creates, active, owed] == [expected[0], expected[1], expected[2], expected[4], expected[5]]
            and len(enabled) == len(expected[3]) and all(state in ENABLED for state in enabled))


class ActionModule(ActionBase):
    """``aihow_converge`` with the check first."""

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        """The check's result when the node is as asked; else the module's."""
        result: dict[str, Any] = super().run(tmp, task_vars)
        args = dict(self._task.args)
        expected = expected_parts(args)
        if expected is not None:
            found = self._low_level_execute_command(check_command(args), sudoable=True)
            if found.get("rc") == 0 and matches(expected, found.get("stdout", "")):
                return {**result, **UNCHANGED, "checked_only": True}
        result.update(self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars))
        return result

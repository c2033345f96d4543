"""Ansible action for ``aihow_converge`` (runs on the controller): a node that already is as
asked is found so by one shell command in the guest, and the module is not run at all.

Under software emulation the module run is most of a deploy with nothing to change (Python's
start in the guest and the module's payload through the guest agent, seconds each); the check
is one ``sh`` command: each folder's and file's owner, group and mode, each file's SHA-256
against the content the module would write, each command's ``creates`` path, and each unit's
``systemctl is-enabled``/``is-active`` (the module's own tests). When everything matches, the
result is the module's for a run that changed nothing (with ``checked_only``); otherwise, and
whenever files are to be read back, the module runs as always and decides.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from typing import Any

from ansible.plugins.action import ActionBase

MODULE = "aihow_converge"
UNCHANGED = {"changed": False, "changed_files": [], "ran": [], "restarted": [], "started": [], "contents": {}}


def _content(spec: dict[str, Any]) -> bytes | None:
    if (spec.get("content") is None) == (spec.get("content_base64") is None):
        return None  # the module says what is wrong with it
    if spec.get("content") is not None:
        return str(spec["content"]).encode()
    return base64.b64decode(spec["content_base64"])


def expected_lines(args: dict[str, Any]) -> list[str] | None:
    """What ``check_command`` prints for a node that is as ``args`` ask; None when only the
    module can tell (files to read back, a file without valid content)."""
    if args.get("read"):
        return None
    lines = []
    for spec in args.get("folders") or []:
        lines.append(f"D {spec.get('owner', 'root')}:{spec.get('group', 'root')} "
                     f"{int(spec.get('mode', '0755'), 8):o} {spec['path']}")
    for spec in args.get("files") or []:
        content = _content(spec)
        if content is None:
            return None
        lines.append(f"F {hashlib.sha256(content).hexdigest()} {spec.get('owner', 'root')}:"
                     f"{spec.get('group', 'root')} {int(spec.get('mode', '0644'), 8):o} {spec['dest']}")
    lines += [f"C yes {spec['creates']}" for spec in args.get("commands") or []]
    lines += [f"S 0 0 {unit}" for unit in args.get("services") or []]
    return lines


def check_command(args: dict[str, Any]) -> str:
    """One POSIX shell command printing, a line each, what ``expected_lines`` expects."""
    q = shlex.quote
    parts = []
    for spec in args.get("folders") or []:
        path = q(spec["path"])
        parts.append(f"if [ -d {path} ]; then stat -c 'D %U:%G %a %n' {path}; else echo 'D missing'; fi")
    for spec in args.get("files") or []:
        dest = q(spec["dest"])
        parts.append(f"if [ -f {dest} ]; then printf 'F %s ' \"$(sha256sum < {dest} | cut -d' ' -f1)\"; "
                     f"stat -c '%U:%G %a %n' {dest}; else echo 'F missing'; fi")
    for spec in args.get("commands") or []:
        creates = q(spec["creates"])
        parts.append(f"if [ -e {creates} ]; then echo 'C yes '{creates}; else echo 'C no'; fi")
    for unit in args.get("services") or []:
        u = q(unit)
        parts.append(f"systemctl is-enabled --quiet {u}; e=$?; systemctl is-active --quiet {u}; "
                     f"echo \"S $e $? \"{u}")
    return "; ".join(parts) or "true"


class ActionModule(ActionBase):
    """``aihow_converge`` with the check first."""

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        """The check's result when the node is as asked; else the module's."""
        result: dict[str, Any] = super().run(tmp, task_vars)
        args = dict(self._task.args)
        expected = expected_lines(args)
        if expected is not None:
            found = self._low_level_execute_command(check_command(args), sudoable=True)
            if found.get("rc") == 0 and found.get("stdout", "").splitlines() == expected:
                return {**result, **UNCHANGED, "checked_only": True}
        result.update(self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars))
        return result

"""Ansible stdout callback: a line as each task starts, one per task and host as it finishes
(with the seconds since the task started), failures with host, task and message, and a recap.
With ``AIHOW_DEPLOY_SUMMARY`` set, the failures and the recap are also written there as JSON,
for ``invoke deploy`` to report."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: aihow
type: stdout
short_description: one line per task result, then a recap
description: Compact live output for ai-how deploys.
"""


def _message(result: Any) -> str:
    data = result._result
    text = data.get("msg") or data.get("stderr") or data.get("reason") or ""
    if data.get("rc") and data.get("stderr"):  # a command's own words, not "non-zero return code"
        text = data["stderr"].strip().splitlines()[-1]
    if not text and data.get("results"):
        text = next((r.get("msg") or r.get("stderr") or "" for r in data["results"] if r.get("failed")), "")
    return " ".join(str(text).split())[:500] or "failed"


def _what_changed(data: dict[str, Any]) -> str:
    """What a node's converge changed (aihow_converge: the paths written and the units restarted;
    never a file's content), for a changed line: a restart under emulation costs a minute."""
    parts = []
    for key, word in (("changed_files", "wrote"), ("restarted", "restarted")):
        names = [str(n) for n in data.get(key) or []]
        if names:
            parts.append(f"{word} {', '.join(names[:6])}" + (f" and {len(names) - 6} more" if len(names) > 6 else ""))
    return f": {'; '.join(parts)}" if parts else ""


class CallbackModule(CallbackBase):  # type: ignore[misc]
    """Compact live lines for operators."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "aihow"

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[dict[str, str]] = []
        self.play = ""
        self.task_began = time.monotonic()

    def _line(self, text: str) -> None:
        self._display.display(text)

    def v2_playbook_on_play_start(self, play: Any) -> None:
        """A play begins."""
        self.play = play.get_name().strip()
        self._line(f"PLAY {self.play}")

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        """A task begins (under emulation one can take a minute: the operator sees which)."""
        self.task_began = time.monotonic()
        self._line(f"TASK {task.get_name().strip()}")

    def v2_runner_on_ok(self, result: Any) -> None:
        """A task finished on a host, changed or not."""
        word = "changed" if result._result.get("changed") else "ok"
        self._line(f"  {word:8} {result._host.get_name()}: {result._task.get_name()} ({self._seconds()})"
                   + _what_changed(result._result))

    def _seconds(self) -> str:
        """Seconds since the task started: on slow guests, where a deploy's time goes."""
        return f"{time.monotonic() - self.task_began:.1f} s"

    def v2_runner_on_skipped(self, result: Any) -> None:
        """Skipped tasks are not shown."""
        return

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        """A task failed on a host: host, task and message, kept for the summary."""
        if ignore_errors:
            return
        failure = {"host": result._host.get_name(), "task": result._task.get_name(), "msg": _message(result)}
        self.failures.append(failure)
        self._line(f"  FAILED   {failure['host']}: {failure['task']}: {failure['msg']}")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        """A host could not be reached."""
        failure = {"host": result._host.get_name(), "task": result._task.get_name(),
                   "msg": f"unreachable: {_message(result)}"}
        self.failures.append(failure)
        self._line(f"  UNREACH  {failure['host']}: {failure['task']}: {failure['msg']}")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        """The recap, and the summary file."""
        recap = {}
        self._line("RECAP")
        for host in sorted(stats.processed):
            s = stats.summarize(host)
            recap[host] = s
            self._line(f"  {host}: ok={s['ok']} changed={s['changed']} failed={s['failures']} "
                       f"unreachable={s['unreachable']} skipped={s['skipped']}")
        path = os.environ.get("AIHOW_DEPLOY_SUMMARY")
        if path:
            with open(path, "w", encoding="utf-8") as out:
                json.dump({"failures": self.failures, "recap": recap}, out)

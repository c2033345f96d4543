"""What the Pulumi engine is doing, as the operator reads it: one line when a resource step
starts and one when it ends (with its time), a line saying which steps still run when it has
said nothing for ``QUIET_S`` (a VM's step boots it and waits until it is ready: minutes under
software emulation), and a summary at the end ("3 created, 1 updated, 2 unchanged" or "no
changes").

The lines come from the engine's structured events (``pulumi --event-log``, one JSON
object per line), never from its text output.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from aihow_infra.changes import kind_of
from aihow_infra.steps import QUIET_S

Say = Callable[[str], None]

# op -> (while it runs, when it is done); refresh, read and same steps print nothing.
_VERBS = {
    "create": ("creating", "created"),
    "update": ("updating", "updated"),
    "delete": ("deleting", "deleted"),
    "replace": ("replacing", "replaced"),
    "create-replacement": ("creating the replacement of", "created the replacement of"),
    "delete-replaced": ("deleting the replaced", "deleted the replaced"),
}
_SUMMARY_WORDS = (("create", "created"), ("update", "updated"), ("replace", "replaced"), ("delete", "deleted"),
                  ("same", "unchanged"))
# The summary counts what a replacement is once, under "replace".
_COUNTED = {"create", "update", "replace", "delete", "same"}
# How a line names each kind of resource (aihow_infra.changes), and the suffix of the names
# aihow_infra.components gives them.
_PHRASES = {"VM": ("VM", "-domain"), "disk": ("disk of", "-disk"), "seed": ("seed of", "-seed"),
            "GPU lease": ("GPU lease of", ""), "network": ("network", ""), "pool": ("storage pool", ""),
            "image": ("image", "")}


def describe(urn: str) -> str | None:
    """What a resource is, in the operator's words: ``VM compute-01``, ``disk of compute-01``,
    ``GPU lease of compute-01``, ``network``, ``network on <host>`` (a host besides the
    cluster's own), ``image hpc``; None for the project's component resources, providers and the
    stack itself (they only group the others)."""
    parts = urn.split("::")
    if len(parts) < 4 or not parts[-2].rsplit("$", 1)[-1].startswith("pulumi-python:dynamic"):
        return None
    kind, name = kind_of(urn), parts[-1]
    phrase, suffix = _PHRASES.get(kind, (kind, ""))
    if kind in ("network", "pool", "image"):  # "network", "network-<host>", "image-<role>[-<host>]"
        rest = name.partition("-")[2]
        what, _, host = rest.partition("-") if kind == "image" else ("", "", rest)
        return " ".join(w for w in (phrase, what) if w) + (f" on {host}" if host else "")
    if kind == "GPU lease":
        return f"{phrase} {name.split('-lease')[0]}"
    return f"{phrase} {name.removesuffix(suffix)}"


class EngineProgress:
    """Receives engine events (call it with each one) and says what happens through ``say``;
    ``summary`` holds the counts once the run has ended."""

    def __init__(self, stack: str, say: Say, clock: Callable[[], float] = time.monotonic) -> None:
        self.stack = stack
        self.say = say
        self.clock = clock
        self.started: dict[str, tuple[str, float]] = {}
        self.counts: Counter[str] = Counter()
        self.failed: list[str] = []
        self.last_said: float | None = None  # when a line was last said (the first tick, before any)

    def _say(self, line: str, now: float) -> None:
        self.last_said = now
        self.say(line)

    def tick(self) -> None:
        """When nothing was said for ``QUIET_S``: one line naming the steps that still run,
        each with its time so far (``hpc: still creating VM controller (45 s), VM compute-01
        (44 s)``)."""
        now = self.clock()
        if self.last_said is None:
            self.last_said = now
        running = [(urn, op, began) for urn, (op, began) in self.started.items()]
        if now - self.last_said < QUIET_S or not running:
            return
        said, last_op = [], ""
        for urn, op, began in running:  # the verb once for steps of the same kind in a row
            said.append(f"{_VERBS[op][0] + ' ' if op != last_op else ''}{describe(urn)} ({now - began:.0f} s)")
            last_op = op
        self._say(f"{self.stack}: still {', '.join(said)}", now)

    def __call__(self, event: Mapping[str, Any]) -> None:
        """Take one engine event."""
        if "resourcePreEvent" in event:
            self._pre(event["resourcePreEvent"].get("metadata") or {})
        elif "resOutputsEvent" in event:
            self._done(event["resOutputsEvent"].get("metadata") or {})
        elif "resOpFailedEvent" in event:
            meta = event["resOpFailedEvent"].get("metadata") or {}
            what = describe(str(meta.get("urn", "")))
            if what:
                self.failed.append(what)
                self.say(f"{self.stack}: {what} failed")

    def _pre(self, meta: Mapping[str, Any]) -> None:
        op, what = str(meta.get("op", "")), describe(str(meta.get("urn", "")))
        if what is None:
            return
        if op in _COUNTED:
            self.counts[op] += 1
        if op in _VERBS:
            now = self.clock()
            self.started[str(meta["urn"])] = (op, now)
            self._say(f"{self.stack}: {_VERBS[op][0]} {what}", now)

    def _done(self, meta: Mapping[str, Any]) -> None:
        urn = str(meta.get("urn", ""))
        if urn not in self.started:
            return
        op, began = self.started.pop(urn)
        now = self.clock()
        self._say(f"{self.stack}: {_VERBS[op][1]} {describe(urn)} ({now - began:.0f} s)", now)

    @property
    def summary(self) -> str:
        """``3 created, 1 updated, 2 unchanged`` or ``no changes`` (and what failed)."""
        changed = [f"{self.counts[op]} {word}" for op, word in _SUMMARY_WORDS if self.counts[op] and op != "same"]
        text = ", ".join(changed) if changed else "no changes"
        if changed and self.counts["same"]:
            text += f", {self.counts['same']} unchanged"
        if self.failed:
            text += f"; failed: {', '.join(self.failed)}"
        return text

"""The engine's event log (``pulumi --event-log``), followed while the engine writes it: each
event handed on as it happens, so a task can say what each resource step does, and, to a view
that has a ``tick``, every tenth of a second without an event, so it can say what still runs."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Events = Callable[[dict[str, Any]], None]


@runtime_checkable
class Ticking(Protocol):
    """A view of the events that also wants to hear when none came (a step may run for minutes)."""

    def tick(self) -> None:
        """No event since the last call (called about every 0.1 s while the engine is quiet)."""


class EventFollower:
    """Reads the engine's event log while it is written and hands each event on, in a thread
    of its own; ``finish`` reads what is left once the engine has exited."""

    def __init__(self, path: Path, events: Events) -> None:
        self.path = path
        self.events = events
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="pulumi-events", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        pending = ""
        handle = None
        try:
            while True:
                finishing = self.done.is_set()
                if handle is None and self.path.exists():
                    handle = self.path.open(encoding="utf-8")
                chunk = handle.read() if handle is not None else ""
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    self._hand_on(line)
                if finishing and not chunk:
                    self._hand_on(pending)
                    return
                if not chunk:
                    if isinstance(self.events, Ticking):
                        with contextlib.suppress(Exception):  # a view must never break the run it shows
                            self.events.tick()
                    self.done.wait(0.1)
        finally:
            if handle is not None:
                handle.close()

    def _hand_on(self, line: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        with contextlib.suppress(Exception):  # a view must never break the run it shows
            self.events(event)

    def finish(self) -> None:
        """Read the rest and wait for the thread."""
        self.done.set()
        self.thread.join(30)

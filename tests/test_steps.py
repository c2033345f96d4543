"""A build step (aihow_infra/steps.py): its lines passed on, a line of its own while it is quiet,
and one line naming it when it fails."""

from __future__ import annotations

import pytest

from aihow_infra import steps
from aihow_infra.errors import ImageError
from aihow_infra.steps import run_step


def test_a_quiet_step_says_it_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "QUIET_S", 0.2)
    lines: list[str] = []
    run_step(["sh", "-c", "echo start; sleep 1; echo end"], lines.append, "go build kubelet")
    assert lines[0] == "start" and lines[-1] == "end"
    quiet = lines[1:-1]
    assert quiet and all(line.startswith("go build kubelet: still running (") for line in quiet), lines


def test_a_chatty_step_gets_no_extra_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "QUIET_S", 0.5)
    lines: list[str] = []
    run_step(["sh", "-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.1; done"], lines.append, "mmdebstrap")
    assert lines == ["1", "2", "3", "4", "5", "6"]


def test_a_failed_step_is_named_with_its_last_lines() -> None:
    with pytest.raises(ImageError) as err:
        run_step(["sh", "-c", "echo compiling; echo 'undefined: foo' ; exit 2"], lambda _l: None, "go build kubelet",
                 error=ImageError)
    assert str(err.value) == "go build kubelet failed (exit 2): compiling | undefined: foo"

"""A build step (aihow_infra/steps.py): its lines passed on, a line of its own while it is quiet,
and one line naming it when it fails."""

from __future__ import annotations

import pytest

from aihow_infra import steps
from aihow_infra.errors import ImageError
from aihow_infra.ops.converge import build_phases
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


def test_system_up_shows_an_image_builds_own_lines_and_phases_not_its_programs_chatter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``system.up`` prints of an image build: the Kubernetes build's steps and its lines
    while ``go build`` is quiet for minutes, mmdebstrap's phases; not every line its programs print."""
    monkeypatch.setattr(steps, "QUIET_S", 0.2)
    shown: list[str] = []
    say = build_phases(shown.append)
    say("[1/9] go build kubelet")
    run_step(["sh", "-c", "echo 'I: automatically chosen format: directory'; echo 'I: downloading packages...'; "
              "sleep 1; echo 'update-initramfs: Generating /boot/initrd.img'"], say, "go build kubelet")
    assert shown[:2] == ["[1/9] go build kubelet", "downloading packages..."], shown
    assert len(shown) > 2 and all(line.startswith("go build kubelet: still running (") for line in shown[2:]), shown

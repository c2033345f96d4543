"""Running the operator's tasks in-process, the way a shell runs ``aihow ARGS``: invoke's own
``Program`` over the project's collection, with the exit code it would give."""

from __future__ import annotations

import pytest
from invoke.program import Program

import tasks


def run_task(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``aihow ARGV``: its exit code, standard output and standard error."""
    capsys.readouterr()
    try:
        Program(namespace=tasks.ns, name="aihow", binary="aihow").run(["aihow", *argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err

"""Running the operator's tasks in-process, the way a shell runs ``aihow ARGS``: the project's
``Program`` over its collection, with the exit code it would give."""

from __future__ import annotations

import pytest

import tasks
from aihow_infra.cli.common import AihowProgram


def run_task(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``aihow ARGV``: its exit code, standard output and standard error."""
    capsys.readouterr()
    try:
        AihowProgram(namespace=tasks.ns, name="aihow", binary="aihow").run(["aihow", *argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err

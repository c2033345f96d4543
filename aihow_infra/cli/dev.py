"""Development: lint, type-check and test (``test``)."""

from __future__ import annotations

import os
import sys

from invoke.context import Context

from aihow_infra.cli.common import task


@task(help={"fast": "skip the end-to-end tests (real engine and libvirtd)"})
def test(c: Context, fast: bool = False) -> None:
    """Lint (ruff), type-check (mypy) and run the tests."""
    py = sys.executable
    from aihow_infra.state.layout import CHECKOUT

    with c.cd(str(CHECKOUT)):  # wherever `aihow test` runs
        c.run(f"{py} -m ruff check .", pty=False)
        c.run(f"{py} -m mypy aihow_infra providers tasks.py __main__.py", pty=False)
        marker = "-m 'not e2e'" if fast else ""
        c.run(f"{py} -m pytest -q --durations=12 {marker}", pty=False, env={"PYTHONUNBUFFERED": "1", **os.environ})

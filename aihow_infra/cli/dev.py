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
        env = {"PYTHONUNBUFFERED": "1", **os.environ}
        # The unit tier on a worker per core (0.70x its time alone on two cores, where one pytest
        # leaves 44 % idle); the end-to-end tier one test at a time: its booted guests keep
        # every core busy, and several of its tests stop libvirtd or compare the whole host.
        c.run(f"{py} -m pytest -q --durations=12 -m 'not e2e' -n {min(os.cpu_count() or 1, 4)}", pty=False, env=env)
        if not fast:
            c.run(f"{py} -m pytest -q --durations=0 --durations-min=5 -m e2e", pty=False, env=env)

"""Development: lint, type-check and test (``test``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from invoke.context import Context
from invoke.exceptions import Exit

from aihow_infra.cli.common import task

# The end-to-end tier in four pytest runs. Two lanes at once, each in a pytest of its own (alone,
# either leaves a quarter to a half of two cores idle: sampled every 15 s, 2026-12-02) on subnets
# of their own (AIHOW_TEST_LANE, tests/sandbox.py), balanced by the test times of a fresh-clone
# run (2026-12-03 04:00, lanes 21.5 and 19.1 min; 18.6 and 19.4 at 07:34): the GPU-host
# simulator's test and the operations tests (about 15-18 + 2 min), and the other short tests with
# the guest boot test and the two-host test (about 11 + 1 + 7 min: it boots a simulator of its
# own, but drives it from here; its power broker's scenario runs before more inner domains start).
# The main job runs alone: its booted clusters keep both cores busy until its SLURM scenarios
# (20-56 % idle there, one compute node booting at a time; sampled 2026-12-03) and its waits have
# deadlines. Last, the tests that stop the host's libvirtd (marker ``alone``).
_FIRST_LANE = ("tests/test_e2e_gpuhost.py", "tests/test_e2e_operations.py")
SIDE_BY_SIDE = {
    "GPU-host simulator, operations": ["-m", "e2e and not alone", *_FIRST_LANE],
    "short tests, guest boot, two hosts": ["-m", "e2e and not alone", "--ignore", "tests/test_e2e_main_job.py",
                               *(arg for path in _FIRST_LANE for arg in ("--ignore", path))],
}
MAIN_JOB = ["-m", "e2e and not alone", "tests/test_e2e_main_job.py"]
ALONE = ["-m", "e2e and alone"]


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
        # leaves 44 % idle).
        c.run(f"{py} -m pytest -q --durations=12 -m 'not e2e' -n {min(os.cpu_count() or 1, 4)}", pty=False, env=env)
        if not fast:
            end_to_end(CHECKOUT, env)


def end_to_end(checkout: Path, env: dict[str, str]) -> None:
    """The end-to-end tier as ``SIDE_BY_SIDE``, ``MAIN_JOB`` and ``ALONE`` say; each run's
    output in full, then one line per run; ``Exit`` with code 1 when any failed."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "--durations-min=5"]
    results: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="aihow-e2e-") as tmp:
        began = time.monotonic()
        running = []
        for lane, (name, args) in enumerate(SIDE_BY_SIDE.items()):
            log = open(Path(tmp) / f"lane{lane}.log", "w+")  # noqa: SIM115 (read back after the run)
            proc = subprocess.Popen([*pytest, "--basetemp", str(Path(tmp) / f"lane{lane}"), *args], cwd=checkout,
                                    env={**env, "AIHOW_TEST_LANE": str(lane)}, stdout=log,
                                    stderr=subprocess.STDOUT, text=True)
            running.append((name, proc, log))
        for name, proc, log in running:
            code = proc.wait()
            log.seek(0)
            print(f"\n===== e2e: {name} (beside the others) =====\n{log.read()}", flush=True)
            log.close()
            results.append((name, code, time.monotonic() - began))
        for name, args in (("main job", MAIN_JOB), ("tests that stop libvirtd", ALONE)):
            print(f"\n===== e2e: {name} =====", flush=True)
            began = time.monotonic()
            code = subprocess.run([*pytest, *args], cwd=checkout, env=env, check=False).returncode
            results.append((name, code, time.monotonic() - began))
    print("\n===== e2e runs =====")
    for name, code, seconds in results:
        print(f"{name}: {'passed' if code == 0 else f'FAILED (pytest exit {code})'} in {seconds / 60:.1f} min")
    if any(code != 0 for _name, code, _s in results):
        raise Exit(code=1)

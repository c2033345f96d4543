"""Development: lint, type-check and test (``test``)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from invoke.context import Context
from invoke.exceptions import Exit

from aihow_infra.cli.common import task

# The end-to-end tier in five pytest runs. Two lanes at once, each in a pytest of its own (alone,
# either leaves a quarter to a half of two cores idle: sampled every 15 s, 2026-12-02) on subnets
# of their own (AIHOW_TEST_LANE, tests/sandbox.py): the GPU-host simulator's test (about 16 min),
# and the other short tests with the guest boot test and the two-host test (it boots a simulator
# of its own, but drives it from here; its power broker's scenario runs before more inner domains
# start). Then the main job: its booted clusters keep both cores busy until its Cloud cluster is
# destroyed; from there its SLURM scenarios boot one single-vCPU compute node at a time and left
# 20-56 % of two cores idle (sampled 2026-12-03), so the test says so (a file named by
# ``SPARE_CPU_ENV``) and a third group starts beside it then: short tests that boot no guest, at
# a lower priority (``BESIDE_NICE``): at the same one, they took the lanes 2.7 min shorter but the
# SLURM phases 275 -> 448 s longer (a booting node's vCPU is their critical path), 394 s at nice 10
# (fresh clones, 2026-12-03). Last, the tests that stop the host's libvirtd (marker ``alone``).
SPARE_CPU_ENV = "AIHOW_TEST_SPARE_CPU"
BESIDE_NICE = 10  # CFS weight 110 against 1024: about a tenth of a contended core
_SIMULATOR = "tests/test_e2e_gpuhost.py"
_MAIN_JOB = "tests/test_e2e_main_job.py"
_BESIDE_SLURM = ("tests/test_e2e_operations.py", "tests/test_e2e_lifecycle.py", "tests/test_e2e_clusters.py")
SIDE_BY_SIDE = {
    "GPU-host simulator": ["-m", "e2e and not alone", _SIMULATOR],
    "short tests, guest boot, two hosts": ["-m", "e2e and not alone", *(
        arg for path in (_SIMULATOR, _MAIN_JOB, *_BESIDE_SLURM) for arg in ("--ignore", path))],
}
MAIN_JOB = ["-m", "e2e and not alone", _MAIN_JOB]
BESIDE_SLURM = ["-m", "e2e and not alone", *_BESIDE_SLURM]
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


@dataclass
class _Run:
    """A pytest run of the tier, its output kept in a log until it is printed."""

    name: str
    proc: subprocess.Popen[str]
    log: IO[str] | None
    began: float


def end_to_end(checkout: Path, env: dict[str, str]) -> None:
    """The end-to-end tier as ``SIDE_BY_SIDE``, ``MAIN_JOB`` (with ``BESIDE_SLURM`` started
    when it says a core is spare, or when it ends without saying so) and ``ALONE`` say; each
    run's output in full, then one line per run; ``Exit`` with code 1 when any failed."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "--durations-min=5"]
    results: list[tuple[str, int, float]] = []
    numbers = itertools.count()
    with tempfile.TemporaryDirectory(prefix="aihow-e2e-") as tmp:
        def start(name: str, args: list[str], lane: int | None, logged: bool = True, nice: int = 0,
                  extra_env: dict[str, str] | None = None) -> _Run:
            # Pytests at once each need a base folder of their own: each prunes the default one's old runs.
            base = Path(tmp) / f"run{next(numbers)}"
            log = open(f"{base}.log", "w+") if logged else None  # noqa: SIM115 (read back after the run)
            more = (extra_env or {}) | ({} if lane is None else {"AIHOW_TEST_LANE": str(lane)})
            proc = subprocess.Popen([*(["nice", "-n", str(nice)] if nice else []), *pytest, "--basetemp", str(base),
                                     *args], cwd=checkout, env={**env, **more},
                                    stdout=log, stderr=subprocess.STDOUT if log else None, text=True)
            return _Run(name, proc, log, time.monotonic())

        def finish(run: _Run, beside: str = "") -> None:
            code = run.proc.wait()
            if run.log is not None:
                run.log.seek(0)
                print(f"\n===== e2e: {run.name}{beside} =====\n{run.log.read()}", flush=True)
                run.log.close()
            results.append((run.name, code, time.monotonic() - run.began))

        for run in [start(name, args, lane) for lane, (name, args) in enumerate(SIDE_BY_SIDE.items())]:
            finish(run, " (beside the others)")
        print("\n===== e2e: main job =====", flush=True)
        spare = Path(tmp) / "spare-cpu"
        main = start("main job", MAIN_JOB, 0, logged=False, extra_env={SPARE_CPU_ENV: str(spare)})
        while main.proc.poll() is None and not spare.exists():
            time.sleep(2)
        beside = start("short tests beside the main job's SLURM scenarios", BESIDE_SLURM, 1, nice=BESIDE_NICE)
        finish(main)
        finish(beside)
        print("\n===== e2e: tests that stop libvirtd =====", flush=True)
        finish(start("tests that stop libvirtd", ALONE, None, logged=False))
    print("\n===== e2e runs =====")
    for name, code, seconds in results:
        print(f"{name}: {'passed' if code == 0 else f'FAILED (pytest exit {code})'} in {seconds / 60:.1f} min")
    if any(code != 0 for _name, code, _s in results):
        raise Exit(code=1)

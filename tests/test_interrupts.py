"""An operator's SIGINT, SIGTERM or SIGHUP in the phases of a task that are not an engine run (those
are in test_e2e_faults.py): a build step, a deploy (real ``ansible-playbook``, local connection),
and waits in worker threads. Each runs as a task would, in a process of its own with the signals
taken over and errors as one line (aihow_infra.cli.common.clean_errors), and is signalled alone, as ``kill`` or a
closed terminal does. Then: one line says what was cut, no traceback, and no process it started
is left."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aihow_infra.state.layout import CHECKOUT

# The task's frame: signals taken over as the tasks' operator() does, errors as clean_errors prints them.
FRAME = """
import sys
from invoke.exceptions import Exit
from aihow_infra.interrupts import RUNS
from aihow_infra.cli.common import clean_errors
RUNS.install()

@clean_errors
def main() -> None:
{body}

try:
    main()
except Exit as exc:
    sys.exit(exc.code)
"""


def start(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    script = tmp_path / "task.py"
    script.write_text(FRAME.format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    return subprocess.Popen([sys.executable, str(script)], cwd=CHECKOUT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "COLUMNS": "300", "PYTHONPATH": str(CHECKOUT)})


def marked(marker: str) -> list[int]:
    """Live processes whose command line has ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def unique_sleep() -> str:
    """A command line no other process has (one sleep of an hour and a bit)."""
    return f"sleep {3600 + secrets.randbelow(10**6) / 1000:.3f}"


def signalled(proc: subprocess.Popen[str], marker: str, sig: signal.Signals) -> str:
    """Wait until a process with ``marker`` runs, send ``sig`` to the task's process alone, and
    return what the task printed once it has exited."""
    deadline = time.monotonic() + 120
    while not marked(marker):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{marker} never started"
        time.sleep(0.1)
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    return out


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_a_build_step_is_stopped_whole(tmp_path: Path, sig: signal.Signals) -> None:
    marker = unique_sleep()
    proc = start(tmp_path, f"""
        from aihow_infra.steps import run_step
        run_step(["sh", "-c", "{marker} & {marker}; wait"], print, "the long step")
    """)
    out = signalled(proc, marker, sig)
    assert proc.returncode == 1, out
    assert f"{sig.name}: stopping the long step (signal again to stop at once)" in out
    assert "error: the long step: interrupted; the same command again goes on from where it stopped" in out
    assert "Traceback" not in out, out
    assert marked(marker) == []  # the step's background child too


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_a_deploy_says_where_it_was_cut_and_leaves_no_ansible(tmp_path: Path, sig: signal.Signals) -> None:
    marker = unique_sleep()
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"node ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    book = tmp_path / "play.yml"
    book.write_text(f"- hosts: all\n  gather_facts: false\n  tasks:\n"
                    f"    - name: a long task\n      ansible.builtin.command: {marker}\n")
    proc = start(tmp_path, f"""
        import os
        from pathlib import Path
        from aihow_infra.deploy import run_playbook
        run_playbook(Path("{book}"), "hpc", dict(os.environ), progress=print, inventory=Path("{inventory}"))
    """)
    out = signalled(proc, marker, sig)
    assert proc.returncode == 1, out
    assert f"{sig.name}: stopping ansible-playbook (signal again to stop at once)" in out
    assert "error: deploy of hpc interrupted at task 'a long task'; its VMs stay up" in out, out
    assert "`aihow deploy --stack hpc` finishes it" in out and "Traceback" not in out, out
    assert marked(marker) == [] and marked(str(book)) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_waits_in_worker_threads_end_and_the_task_exits(tmp_path: Path, sig: signal.Signals) -> None:
    """As system.up and system.down wait for both clusters at once: the main thread waits on the
    workers, each polling (a VM's readiness, a drain)."""
    ready = tmp_path / "waiting"
    proc = start(tmp_path, f"""
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path
        from aihow_infra.interrupts import RUNS

        def wait(name: str) -> None:
            Path("{ready}").touch()
            RUNS.pause(3600, f"waiting for {{name}} to be ready")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(wait, ["hpc-controller", "cloud-control-plane"]))
    """)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)  # not an hour: the workers' waits ended too
    assert proc.returncode == 130, out
    assert "interrupted: no engine was running; the same command again goes on from where this one stopped" in out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_the_power_broker_stops_cleanly_when_signalled_inside_a_pass(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal that lands while the broker reads a queue (plain code, no engine running and no
    wait) is its normal end too: exit 0, not the interrupted task's 130 (CI: the e2e broker
    signalled while it read the controller's queue)."""
    inside = tmp_path / "inside"
    proc = start(tmp_path, f"""
        import time
        from pathlib import Path
        from types import SimpleNamespace
        from aihow_infra.ops.broker import PowerBroker

        class Reading(PowerBroker):
            def views(self):
                return []

            def pass_once(self):
                Path("{inside}").touch()
                time.sleep(3600)  # as a guest-agent call is: not a RUNS.pause
                return []

        op = SimpleNamespace(progress=print, state=SimpleNamespace(broker=Path("{tmp_path}/broker.json")),
                             configured_stacks=lambda: [])
        Reading(op).serve(interval=1)
    """)
    deadline = time.monotonic() + 60
    while not inside.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "power broker: stopped; a request it was carrying out stays queued for the next broker" in out, out
    assert "Traceback" not in out, out

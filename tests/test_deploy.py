"""Deploys: the live output, the one-line failure, and when system.up deploys again.

The playbooks here run on this machine with Ansible's local connection (nothing reaches a
guest); the project's own playbooks run in the end-to-end tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from aihow_infra.deploy import ANSIBLE_DIR, DeployRecord, DeployResult, fingerprint, run_playbook
from aihow_infra.errors import DeployError

INVENTORY = "local-node ansible_connection=local ansible_python_interpreter={python}\n"


def write(tmp_path: Path, tasks: str) -> tuple[Path, Path]:
    import sys

    inventory = tmp_path / "hosts.ini"
    inventory.write_text(INVENTORY.format(python=sys.executable))
    book = tmp_path / "play.yml"
    book.write_text(f"- name: test play\n  hosts: all\n  gather_facts: false\n  tasks:\n{tasks}")
    return inventory, book


def test_live_lines_and_recap(tmp_path: Path) -> None:
    inventory, book = write(tmp_path, "    - name: say hello\n      ansible.builtin.command: echo hello\n"
                                      "    - name: nothing to do\n      ansible.builtin.debug: {msg: hi}\n")
    lines: list[str] = []
    result = run_playbook(book, "hpc", dict(os.environ), progress=lines.append, inventory=inventory)
    assert lines[0] == "PLAY test play"
    assert any(re.fullmatch(r"  changed  local-node: say hello \(\d+\.\d s\)", line) for line in lines), lines
    assert any(re.fullmatch(r"  ok       local-node: nothing to do \(\d+\.\d s\)", line) for line in lines), lines
    assert lines[-1] == "  local-node: ok=2 changed=1 failed=0 unreachable=0 skipped=0"
    assert result.changed == 1


def test_a_failure_names_host_task_and_message(tmp_path: Path) -> None:
    inventory, book = write(tmp_path, "    - name: break on purpose\n"
                                      "      ansible.builtin.fail: {msg: 'slurm_partition is undefined'}\n")
    with pytest.raises(DeployError) as err:
        run_playbook(book, "hpc", dict(os.environ), inventory=inventory)
    assert str(err.value) == ("deploy of hpc failed on local-node, task 'break on purpose': "
                              "slurm_partition is undefined")


def test_a_missing_playbook_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=r"playbook .*nope.yml does not exist"):
        run_playbook(tmp_path / "nope.yml", "hpc", dict(os.environ))


def test_fingerprint_follows_inventory_and_playbooks(tmp_path: Path) -> None:
    book = ANSIBLE_DIR / "hpc.yml"
    inventory = {"all": {"children": {"slurmd": {"hosts": {"compute-01": {"power_state": "running"}}}}}}
    first = fingerprint(inventory, book)
    assert fingerprint(inventory, book) == first
    stopped = {"all": {"children": {"stopped": {"hosts": {"compute-01": {"power_state": "shutoff"}}}}}}
    assert fingerprint(stopped, book) != first
    own = tmp_path / "site.yml"
    own.write_text("- hosts: all\n")
    mine = fingerprint(inventory, own)
    own.write_text("- hosts: all\n  tasks: []\n")
    assert fingerprint(inventory, own) != mine


def test_record_of_the_last_deploy(tmp_path: Path) -> None:
    record = DeployRecord(tmp_path / "deploy")
    assert record.last("hpc") is None
    record.save("hpc", "abc", DeployResult(seconds=1.0))
    assert record.last("hpc") == "abc"
    record.forget("hpc")
    assert record.last("hpc") is None


def test_a_long_task_says_every_quiet_period_that_it_still_runs(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The Kubernetes check waits minutes for the API server under emulation: while a task prints
    nothing, a line names it and how long it has run (every 15 s; 0.3 s here)."""
    from aihow_infra import steps

    monkeypatch.setattr(steps, "QUIET_S", 0.3)
    inventory, book = write(tmp_path, "    - name: quick\n      ansible.builtin.debug: {msg: hi}\n"
                                      "    - name: wait for the API server\n      ansible.builtin.command: sleep 2\n")
    lines: list[str] = []
    run_playbook(book, "hpc", dict(os.environ), progress=lines.append, inventory=inventory)
    waited = lines.index("TASK wait for the API server")
    quiet = [line for line in lines[waited + 1:] if "still running" in line]
    assert quiet and all(re.fullmatch(r"task 'wait for the API server': still running \(\d+ s\)", line)
                         for line in quiet), lines
    # Before the first task (Ansible's own start): the deploy's name.
    assert all(line.startswith("deploy of hpc: still running (") for line in lines[:waited] if "still" in line)

"""The one-run node converge (ansible/plugins/modules/aihow_converge.py) the playbooks use: files
written only when they differ, one-time commands, restarts of what changed, units enabled and
running, files read back, and one clear line when a step fails.

It runs here through ``ansible-playbook`` with Ansible's local connection, on files under the
test's folder, with a stand-in ``systemctl`` on PATH that records each call and keeps unit states
in a folder (this machine has no systemd)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from aihow_infra.deploy import DeployResult, run_playbook
from aihow_infra.errors import DeployError

SYSTEMCTL = """#!/bin/sh
# A stand-in systemctl: records the call, keeps enabled/active units as files; refuses to enable
# "broken", and to start or restart a unit U while the file refuse-U exists.
echo "$*" >> "$UNITS/calls"
verb=$1; shift
[ "$1" = --no-reload ] && shift
case "$verb" in
  daemon-reload) exit 0 ;;
  is-active|is-enabled)  # -- UNIT...: a state per line, as systemd's
    dir=active; yes=active; no=inactive
    [ "$verb" = is-enabled ] && { dir=enabled; yes=enabled; no=disabled; }
    shift; for u; do if [ -e "$UNITS/$dir/$u" ]; then echo $yes; else echo $no; fi; done ;;
  start|restart) for u; do [ ! -e "$UNITS/refuse-$u" ] || { echo "Job for $u.service failed" >&2; exit 1; }; done
                 mkdir -p "$UNITS/active" && for u; do touch "$UNITS/active/$u"; done ;;
  enable) for u; do [ "$u" != broken ] || { echo "unit broken.service: unknown" >&2; exit 1; }; done
          mkdir -p "$UNITS/enabled" && for u; do touch "$UNITS/enabled/$u"; done ;;
  *) echo "unknown: $verb $*" >&2; exit 1 ;;
esac
"""


class Node:
    """A folder standing for a node's root, and a playbook runner against it."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.units = tmp_path / "units"
        self.units.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        tool = bin_dir / "systemctl"
        tool.write_text(SYSTEMCTL)
        tool.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "UNITS": str(self.units)}
        self.inventory = tmp_path / "hosts.ini"
        self.inventory.write_text(f"node ansible_connection=local ansible_python_interpreter={sys.executable}\n")
        self.book = tmp_path / "play.yml"
        self.result = tmp_path / "result.json"
        self.lines: list[str] = []  # the deploy's progress lines, as an operator sees them
        self.owed = self.root / "var/lib/aihow/restarts-owed"

    def converge(self, args: dict[str, Any]) -> DeployResult:
        """One play with one ``aihow_converge`` task; its module result lands in ``self.result``."""
        args = {"restarts_owed": str(self.owed), **args}
        play = [{"name": "converge", "hosts": "all", "gather_facts": False, "tasks": [
            {"name": "converge the node", "aihow_converge": args, "register": "out"},
            {"name": "keep the result", "ansible.builtin.copy": {
                "dest": str(self.result), "content": "{{ out | to_json }}"}, "changed_when": False},
        ]}]
        self.book.write_text(json.dumps(play))
        return run_playbook(self.book, "hpc", self.env, progress=self.lines.append, inventory=self.inventory)

    def out(self) -> dict[str, Any]:
        """What the module returned last."""
        data: dict[str, Any] = json.loads(self.result.read_text())
        return data

    def calls(self) -> list[str]:
        """The systemctl calls so far, and forget them."""
        log = self.units / "calls"
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return lines


@pytest.fixture()
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_files_are_written_once_and_a_second_run_changes_nothing(node: Node) -> None:
    conf = node.root / "etc/app/app.conf"
    args = {"folders": [{"path": str(node.root / "var/lib/app"), "mode": "0700"}],
            "files": [{"dest": str(conf), "content": "port = 1\n", "mode": "0640", "restarts": ["app"]}],
            "services": ["app"]}
    first = node.converge(args)
    assert conf.read_text() == "port = 1\n" and stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert stat.S_IMODE((node.root / "var/lib/app").stat().st_mode) == 0o700
    assert node.out()["changed_files"] == [str(node.root / "var/lib/app"), str(conf)]
    # The action's check (one shell command), then the module's own steps.
    # The module: one query per kind, every unit enabled in one run without systemd's reload.
    assert node.calls() == ["is-enabled -- app", "is-active -- app",
                            "restart app", "is-enabled -- app", "enable --no-reload app"]
    assert first.recap["node"]["changed"] == 1 and "checked_only" not in node.out()

    # Nothing to change: the check finds it so, and the module does not run at all.
    again = node.converge(args)
    out = node.out()
    assert (out["changed"], out["changed_files"], out["restarted"], out["started"]) == (False, [], [], [])
    assert out["checked_only"] is True
    assert node.calls() == ["is-enabled -- app", "is-active -- app"]
    assert again.recap["node"]["changed"] == 0

    # Anything the check sees differ (content edited by hand, a unit stopped) goes to the module.
    conf.write_text("port = 2\n")
    node.converge(args)
    assert conf.read_text() == "port = 1\n" and node.out()["changed_files"] == [str(conf)]
    assert "checked_only" not in node.out()
    (node.units / "active/app").unlink()
    node.converge(args)
    assert node.out()["started"] == ["app"] and "checked_only" not in node.out()


def test_the_check_is_one_program_per_kind_whatever_the_node_and_any_difference_goes_to_the_module(
        node: Node) -> None:
    # A start of a program under emulation costs tens of milliseconds, systemctl hundreds: the
    # check of a control plane (about 40 files, 11 units) must not start one per file or unit.
    made = node.root / "var/lib/made"
    files = [node.root / f"etc/app/{n}.conf" for n in ("a", "b", "c")]
    args = {"folders": [{"path": str(node.root / "etc/app")}, {"path": str(node.root / "var/lib"), "mode": "0700"}],
            "files": [{"dest": str(files[0]), "content": "a\n"}, {"dest": str(files[1]), "content": ""},
                      {"dest": str(files[2]), "content_base64": base64.b64encode(b"\0\1").decode(), "mode": "0600"}],
            "commands": [{"run": f"touch {made}", "creates": str(made)}],
            "services": ["one", "two", "three"]}
    node.converge(args)
    node.calls()
    node.converge(args)
    assert node.out()["checked_only"] is True
    assert node.calls() == ["is-enabled -- one two three", "is-active -- one two three"]

    # One unit of three stopped, one file of three gone, a made path removed: each is the module's.
    (node.units / "active/two").unlink()
    node.converge(args)
    assert node.out()["started"] == ["two"] and "checked_only" not in node.out()
    files[1].unlink()
    node.converge(args)
    assert node.out()["changed_files"] == [str(files[1])] and files[1].read_text() == ""
    made.unlink()
    node.converge(args)
    assert node.out()["ran"] == [str(made)]
    node.converge(args)
    assert node.out()["checked_only"] is True


def _action() -> Any:
    """The action plugin's own code (it runs on the controller, beside Ansible)."""
    path = Path(__file__).resolve().parent.parent / "ansible/plugins/action/aihow_converge.py"
    spec = importlib.util.spec_from_file_location("aihow_converge_action", path)
    assert spec is not None and spec.loader is not None
    action = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(action)
    return action


def test_the_check_takes_the_unit_states_the_module_takes_as_enabled() -> None:
    action = _action()
    args = {"files": [{"dest": "/etc/x", "content": ""}], "services": ["a", "b"]}
    expected = action.expected_parts(args)
    assert expected is not None
    empty = hashlib.sha256(b"").hexdigest()
    sep = action.SECTION

    def out(enabled: str, active: str = "active\nactive", owed: str = "") -> str:
        parts = ["regular empty file root:root 644 /etc/x", f"{empty}  /etc/x", "", enabled, active, owed]
        return "".join(f"{part}\n" if part else "" for part in parts[:1]) + "".join(
            f"{sep}\n{part}\n" if part else f"{sep}\n" for part in parts[1:])

    assert action.matches(expected, out("enabled\nstatic"))
    assert not action.matches(expected, out("enabled\ndisabled"))
    assert not action.matches(expected, out("enabled"))  # a unit systemd does not know prints nothing
    assert not action.matches(expected, out("enabled\nenabled", "active\nfailed"))
    assert not action.matches(expected, out("enabled\nenabled").replace("root:root 644", "root:root 600"))
    assert not action.matches(expected, out("enabled\nenabled", owed="kubelet"))  # a restart owed: the module's


def test_a_changed_file_restarts_its_running_units_only(node: Node) -> None:
    conf = node.root / "etc/slurm/slurm.conf"
    (node.units / "active").mkdir()
    (node.units / "active/slurmctld").touch()
    text = "SlurmctldHost=controller\n"
    node.converge({"files": [{"dest": str(conf), "content": text, "restarts": ["slurmctld", "slurmd"]}]})
    # slurmd is neither running nor asked for here (a controller): rewritten, not started.
    assert node.calls() == ["is-active -- slurmctld slurmd", "restart slurmctld"]
    assert node.out()["restarted"] == ["slurmctld"]
    # The operator sees what was written and restarted (a restart under emulation costs a minute).
    assert any(line.startswith("  changed  node: converge the node (") and
               line.endswith(f"): wrote {conf}; restarted slurmctld") for line in node.lines), node.lines

    conf.chmod(0o600)  # a mode changed by hand is put back, and counts as a change
    node.converge({"files": [{"dest": str(conf), "content": text}]})
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644 and node.out()["changed_files"] == [str(conf)]


def _module() -> Any:
    """The module's own code, to call its functions with paths a test cannot write to."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ansible/plugins/modules"))
    try:
        import aihow_converge as module
    finally:
        sys.path.pop(0)
    return module


def test_new_units_are_enabled_together_and_systemd_reloads_once_before_any_restart(tmp_path: Path) -> None:
    # A control plane's first deploy: unit files under /etc/systemd/ written, none enabled yet. Each
    # `systemctl enable` reloads systemd by itself (6-9 s each under emulation): the one reload the
    # new unit files need, the restarts in their order, then one enable run without a reload.
    module = _module()
    calls: list[tuple[str, ...]] = []
    units = ["etcd", "kube-apiserver", "containerd", "kubelet"]

    def fake_systemctl(*args: str) -> Any:
        calls.append(args)
        states = {"is-enabled": "disabled", "is-active": "inactive"}
        out = "".join(f"{states[args[0]]}\n" for _ in args[2:]) if args[0] in states else ""
        return type("Done", (), {"returncode": 0, "stdout": out, "stderr": ""})()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_file", lambda spec, before_change: before_change() or True)
        patch.setattr(module, "_systemctl", fake_systemctl)
        out = module.converge({"folders": [], "commands": [], "read": [], "services": units,
                               "restarts_owed": str(tmp_path / "owed"), "files": [
                                   {"dest": f"/etc/systemd/system/{unit}.service", "restarts": [unit]}
                                   for unit in units]})
    assert calls == [("daemon-reload",), *[("restart", unit) for unit in units],
                     ("is-enabled", "--", *units), ("enable", "--no-reload", *units)]
    assert (out["restarted"], out["started"]) == (units, units)


def test_a_unit_that_cannot_be_enabled_fails_after_the_changed_units_restarted(node: Node) -> None:
    # The failed run wrote the file; the next run finds it as asked and would not restart its unit:
    # so the restart comes before the enable that fails.
    conf = node.root / "etc/app/app.conf"
    (node.units / "active").mkdir()
    (node.units / "active/app").touch()
    (node.units / "enabled").mkdir()
    (node.units / "enabled/app").touch()
    args = {"files": [{"dest": str(conf), "content": "port = 2\n", "restarts": ["app"]}], "services": ["app", "broken"]}
    with pytest.raises(DeployError, match="enabling broken: systemctl enable --no-reload broken exited 1"):
        node.converge(args)
    assert "restart app" in node.calls() and conf.read_text() == "port = 2\n"


def test_a_unit_systemd_does_not_know_is_asked_alone_and_enabled(tmp_path: Path) -> None:
    # systemd prints no is-enabled line for a unit it has no file for; the batch cannot say which.
    module = _module()
    calls: list[tuple[str, ...]] = []
    known = {"munge": "enabled", "slurmd": ""}

    def fake_systemctl(*args: str) -> Any:
        calls.append(args)
        out = "".join(f"{known[u]}\n" for u in args[2:] if known[u]) if args[0] == "is-enabled" else \
            "active\n" * len(args[2:]) if args[0] == "is-active" else ""
        return type("Done", (), {"returncode": 0, "stdout": out, "stderr": ""})()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_systemctl", fake_systemctl)
        out = module.converge({"folders": [], "commands": [], "read": [], "files": [], "services": ["munge", "slurmd"],
                               "restarts_owed": str(tmp_path / "owed")})
    assert calls == [("is-enabled", "--", "munge", "slurmd"), ("is-enabled", "--", "munge"),
                     ("is-enabled", "--", "slurmd"), ("enable", "--no-reload", "slurmd"),
                     ("is-active", "--", "munge", "slurmd")]
    assert out["started"] == ["slurmd"] and out["changed"]


def test_the_module_and_the_check_take_the_same_states_as_enabled() -> None:
    assert _action().ENABLED == _module().ENABLED


def test_commands_run_once_and_files_come_back(node: Node) -> None:
    made = node.root / "pki/ca.crt"
    args = {"commands": [{"run": f"mkdir -p {made.parent} && printf 'CA' > {made}", "creates": str(made),
                          "restarts": ["etcd"]}],
            "read": [str(made)]}
    node.converge(args)
    out = node.out()
    assert out["ran"] == [str(made)] and out["restarted"] == []  # etcd is not running here
    assert base64.b64decode(out["contents"][str(made)]) == b"CA"
    # Bytes that are not text (a munge key) travel base64-encoded, and come back the same.
    key = node.root / "etc/munge/munge.key"
    node.converge({"files": [{"dest": str(key), "content_base64": base64.b64encode(b"\xf8\x00\xff").decode(),
                              "mode": "0400"}]})
    assert key.read_bytes() == b"\xf8\x00\xff" and stat.S_IMODE(key.stat().st_mode) == 0o400
    made.write_text("kept")  # made once: never made again while it exists
    node.converge(args)
    assert node.out()["ran"] == [] and made.read_text() == "kept"


@pytest.mark.parametrize(("args", "message"), [
    ({"commands": [{"run": "echo 'kubeadm: bad config' >&2; exit 3", "creates": "/nonexistent/x"}]},
     "command for /nonexistent/x exited 3: kubeadm: bad config"),
    ({"commands": [{"run": "true", "creates": "/nonexistent/x"}]},
     "command for /nonexistent/x succeeded but did not make it"),
    ({"files": [{"dest": "/tmp/aihow-converge-test", "content": "key material\n", "owner": "no-such-user"}]},
     "owner no-such-user:root does not exist on this node"),
    ({"files": [{"dest": "/tmp/aihow-converge-test"}]},
     "/tmp/aihow-converge-test: give content (text) or content_base64 (bytes, e.g. a key), one of them"),
    ({"read": ["/nonexistent/ca.crt"]}, "reading /nonexistent/ca.crt: No such file or directory"),
    ({"services": ["broken"]},
     "enabling broken: systemctl enable --no-reload broken exited 1: unit broken.service: unknown"),
])
def test_a_failed_step_is_one_line_naming_it(node: Node, args: dict[str, Any], message: str) -> None:
    with pytest.raises(DeployError) as err:
        node.converge(args)
    assert str(err.value).startswith(f"deploy of hpc failed on node, task 'converge the node': {message}")


def test_file_content_is_never_logged(node: Node) -> None:
    secret = "munge-key-material-4711"
    conf = node.root / "etc/munge/munge.key"
    with pytest.raises(DeployError) as err:
        node.converge({"files": [{"dest": str(conf), "content": secret, "owner": "no-such-user"}]})
    assert secret not in str(err.value)
    node.converge({"files": [{"dest": str(conf), "content": secret}]})
    assert secret not in node.result.read_text()
    assert not any(secret in line for line in node.lines) and any(str(conf) in line for line in node.lines)


def test_the_module_and_the_check_read_the_same_record_of_restarts_owed() -> None:
    assert _module().SPEC["restarts_owed"]["default"] == _action().OWED


def test_a_restart_owed_by_a_run_cut_short_is_done_by_the_next(node: Node) -> None:
    """A file changed, then the run failed before its units restarted (here the first restart;
    a later file, a command, or the run killed are alike): the next run finds every file as asked,
    and still restarts them, in the order asked, once."""
    conf = node.root / "etc/app/app.conf"
    (node.units / "active").mkdir()
    for unit in ("app", "helper"):
        (node.units / "active" / unit).touch()
    (node.units / "refuse-app").touch()
    args = {"files": [{"dest": str(conf), "content": "port = 2\n", "restarts": ["app", "helper"]}]}
    with pytest.raises(DeployError, match=r"restarting app: systemctl restart app exited 1: Job for app\.service"):
        node.converge(args)
    assert conf.read_text() == "port = 2\n" and node.owed.read_text() == "app\nhelper\n"
    node.calls()

    (node.units / "refuse-app").unlink()
    node.converge(args)
    out = node.out()
    assert "checked_only" not in out and (out["changed_files"], out["restarted"]) == ([], ["app", "helper"])
    assert node.calls()[-2:] == ["restart app", "restart helper"] and not node.owed.exists()
    node.converge(args)
    assert node.out()["checked_only"] is True


def test_a_restart_owed_when_a_later_step_failed_is_done_once_that_step_works(node: Node) -> None:
    conf, made = node.root / "etc/app/app.conf", node.root / "var/lib/app/made"
    (node.units / "active").mkdir()
    (node.units / "active/app").touch()
    broken = {"files": [{"dest": str(conf), "content": "port = 3\n", "restarts": ["app"]}],
              "commands": [{"run": "exit 4", "creates": str(made), "restarts": ["other"]}]}
    with pytest.raises(DeployError, match=f"command for {made} exited 4"):
        node.converge(broken)
    assert node.owed.read_text() == "app\nother\n"
    node.calls()
    node.converge({**broken, "commands": [{"run": f"mkdir -p {made.parent} && touch {made}", "creates": str(made),
                                           "restarts": ["other"]}]})
    # "other" is neither running nor asked for: struck off unrestarted (it reads its files when it starts).
    assert node.out()["restarted"] == ["app"] and node.calls()[-1] == "restart app" and not node.owed.exists()

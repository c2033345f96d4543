"""The Operator without the engine: views of stacks whose files are bad, and the checks that
span stacks. libvirt's test driver stands in for the host (nothing is deployed there)."""

from __future__ import annotations

import socket
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from aihow_infra.errors import AihowError, StackError
from aihow_infra.lastrun import LastRuns
from aihow_infra.ops import Operator, Refused, refuse_risks
from aihow_infra.stacks import Plan, Workspace
from tests.samples import base


def project(tmp_path: Path, hpc_file: str, cloud_file: str, **cloud: str) -> Operator:
    folder = tmp_path / "project"
    folder.mkdir()
    for stack, file, extra in (("hpc", hpc_file, {}), ("cloud", cloud_file, cloud)):
        config = {"aihow:clusterFile": file, "aihow:libvirtUri": "test:///default",
                  "aihow:ledgerPath": str(tmp_path / "leases.json"), **{f"aihow:{k}": v for k, v in extra.items()}}
        (folder / f"Pulumi.{stack}.yaml").write_text(yaml.safe_dump({"config": config}))
    return Operator(Workspace(project_dir=folder, backend_url=f"file://{tmp_path / 'state'}"))


def test_a_bad_cluster_file_does_not_hide_the_other_cluster(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    bad = tmp_path / "empty.yaml"
    bad.write_text("")
    status = Operator.system_status(project(tmp_path, str(good), str(bad)))
    hpc, cloud = status.clusters
    assert (hpc.stack, hpc.status, hpc.network_state) == ("hpc", "not deployed", "missing")
    assert hpc.host == f"{socket.gethostname()} (test:///default)"  # the libvirt host it is placed on
    assert {vm.state for vm in hpc.vms} == {"undefined"}
    assert (cloud.stack, cloud.status) == ("cloud", "unreadable")
    assert cloud.error == f"invalid cluster file {bad}: (top level): the file is empty; allowed: a YAML mapping " \
                          "with 'clusters'"


def test_every_stack_must_name_the_same_ledger(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    op = project(tmp_path, str(good), str(good), ledgerPath="/srv/other-leases.json")
    with pytest.raises(AihowError, match=r"aihow:ledgerPath: '.*leases.json' \(stack hpc\) differs from "
                                         r"'/srv/other-leases.json' \(stack cloud\); allowed: one ledger"):
        op.view("hpc")


def test_a_task_parses_each_cluster_file_once_and_again_only_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """view() is called from every part of a task; the parse and validation happen once, while
    an edited file (as tests and operators make between calls) is read again."""
    import aihow_infra.ops.project as project_module

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    op = project(tmp_path, str(good), str(good))
    loads: list[Path] = []
    real = project_module.load_cluster_file
    monkeypatch.setattr(project_module, "load_cluster_file",
                        lambda path, **kw: loads.append(Path(path)) or real(path, **kw))
    first = [op.view("hpc") for _ in range(3)]
    assert len(loads) == 1 and first[0].plan is first[2].plan
    data = base()
    data["clusters"]["hpc"]["compute_nodes"][0]["memory_gb"] = 3
    good.write_text(yaml.safe_dump(data))
    changed = op.view("hpc")
    assert len(loads) == 2 and changed.plan is not first[0].plan
    assert (first[0].plan.vms[1].memory_gb, changed.plan.vms[1].memory_gb) == (2, 3)
    monkeypatch.setenv("AIHOW_TEST_UNRELATED", "1")  # a ${VAR} could now read differently
    op.view("hpc")
    assert len(loads) == 3


@pytest.mark.parametrize("force", [False, True])
def test_a_forced_stop_powers_off_without_draining_and_a_stop_drains_then_shuts_down(
        tmp_path: Path, force: bool) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    op = project(tmp_path, str(good), str(good))
    lines: list[str] = []
    drained: list[str] = []
    applied: list[dict[str, str]] = []
    op.progress = lines.append
    op._drain = lambda view, vms: drained.extend(vm.name for vm in vms)  # type: ignore[method-assign]
    op._apply_power = lambda view, changes: applied.append(changes)  # type: ignore[method-assign]
    name = op.view("hpc").plan.vms[1].name
    op.vm_stop(name, force=force)
    assert applied == [{name: "stopped"}]
    assert drained == ([] if force else [name])
    said = " ".join(lines)
    assert ("powering off" in said, "shutting down" in said) == (force, not force)


def test_vm_start_refuses_a_device_held_open_before_any_engine_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The early check of vm.start (the domain provider checks again at the start itself): one
    line naming the holder, and nothing ran, no lease taken."""
    import aihow_infra.ops.lifecycle as lifecycle
    from aihow_infra.errors import CustodyError
    from aihow_infra.gpu.ledger import Ledger
    from aihow_infra.host import Host
    from tests.test_custody import hold, ready_host

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    op = project(tmp_path, str(good), str(good))
    root = ready_host(tmp_path / "r").root
    monkeypatch.setattr(lifecycle, "local_host", lambda uri: Host(root))
    op.ensure_images = lambda views: pytest.fail("an engine run was prepared")  # type: ignore[method-assign]
    name = op.view("hpc").plan.vms[1].name
    started: list[typing.Any] = []
    try:
        holder = hold(started, root / "dev/vfio/14")
        with pytest.raises(CustodyError, match=rf"device 0000:01:00.0 is held open on the host: pid {holder.pid}"):
            op.vm_start(name)
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert Ledger(str(tmp_path / "leases.json")).leases() == {}


def test_vm_restart_names_a_device_without_a_reset_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel cannot reset the audio function between the two boots: the VM gets it back as
    it left it, and the restart says so before it starts."""
    import libvirt

    import aihow_infra.ops.lifecycle as lifecycle
    from aihow_infra.host import Host
    from tests.test_custody import AUDIO, GPU, ready_host

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    op = project(tmp_path, str(good), str(good))
    root = ready_host(tmp_path / "r").root
    (root / "sys/bus/pci/devices" / GPU / "reset_method").write_text("flr\n")
    monkeypatch.setattr(lifecycle, "local_host", lambda uri: Host(root))
    name = op.view("hpc").plan.vms[1].name
    conn = libvirt.open("test:///default")  # the test driver's state is shared by its connections
    dom = conn.defineXML(f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>"
                         "</domain>")
    try:
        dom.create()
        said: list[str] = []
        op.progress = said.append
        op.vm_restart(name)
        assert dom.isActive()
        warned = [line for line in said if line.startswith("warning:")]
        assert warned == [f"warning: device {AUDIO} has no reset method: {name} gets it back as it left it (a GPU "
                          "may hang until the host reboots; `aihow host.check` says what helps)"]
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()


def test_refusing_risks_never_returns() -> None:
    with pytest.raises(Refused, match=r"1 planned change\(s\) delete data or interrupt a guest, first: x; "
                                      r"nothing was changed"):
        refuse_risks(["x"])  # type: ignore[list-item]
    assert typing.get_type_hints(refuse_risks)["return"] is typing.NoReturn


class FakeEngine(Workspace):
    """A workspace whose engine is a script: ``up`` fails as often as told, and every call is
    kept; the stack holds one resource, and a preview plans what it is given."""

    def __init__(self, project_dir: Path, failures: int, steps: list[dict[str, Any]]) -> None:
        super().__init__(project_dir=project_dir, backend_url="file:///nonexistent")
        self.failures, self.steps, self.calls = failures, steps, []  # type: list[tuple[str, ...]]

    def urns(self, stack: str) -> set[str]:
        return {f"urn:pulumi:{stack}::aihow::aihow:libvirt:HpcCluster::cluster"}

    def preview_plan(self, stack: str) -> Plan:
        self.calls.append(("preview", stack))
        return Plan(self.steps, [])

    def up(self, stack: str, extra: Sequence[str] = (), events: Any = None) -> str:
        self.calls.append(("up", stack, *extra))
        if self.failures:
            self.failures -= 1
            raise StackError(f"pulumi up -s {stack}: the domain failed to start")
        return ""


def engine_operator(tmp_path: Path, failures: int, steps: list[dict[str, Any]] | None = None,
                    confirm: Any = refuse_risks) -> tuple[Operator, FakeEngine, list[str]]:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    folder = project(tmp_path, str(good), str(good)).workspace.project_dir
    (folder / "Pulumi.yaml").write_text("name: aihow\nruntime: python\n")
    engine = FakeEngine(folder, failures, steps or [])
    lines: list[str] = []
    return Operator(engine, progress=lines.append, confirm=confirm), engine, lines


def test_a_failed_run_puts_the_power_records_back_and_the_stack_with_them(tmp_path: Path) -> None:
    op, engine, lines = engine_operator(tmp_path, failures=1)
    name = op.view("hpc").plan.vms[1].name
    before = op.records("hpc").read()
    with pytest.raises(StackError, match="the domain failed to start"):
        op._apply_power(op.view("hpc"), {name: "stopped"})
    assert op.records("hpc").read() == before
    assert engine.calls == [("preview", "hpc"), ("up", "hpc"), ("up", "hpc", "--continue-on-error")]
    assert any(line.startswith("hpc: putting the power states back") for line in lines)


def test_a_refused_change_runs_nothing_and_changes_no_record(tmp_path: Path) -> None:
    replace_disk = {"op": "replace", "urn": "urn:pulumi:hpc::aihow::aihow:libvirt:Volume::compute-01-disk",
                    "oldState": {"type": "pulumi-python:dynamic:Resource"}, "newState": {}}
    op, engine, _lines = engine_operator(tmp_path, failures=0, steps=[replace_disk])
    name = op.view("hpc").plan.vms[1].name
    before = op.records("hpc").read()
    with pytest.raises(Refused):
        op._apply_power(op.view("hpc"), {name: "stopped"})
    assert op.records("hpc").read() == before and engine.calls == [("preview", "hpc")]


def test_a_good_run_keeps_the_new_records(tmp_path: Path) -> None:
    op, engine, _lines = engine_operator(tmp_path, failures=0)
    name = op.view("hpc").plan.vms[1].name
    op._apply_power(op.view("hpc"), {name: "stopped"})
    assert op.records("hpc").read().vms == {name: "stopped"}
    assert engine.calls == [("preview", "hpc"), ("up", "hpc")]


def test_a_power_change_to_a_stack_as_its_last_run_left_it_runs_no_preview_and_no_refresh(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    replace_disk = {"op": "replace", "urn": "urn:pulumi:hpc::aihow::aihow:libvirt:Volume::compute-01-disk",
                    "oldState": {"type": "pulumi-python:dynamic:Resource"}, "newState": {}}
    op, engine, lines = engine_operator(tmp_path, failures=0, steps=[replace_disk])
    name = op.view("hpc").plan.vms[1].name
    last_run = op.workspace.state_stamp("hpc")  # the stamp (state and power records) of the last good run
    monkeypatch.setattr(LastRuns, "changes",
                        lambda _self, stack, stamp, settled=False: [] if stamp == last_run else ["its files changed"])
    op._apply_power(op.view("hpc"), {name: "stopped"})
    assert engine.calls == [("up", "hpc", "--refresh=false")] and op.records("hpc").read().vms == {name: "stopped"}
    assert "hpc: only its power records change (the rest is as the last run left it; libvirt agrees): no " \
           "preview, no refresh" in lines
    # Anything else changed since (here the records this run wrote): the gate previews, and its
    # plan (a disk made anew) is refused before any engine run.
    engine.calls.clear()
    with pytest.raises(Refused):
        op._apply_power(op.view("hpc"), {name: "running"})
    assert engine.calls == [("preview", "hpc")] and op.records("hpc").read().vms == {name: "stopped"}


def test_a_vm_is_found_by_its_short_name_when_one_vm_has_it(tmp_path: Path) -> None:
    """The inventory and the deploy lines name nodes ``compute-01``; the VM tasks take that too
    when it names one VM of the configured stacks."""
    default = str(Path(__file__).resolve().parents[1] / "config" / "default.yaml")
    op = project(tmp_path, default, default)
    assert op.vm_name("aihow-hpc-compute-01") == op.vm_name("compute-01") == "aihow-hpc-compute-01"
    assert op.vm_name("control-plane") == "aihow-cloud-control-plane"
    with pytest.raises(AihowError, match=r"^no VM named 'compute-09'; allowed: aihow-hpc-controller, .* \(or the "):
        op.vm_name("compute-09")
    other = tmp_path / "lab-b.yaml"  # a second SLURM cluster, in the second stack
    data = yaml.safe_load(Path(default).read_text())
    data["clusters"]["hpc"] |= {"name": "lab-b", "network": {**data["clusters"]["hpc"]["network"],
                                                             "subnet": "10.213.30.0/24", "bridge": "lab-b0"}}
    other.write_text(yaml.safe_dump(data).replace("10.213.10.", "10.213.30."))
    (tmp_path / "b").mkdir()
    both = project(tmp_path / "b", default, str(other), cluster="hpc")
    with pytest.raises(AihowError, match=r"fits 2 VMs; allowed: one of aihow-hpc-compute-01, lab-b-compute-01$"):
        both.vm_name("compute-01")
    assert both.vm_name("lab-b-compute-01") == "lab-b-compute-01"


def test_a_deploy_is_due_once_what_a_deployed_cluster_was_told_changed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``up`` changes VMs only (a node's new address): it says when SLURM or Kubernetes still run
    on what the last deploy told them."""
    from aihow_infra.deploy import DeployResult, fingerprint, project_playbook

    default = str(Path(__file__).resolve().parents[1] / "config" / "default.yaml")
    op = project(tmp_path, default, default)
    inventory: dict[str, Any] = {"all": {"hosts": {"compute-02": {"ansible_host": "10.213.10.12"}}}}
    monkeypatch.setattr(Operator, "inventory", lambda _self, _stack: inventory)
    assert not op.deploy_due("hpc")  # never deployed: `aihow deploy` or system.up's own
    book = project_playbook("hpc")
    assert book is not None
    op.deploys.save("hpc", fingerprint(inventory, book), DeployResult(seconds=1.0))
    assert not op.deploy_due("hpc")
    inventory["all"]["hosts"]["compute-02"]["ansible_host"] = "10.213.10.22"
    assert op.deploy_due("hpc")

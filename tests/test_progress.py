"""Engine events into the operator's lines: what counts, what is shown, how it is summed up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aihow_infra import progress
from aihow_infra.eventlog import EventFollower
from aihow_infra.progress import EngineProgress, describe

NODE = "urn:pulumi:hpc::aihow::aihow:libvirt:HpcCluster$aihow:libvirt:Node$pulumi-python:dynamic/libvirt:"


def pre(op: str, urn: str) -> dict[str, object]:
    return {"resourcePreEvent": {"metadata": {"op": op, "urn": urn}}}


def done(op: str, urn: str) -> dict[str, object]:
    return {"resOutputsEvent": {"metadata": {"op": op, "urn": urn}}}


def test_resources_are_named_as_the_operator_knows_them() -> None:
    assert describe(NODE + "Domain::compute-01-domain") == "VM compute-01"
    assert describe(NODE + "Volume::compute-01-disk") == "disk of compute-01"
    assert describe(NODE + "Seed::compute-01-seed") == "seed of compute-01"
    assert describe(NODE + "GpuLease::compute-01-lease-0000-41-00") == "GPU lease of compute-01"
    cluster = "urn:pulumi:hpc::aihow::aihow:libvirt:HpcCluster$pulumi-python:dynamic/libvirt:"
    assert describe(cluster + "Network::network") == "network"
    # A cluster spread over hosts: each other host's network, pool and images say their host.
    assert describe(cluster + "Network::network-sim") == "network on sim"
    assert describe(cluster + "StoragePool::pool-gpu-2") == "storage pool on gpu-2"
    assert describe(cluster + "HostImage::image-hpc") == "image hpc"
    assert describe(cluster + "HostImage::image-base-sim") == "image base on sim"
    assert describe("urn:pulumi:hpc::aihow::aihow:libvirt:HpcCluster::hpc") is None
    assert describe("urn:pulumi:hpc::aihow::pulumi:pulumi:Stack::aihow-hpc") is None


def test_each_step_is_said_when_it_starts_and_ends_and_the_run_is_summed_up() -> None:
    lines: list[str] = []
    ticks = iter([0.0, 0.0, 42.4, 43.0, 44.2])
    seen = EngineProgress("cloud", lines.append, clock=lambda: next(ticks))
    domain, disk = NODE + "Domain::gpu-worker-01-domain", NODE + "Volume::gpu-worker-01-disk"
    for event in (pre("refresh", domain), pre("same", disk), pre("replace", domain), pre("create-replacement", domain),
                  done("create-replacement", domain), pre("delete-replaced", domain), done("delete-replaced", domain),
                  {"diagnosticEvent": {"severity": "debug", "message": "noise"}}):
        seen(event)
    assert lines == ["cloud: replacing VM gpu-worker-01",
                     "cloud: creating the replacement of VM gpu-worker-01",
                     "cloud: created the replacement of VM gpu-worker-01 (42 s)",
                     "cloud: deleting the replaced VM gpu-worker-01",
                     "cloud: deleted the replaced VM gpu-worker-01 (1 s)"]
    assert seen.summary == "1 replaced, 1 unchanged"


def test_nothing_changed_and_failures_are_said_plainly() -> None:
    lines: list[str] = []
    seen = EngineProgress("hpc", lines.append)
    seen(pre("same", NODE + "Domain::controller-domain"))
    assert (seen.summary, lines) == ("no changes", [])
    seen(pre("update", NODE + "Domain::controller-domain"))
    seen({"resOpFailedEvent": {"metadata": {"op": "update", "urn": NODE + "Domain::controller-domain"}}})
    assert lines[-1] == "hpc: VM controller failed"
    assert seen.summary == "1 updated, 1 unchanged; failed: VM controller"


def test_a_preview_lists_each_step_and_what_of_it_stops_a_guest() -> None:
    from aihow_infra.ops import planned_changes
    from aihow_infra.stacks import Plan

    steps = [
        {"op": "same", "urn": NODE + "Volume::controller-disk"},
        {"op": "update", "urn": NODE + "Domain::controller-domain",
         "oldState": {"outputs": {"name": "c-controller", "vcpus": 1, "running": True}},
         "newState": {"inputs": {"name": "c-controller", "vcpus": 2, "running": True}}},
        {"op": "create", "urn": NODE + "Volume::compute-02-disk"},
        {"op": "create", "urn": NODE + "Domain::compute-02-domain"},
    ]
    assert planned_changes("hpc", Plan(steps, [])).splitlines() == [
        "hpc: 1 to update, 2 to create",
        "  update VM controller",
        "  create disk of compute-02",
        "  create VM compute-02",
        "  of these, the ones that lose data or interrupt a guest (`up` asks first):",
        "    - VM c-controller: restarted to apply vcpus",
    ]
    assert planned_changes("hpc", Plan(steps[:1], [])) == "hpc: no changes"


def test_steps_that_run_long_are_said_every_quiet_period_while_nothing_else_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """VMs boot under software emulation for minutes inside their create step: while the engine
    says nothing, a line every QUIET_S (15 s here) names what still runs and for how long."""
    monkeypatch.setattr(progress, "QUIET_S", 15.0)
    lines: list[str] = []
    now = [100.0]
    seen = EngineProgress("hpc", lines.append, clock=lambda: now[0])
    seen.tick()  # the engine starts: nothing runs yet, nothing to say
    controller, compute = NODE + "Domain::controller-domain", NODE + "Domain::compute-01-domain"
    seen(pre("create", controller))
    now[0] = 101.0
    seen(pre("create", compute))
    seen(pre("delete", NODE + "Volume::old-disk"))
    for moment in (110.0, 115.9):
        now[0] = moment
        seen.tick()
    assert lines[-1] == "hpc: deleting disk of old"  # the last line is 14.9 s old: nothing more yet
    now[0] = 116.0
    seen.tick()
    assert lines[-1] == "hpc: still creating VM controller (16 s), VM compute-01 (15 s), deleting disk of old (15 s)"
    seen(done("delete", NODE + "Volume::old-disk"))
    now[0] = 130.0
    seen.tick()  # the delete's end was said at 116 s
    assert lines[-1] == "hpc: deleted disk of old (15 s)"
    now[0] = 131.0
    seen.tick()
    assert lines[-1] == "hpc: still creating VM controller (31 s), VM compute-01 (30 s)"
    seen(done("create", controller))
    seen(done("create", compute))
    now[0] = 200.0
    seen.tick()  # nothing runs: nothing to say
    assert lines[-1] == "hpc: created VM compute-01 (30 s)"


def test_the_event_log_follower_ticks_a_view_that_wants_it_while_the_engine_is_quiet(tmp_path: Path) -> None:
    class View:
        def __init__(self) -> None:
            self.events: list[dict[str, object]] = []
            self.ticks = 0

        def __call__(self, event: dict[str, object]) -> None:
            self.events.append(event)

        def tick(self) -> None:
            self.ticks += 1

    log, view = tmp_path / "events.jsonl", View()
    log.write_text('{"resourcePreEvent": {}}\n')
    follower = EventFollower(log, view)
    time.sleep(0.5)
    follower.finish()
    assert view.events == [{"resourcePreEvent": {}}] and view.ticks >= 2
    plain: list[dict[str, object]] = []
    follower = EventFollower(log, plain.append)  # a plain function is only given the events
    follower.finish()
    assert plain == [{"resourcePreEvent": {}}]

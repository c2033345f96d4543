"""The Operator without the engine: views of stacks whose files are bad, and the checks that
span stacks. libvirt's test driver stands in for the host (nothing is deployed there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aihow_infra.errors import AihowError
from aihow_infra.operations import Operator
from aihow_infra.stacks import Workspace
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

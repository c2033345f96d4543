"""ansible/roles/cluster_ready/files/cluster-ready.py, the control plane's one check of the whole cluster, against a
fake kubectl that keeps the cluster's objects in a JSON file and logs every call: what it makes
on a new cluster, and that a cluster with nothing to change costs two reads (/readyz, then
everything else in one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "ansible" / "roles" / "cluster_ready" / "files" / "cluster-ready.py"

FAKE_KUBECTL = r'''#!PYTHON
import json, os, sys
state_path = os.environ["FAKE_STATE"]
state = json.load(open(state_path))
args = [a for a in sys.argv[1:] if not a.startswith("--kubeconfig") and not a.endswith(".conf")]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\n")
while args and args[0] == "--namespace":
    args = args[2:]
verb, rest = args[0], args[1:]
if verb == "get" and rest[:2] == ["--raw", "/readyz"]:
    print("ok")
elif verb == "get":
    names = [a for a in rest if "/" in a]
    items = [state[n] for n in names if n in state]
    print(json.dumps({"kind": "List", "items": items}))
elif verb == "create":
    kind, name = rest[0], rest[1]
    key = f"{kind}/{name}"
    if key in state:
        sys.exit("AlreadyExists")
    state[key] = {"kind": {"clusterrolebinding": "ClusterRoleBinding"}.get(kind, "ServiceAccount"),
                  "metadata": {"name": name}}
elif verb == "label":
    node = state[f"node/{rest[1]}"]
    for label in rest[3:]:
        key, _, value = label.partition("=")
        node["metadata"].setdefault("labels", {})[key] = value
elif verb == "uncordon":
    for name in rest:
        state[f"node/{name}"]["spec"].pop("unschedulable", None)
json.dump(state, open(state_path, "w"))
'''


def node(name: str, ready: bool = True, cordoned: bool = False, **labels: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": True} if cordoned else {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def ready_check(tmp_path: Path, state: dict[str, Any], *args: str) -> tuple[str, list[str], dict[str, Any]]:
    """Run the script with the fake kubectl over ``state``: its output, the kubectl calls, the state after."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable))
    kubectl.chmod(0o755)
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "log").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(tmp_path / "state.json"),
           "FAKE_LOG": str(tmp_path / "log")}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=True)
    return done.stdout, (tmp_path / "log").read_text().splitlines(), json.loads((tmp_path / "state.json").read_text())


ARGS = ("cp=node-role.kubernetes.io/control-plane=", "w1=node-role.kubernetes.io/worker=,aihow.dev/gpu=nvidia_2330")


def test_a_new_cluster_gets_its_bindings_service_account_and_labels(tmp_path: Path) -> None:
    out, calls, state = ready_check(tmp_path, {"node/cp": node("cp"), "node/w1": node("w1")}, *ARGS)
    assert out.strip() == "changed=1"
    assert {"clusterrolebinding/kubeadm:cluster-admins", "clusterrolebinding/aihow:kube-proxy",
            "serviceaccount/default"} <= set(state)
    assert state["node/w1"]["metadata"]["labels"] == {"node-role.kubernetes.io/worker": "",
                                                      "aihow.dev/gpu": "nvidia_2330"}
    assert not any(c.startswith("uncordon") for c in calls)


def test_a_cluster_with_nothing_to_change_costs_two_reads(tmp_path: Path) -> None:
    _out, _calls, state = ready_check(tmp_path, {"node/cp": node("cp"), "node/w1": node("w1")}, *ARGS)
    out, calls, _state = ready_check(tmp_path, state, *ARGS)
    assert out.strip() == "changed=0"
    assert calls[0] == "get --raw /readyz" and len(calls) == 2 and " get " in calls[1]


def test_a_node_the_project_cordoned_goes_back_into_scheduling(tmp_path: Path) -> None:
    _out, _calls, state = ready_check(tmp_path, {"node/cp": node("cp"), "node/w1": node("w1")}, *ARGS)
    state["node/w1"]["spec"]["unschedulable"] = True
    out, calls, after = ready_check(tmp_path, state, *ARGS)
    assert out.strip() == "changed=1" and "uncordon w1" in calls
    assert "unschedulable" not in after["node/w1"]["spec"]

"""ansible/roles/cluster_ready/files/cluster-ready.py, the control plane's one check of the whole cluster:
its reads go to a fake API server (tests/fakeapi.py: HTTPS on 127.0.0.1, client certificates
required), its changes to a fake kubectl; both keep the cluster's objects in one JSON file and
log every call. What it makes on a new cluster, that it waits while the API server is not
ready, and that a cluster with nothing to change costs no kubectl run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fakeapi import fake_api
from tests.samples import node

SCRIPT = Path(__file__).resolve().parents[1] / "ansible" / "roles" / "cluster_ready" / "files" / "cluster-ready.py"

FAKE_KUBECTL = r'''#!PYTHON
import json, os, sys
state_path = os.environ["FAKE_STATE"]
state = json.load(open(state_path))
args = [a for a in sys.argv[1:] if not a.startswith("--kubeconfig") and not a.endswith(".conf")]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("kubectl " + " ".join(args) + "\n")
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


@contextlib.contextmanager
def fake_cluster(tmp_path: Path, unready: int = 0) -> Iterator[dict[str, str]]:
    """The fake API server (tests/fakeapi.py; its first ``unready`` answers to /readyz 503) and
    kubectl over ``tmp_path/state.json``; the script's environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable))
    kubectl.chmod(0o755)
    with fake_api(tmp_path, unready) as kubeconfig:
        yield {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBECONFIG": str(kubeconfig),
               "FAKE_STATE": str(tmp_path / "state.json"), "FAKE_LOG": str(tmp_path / "log")}


def ready_check(tmp_path: Path, state: dict[str, Any], *args: str) -> tuple[str, list[str], dict[str, Any]]:
    """Run the script against ``state``: its output, the calls (``GET PATH as CLIENT`` and
    ``kubectl ARGS``), the state after."""
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "log").write_text("")
    with fake_cluster(tmp_path) as env:
        done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                              check=False, timeout=120)
    assert done.returncode == 0, done.stderr
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


def test_a_cluster_with_nothing_to_change_runs_no_kubectl(tmp_path: Path) -> None:
    _out, _calls, state = ready_check(tmp_path, {"node/cp": node("cp"), "node/w1": node("w1")}, *ARGS)
    out, calls, _state = ready_check(tmp_path, state, *ARGS)
    assert out.strip() == "changed=0"
    assert calls == ["GET /readyz as kubernetes-super-admin",
                     "GET /apis/rbac.authorization.k8s.io/v1/clusterrolebindings/kubeadm:cluster-admins as "
                     "kubernetes-super-admin",
                     "GET /apis/rbac.authorization.k8s.io/v1/clusterrolebindings/aihow:kube-proxy as "
                     "kubernetes-super-admin",
                     "GET /api/v1/namespaces/default/serviceaccounts/default as kubernetes-super-admin",
                     "GET /api/v1/nodes as kubernetes-super-admin"]


def test_it_waits_while_the_api_server_is_not_ready_then_for_every_node(tmp_path: Path) -> None:
    state = {"node/cp": node("cp"), "node/w1": node("w1", ready=False)}
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "log").write_text("")
    with fake_cluster(tmp_path, unready=2) as env:
        script = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS], stdout=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 60
            while "GET /api/v1/nodes" not in (tmp_path / "log").read_text():
                assert script.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            assert script.poll() is None  # w1 not Ready: it waits
            now = json.loads((tmp_path / "state.json").read_text())
            now["node/w1"] = node("w1")
            (tmp_path / "state.new").write_text(json.dumps(now))
            (tmp_path / "state.new").replace(tmp_path / "state.json")  # whole, for the server reading it
            out, _err = script.communicate(timeout=60)
        finally:
            script.kill()
    calls = (tmp_path / "log").read_text().splitlines()
    assert out.strip() == "changed=1"
    # Two answers 503, then ready: the objects read; w1 not Ready, read again until it is.
    assert calls[:3] == ["GET /readyz as kubernetes-super-admin"] * 3
    assert calls[3].startswith("GET /apis/rbac.authorization.k8s.io/") and calls.count(calls[0]) >= 4


def test_a_node_the_project_cordoned_goes_back_into_scheduling(tmp_path: Path) -> None:
    _out, _calls, state = ready_check(tmp_path, {"node/cp": node("cp"), "node/w1": node("w1")}, *ARGS)
    state["node/w1"]["spec"]["unschedulable"] = True
    out, calls, after = ready_check(tmp_path, state, *ARGS)
    assert out.strip() == "changed=1" and "kubectl uncordon w1" in calls
    assert "unschedulable" not in after["node/w1"]["spec"]

"""ansible/roles/cluster_ready/files/cluster-ready.py, the control plane's one check of the whole cluster:
its reads go to a fake API server (HTTPS on 127.0.0.1, certificates and the super admin's
kubeconfig made by aihow_infra/kubepki.py, client certificates required), its changes to a fake
kubectl; both keep the cluster's objects in one JSON file and log every call. What it makes on a
new cluster, that it waits while the API server is not ready, and that a cluster with nothing to
change costs no kubectl run."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from aihow_infra import kubepki

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


def node(name: str, ready: bool = True, cordoned: bool = False, **labels: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": True} if cordoned else {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeApi(BaseHTTPRequestHandler):
    """The reads cluster-ready.py makes, answered from the state file (which only the fake
    kubectl and the test write); ``unready`` counts the /readyz answers still to fail."""

    protocol_version = "HTTP/1.1"  # one kept connection, as the script uses it
    state: Path
    log: Path
    unready = 0

    def do_GET(self) -> None:
        state = json.loads(self.state.read_text())
        client = dict(x[0] for x in self.request.getpeercert()["subject"])["commonName"]
        with self.log.open("a") as log:
            log.write(f"GET {self.path} as {client}\n")
        status, body = 404, {}
        if self.path == "/readyz":
            status, body = (503, {}) if FakeApi.unready else (200, {})
            FakeApi.unready = max(0, FakeApi.unready - 1)
        elif self.path == "/api/v1/nodes":
            status, body = 200, {"kind": "NodeList", "items": [v for k, v in state.items() if k.startswith("node/")]}
        else:
            kind, name = self.path.rsplit("/", 2)[-2:]
            key = f"{kind.removesuffix('s')}/{name}"
            if key in state:
                status, body = 200, state[key]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the calls go to the log file."""


@contextlib.contextmanager
def fake_cluster(tmp_path: Path, unready: int = 0) -> Iterator[dict[str, str]]:
    """The fake API server (its first ``unready`` answers to /readyz 503) and kubectl over
    ``tmp_path/state.json``; the script's environment."""
    made = kubepki.ensure(tmp_path / "pki", kubepki.Cluster("test", "cp", "127.0.0.1", "10.96.0.0/12"))
    for name in ("ca.crt", "apiserver.crt", "apiserver.key"):
        (tmp_path / name).write_text(made.files[f"pki/{name}"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(tmp_path / "apiserver.crt", tmp_path / "apiserver.key")
    FakeApi.unready = unready
    handler = type("Api", (FakeApi,), {"state": tmp_path / "state.json", "log": tmp_path / "log"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    config = yaml.safe_load(made.files["super-admin.conf"])
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "super-admin.conf").write_text(yaml.safe_dump(config))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable))
    kubectl.chmod(0o755)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "KUBECONFIG": str(tmp_path / "super-admin.conf"),
               "FAKE_STATE": str(tmp_path / "state.json"), "FAKE_LOG": str(tmp_path / "log")}
    finally:
        server.shutdown()
        server.server_close()


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

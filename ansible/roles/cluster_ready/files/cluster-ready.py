#!/usr/bin/python3
"""On the control plane, after every node converged: the RBAC kubeadm init would add, the
default service account (pods cannot be made before it), every running node registered and Ready,
role labels (a kubelet may not set node-role labels on itself), and every node back in
scheduling (a node the project stopped was drained and cordoned first). Prints changed=1 when it
changed anything.

    cluster-ready.py NODE=LABEL[,LABEL...] ...     (a LABEL is KEY=VALUE; VALUE may be empty)

Under software emulation a kubectl run costs the control plane about a second of CPU, nearly all
of it kubectl's own start, and this check used to poll with two every 3 s while the API server
came up, on the very vCPUs it waits for. It reads with plain HTTPS GETs from this one process
instead (the address, authority and embedded client certificate of the super admin's kubeconfig,
its first cluster and user, as the project writes it; ``KUBECONFIG`` may name another such file), and
runs kubectl only for what it changes: a cluster with nothing to change costs no kubectl run.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any

import yaml

KUBECONFIG = os.environ.get("KUBECONFIG", "/etc/kubernetes/super-admin.conf")
KUBECTL = ["kubectl", "--kubeconfig", KUBECONFIG]
BINDINGS = {"kubeadm:cluster-admins": ["--clusterrole=cluster-admin", "--group=kubeadm:cluster-admins"],
            "aihow:kube-proxy": ["--clusterrole=system:node-proxier", "--user=system:kube-proxy"]}
TIMEOUT_SECONDS = 450
POLL_SECONDS = 2


class Unanswered(Exception):
    """The API server did not give an answer (yet): why, in a few words."""


class Api:
    """GETs to the API server the kubeconfig names, as the client it names, over one kept
    connection (opened again after a failure)."""

    def __init__(self, kubeconfig: str) -> None:
        with open(kubeconfig) as f:
            config = yaml.safe_load(f)
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        server = urllib.parse.urlsplit(cluster["server"])
        self.host, self.port = server.hostname or "", server.port or 443
        self.context = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        with tempfile.TemporaryDirectory() as folder:  # the ssl module loads a client's key from files only
            paths = []
            for field in ("client-certificate-data", "client-key-data"):
                path = os.path.join(folder, field)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as out:
                    out.write(base64.b64decode(user[field]))
                paths.append(path)
            self.context.load_cert_chain(*paths)
        self.connection: http.client.HTTPSConnection | None = None

    def get(self, path: str) -> tuple[int, bytes]:
        """The status and body of ``GET path``; ``Unanswered`` when there is none."""
        if self.connection is None:
            self.connection = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=30)
        try:
            self.connection.request("GET", path, headers={"Accept": "application/json"})
            answer = self.connection.getresponse()
            return answer.status, answer.read()
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()
            self.connection = None
            raise Unanswered(str(exc) or type(exc).__name__) from None

    def read(self, path: str) -> Any:
        """The object at ``path``, or None when there is none (404)."""
        status, body = self.get(path)
        if status == 404:
            return None
        if status != 200:
            raise Unanswered(f"GET {path}: {status} {body[:200].decode(errors='replace').strip()}")
        try:
            return json.loads(body)
        except ValueError:
            raise Unanswered(f"GET {path}: not JSON") from None


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    """``kubectl ARGS`` as the cluster's super admin, not checked."""
    return subprocess.run([*KUBECTL, *args], capture_output=True, text=True, check=False)


def must(*args: str) -> str:
    """``kubectl ARGS``'s output; exits saying why when it fails."""
    done = kubectl(*args)
    if done.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def read(api: Api, nodes: list[str]) -> dict[tuple[str, str], Any]:
    """Every object checked that exists, by (kind, name); ``Unanswered`` while the API server
    is not ready. Ready first: the API server answers reads a while before every check of
    /readyz passes, and status calls a cluster whose API server is not ready unhealthy."""
    status, body = api.get("/readyz")
    if status != 200:
        raise Unanswered(f"/readyz {status}: {body[:200].decode(errors='replace').strip()}")
    found: dict[tuple[str, str], Any] = {}
    for binding in BINDINGS:
        if api.read(f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{binding}") is not None:
            found[("ClusterRoleBinding", binding)] = {}
    if api.read("/api/v1/namespaces/default/serviceaccounts/default") is not None:
        found[("ServiceAccount", "default")] = {}
    listed = api.read("/api/v1/nodes")
    if listed is None:
        raise Unanswered("GET /api/v1/nodes: 404")
    for node in listed["items"]:
        if node["metadata"]["name"] in nodes:
            found[("Node", node["metadata"]["name"])] = node
    return found


def ready(node: Any) -> bool:
    """Whether a Node object reports Ready (False for a node not registered: None)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node or {}).get("status", {}).get("conditions", []))


def main(args: list[str]) -> int:
    """Wait for the cluster, then label and uncordon what needs it; see the module's text."""
    wanted: dict[str, dict[str, str]] = {}
    for arg in args:
        name, _, listed = arg.partition("=")
        wanted[name] = dict(label.partition("=")[::2] for label in listed.split(",") if label)
    nodes, changed = list(wanted), False
    api = Api(KUBECONFIG)
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        try:
            found = read(api, nodes)
        except Unanswered as exc:
            found, why = None, f"the API server to be ready: {exc}"
        if found is not None:
            for binding, how in BINDINGS.items():
                if ("ClusterRoleBinding", binding) not in found:
                    must("create", "clusterrolebinding", binding, *how)
                    found[("ClusterRoleBinding", binding)] = {}
                    changed = True
            # Made here rather than awaited: the controller manager's own would come only once
            # it has started all its controllers, tens of seconds later under emulation. Its
            # controller keeps it from then on.
            if ("ServiceAccount", "default") not in found:
                done = kubectl("--namespace", "default", "create", "serviceaccount", "default")
                if done.returncode == 0:
                    changed = True
                elif "AlreadyExists" not in done.stderr:
                    sys.exit(f"kubectl create serviceaccount default exited {done.returncode}: {done.stderr.strip()}")
            missing = [n for n in nodes if not ready(found.get(("Node", n)))]
            if not missing:
                break
            why = f"{', '.join(missing)} (not registered or not Ready)"
        if time.monotonic() > deadline:
            sys.exit(f"after {TIMEOUT_SECONDS} s still waiting for {why}")
        time.sleep(POLL_SECONDS)
    for name, labels in wanted.items():
        node = found[("Node", name)]
        have = node["metadata"].get("labels", {})
        absent = [f"{k}={v}" for k, v in labels.items() if have.get(k) != v]
        if absent:
            must("label", "node", name, "--overwrite", *absent)
            changed = True
    cordoned = [n for n in nodes if found[("Node", n)].get("spec", {}).get("unschedulable")]
    if cordoned:
        must("uncordon", *cordoned)
        changed = True
    print(f"changed={int(changed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

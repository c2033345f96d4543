#!/usr/bin/python3
"""On the control plane, after every node converged: the RBAC kubeadm init would add, the
default service account (pods cannot be made before it), every running node registered and Ready,
role labels (a kubelet may not set node-role labels on itself), and every node back in
scheduling (a node the project stopped was drained and cordoned first). Prints changed=1 when it
changed anything.

    cluster-ready.py NODE=LABEL[,LABEL...] ...     (a LABEL is KEY=VALUE; VALUE may be empty)

Under software emulation each kubectl run costs seconds, so after the API server's /readyz one
``kubectl get`` reads everything it checks, polled until the cluster is there; a cluster with
nothing to change costs those two reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

KUBECTL = ["kubectl", "--kubeconfig", "/etc/kubernetes/super-admin.conf"]
BINDINGS = {"kubeadm:cluster-admins": ["--clusterrole=cluster-admin", "--group=kubeadm:cluster-admins"],
            "aihow:kube-proxy": ["--clusterrole=system:node-proxier", "--user=system:kube-proxy"]}
TIMEOUT_SECONDS = 450
POLL_SECONDS = 3


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    """``kubectl ARGS`` as the cluster's super admin, not checked."""
    return subprocess.run([*KUBECTL, *args], capture_output=True, text=True, check=False)


def must(*args: str) -> str:
    """``kubectl ARGS``'s output; exits saying why when it fails."""
    done = kubectl(*args)
    if done.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def read(nodes: list[str]) -> tuple[dict[tuple[str, str], Any] | None, str]:
    """Every object checked, by (kind, name); None and why while the API server does not answer."""
    objects = [f"clusterrolebinding/{b}" for b in BINDINGS] + ["serviceaccount/default"] + [f"node/{n}" for n in nodes]
    done = kubectl("--namespace", "default", "get", *objects, "--ignore-not-found", "--output", "json")
    if done.returncode != 0:
        return None, last_line(done.stderr, done.returncode)
    listed = json.loads(done.stdout) if done.stdout.strip() else {}
    items = listed.get("items", [listed] if listed.get("kind") else [])
    return {(i["kind"], i["metadata"]["name"]): i for i in items}, ""


def last_line(stderr: str, code: int) -> str:
    """What kubectl said last, or its exit code."""
    return stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {code}"


def ready(node: Any) -> bool:
    """Whether a Node object reports Ready (False for a node not registered: None)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node or {}).get("status", {}).get("conditions", []))


def main(args: list[str]) -> int:
    """Wait for the cluster, then label and uncordon what needs it; see the module's text."""
    wanted: dict[str, dict[str, str]] = {}
    for arg in args:
        name, _, labels = arg.partition("=")
        wanted[name] = dict(label.partition("=")[::2] for label in labels.split(",") if label)
    nodes, changed = list(wanted), False
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        # Ready first: the API server answers reads a while before every check of /readyz
        # passes, and status calls a cluster whose API server is not ready unhealthy.
        ready_z = kubectl("get", "--raw", "/readyz")
        found, why = read(nodes) if ready_z.returncode == 0 else (None, "the API server to be ready: "
                                                                   + last_line(ready_z.stderr, ready_z.returncode))
        if found is not None:
            for binding, how in BINDINGS.items():
                if ("ClusterRoleBinding", binding) not in found:
                    must("create", "clusterrolebinding", binding, *how)
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
            sys.exit(f"after {TIMEOUT_SECONDS} s still waiting for {why or 'the API server'}")
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

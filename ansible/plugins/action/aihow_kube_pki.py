"""Ansible action (runs on the controller, no module run in a guest): the Kubernetes cluster's
certificates and kubeconfigs, made or renewed on the host (``aihow_infra.kubepki``), as
``aihow_converge`` file entries for each node.

Arguments: ``folder`` (where the host keeps them: the inventory's ``kube_pki_dir``),
``cluster_name``, ``control_plane`` (its node name), ``address`` (its IPv4 address),
``service_subnet``, ``workers`` (node names), ``adopt`` (an existing control plane's
authorities, as a base64 gzip tar; see kubepki.ensure) and ``admin_kubeconfig`` (a host path the
admin kubeconfig is also written to, 0600; empty: none).

Returns ``files``: by node name, the list of files that node gets, each with the units that
read it (restarted when it changes), and ``remade``: the files (re)made on the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible.plugins.action import ActionBase

# Which units read each file (restarted when the file changes); a unit a node does not run is
# only named.
READERS: dict[str, list[str]] = {
    "pki/ca.crt": ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"],
    "pki/ca.key": ["kube-controller-manager"],
    "pki/front-proxy-ca.crt": ["kube-apiserver", "kube-controller-manager"],
    "pki/etcd/ca.crt": ["etcd", "kube-apiserver"],
    "pki/sa.key": ["kube-apiserver", "kube-controller-manager"],
    "pki/sa.pub": ["kube-apiserver"],
    "pki/etcd/server.crt": ["etcd"],
    "pki/etcd/server.key": ["etcd"],
    "controller-manager.conf": ["kube-controller-manager"],
    "scheduler.conf": ["kube-scheduler"],
    "kubelet.conf": ["kubelet"],
    "kube-proxy.conf": ["kube-proxy"],
    "admin.conf": [],
    "super-admin.conf": [],
}
ARGS = frozenset({"folder", "cluster_name", "control_plane", "address", "service_subnet", "workers", "adopt",
                  "admin_kubeconfig"})


def entries(files: dict[str, str]) -> list[dict[str, Any]]:
    """``aihow_converge`` file entries (0600) for files by their guest path."""
    made = []
    for dest, content in files.items():
        relative = dest.removeprefix("/etc/kubernetes/")
        readers = READERS.get(relative, ["kube-apiserver"])  # the API server's own certificates
        made.append({"dest": dest, "content": content, "mode": "0600", "restarts": readers})
    return made


class ActionModule(ActionBase):  # type: ignore[misc]
    """See the module's text."""

    TRANSFERS_FILES = False
    _VALID_ARGS = ARGS

    def run(self, tmp: Any = None, task_vars: Any = None) -> dict[str, Any]:
        """Make or renew on the host; return each node's files (see the module's text)."""
        from aihow_infra.errors import AihowError
        from aihow_infra.files import atomic_write
        from aihow_infra.kubepki import Cluster, ensure

        result: dict[str, Any] = super().run(tmp, task_vars)
        # Plain strings: Ansible's own carry tags that YAML and paths need not know.
        args = {k: [_plain(x) for x in v] if isinstance(v, list) else _plain(v) for k, v in self._task.args.items()}
        missing = sorted({"folder", "cluster_name", "control_plane", "address", "service_subnet"}
                         - {k for k, v in args.items() if v})
        if missing:
            return {**result, "failed": True,
                    "msg": f"aihow_kube_pki needs {', '.join(missing)} (the inventory's kube_pki_dir names the folder)"}
        workers = tuple(args.get("workers") or ())
        cluster = Cluster(args["cluster_name"], args["control_plane"], args["address"], args["service_subnet"],
                          workers)
        try:
            made = ensure(Path(args["folder"]), cluster, adopt=(args.get("adopt") or "").strip())
            if args.get("admin_kubeconfig"):
                atomic_write(Path(args["admin_kubeconfig"]), made.files["admin.conf"], "admin kubeconfig",
                             mode=0o600)
        except AihowError as exc:
            return {**result, "failed": True, "msg": str(exc)}
        files = {cluster.control_plane: entries(made.control_plane_files())}
        files |= {node: entries(made.worker_files(node)) for node in workers}
        # Censored in any output (the task's own no_log would also hide a failure's message).
        return {**result, "changed": bool(made.changed), "files": files, "remade": list(made.changed),
                "_ansible_no_log": True}


def _plain(value: Any) -> Any:
    return value.encode().decode() if isinstance(value, str) else value

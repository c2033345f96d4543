"""A fake Kubernetes API server for the programs that read one (HTTPS on 127.0.0.1, certificates
and the super admin's kubeconfig made by aihow_infra/kubepki.py, client certificates required):
the cluster's objects in one JSON file (``kind/name`` -> object), every call logged as ``GET PATH
as CLIENT`` (and the client's port, for a test that counts connections, in ``log.ports``)."""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from aihow_infra import kubepki


class FakeApi(BaseHTTPRequestHandler):
    """GETs answered from the state file: ``/readyz`` and ``/healthz`` (``ok``, or 503 while
    ``unready`` counts answers still to fail), the node and pod lists, and single objects by path."""

    protocol_version = "HTTP/1.1"  # kept connections, as the readers use them
    state: Path
    log: Path
    unready = 0

    def do_GET(self) -> None:
        state = json.loads(self.state.read_text())
        client = dict(x[0] for x in self.request.getpeercert()["subject"])["commonName"]
        with self.log.open("a") as log:
            log.write(f"GET {self.path} as {client}\n")
        with self.log.with_suffix(".ports").open("a") as ports:
            ports.write(f"{self.client_address[1]}\n")
        status, body = 404, {"kind": "Status", "code": 404, "message": f"{self.path} not found"}
        lists = {"/api/v1/nodes": ("NodeList", "node/"), "/api/v1/pods": ("PodList", "pod/")}
        if self.path in ("/readyz", "/healthz"):  # text, as the API server answers them
            status, text = (503, "[-]etcd failed: reason withheld\nreadyz check failed") if FakeApi.unready \
                else (200, "ok")
            FakeApi.unready = max(0, FakeApi.unready - 1)
            self._send(status, text.encode())
            return
        if self.path in lists:
            kind, prefix = lists[self.path]
            status, body = 200, {"kind": kind, "items": [
                {k: v for k, v in obj.items() if k != "kind"} for key, obj in state.items() if key.startswith(prefix)]}
        else:
            kind, name = self.path.rsplit("/", 2)[-2:]
            key = f"{kind.removesuffix('s')}/{name}"
            if key in state:
                status, body = 200, state[key]
        self._send(status, json.dumps(body).encode())

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the calls go to the log file."""


@contextlib.contextmanager
def fake_api(folder: Path, unready: int = 0) -> Iterator[Path]:
    """The fake API server over ``folder/state.json``, logging to ``folder/log``, its first
    ``unready`` answers to /readyz or /healthz 503; yields the super admin's kubeconfig naming it."""
    made = kubepki.ensure(folder / "pki", kubepki.Cluster("test", "cp", "127.0.0.1", "10.96.0.0/12"))
    for name in ("ca.crt", "apiserver.crt", "apiserver.key"):
        (folder / name).write_text(made.files[f"pki/{name}"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(folder / "ca.crt"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(folder / "apiserver.crt", folder / "apiserver.key")
    FakeApi.unready = unready
    handler = type("Api", (FakeApi,), {"state": folder / "state.json", "log": folder / "log"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    config = yaml.safe_load(made.files["super-admin.conf"])
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{server.server_address[1]}"
    (folder / "super-admin.conf").write_text(yaml.safe_dump(config))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder / "super-admin.conf"
    finally:
        server.shutdown()
        server.server_close()

"""aihow-kube-get (kubernetes/kube/kubeget), the reader the cloud image carries for the project's
looks at a cluster, built here with the build's own flags and run against the fake API server
(tests/fakeapi.py: HTTPS, client certificates required); then aihow_infra.kinds.cloud reading
a cluster through it, as it does on the control plane through the guest agent."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aihow_infra.errors import GuestError
from aihow_infra.kinds import cloud
from aihow_infra.kubebins import MODULES_DIR, READER_PACKAGE
from aihow_infra.libvirt.guest import Ran
from tests.fakeapi import FakeApi, fake_api
from tests.samples import node, pod


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reader, compiled as kubebins.build_binaries compiles it (static, module read-only)."""
    binary = tmp_path_factory.mktemp("reader") / "aihow-kube-get"
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"}
    subprocess.run(["go", "build", "-trimpath", "-tags", "selinux,notest", "-ldflags", "-s -w", "-o", str(binary),
                    READER_PACKAGE],
                   cwd=MODULES_DIR / "kube", env=env, check=True, timeout=600)
    return binary


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Path]:
    """The fake API server with two nodes and a pending pod; its super admin's kubeconfig."""
    (tmp_path / "state.json").write_text(json.dumps({
        "node/cp": node("cp"), "node/w1": node("w1", ready=False, cordoned=True),
        "pod/sleeper": pod("sleeper", nodeSelector={"kubernetes.io/hostname": "w1"})}))
    (tmp_path / "log").write_text("")
    with fake_api(tmp_path) as kubeconfig:
        yield kubeconfig


def read(reader: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    done = subprocess.run([str(reader), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr


def test_paths_are_read_in_order_over_one_connection_with_the_client_certificate(reader: Path, api: Path) -> None:
    code, answers, err = read(reader, "-kubeconfig", str(api), "/api/v1/nodes", "/api/v1/pods", "/readyz")
    assert code == 0, err
    assert [(a["path"], a["code"]) for a in answers] == [
        ("/api/v1/nodes", 200), ("/api/v1/pods", 200), ("/readyz", 200)]
    assert [n["metadata"]["name"] for n in answers[0]["body"]["items"]] == ["cp", "w1"]
    assert answers[1]["body"]["items"][0]["metadata"]["name"] == "sleeper"
    assert answers[2]["body"] == "ok"  # text, as the API server says it, kept as a JSON string
    calls = (api.parent / "log").read_text().splitlines()
    assert calls == [f"GET {p} as kubernetes-super-admin" for p in ("/api/v1/nodes", "/api/v1/pods", "/readyz")]
    assert len(set((api.parent / "log.ports").read_text().split())) == 1  # one connection


def test_the_kubeconfig_comes_from_kubeconfig_env_and_may_name_files_beside_it(reader: Path, api: Path) -> None:
    config = yaml.safe_load(api.read_text())
    folder = api.parent / "conf"
    folder.mkdir()
    for where, key, name in (("clusters", "certificate-authority", "ca.pem"),
                             ("users", "client-certificate", "client.pem"), ("users", "client-key", "client-key.pem")):
        entry = config[where][0]["cluster" if where == "clusters" else "user"]
        (folder / name).write_bytes(base64.b64decode(entry.pop(f"{key}-data")))
        entry[key] = name  # relative: to the kubeconfig's folder, not the working one
    (folder / "files.conf").write_text(yaml.safe_dump(config))
    listed = f"{folder / 'files.conf'}:{folder / 'other.conf'}"  # the first file of the list
    code, answers, err = read(reader, "/api/v1/nodes", env={"KUBECONFIG": listed})
    assert code == 0, err
    assert len(answers[0]["body"]["items"]) == 2


@pytest.mark.parametrize(("change", "said"), [
    (lambda c: c.update({"current-context": "elsewhere"}), 'current-context "elsewhere" is not one of its contexts'),
    (lambda c: c["contexts"][0]["context"].update(user="nobody"), 'user "nobody" is not one of its users'),
    (lambda c: c["contexts"][0]["context"].update(cluster="none"), 'cluster "none" is not one of its clusters'),
])
def test_a_kubeconfig_naming_what_it_does_not_hold_is_refused(reader: Path, api: Path,
                                                               change: Callable[[dict[str, Any]], None],
                                                               said: str) -> None:
    config = yaml.safe_load(api.read_text())
    change(config)
    api.write_text(yaml.safe_dump(config))
    code, answers, err = read(reader, "-kubeconfig", str(api), "/readyz")
    assert (code, answers) == (2, None)
    assert err == f"aihow-kube-get: kubeconfig {api}: {said}\n"


def test_an_answer_other_than_2xx_is_printed_and_exits_1(reader: Path, tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "log").write_text("")
    with fake_api(tmp_path, unready=1) as kubeconfig:
        code, answers, _ = read(reader, "-kubeconfig", str(kubeconfig), "/readyz", "/api/v1/namespaces/x/pods/gone")
    assert code == 1
    assert answers[0]["code"] == 503 and "etcd failed" in answers[0]["body"]
    assert answers[1]["code"] == 404 and answers[1]["body"]["kind"] == "Status"


def test_no_server_is_one_line_exit_3_and_bad_input_exit_2(reader: Path, tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "log").write_text("")
    with fake_api(tmp_path) as kubeconfig:
        pass  # the server is gone, its kubeconfig stays
    code, answers, err = read(reader, "-kubeconfig", str(kubeconfig), "-timeout=5s", "/readyz")
    assert (code, answers) == (3, None)
    assert err.startswith("aihow-kube-get: GET /readyz: ") and "connection refused" in err and err.count("\n") == 1
    code, _, err = read(reader, "-kubeconfig", str(tmp_path / "missing.conf"), "/readyz")
    assert code == 2 and err.startswith("aihow-kube-get: kubeconfig ") and "missing.conf" in err
    code, _, err = read(reader, "-kubeconfig", str(kubeconfig), "api/v1/nodes")
    assert code == 2 and "not an API path" in err


class Head:
    """A control plane's guest agent, played here: the reader runs on this machine with the fake
    API server's kubeconfig; without ``has_reader`` it is missing, as on an image made before it
    (the shell says 127), and kubectl answers from ``kubectl`` instead."""

    def __init__(self, reader: Path, kubeconfig: Path, has_reader: bool = True,
                 kubectl: Callable[[list[str]], Ran] | None = None) -> None:
        self.reader, self.kubeconfig, self.has_reader, self.kubectl = reader, kubeconfig, has_reader, kubectl
        self.ran: list[list[str]] = []

    def name(self) -> str:
        return "cloud-control-plane"

    def run(self, dom: Any, argv: list[str], timeout: float = 120) -> Ran:
        self.ran.append(argv)
        if tuple(argv[:4]) == cloud.KUBE_GET_COMMAND:
            if not self.has_reader:
                return Ran(127, "", f"/bin/sh: 1: exec: {cloud.KUBE_GET}: not found\n")
            args = [str(self.kubeconfig) if a == cloud.ADMIN_KUBECONFIG else a for a in argv[4:]]
            done = subprocess.run([str(self.reader), *args], capture_output=True, text=True, timeout=timeout)
            return Ran(done.returncode, done.stdout, done.stderr)
        assert argv[0] == cloud.KUBECTL and self.kubectl is not None, argv
        return self.kubectl(argv[3:])


@pytest.fixture
def head(reader: Path, api: Path, monkeypatch: pytest.MonkeyPatch) -> Head:
    played = Head(reader, api)
    monkeypatch.setattr(cloud, "run", played.run)
    return played


def test_the_broker_and_status_read_nodes_pods_and_readiness_in_one_run_each(head: Head) -> None:
    objects = cloud.cluster_objects(head)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [("Node", "cp"), ("Node", "w1"), ("Pod", "sleeper")]
    assert cloud.node_states(head) == {"cp": "Ready", "w1": "NotReady,SchedulingDisabled"}
    _nodes, line = cloud.KIND.workload(head, plan=_Plan(), power=_Power())  # type: ignore[arg-type]
    assert line == "Kubernetes: degraded, 1/2 nodes Ready"
    assert len(head.ran) == 3 and all(argv[3] == cloud.KUBE_GET for argv in head.ran)


def test_an_api_server_not_ready_still_lists_its_nodes(head: Head) -> None:
    FakeApi.unready = 1  # its /readyz 503 once: the reader exits 1 with every answer
    nodes, line = cloud.KIND.workload(head, plan=_Plan(), power=_Power())  # type: ignore[arg-type]
    assert nodes == {"cp": "Ready", "w1": "NotReady,SchedulingDisabled"}
    assert line == "Kubernetes: API server not ready, 1/2 nodes Ready"


def test_an_api_server_not_answering_is_a_guest_error_and_no_states(head: Head, tmp_path: Path) -> None:
    head.kubeconfig = tmp_path / "nowhere.conf"
    config = yaml.safe_load((tmp_path / "super-admin.conf").read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    head.kubeconfig.write_text(yaml.safe_dump(config))
    with pytest.raises(GuestError, match=r"asking the API server on cloud-control-plane failed: .*connection refused"):
        cloud.cluster_objects(head)
    assert cloud.node_states(head) is None


def test_a_control_plane_without_the_reader_is_asked_with_kubectl_as_before(head: Head) -> None:
    asked: list[str] = []

    def kubectl(args: list[str]) -> Ran:
        asked.append(" ".join(args))
        if args == ["get", "--raw", "/readyz"]:  # any failure is "not ready", with the nodes still listed
            return Ran(1, "", "Unable to connect to the server: net/http: TLS handshake timeout\n")
        items = [node("cp")] + ([pod("sleeper")] if args[1] == "nodes,pods" else [])
        return Ran(0, json.dumps({"kind": "List", "items": items}), "")

    head.has_reader, head.kubectl = False, kubectl
    nodes, line = cloud.KIND.workload(head, plan=_Plan(), power=_Power())  # type: ignore[arg-type]
    assert nodes == {"cp": "Ready"}
    assert line == "Kubernetes: API server not ready, 1/1 nodes Ready"
    assert [o["metadata"]["name"] for o in cloud.cluster_objects(head)] == ["cp", "sleeper"]
    assert asked == ["get nodes --all-namespaces -o json", "get --raw /readyz",
                     "get nodes,pods --all-namespaces -o json"]  # one run per pass, as before the reader


@pytest.mark.parametrize("printed", ["", "not json", json.dumps([{"path": "/api/v1/nodes"}]),
                                     json.dumps([{"path": "/api/v1/nodes", "code": 200, "body": [1]},
                                                 {"path": "/api/v1/pods", "code": 200, "body": {"items": 3}}])])
def test_answers_that_make_no_sense_are_guest_errors(head: Head, monkeypatch: pytest.MonkeyPatch,
                                                     printed: str) -> None:
    monkeypatch.setattr(cloud, "run", lambda _dom, _argv, timeout=0: Ran(0, printed, ""))
    with pytest.raises(GuestError, match=r"cloud-control-plane|GET /api/v1/nodes: 200"):
        cloud.cluster_objects(head)
    assert cloud.node_states(head) is None


class _Plan:
    """A cluster plan with no VM meant to be off."""

    vms: tuple[Any, ...] = ()


class _Power:
    """Power records wanting every VM running."""

    def wants_running(self, name: str, auto_start: bool) -> bool:
        return True


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


AFTER_API_SERVER = (Path(__file__).resolve().parent.parent
                    / "ansible/roles/kube_controller_manager/files/aihow-after-api-server")


def test_the_controller_manager_starts_once_the_api_server_answers_it(reader: Path, tmp_path: Path) -> None:
    # Its unit starts it through aihow-after-api-server, which asks /healthz with the reader as the
    # controller manager's client until it says 200 (not yet: no answer, or 503 here, 403 there),
    # then runs it; the controller manager itself gives the API server only 10 s.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aihow-kube-get").symlink_to(reader)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "log").write_text("")
    command = ["sh", "-c", 'echo "started with $*"', "sh", "--kubeconfig=x"]
    with fake_api(tmp_path, unready=2) as kubeconfig:
        config = yaml.safe_load(kubeconfig.read_text())
        listening = config["clusters"][0]["cluster"]["server"]
        # Nothing listening yet (the API server's port, another one): it waits, and asks again.
        config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:9"
        silent = tmp_path / "silent.conf"
        silent.write_text(yaml.safe_dump(config))
        waiting = subprocess.Popen([str(AFTER_API_SERVER), str(silent), *command], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=5)
        config["clusters"][0]["cluster"]["server"] = listening
        silent.write_text(yaml.safe_dump(config))
        out, err = waiting.communicate(timeout=30)
    assert out == "started with --kubeconfig=x\n" and waiting.returncode == 0
    # What it waits on goes to the journal, once and then every minute, not every try.
    assert err.count("aihow-after-api-server: waiting for the API server to answer /healthz with 200") == 1, err
    assert (tmp_path / "log").read_text().splitlines() == ["GET /healthz as kubernetes-super-admin"] * 3

    # No answer within AIHOW_API_WAIT_SECONDS: the command runs anyway, and says what is wrong itself.
    done = subprocess.run([str(AFTER_API_SERVER), str(silent), *command], env={**env, "AIHOW_API_WAIT_SECONDS": "0"},
                          capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout == "started with --kubeconfig=x\n"
    assert "no 200 from /healthz after 0 s; starting sh anyway" in done.stderr, done.stderr

    # A kubeconfig the reader cannot use (it exits 2), or an image without the reader: the command
    # runs at once and says what is wrong itself.
    for kubeconfig_arg, path in ((str(tmp_path / "missing.conf"), env["PATH"]), (str(silent), "/usr/bin:/bin")):
        done = subprocess.run([str(AFTER_API_SERVER), kubeconfig_arg, *command], env={**env, "PATH": path},
                              capture_output=True, text=True, timeout=30, check=True)
        assert done.stdout == "started with --kubeconfig=x\n"

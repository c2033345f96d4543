"""Kubernetes without a registry, the parts that need no booted guest: pod subnets in the plan
and the inventory, the OCI archives containerd imports, how the build is named and stamped,
and what status makes of the API server's answers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from aihow_infra import kubebins
from aihow_infra.errors import GuestError
from aihow_infra.images import recipe_for
from aihow_infra.inventory import build_inventory
from aihow_infra.kinds import cloud, hpc
from aihow_infra.libvirt import guest
from aihow_infra.libvirt.guest import Ran
from aihow_infra.loading import parse_cluster_file
from aihow_infra.oci import ImageSpec, write_archive
from aihow_infra.plan import plan_cluster
from tests.samples import base

ROOT = Path(__file__).resolve().parents[1]


def test_each_node_gets_its_own_pod_subnet_in_file_order() -> None:
    data = base()
    data["clusters"]["cloud"]["worker_nodes"].append({"cpu_cores": 1, "memory_gb": 1, "disk_gb": 4,
                                                      "ip": "10.2.0.30"})
    plan = plan_cluster(parse_cluster_file(data), "cloud")
    assert [vm.pod_subnet for vm in plan.vms] == [f"10.244.{i}.0/24" for i in range(len(plan.vms))]
    assert (plan.pod_subnet, plan.service_subnet) == ("10.244.0.0/16", "10.96.0.0/12")
    assert plan_cluster(parse_cluster_file(base()), "hpc").vms[0].pod_subnet is None


def test_the_inventory_carries_pod_subnets_for_every_node_running_or_not() -> None:
    outputs = {"cluster": {"name": "c", "key": "cloud", "pod_subnet": "10.244.0.0/16",
                           "service_subnet": "10.96.0.0/12"},
               "nodes": {name: {"name": f"c-{name}", "short_name": name, "role": role, "vcpus": 1, "memory_gb": 1,
                                "mac": "52:54:00:00:00:0" + str(i), "ip": f"10.2.0.{10 + i}",
                                "pod_subnet": f"10.244.{i}.0/24", "power_state": "running"}
                         for i, (name, role) in enumerate([("control-plane", "control-plane"),
                                                           ("gpu-worker-01", "gpu-worker")])}}
    data = build_inventory(outputs, "cloud", states={"c-control-plane": "running", "c-gpu-worker-01": "shut off"})
    assert data["all"]["vars"]["kube_pod_subnet"] == "10.244.0.0/16"
    stopped = data["all"]["children"]["stopped"]["hosts"]
    assert stopped["gpu-worker-01"]["pod_subnet"] == "10.244.1.0/24"  # peers still route to it
    assert list(data["all"]["children"]["k8s_cluster"]["children"]["kube_control_plane"]["hosts"]) == ["control-plane"]


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_an_oci_archive_is_a_valid_image_layout_and_reproducible(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF pretend")
    spec = ImageSpec("registry.k8s.io/pause:3.10.1", {"/pause": binary}, ["/pause"], symlinks={"/bin/sh": "/pause"})
    first = write_archive(spec, tmp_path / "a.tar")
    second = write_archive(spec, tmp_path / "b.tar")
    assert first == second and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()

    files = _members(tmp_path / "a.tar")
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():  # every blob is named by its content
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    entry = json.loads(files["index.json"])["manifests"][0]
    assert entry["digest"] == first
    assert entry["annotations"]["io.containerd.image.name"] == "registry.k8s.io/pause:3.10.1"
    manifest = json.loads(files[f"blobs/sha256/{first.split(':')[1]}"])
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"])
    assert config["config"]["Entrypoint"] == ["/pause"] and "Cmd" not in config["config"]
    assert config["rootfs"]["diff_ids"] == [manifest["layers"][0]["digest"]]  # the layer is not compressed
    layer = tmp_path / "layer.tar"
    layer.write_bytes(files[f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}"])
    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["pause"].mode == 0o755 and members["bin/sh"].linkname == "/pause"
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())


def test_the_build_is_named_by_versions_toolchain_and_modules() -> None:
    key = kubebins.build_key()
    assert key.startswith(f"{kubebins.kubernetes_version()}-etcd{kubebins.etcd_version()}-{kubebins.go_version()}-")
    assert kubebins.kubernetes_version() == "v1.34.2"
    flags = kubebins._version_flags("v1.34.2", "2023-11-14T22:13:20Z")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.34.2" in flags
        assert f"-X {package}.gitMinor=34" in flags


def test_another_go_toolchain_builds_beside_and_renames_no_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cloud image is named by what it carries: a Go upgrade must not ask to replace every
    Cloud VM's disk (their overlays name the image)."""
    image, folder = recipe_for("cloud").name, kubebins.build_key()
    monkeypatch.setattr(kubebins, "go_version", lambda: "go9.99.0")
    for cached in (kubebins.content_key, kubebins.build_key):
        cached.cache_clear()
    try:
        assert recipe_for("cloud").name == image
        assert kubebins.build_key() != folder and "go9.99.0" in kubebins.build_key()
    finally:
        monkeypatch.undo()
        for cached in (kubebins.content_key, kubebins.build_key):
            cached.cache_clear()


# kubernetes/kube/kubeget's source (sha256 of its files, by name) at each reader version.
READER_SOURCES = {1: "2e9191c8137a86c6768d5beb638fc7d43325f167ff647ae840d396301e207ba1"}


def _reader_source_digest() -> str:
    digest = hashlib.sha256()
    for source in sorted((kubebins.MODULES_DIR / "kube" / kubebins.READER_PACKAGE).glob("*")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def test_the_readers_source_is_pinned_to_its_version() -> None:
    """aihow-kube-get is carried by the cloud image, named by its version: a change to what it does
    must bump the version (a new image), and an edit that changes nothing must not rename it."""
    assert READER_SOURCES.get(kubebins.READER_VERSION) == _reader_source_digest(), (
        f"kubernetes/kube/kubeget changed (digest {_reader_source_digest()}): when what it does "
        "changed, bump kubebins.READER_VERSION (the cloud image is then new, and `up` asks to replace "
        "every Cloud VM's disk); either way record the digest in READER_SOURCES")


def test_the_readers_version_is_part_of_what_the_build_contains(monkeypatch: pytest.MonkeyPatch) -> None:
    before = kubebins.content_key()
    monkeypatch.setattr(kubebins, "READER_VERSION", kubebins.READER_VERSION + 1)
    kubebins.content_key.cache_clear()
    try:
        assert kubebins.content_key() != before
        assert kubebins.READER in kubebins.KubeBinaries(Path("/nowhere"), "k").commands
    finally:
        monkeypatch.undo()
        kubebins.content_key.cache_clear()


def test_the_wrapper_modules_replace_every_staging_module_of_the_release() -> None:
    """A staging module left out would resolve to a version other than the release's own."""
    listed = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"], cwd=ROOT / "kubernetes/kube",
                            check=True, capture_output=True, text=True)
    upstream = (Path(listed.stdout.strip()) / "go.mod").read_text()
    staging = {line.split()[0] for line in upstream.splitlines() if "=> ./staging/" in line}
    ours = (ROOT / "kubernetes/kube/go.mod").read_text()
    assert staging and all(f"{name} => {name} v0.34.2" in ours for name in staging)


NODE = {"metadata": {"name": "c-w1"}, "spec": {},
        "status": {"conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}]}}


@pytest.mark.parametrize(("node", "word"), [
    (NODE, "Ready"),
    ({**NODE, "spec": {"unschedulable": True}}, "Ready,SchedulingDisabled"),
    ({**NODE, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}, "NotReady"),
    ({**NODE, "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}, "Unknown"),
    ({**NODE, "status": {}}, "Unknown"),
])
def test_node_words_follow_the_ready_condition_and_cordon(node: dict[str, object], word: str) -> None:
    assert cloud._state(node) == word


def test_health_counts_nodes_meant_to_be_off_as_expected() -> None:
    states = {"cp": "Ready", "w1": "Ready", "gpu": "NotReady,SchedulingDisabled"}
    assert cloud.health(states) == "Kubernetes: degraded, 2/3 nodes Ready"
    assert cloud.health(states, frozenset({"gpu"})) == "Kubernetes: healthy, 2/3 nodes Ready (1 stopped)"
    # A node just stopped that Kubernetes has not yet noticed is not counted Ready.
    assert cloud.health(states, frozenset({"gpu", "w1"})) == "Kubernetes: healthy, 1/3 nodes Ready (2 stopped)"
    assert cloud.health(states, api_ready=False).startswith("Kubernetes: API server not ready")
    assert cloud.health(None) == "Kubernetes: no answer from the control plane (not deployed, or stopped)"


@pytest.mark.parametrize(("answer", "words"), [
    (Ran(0, "12.84\n", ""), "deployed, API server not answering (guest load 12.84)"),
    (Ran(1, "", ""), "not deployed"),
    (GuestError("the guest agent does not answer"), "no answer from the guest agent"),
])
def test_status_tells_a_silent_api_server_from_a_cluster_never_deployed(
        monkeypatch: pytest.MonkeyPatch, answer: Ran | GuestError, words: str) -> None:
    def fake_run(_dom: object, argv: list[str], timeout: float = 0) -> Ran:
        assert argv[-1].startswith(f"test -e {cloud.ADMIN_KUBECONFIG} && ")  # the deploy's own file
        if isinstance(answer, GuestError):
            raise answer
        return answer

    monkeypatch.setattr(guest, "run", fake_run)
    dom = object()
    assert cloud.health(None, silent=cloud.silence(dom)) == f"Kubernetes: {words}"  # type: ignore[arg-type]
    assert cloud.silence(None) == "control plane not running"
    assert hpc.silence(None) == "controller not running"

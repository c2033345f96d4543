"""The Kubernetes certificates and kubeconfigs made on the host (aihow_infra/kubepki.py): what
they name, what makes them again, an existing cluster's authorities taken over, and kubeadm
itself accepting them (the consumer)."""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aihow_infra.errors import DeployError
from aihow_infra.kubebins import ensure_binaries
from aihow_infra.kubepki import ADOPTED, Cluster, Made, ensure

CLUSTER = Cluster("aihow-cloud", "control-plane", "10.213.20.10", "10.96.0.0/12", ("cpu-worker-01",))
AUTHORITIES = ("pki/ca.crt", "pki/ca.key", "pki/front-proxy-ca.crt", "pki/etcd/ca.crt", "pki/sa.key")


def cert(text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(text.encode())


def kubeconfig_cert(made: Made, path: str) -> tuple[dict[str, object], x509.Certificate]:
    config = yaml.safe_load(made.files[path])
    data = config["users"][0]["user"]["client-certificate-data"]
    return config, x509.load_pem_x509_certificate(base64.b64decode(data))


def test_every_certificate_names_its_identity_and_is_signed_by_its_authority(tmp_path: Path) -> None:
    made = ensure(tmp_path, CLUSTER)
    ca, etcd_ca = cert(made.files["pki/ca.crt"]), cert(made.files["pki/etcd/ca.crt"])
    apiserver = cert(made.files["pki/apiserver.crt"])
    apiserver.verify_directly_issued_by(ca)
    names = apiserver.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) >= {"control-plane", "kubernetes.default.svc"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in
                                                             ("10.96.0.1", "10.213.20.10", "127.0.0.1")}
    etcd = cert(made.files["pki/etcd/server.crt"])
    etcd.verify_directly_issued_by(etcd_ca)
    usages = set(etcd.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    config, node = kubeconfig_cert(made, "nodes/cpu-worker-01.conf")
    node.verify_directly_issued_by(ca)
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:cpu-worker-01"
    assert node.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    assert config["clusters"][0]["cluster"]["server"] == "https://10.213.20.10:6443"  # type: ignore[index]
    # Only the cluster CA's key enters a guest (the controller manager signs with it).
    assert not any(p.endswith(("front-proxy-ca.key", "etcd/ca.key")) for p in made.control_plane_files())
    assert set(made.worker_files("cpu-worker-01")) == {"/etc/kubernetes/pki/ca.crt", "/etc/kubernetes/kubelet.conf",
                                                       "/etc/kubernetes/kube-proxy.conf"}
    assert {p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()} == {0o600}
    assert tmp_path.stat().st_mode & 0o777 == 0o700


def test_a_second_call_changes_nothing(tmp_path: Path) -> None:
    first = ensure(tmp_path, CLUSTER)
    again = ensure(tmp_path, CLUSTER)
    assert again.changed == () and again.files == first.files


def test_a_moved_control_plane_gets_new_certificates_from_the_same_authorities(tmp_path: Path) -> None:
    first = ensure(tmp_path, CLUSTER)
    moved = ensure(tmp_path, Cluster(**{**CLUSTER.__dict__, "address": "10.213.20.20"}))
    assert {"pki/apiserver.crt", "pki/etcd/server.crt", "admin.conf", "kubelet.conf",
            "nodes/cpu-worker-01.conf"} <= set(moved.changed)
    assert not {"pki/front-proxy-client.crt", "pki/apiserver-etcd-client.crt", *AUTHORITIES} & set(moved.changed)
    assert all(moved.files[a] == first.files[a] for a in AUTHORITIES)
    assert "https://10.213.20.20:6443" in moved.files["kube-proxy.conf"]


def test_a_joining_worker_gets_its_kubeconfig_and_nothing_else_changes(tmp_path: Path) -> None:
    ensure(tmp_path, CLUSTER)
    joined = ensure(tmp_path, Cluster(**{**CLUSTER.__dict__, "workers": ("cpu-worker-01", "gpu-worker-01")}))
    assert joined.changed == ("nodes/gpu-worker-01.conf",)


def test_certificates_near_their_end_are_made_again_and_the_authorities_kept(tmp_path: Path) -> None:
    first = ensure(tmp_path, CLUSTER)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
    renewed = ensure(tmp_path, CLUSTER, now=later)
    assert "pki/apiserver.crt" in renewed.changed and "nodes/cpu-worker-01.conf" in renewed.changed
    assert all(renewed.files[a] == first.files[a] for a in AUTHORITIES)
    assert cert(renewed.files["pki/apiserver.crt"]).not_valid_after_utc > later + datetime.timedelta(days=300)


def test_a_certificate_signed_by_another_authority_is_made_again(tmp_path: Path) -> None:
    ensure(tmp_path / "other", CLUSTER)
    ensure(tmp_path / "own", CLUSTER)
    for name in ("apiserver.crt", "apiserver.key"):
        (tmp_path / "own/pki" / name).write_text((tmp_path / "other/pki" / name).read_text())
    assert "pki/apiserver.crt" in ensure(tmp_path / "own", CLUSTER).changed


def test_an_existing_control_plane_hands_over_its_authorities(tmp_path: Path) -> None:
    old = ensure(tmp_path / "guest", CLUSTER)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ADOPTED:
            tar.add(tmp_path / "guest/pki" / name, arcname=name)
    adopted = ensure(tmp_path / "host", CLUSTER, adopt=base64.b64encode(buffer.getvalue()).decode())
    assert all(adopted.files[a] == old.files[a] for a in AUTHORITIES)
    cert(adopted.files["pki/apiserver.crt"]).verify_directly_issued_by(cert(old.files["pki/ca.crt"]))
    # Only while the host has no authority of its own: later archives are ignored.
    assert ensure(tmp_path / "host", CLUSTER, adopt=base64.b64encode(b"not a tar").decode()).changed == ()


def test_an_unreadable_file_is_one_line_naming_it(tmp_path: Path) -> None:
    ensure(tmp_path, CLUSTER)
    (tmp_path / "pki/ca.crt").write_text("garbage")
    with pytest.raises(DeployError, match=r"pki/ca.crt is not a PEM certificate; remove it"):
        ensure(tmp_path, CLUSTER)


def test_kubeadm_accepts_them_as_its_own(tmp_path: Path) -> None:
    """kubeadm's own checks of existing files (``init phase certs all`` / ``kubeconfig all``):
    each certificate signed by the right authority with the names it needs, each kubeconfig
    naming the cluster's CA and server (a mismatch is a warning); it makes only the etcd files
    this cluster does not use. (kubeadm does not check an existing certificate's names: the
    tests above do.)"""
    ensure(tmp_path / "k", CLUSTER)
    kubeadm = str(ensure_binaries().path("kubeadm"))
    version = subprocess.run([kubeadm, "version", "-o", "short"], capture_output=True, text=True, check=True).stdout
    config = tmp_path / "kubeadm.yaml"
    config.write_text(yaml.safe_dump_all([
        {"apiVersion": "kubeadm.k8s.io/v1beta4", "kind": "InitConfiguration",
         "localAPIEndpoint": {"advertiseAddress": CLUSTER.address, "bindPort": 6443},
         "nodeRegistration": {"name": CLUSTER.control_plane}},
        {"apiVersion": "kubeadm.k8s.io/v1beta4", "kind": "ClusterConfiguration", "kubernetesVersion": version.strip(),
         "clusterName": CLUSTER.name, "controlPlaneEndpoint": f"{CLUSTER.address}:6443",
         "certificatesDir": str(tmp_path / "k/pki"), "encryptionAlgorithm": "ECDSA-P256",
         "networking": {"serviceSubnet": CLUSTER.service_subnet, "dnsDomain": "cluster.local"}}]))
    before = {p: p.read_bytes() for p in (tmp_path / "k").rglob("*") if p.is_file()}
    for phase in (["certs", "all"], ["kubeconfig", "all", "--kubeconfig-dir", str(tmp_path / "k")]):
        done = subprocess.run([kubeadm, "init", "phase", *phase, "--config", str(config)], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        # A kubeconfig naming another server or CA is only a warning (klog's "W..." lines).
        warnings = [line for line in done.stderr.splitlines() if line.startswith("W")]
        assert not warnings, warnings
    after = {p: p.read_bytes() for p in (tmp_path / "k").rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before, "kubeadm replaced a file it did not accept"
    assert {str(p.relative_to(tmp_path / "k")) for p in set(after) - set(before)} == {
        "pki/etcd/peer.crt", "pki/etcd/peer.key", "pki/etcd/healthcheck-client.crt",
        "pki/etcd/healthcheck-client.key"}


def test_the_ansible_action_gives_each_node_its_files_and_shows_none(tmp_path: Path) -> None:
    """The ``aihow_kube_pki`` action as cloud.yml runs it (once, on the controller), with a
    local inventory: every node's files by its node name, the admin kubeconfig written for the
    host, and nothing of them in Ansible's most verbose output."""
    inventory = {"all": {"vars": {"cluster_name": "c1", "kube_service_subnet": "10.96.0.0/12",
                                  "kube_pki_dir": str(tmp_path / "pki")},
                         "children": {"k8s_cluster": {"children": {
                             "kube_control_plane": {"hosts": {"cp": {"vm_name": "c1-cp", "ip": "10.0.0.10"}}},
                             "kube_node": {"hosts": {"w1": {"vm_name": "c1-w1", "ip": "10.0.0.11"}}}}}}}}
    play = [{"hosts": "k8s_cluster", "gather_facts": False, "vars": {"ansible_connection": "local"}, "tasks": [
        {"aihow_kube_pki": {"folder": "{{ kube_pki_dir }}", "cluster_name": "{{ cluster_name }}",
                            "control_plane": "c1-cp", "address": "10.0.0.10",
                            "service_subnet": "{{ kube_service_subnet }}",
                            "workers": "{{ groups['kube_node'] | map('extract', hostvars, 'vm_name') | list }}",
                            "admin_kubeconfig": str(tmp_path / "admin.conf")},
         "run_once": True, "register": "pki"},
        {"ansible.builtin.copy": {"dest": f"{tmp_path}/{{{{ inventory_hostname }}}}.txt",
                                  "content": "{{ pki.files[vm_name] | map(attribute='dest') | join(' ') }}"},
         "delegate_to": "localhost"}]}]
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([str(root / ".venv/bin/ansible-playbook"), "-vvv", "-i", "inventory.yml", "play.yml"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "ANSIBLE_ACTION_PLUGINS": str(root / "ansible/plugins/action"),
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "/etc/kubernetes/pki/apiserver.key" in (tmp_path / "cp.txt").read_text()
    assert (tmp_path / "w1.txt").read_text().split() == ["/etc/kubernetes/pki/ca.crt",
                                                         "/etc/kubernetes/kube-proxy.conf",
                                                         "/etc/kubernetes/kubelet.conf"]
    assert (tmp_path / "admin.conf").read_text() == (tmp_path / "pki/admin.conf").read_text()
    assert "PRIVATE KEY" not in done.stdout and "client-key-data" not in done.stdout

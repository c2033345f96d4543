"""A Kubernetes cluster's certificates and kubeconfigs, made on the host with ``cryptography``.

The control plane guest used to make them with kubeadm: eight runs of a large Go binary under
software emulation, and the workers had to wait for it before they could converge. Made here, a
deploy converges every node at once, and the authorities' private keys (but the cluster CA's,
which the controller manager signs with) never enter a guest.

The layout and the identities follow kubeadm's (``kubeadm init phase certs all`` and
``phase kubeconfig all``; ECDSA P-256 keys as the project's kubeadm.yaml asked for, since a TLS
handshake costs a third of RSA-2048's under emulation), so kubeadm itself accepts them (the
consumer test runs it on them). The host keeps them in one folder per stack (0700; files
0600), mirroring ``/etc/kubernetes``:

- made once and kept: the three authorities (``pki/ca``, ``pki/front-proxy-ca``,
  ``pki/etcd/ca``) and the service-account key pair (``pki/sa``);
- made again when missing, expiring within ``RENEW_BEFORE``, not signed by the authority kept
  here, or naming other identities or addresses than the cluster's now (the control plane's
  address changed; a node joined): every leaf certificate and kubeconfig.

An existing cluster whose certificates were made in its guest hands its authorities and
service-account keys over once (``adopt``), so its tokens and clients stay valid.
"""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aihow_infra.errors import DeployError
from aihow_infra.files import atomic_write

GUEST_DIR = "/etc/kubernetes"
AUTHORITY_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)
ADMIN_GROUP = "kubeadm:cluster-admins"
# What an existing control plane hands over (paths under /etc/kubernetes/pki), when present.
ADOPTED = ("ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key",
           "sa.key", "sa.pub")

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Cluster:
    """Who the certificates name: the cluster, its control plane node (name and IPv4 address),
    its service subnet (the API server's service address is its first) and the worker nodes."""

    name: str
    control_plane: str
    address: str
    service_subnet: str
    workers: tuple[str, ...] = ()

    @property
    def server(self) -> str:
        """The API server's URL, as every kubeconfig names it."""
        return f"https://{self.address}:6443"


@dataclass(frozen=True)
class Leaf:
    """One certificate kubeadm would make: who it names, what it may do, who signs it."""

    path: str  # under the folder, without .crt/.key
    authority: str  # the signing authority's path, the same way
    common_name: str
    organization: str | None = None
    server: bool = False
    client: bool = False
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Made:
    """What ``ensure`` leaves: every file's text by its path under ``/etc/kubernetes``, and
    which of them it (re)made in this call."""

    files: dict[str, str]
    changed: tuple[str, ...]

    def control_plane_files(self) -> dict[str, str]:
        """What the control plane node gets: its services' certificates and kubeconfigs, and its
        own kubelet's."""
        wanted = [f"pki/{name}" for name in ("ca.crt", "ca.key", "front-proxy-ca.crt", "etcd/ca.crt", "sa.key",
                                             "sa.pub")]
        wanted += [f"pki/{leaf}.{ext}" for leaf in ("apiserver", "apiserver-kubelet-client", "front-proxy-client",
                                                    "apiserver-etcd-client", "etcd/server") for ext in ("crt", "key")]
        wanted += ["admin.conf", "super-admin.conf", "controller-manager.conf", "scheduler.conf", "kubelet.conf",
                   "kube-proxy.conf"]
        return {f"{GUEST_DIR}/{path}": self.files[path] for path in wanted}

    def worker_files(self, node: str) -> dict[str, str]:
        """What a worker gets: the cluster CA, kube-proxy's kubeconfig and its kubelet's own."""
        return {f"{GUEST_DIR}/pki/ca.crt": self.files["pki/ca.crt"],
                f"{GUEST_DIR}/kube-proxy.conf": self.files["kube-proxy.conf"],
                f"{GUEST_DIR}/kubelet.conf": self.files[f"nodes/{node}.conf"]}


def leaves(cluster: Cluster) -> list[Leaf]:
    """The leaf certificates of kubeadm's ``init phase certs all`` that this project's control
    plane uses (no etcd peer or health-check client: etcd is one member, checked by the API
    server)."""
    service_ip = str(next(ipaddress.IPv4Network(cluster.service_subnet).hosts()))
    cp, address = cluster.control_plane, cluster.address
    return [
        Leaf("apiserver", "ca", "kube-apiserver", server=True,
             dns=(cp, "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                  "kubernetes.default.svc.cluster.local", "localhost"),
             ips=(service_ip, address, "127.0.0.1")),
        Leaf("apiserver-kubelet-client", "ca", "kube-apiserver-kubelet-client", ADMIN_GROUP, client=True),
        Leaf("front-proxy-client", "front-proxy-ca", "front-proxy-client", client=True),
        Leaf("etcd/server", "etcd/ca", cp, server=True, client=True, dns=(cp, "localhost"),
             ips=(address, "127.0.0.1", "::1")),
        Leaf("apiserver-etcd-client", "etcd/ca", "kube-apiserver-etcd-client", client=True),
    ]


def kubeconfigs(cluster: Cluster) -> dict[str, tuple[str, str | None]]:
    """Each kubeconfig's file and the client it names: (common name, organization)."""
    made: dict[str, tuple[str, str | None]] = {
        "admin.conf": ("kubernetes-admin", ADMIN_GROUP),
        "super-admin.conf": ("kubernetes-super-admin", "system:masters"),
        "controller-manager.conf": ("system:kube-controller-manager", None),
        "scheduler.conf": ("system:kube-scheduler", None),
        "kubelet.conf": (f"system:node:{cluster.control_plane}", "system:nodes"),
        "kube-proxy.conf": ("system:kube-proxy", None),
    }
    for node in cluster.workers:
        made[f"nodes/{node}.conf"] = (f"system:node:{node}", "system:nodes")
    return made


def ensure(folder: Path, cluster: Cluster, adopt: str = "", now: datetime.datetime | None = None) -> Made:
    """Make what is missing or stale in ``folder`` (see the module's text) and return every file.

    ``adopt``: a base64 gzip tar of an existing control plane's ``/etc/kubernetes/pki`` members
    named in ``ADOPTED``, taken in only while the folder has no cluster CA. Raises
    ``DeployError`` when the folder cannot be written or holds an unreadable file.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    store = _Store(folder)
    if adopt and not store.exists("pki/ca.crt"):
        store.adopt(adopt)
    for authority, name in (("ca", "kubernetes"), ("front-proxy-ca", "front-proxy-ca"), ("etcd/ca", "etcd-ca")):
        if not store.exists(f"pki/{authority}.crt"):
            store.make_authority(authority, name, now)
    if not store.exists("pki/sa.key"):
        key = _new_key()
        store.write("pki/sa.key", _key_pem(key))
        store.write("pki/sa.pub", key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    for leaf in leaves(cluster):
        if store.stale(leaf, now):
            store.make_leaf(leaf, now)
    ca = store.text("pki/ca.crt")
    for path, (common_name, organization) in kubeconfigs(cluster).items():
        client = Leaf(path, "ca", common_name, organization, client=True)
        if store.kubeconfig_stale(path, client, cluster, ca, now):
            store.write(path, store.kubeconfig(client, cluster, ca, now))
    return Made(store.files(), tuple(store.changed))


class _Store:
    """The folder's files, read once, written atomically (0600) as they are made."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.changed: list[str] = []
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise DeployError(f"the cluster's certificate folder {folder} cannot be made ({exc.strerror})") from None

    def exists(self, path: str) -> bool:
        return (self.folder / path).is_file()

    def text(self, path: str) -> str:
        try:
            return (self.folder / path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DeployError(f"{self.folder / path} cannot be read ({exc}); remove it to have it made again") \
                from None

    def write(self, path: str, text: str) -> None:
        target = self.folder / path
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(target, text, "certificate file", mode=0o600, error=DeployError)
        self.changed.append(path)

    def files(self) -> dict[str, str]:
        return {str(p.relative_to(self.folder)): p.read_text() for p in sorted(self.folder.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}

    def cert(self, path: str) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.text(path).encode())
        except ValueError:
            raise DeployError(f"{self.folder / path} is not a PEM certificate; remove it to have it made again") \
                from None

    def key(self, path: str) -> Key:
        try:
            key = serialization.load_pem_private_key(self.text(path).encode(), password=None)
        except ValueError:
            raise DeployError(f"{self.folder / path} is not a PEM private key; remove it to have it made again") \
                from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise DeployError(f"{self.folder / path} is not an ECDSA key; remove it to have it made again")
        return key

    def adopt(self, archive: str) -> None:
        try:
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(archive)), mode="r:gz") as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name in ADOPTED:
                        data = tar.extractfile(member)
                        if data is not None:
                            self.write(f"pki/{member.name}", data.read().decode())
        except (tarfile.TarError, ValueError, EOFError) as exc:
            raise DeployError(f"the control plane's certificates could not be taken over ({exc})") from None

    def make_authority(self, path: str, common_name: str, now: datetime.datetime) -> None:
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (_builder(name, name, key.public_key(), now, AUTHORITY_DAYS)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(_usage(cert_sign=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        self.write(f"pki/{path}.key", _key_pem(key))
        self.write(f"pki/{path}.crt", _cert_pem(cert))

    def issue(self, leaf: Leaf, key: Key, now: datetime.datetime) -> x509.Certificate:
        authority, signer = self.cert(f"pki/{leaf.authority}.crt"), self.key(f"pki/{leaf.authority}.key")
        uses = ([ExtendedKeyUsageOID.SERVER_AUTH] if leaf.server else []) + \
               ([ExtendedKeyUsageOID.CLIENT_AUTH] if leaf.client else [])
        builder = (_builder(_subject(leaf), authority.subject, key.public_key(), now, LEAF_DAYS)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_usage(cert_sign=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(uses), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                                  critical=False))
        names = _alt_names(leaf)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def make_leaf(self, leaf: Leaf, now: datetime.datetime) -> None:
        key = _new_key()
        self.write(f"pki/{leaf.path}.key", _key_pem(key))
        self.write(f"pki/{leaf.path}.crt", _cert_pem(self.issue(leaf, key, now)))

    def stale(self, leaf: Leaf, now: datetime.datetime) -> bool:
        """Missing, expiring, signed by another authority, or naming other identities."""
        if not (self.exists(f"pki/{leaf.path}.crt") and self.exists(f"pki/{leaf.path}.key")):
            return True
        return not _current(self.cert(f"pki/{leaf.path}.crt"), leaf, self.cert(f"pki/{leaf.authority}.crt"), now)

    def kubeconfig(self, client: Leaf, cluster: Cluster, ca: str, now: datetime.datetime) -> str:
        key = _new_key()
        cert = self.issue(client, key, now)
        user = client.common_name
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": cluster.name, "cluster": {
                "certificate-authority-data": _b64(ca), "server": cluster.server}}],
            "contexts": [{"name": f"{user}@{cluster.name}", "context": {"cluster": cluster.name, "user": user}}],
            "current-context": f"{user}@{cluster.name}",
            "preferences": {},
            "users": [{"name": user, "user": {"client-certificate-data": _b64(_cert_pem(cert)),
                                              "client-key-data": _b64(_key_pem(key))}}],
        }, sort_keys=False)

    def kubeconfig_stale(self, path: str, client: Leaf, cluster: Cluster, ca: str, now: datetime.datetime) -> bool:
        if not self.exists(path):
            return True
        try:
            config: Mapping[str, Any] = yaml.safe_load(self.text(path))
            entry = config["clusters"][0]["cluster"]
            cert = x509.load_pem_x509_certificate(
                base64.b64decode(config["users"][0]["user"]["client-certificate-data"]))
        except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError):
            return True
        return (entry.get("server") != cluster.server or entry.get("certificate-authority-data") != _b64(ca)
                or not _current(cert, client, self.cert("pki/ca.crt"), now))


def _current(cert: x509.Certificate, leaf: Leaf, authority: x509.Certificate, now: datetime.datetime) -> bool:
    if cert.not_valid_after_utc - RENEW_BEFORE <= now or cert.subject != _subject(leaf):
        return False
    try:
        cert.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        return False
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return not _alt_names(leaf)
    return set(names) == set(_alt_names(leaf))


def _subject(leaf: Leaf) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, leaf.organization)] if leaf.organization else []
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, leaf.common_name)])


def _alt_names(leaf: Leaf) -> list[x509.GeneralName]:
    return [*(x509.DNSName(d) for d in leaf.dns), *(x509.IPAddress(ipaddress.ip_address(i)) for i in leaf.ips)]


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, now: datetime.datetime,
             days: int) -> x509.CertificateBuilder:
    # Backdated a little, as kubeadm does, so a guest clock slightly behind accepts them.
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_encipherment=not cert_sign, key_cert_sign=cert_sign,
                         content_commitment=False, data_encipherment=False, key_agreement=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()

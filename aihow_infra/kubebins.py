"""Kubernetes, etcd, the pause binary and the project's aihow-kube-get, built on this machine:
no release download.

Every command is compiled from the Go module proxy through the wrapper modules in
``kubernetes/`` (``kube`` pins the Kubernetes release, ``etcd`` the etcd server; each has
its own module so that neither shifts the other's dependencies). The version is stamped
the way Kubernetes' own build does, since the kubelet and kubeadm check it. The pause
binary, the sandbox every pod starts from, is compiled from the ``pause.c`` the release
ships; aihow-kube-get (``kubernetes/kube/kubeget``, in the ``kube`` module) from the project's
own source. Binaries are static.

Builds are kept outside the work tree in a folder named by the versions and a hash of
the wrapper modules, so a later clone on the same machine reuses them; a build happens
in a scratch folder renamed into place when whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from aihow_infra.errors import ImageError
from aihow_infra.files import locked
from aihow_infra.state.layout import CHECKOUT
from aihow_infra.steps import Progress, run_step

MODULES_DIR = CHECKOUT / "kubernetes"

# The commands of each wrapper module, in build order (the largest first: their packages
# warm the build cache for the rest).
KUBE_COMMANDS = ("kubelet", "kubectl", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                 "kube-proxy", "kubeadm")
ETCD_PACKAGE = "go.etcd.io/etcd/server/v3"
# The project's own reader of API paths (kubernetes/kube/kubeget): the power broker's and
# status's looks at a cluster, without kubectl's start.
READER = "aihow-kube-get"
READER_PACKAGE = "./kubeget"
# Bump when what the reader does changes (tests/test_kubernetes.py pins its source to this): a
# new version is a new build and a new cloud image, whose name every Cloud VM's disk carries, so
# `up` then asks to replace them. An edit that changes nothing it does (a comment) keeps the image.
READER_VERSION = 1
PAUSE_SOURCE = "build/pause/linux/pause.c"
PAUSE_VERSION = "3.10.1"  # the kubelet's default sandbox image, registry.k8s.io/pause:3.10.1
BUILD_WAIT_SECONDS = 3600.0
# Bump when the build steps below change in a way the wrapper modules do not show.
BUILD_VERSION = 1


def _required(module: str, dependency: str) -> str:
    text = (MODULES_DIR / module / "go.mod").read_text()
    found = re.search(rf"^\s*(?:require\s+)?{re.escape(dependency)}\s+(v\S+)", text, re.M)
    if not found:
        raise ImageError(f"kubernetes/{module}/go.mod does not require {dependency}")
    return found.group(1)


def kubernetes_version() -> str:
    """The Kubernetes release the wrapper module pins, e.g. ``v1.34.2``."""
    return _required("kube", "k8s.io/kubernetes")


def etcd_version() -> str:
    """The etcd release the wrapper module pins."""
    return _required("etcd", ETCD_PACKAGE)


@functools.cache
def go_version() -> str:
    """The Go toolchain that builds (part of the cache key: another toolchain, another build)."""
    if shutil.which("go") is None:
        raise ImageError("building Kubernetes needs Go 1.24 or newer on PATH (see README: Requirements)")
    return subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True).stdout.strip()


@functools.cache
def content_key() -> str:
    """What a build contains: the pinned versions and a hash of the wrapper modules (their
    go.mod and go.sum, so every dependency's sum), of the build recipe and of the reader's
    version; never the toolchain.
    An image carrying the build is named by this, so a Go upgrade renames no image and asks to
    replace no disk."""
    digest = hashlib.sha256(str(BUILD_VERSION).encode())
    for module in ("kube", "etcd"):
        for name in ("go.mod", "go.sum"):
            digest.update((MODULES_DIR / module / name).read_bytes())
    digest.update(f"{READER}-{READER_VERSION}".encode())
    return f"{kubernetes_version()}-etcd{etcd_version()}-{digest.hexdigest()[:12]}"


@functools.cache
def build_key() -> str:
    """Names one build's cache folder: its content and the toolchain that compiled it (another
    toolchain builds again, beside)."""
    version, _, digest = content_key().rpartition("-")
    return f"{version}-{go_version()}-{digest}"


def cache_root() -> Path:
    """Where builds are kept (``AIHOW_KUBERNETES_CACHE`` moves it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("AIHOW_KUBERNETES_CACHE") or Path(base) / "aihow-infra" / "kubernetes")


@dataclass(frozen=True)
class KubeBinaries:
    """A whole build: one folder of static binaries and a manifest of how it was made."""

    folder: Path
    key: str

    def path(self, command: str) -> Path:
        """The binary of one command (``kubelet``, ``etcd``, ``pause``...)."""
        return self.folder / "bin" / command

    @property
    def manifest(self) -> dict[str, object]:
        """Versions, per-command build seconds and sizes, as recorded by the build."""
        data: dict[str, object] = json.loads((self.folder / "build.json").read_text())
        return data

    @property
    def commands(self) -> tuple[str, ...]:
        """Every command the build has."""
        return (*KUBE_COMMANDS, "etcd", READER, "pause")


def find_binaries(root: Path | None = None) -> KubeBinaries | None:
    """The build of the current wrapper modules, when it is whole."""
    key = build_key()
    found = KubeBinaries(folder=(root or cache_root()) / key, key=key)
    if not (found.folder / "build.json").is_file():
        return None
    return found if all(found.path(c).is_file() for c in found.commands) else None


def _version_flags(version: str, build_date: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    values = {"gitVersion": version, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean",
              "buildDate": build_date}
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{name}={value}" for name, value in values.items()]
    return " ".join(flags)


def build_binaries(root: Path, say: Progress) -> KubeBinaries:
    """Compile every command into ``root/<key>``; the first time downloads about 140 MB of
    modules and takes several minutes on two cores, later builds reuse Go's caches."""
    key, version = build_key(), kubernetes_version()
    final = root / key
    scratch = root / f".{key}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "bin").mkdir(parents=True)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))
    flags = f"{os.environ.get('GOFLAGS', '')} -mod=readonly".strip()
    env = {**os.environ, "CGO_ENABLED": "0", "SOURCE_DATE_EPOCH": str(epoch), "GOFLAGS": flags}
    build_date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    seconds: dict[str, float] = {}
    try:
        for module in ("kube", "etcd"):
            say(f"downloading the {module} modules (Go module proxy)")
            run_step(["go", "mod", "download"], say, f"downloading the {module} modules", env,
                     MODULES_DIR / module, ImageError)
        ldflags = _version_flags(version, build_date)
        targets = [(c, "kube", f"k8s.io/kubernetes/cmd/{c}", ldflags) for c in KUBE_COMMANDS]
        targets.append(("etcd", "etcd", ETCD_PACKAGE, "-s -w"))
        targets.append((READER, "kube", READER_PACKAGE, "-s -w"))
        for n, (command, module, package, flags) in enumerate(targets, 1):
            say(f"[{n}/{len(targets) + 1}] go build {command}")
            started = time.monotonic()
            run_step(["go", "build", "-trimpath", "-tags", "selinux,notest", "-ldflags", flags,
                      "-o", str(scratch / "bin" / command), package], say, f"go build {command}", env,
                     MODULES_DIR / module, ImageError)
            seconds[command] = round(time.monotonic() - started, 1)
        say(f"[{len(targets) + 1}/{len(targets) + 1}] gcc pause {PAUSE_VERSION}")
        _build_pause(scratch / "bin" / "pause", env, say)
        sizes = {p.name: p.stat().st_size for p in sorted((scratch / "bin").iterdir())}
        manifest = {"kubernetes": version, "etcd": etcd_version(), "go": go_version(), "pause": PAUSE_VERSION,
                    "build_seconds": seconds, "bytes": sizes}
        (scratch / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    built = find_binaries(root)
    if built is None:
        raise ImageError(f"the Kubernetes build in {final} is not whole")
    return built


def _build_pause(target: Path, env: dict[str, str], say: Progress) -> None:
    listed = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"], cwd=MODULES_DIR / "kube",
                            env=env, check=True, capture_output=True, text=True)
    source = Path(listed.stdout.strip()) / PAUSE_SOURCE
    run_step(["gcc", "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{PAUSE_VERSION}-aihow", "-o", str(target),
              str(source)], say, "building the pause binary (gcc, libc6-dev)", error=ImageError)
    run_step(["strip", str(target)], say, "stripping the pause binary (binutils)", error=ImageError)


def ensure_binaries(say: Progress | None = None, root: Path | None = None) -> KubeBinaries:
    """The build of the current wrapper modules, made when missing."""
    root = root or cache_root()
    found = find_binaries(root)
    if found is not None:
        return found
    say = say or (lambda _line: None)
    # One build at a time: a second task waits for the first and then finds its result.
    with locked(root / build_key(), "the Kubernetes build", BUILD_WAIT_SECONDS, say, error=ImageError):
        return find_binaries(root) or build_binaries(root, say)

"""Where each thing is kept: the one answer per question, and the one place the checkout's own
folder is computed.

- ``CHECKOUT``: the checkout this code runs from (its templates, playbooks, Kubernetes wrapper
  modules, and the default project: ``Pulumi.yaml`` and the stack files beside it).
- ``STATE_ROOT``: the host's state of the project tools (``AIHOW_STATE_DIR``, default
  ``CHECKOUT/.state``); each project has a folder of its own below some of it (``ProjectState``).
- ``BUILT_IMAGES_DIR``: the images ``image.build`` makes (``AIHOW_IMAGES_DIR``, default
  ``/var/lib/aihow/images``), shared by every project on the host. Not to be confused with a
  stack's ``aihow:imagesDir``, where its VMs' disks and seeds live.

Every file kept there is written through ``files.atomic_write``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
STATE_ROOT = Path(os.environ.get("AIHOW_STATE_DIR") or CHECKOUT / ".state")
BUILT_IMAGES_DIR = Path("/var/lib/aihow/images")


def built_images_dir() -> Path:
    """Where built images are kept now (``AIHOW_IMAGES_DIR`` moves it; read at each call)."""
    return Path(os.environ.get("AIHOW_IMAGES_DIR") or BUILT_IMAGES_DIR)


@dataclass(frozen=True)
class ProjectState:
    """Where one project's records are kept. In the project folder (they travel with it):
    power records and last runs. Under ``root`` (the host's, git-ignored), by project: deploy
    records, admin kubeconfigs and Kubernetes certificates; shared: the project SSH key and
    ``ssh_config``."""

    project_dir: Path
    root: Path = STATE_ROOT

    @property
    def slug(self) -> str:
        """The project's folder name under ``root``: ``default`` for the checkout's own, else a
        hash of its path (test workspaces stay apart)."""
        resolved = self.project_dir.resolve()
        return "default" if resolved == CHECKOUT else hashlib.sha256(str(resolved).encode()).hexdigest()[:12]

    @property
    def power(self) -> Path:
        """Each stack's desired power, ``<stack>.json`` (desired.py)."""
        return self.project_dir / ".state" / "power"

    @property
    def runs(self) -> Path:
        """Each stack's last successful up, ``<stack>.json`` (lastrun.py)."""
        return self.project_dir / ".state" / "runs"

    @property
    def deploys(self) -> Path:
        """Each stack's last deploy's fingerprint, ``<stack>.json`` (deploy.py)."""
        return self.root / "deploy" / self.slug

    @property
    def broker(self) -> Path:
        """The power broker's record on this host (ops/broker.py), its lock beside it (``.lock``)."""
        return self.root / "broker" / f"{self.slug}.json"

    def kubeconfig(self, stack: str) -> Path:
        """The admin kubeconfig a deploy of a Kubernetes stack leaves (0600)."""
        return self.root / "kube" / self.slug / f"{stack}-admin.conf"

    def kube_pki(self, stack: str) -> Path:
        """A Kubernetes stack's certificates and kubeconfigs (0700; kubepki.py)."""
        return self.root / "kube" / self.slug / f"{stack}-pki"

    @property
    def ssh(self) -> Path:
        """The project SSH key (``id_ed25519``), ``config`` and ``known_hosts``."""
        return self.root / "ssh"

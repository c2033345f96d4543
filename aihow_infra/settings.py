"""Stack settings: what ``Pulumi.<stack>.yaml`` holds under the ``aihow:`` namespace.

The cluster file describes the clusters; the stack settings say where and how
this host runs one of them. Pure data (no pulumi import): ``__main__.py`` reads
the raw values from the stack config and validates them here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aihow_infra.config import CLUSTER_KEYS, ClusterKey
from aihow_infra.database import HOST_PARAM, is_database_url, redacted
from aihow_infra.errors import ConfigError
from aihow_infra.libvirt_names import canonical_uri

DEFAULT_LEDGER = "/var/lib/aihow/gpu-leases.json"
DEFAULT_POOLS_DIR = "/var/lib/libvirt/images/aihow"  # aihow:imagesDir: the clusters' disks and seeds

# Former settings, now power records in the project's state (aihow_infra.desired).
MOVED = {"power": "vm.start/vm.stop", "clusterPower": "system.up/system.down"}


DEFAULT_LIBVIRT_URI = "qemu:///system"  # libvirt's system daemon, where VFIO passthrough works

class StackSettings(BaseModel):
    """The ``aihow:*`` stack config keys (camelCase in YAML)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    cluster_file: str = Field(alias="clusterFile")
    cluster: ClusterKey | None = None
    libvirt_uri: str = Field(DEFAULT_LIBVIRT_URI, alias="libvirtUri")
    images_dir: str = Field(DEFAULT_POOLS_DIR, alias="imagesDir")
    ledger_path: str = Field(DEFAULT_LEDGER, alias="ledgerPath")
    stop_timeout: float = Field(60.0, alias="stopTimeout", gt=0)
    virt_type: Literal["auto", "kvm", "qemu"] = Field("auto", alias="virtType")
    ssh_public_key: str | None = Field(None, alias="sshPublicKey")
    login_user: str = Field("aihow", alias="loginUser", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    ready_timeout: float = Field(900.0, alias="readyTimeout", gt=0)
    ansible_connection: Literal["ssh", "agent"] = Field("ssh", alias="ansibleConnection")
    drain_timeout: float = Field(300.0, alias="drainTimeout", ge=0)
    graphics: Literal["none", "vnc-socket"] = "none"
    allow_system_paths: bool = Field(False, alias="allowSystemPaths")

    @field_validator("libvirt_uri")
    @classmethod
    def _canonical_uri(cls, value: str) -> str:
        return canonical_uri(value)

    @field_validator("images_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not Path(value).is_absolute():
            raise ValueError(f"{value!r} is relative; allowed: an absolute path")
        return value

    @field_validator("ledger_path")
    @classmethod
    def _ledger(cls, value: str) -> str:
        if f"{HOST_PARAM}=" in value:
            raise ValueError(f"{redacted(value)!r} names {HOST_PARAM}; allowed: a URL without it (the project keys "
                             "leases by the libvirt host it finds)")
        if is_database_url(value) or Path(value).is_absolute():
            return value
        raise ValueError(f"{value!r} is neither an absolute path nor a PostgreSQL URL; allowed: a file such as "
                         f"{DEFAULT_LEDGER}, or postgresql://USER@HOST/DATABASE (one ledger several hosts share)")

    def pool_folder(self, cluster_name: str) -> str:
        """The folder of a cluster's storage pool, below the images folder."""
        return f"{self.images_dir.rstrip('/')}/{cluster_name}"

    def cluster_key(self, stack: str) -> ClusterKey:
        """The cluster this stack deploys: ``aihow:cluster``, else the stack's name."""
        if self.cluster is not None:
            return self.cluster
        if stack in CLUSTER_KEYS:
            return stack
        raise ConfigError([f"aihow:cluster: not set and the stack name {stack!r} is not a cluster; "
                           "allowed: name the stack 'hpc' or 'cloud', or set aihow:cluster to one of them"],
                          "stack settings")


def parse_settings(raw: dict[str, Any]) -> StackSettings:
    """Validate the raw ``aihow:`` keys; raise ``ConfigError`` naming each bad key."""
    moved = [f"aihow:{key}: desired power is no longer a stack setting (it lives in .state/power, "
             f"git-ignored); allowed: remove it (pulumi config rm aihow:{key}) and use `aihow {tasks}`"
             for key, tasks in MOVED.items() if key in raw]
    if moved:
        raise ConfigError(moved, "stack settings")
    try:
        return StackSettings.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = "aihow:" + ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                problems.append(f"{key}: required setting is missing (pulumi config set {key} FILE)")
            elif err["type"] == "extra_forbidden":
                problems.append(f"{key}: unknown setting; allowed: {', '.join(sorted(_aliases()))}")
            elif err["type"] == "value_error":
                problems.append(f"{key}: {str(err['msg']).removeprefix('Value error, ')}")
            else:
                message = str(err["msg"]).removeprefix("Input should be ")
                problems.append(f"{key}: {err.get('input')!r} is invalid; allowed: {message}")
        raise ConfigError(problems, "stack settings") from None


def _aliases() -> set[str]:
    return {f.alias or n for n, f in StackSettings.model_fields.items()}

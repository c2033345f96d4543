"""A VM's cloud-init NoCloud seed as a Pulumi resource: an ISO volume in the cluster's pool.

It lives as long as its domain (a seed removed after the first boot breaks later boots,
as virt-install's temporary one does), and is replaced only when what it says changes.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypedDict

import libvirt
import pulumi
from pulumi.dynamic import CheckFailure, CreateResult, Resource

from aihow_infra.cloudinit import SEED_FILES, seed_iso
from aihow_infra.libvirt.connection import call, connect
from aihow_infra.libvirt.render import volume_xml
from providers.base import Input
from providers.storage import VolumeInPool, send_all


class SeedArgs(TypedDict):
    """The inputs of a ``Seed``: where it goes and its three files."""

    uri: str
    pool: Input[str]
    name: str
    files: dict[str, str]


class SeedProvider(VolumeInPool):
    """Writes the seed ISO into a raw volume through libvirt (so it works on any pool)."""

    INPUTS = SeedArgs
    REPLACE = frozenset({"uri", "pool", "name", "files"})
    KIND = "seed volume"

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """The three NoCloud files, no others."""
        files = news.get("files")
        if isinstance(files, dict) and sorted(files) != sorted(SEED_FILES):
            return [CheckFailure("files", f"files: {sorted(files)}; allowed: exactly {', '.join(SEED_FILES)}")]
        return []

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Create the volume and upload the ISO; a half-written volume is removed."""
        name = props["name"]
        data = seed_iso(props["files"])
        with connect(props["uri"]) as conn:
            vol = self.create_volume(conn, props, volume_xml({"name": name, "size_bytes": len(data), "format": "raw"}))
            try:
                stream = conn.newStream(0)
                call(f"uploading seed {name}", vol.upload, stream, 0, len(data), 0)
                send_all(stream, data)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
                raise
            return CreateResult(f"{props['pool']}/{name}", {**props, "path": vol.path(), "size": len(data)})


class Seed(Resource, module="cloudinit", name="Seed"):
    """A cloud-init NoCloud seed ISO; ``path`` is what the domain attaches read-only."""

    path: pulumi.Output[str]

    def __init__(self, resource_name: str, props: SeedArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(SeedProvider(), resource_name, {**props, "path": None, "size": None}, opts)

"""Container images made here, as OCI image archives: no registry is needed or reachable.

An archive holds one single-layer image (the OCI image layout: ``oci-layout``,
``index.json``, and the blobs). containerd imports it under the name in its
``io.containerd.image.name`` annotation, so pods find ``registry.k8s.io/pause:3.10.1``
without pulling it. Archives are byte-for-byte reproducible (fixed times and owners).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class ImageSpec:
    """One image: its reference, its files (path in the image -> file on this host), symbolic
    links (path -> target) and what it runs: ``entrypoint``, to which a pod's ``args`` are
    given, or else ``cmd``, which a pod's ``args`` replace (as busybox's own image does)."""

    reference: str
    files: Mapping[str, Path]
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    symlinks: Mapping[str, str] = field(default_factory=dict)
    env: Sequence[str] = ("PATH=/bin:/usr/bin",)


def _info(name: str, kind: bytes, size: int = 0, mode: int = 0o755) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _layer(spec: ImageSpec) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = {*spec.files, *spec.symlinks}
        folders = sorted({str(Path(p).parent).lstrip("/") for p in paths} - {""})
        for folder in folders:
            tar.addfile(_info(folder, tarfile.DIRTYPE))
        for path in sorted(spec.files):
            data = spec.files[path].read_bytes()
            tar.addfile(_info(path.lstrip("/"), tarfile.REGTYPE, len(data)), io.BytesIO(data))
        for path in sorted(spec.symlinks):
            link = _info(path.lstrip("/"), tarfile.SYMTYPE, mode=0o777)
            link.linkname = spec.symlinks[path]
            tar.addfile(link)
    return buffer.getvalue()


def _blob(data: bytes, media_type: str) -> tuple[dict[str, object], str]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(data)}, digest


def write_archive(spec: ImageSpec, target: Path) -> str:
    """Write ``spec`` as an OCI archive at ``target``; returns the manifest's digest."""
    layer = _layer(spec)
    layer_ref, layer_digest = _blob(layer, LAYER_TYPE)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {**({"Entrypoint": list(spec.entrypoint)} if spec.entrypoint else {}),
                   **({"Cmd": list(spec.cmd)} if spec.cmd else {}), "Env": list(spec.env)},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode()
    config_ref, _ = _blob(config, CONFIG_TYPE)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config_ref,
                           "layers": [layer_ref]}, sort_keys=True).encode()
    manifest_ref, manifest_digest = _blob(manifest, MANIFEST_TYPE)
    tag = spec.reference.rsplit(":", 1)[-1] if ":" in spec.reference.rsplit("/", 1)[-1] else "latest"
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [{
        **manifest_ref, "annotations": {"io.containerd.image.name": spec.reference,
                                        "org.opencontainers.image.ref.name": tag}}]}, sort_keys=True).encode()
    blobs = {layer_digest: layer, str(config_ref["digest"]): config, manifest_digest: manifest}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index,
                   **{f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()}}
        for folder in ("blobs", "blobs/sha256"):
            tar.addfile(_info(folder, tarfile.DIRTYPE))
        for name in sorted(entries):
            tar.addfile(_info(name, tarfile.REGTYPE, len(entries[name]), 0o644), io.BytesIO(entries[name]))
    partial.replace(target)
    return str(manifest_digest)

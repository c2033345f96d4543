"""libvirt storage as Pulumi resources: a directory pool per cluster, a qcow2 volume per VM."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, NotRequired, TypedDict

import libvirt
import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, Resource, UpdateResult

from aihow_infra.errors import LibvirtError
from aihow_infra.libvirt.connection import call, connect, discard, lookup, remove_pool, translate
from aihow_infra.libvirt.inspect import pool_path
from aihow_infra.libvirt.render import pool_xml, volume_xml
from providers.base import Input, LibvirtProvider


class PoolArgs(TypedDict):
    """The inputs of a ``StoragePool``: a directory pool."""

    uri: str
    name: str
    path: str


class VolumeArgs(TypedDict):
    """The inputs of a ``Volume``: a qcow2 disk, blank or an overlay on ``base_image``."""

    uri: str
    pool: Input[str]
    name: str
    size_gb: int
    base_image: NotRequired[str | None]


class PoolProvider(LibvirtProvider):
    """A directory pool under the images folder."""

    INPUTS = PoolArgs
    REPLACE = frozenset({"uri", "name", "path"})
    MUST_HOLD: ClassVar[dict[str, Any]] = {"active": True}
    KIND = "storage pool"

    def is_ours(self, obj: libvirt.virStoragePool, props: dict[str, Any]) -> bool:
        """A pool of this name on this folder (a pool has no metadata; the folder is the cluster's)."""
        return bool(pool_path(obj) == props["path"])

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Define, build (mkdir), start and autostart (or take over this cluster's pool, left by
        an interrupted run); on failure remove what this call made."""
        name = props["name"]
        with connect(props["uri"]) as conn:
            pool = self.refuse_existing(conn, props, f"virsh pool-destroy {name}; virsh pool-undefine {name}")
            made = pool is None
            if pool is None:
                pool = call(f"defining pool {name}", conn.storagePoolDefineXML, pool_xml(props), 0)
            try:
                self._start(pool, props)
                call(f"marking pool {name} autostart", pool.setAutostart, 1)
            except LibvirtError:
                if made:
                    discard(pool)
                raise
            return CreateResult(name, self.observe(pool, props))

    def _start(self, pool: libvirt.virStoragePool, props: dict[str, Any]) -> None:
        if pool.isActive():
            return
        try:
            pool.create(0)
        except libvirt.libvirtError:
            # Its folder is missing: made through libvirt (on the pool's host, which may not be
            # this machine); one that is there is kept as it is.
            call(f"creating folder of pool {props['name']}", pool.build, 0)
            call(f"starting pool {props['name']}", pool.create, 0)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Start the pool again when it was stopped (or its folder removed) behind Pulumi's back."""
        with connect(news["uri"]) as conn:
            pool = call(f"looking up pool {news['name']}", conn.storagePoolLookupByName, news["name"])
            self._start(pool, news)
            return UpdateResult(self.observe(pool, news))

    def find(self, conn: libvirt.virConnect, props: dict[str, Any]) -> libvirt.virStoragePool | None:
        """The pool named in the inputs."""
        return lookup("looking up pool", conn.storagePoolLookupByName, props["name"])

    def remove(self, pool: libvirt.virStoragePool, props: dict[str, Any]) -> None:
        """Stop, remove the folder when empty (files we did not make stay), undefine."""
        remove_pool(pool)

    def observe(self, pool: libvirt.virStoragePool, props: dict[str, Any]) -> dict[str, Any]:
        """The inputs, the pool's UUID and whether it is started."""
        return {**props, "uuid": pool.UUIDString(), "active": bool(pool.isActive())}


def image_format(path: str) -> str:
    """The format of a base image, as qemu-img reports it."""
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise LibvirtError(f"base image {path!r} cannot be read by qemu-img: {detail.strip()}") from None
    return str(json.loads(out)["format"])


class VolumeInPool(LibvirtProvider):
    """A provider of volumes in a pool: found, removed and shown the same way for every kind."""

    def is_ours(self, obj: libvirt.virStorageVol, props: dict[str, Any]) -> bool:
        """A volume of this name in the cluster's own pool."""
        return True

    def create_volume(self, conn: libvirt.virConnect, props: dict[str, Any], xml: str) -> libvirt.virStorageVol:
        """Create the volume from ``xml``. An existing volume of that name is taken over when
        ``is_ours`` (an interrupted run made it), else refused; never overwritten."""
        name, pool_name = props["name"], props["pool"]
        pool = call(f"looking up pool {pool_name}", conn.storagePoolLookupByName, pool_name)
        found = self.find(conn, props)
        if found is not None:
            if self.left_by_us(found, props):
                return found
            raise LibvirtError(f"{self.KIND} {name!r} already exists in pool {pool_name!r} outside this stack; "
                               f"remove it (virsh vol-delete {name} --pool {pool_name}) to let it be made")
        return call(f"creating {self.KIND} {name}", pool.createXML, xml, 0)

    def find(self, conn: libvirt.virConnect, props: dict[str, Any]) -> libvirt.virStorageVol | None:
        """The volume named in the inputs (None also when its pool is gone)."""
        pool = lookup("looking up pool", conn.storagePoolLookupByName, props["pool"])
        if pool is None:
            return None
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)  # see files removed behind libvirt's back
        return lookup("looking up volume", pool.storageVolLookupByName, props["name"])

    def remove(self, vol: libvirt.virStorageVol, props: dict[str, Any]) -> None:
        """Delete the volume's file."""
        call(f"deleting {self.KIND} {props['name']}", vol.delete, 0)

    def observe(self, vol: libvirt.virStorageVol, props: dict[str, Any]) -> dict[str, Any]:
        """The inputs, the volume's path and its size in bytes."""
        return {**props, "path": vol.path(), "capacity": vol.info()[1]}


class VolumeProvider(VolumeInPool):
    """A VM disk: qcow2 of ``size_gb``, an overlay on ``base_image`` (never a copy) or blank."""

    INPUTS = VolumeArgs
    REPLACE = frozenset({"uri", "pool", "name", "base_image"})
    UPDATE = frozenset({"size_gb"})
    KIND = "volume"

    def left_by_us(self, obj: libvirt.virStorageVol, props: dict[str, Any]) -> bool:
        """A volume of this name in the cluster's own pool with the same backing image (or none)."""
        backing = ET.fromstring(obj.XMLDesc(0)).findtext("./backingStore/path")
        return bool(backing == props.get("base_image"))

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        """The inputs' checks, and a disk never shrinks (its data would be cut)."""
        result = super().check(olds, news)
        old, new = olds.get("size_gb"), result.inputs.get("size_gb")
        if isinstance(old, int | float) and isinstance(new, int) and new < old and \
                olds.get("name") == news.get("name"):
            result.failures.append(CheckFailure("size_gb", (
                f"size_gb: {new} is smaller than the disk {news.get('name')}'s {old:.0f} GiB; allowed: {old:.0f} or "
                "more (disks only grow: shrinking would cut the guest's data)")))
        return result

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Grow the disk in place, keeping its data. A disk in use by a running VM is locked by
        its qemu: the VM's domain grows it live instead (``blockResize``)."""
        size = int(news["size_gb"]) * 2**30
        with connect(news["uri"]) as conn:
            vol = self.find(conn, news)
            if vol is None:
                raise LibvirtError(f"volume {news['name']} is gone from pool {news['pool']}; "
                                   "allowed: run `aihow up` again (a refresh notices it and makes it anew)")
            if vol.info()[1] < size:
                try:
                    vol.resize(size, 0)
                except libvirt.libvirtError as exc:
                    if "lock" not in str(exc):
                        raise translate(exc, f"growing volume {news['name']}") from None
            return UpdateResult(self.observe(vol, news))

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """Positive size; an absolute, existing base image when one is named."""
        failures = []
        size = news.get("size_gb")
        if isinstance(size, int) and size <= 0:
            failures.append(CheckFailure("size_gb", f"size_gb: {size}; allowed: a positive number of GiB"))
        image = news.get("base_image")
        if isinstance(image, str) and not Path(image).is_file():
            failures.append(CheckFailure("base_image", f"base_image: {image!r} does not exist; "
                                                       "allowed: an existing image file"))
        return failures

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Create the volume."""
        backing_format = image_format(props["base_image"]) if props.get("base_image") else "qcow2"
        with connect(props["uri"]) as conn:
            vol = self.create_volume(conn, props, volume_xml(props, backing_format))
            return CreateResult(f"{props['pool']}/{props['name']}", self.observe(vol, props))


class StoragePool(Resource, module="libvirt", name="StoragePool"):
    """A libvirt directory pool."""

    name: pulumi.Output[str]

    def __init__(self, resource_name: str, props: PoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(PoolProvider(), resource_name, {**props, "uuid": None, "active": None}, opts)


class Volume(Resource, module="libvirt", name="Volume"):
    """A libvirt storage volume; ``path`` is what a domain's disk points at."""

    path: pulumi.Output[str]

    def __init__(self, resource_name: str, props: VolumeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(VolumeProvider(), resource_name, {**props, "path": None, "capacity": None}, opts)


class HostImageArgs(TypedDict):
    """The inputs of a ``HostImage``: a built image folder (``images.Image``) that must be on the
    libvirt host of ``uri`` at the same path."""

    uri: str
    name: str  # the image's folder name, ``<role>-<recipe key>``
    source: str  # where this machine has the built image
    folder: str  # where the host keeps it (the same path: domains name its kernel by path)
    files: list[str]  # the files to copy, the marker (image.json) last


CHUNK = 1 << 20  # bytes per stream write


def send_all(stream: libvirt.virStream, data: bytes) -> None:
    """Write all of ``data`` to a libvirt stream (one send may take part of it)."""
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view[:CHUNK]))
        view = view[sent:]
COPY_WAIT = 1800  # seconds to wait for another run copying the same image to the same host


class HostImageProvider(LibvirtProvider):
    """A project image on a libvirt host, copied there through libvirt's storage streams when the
    host lacks it (a remote host), found in place when it has it (the machine that built it).

    The folder is opened as a transient directory pool for the copy and closed after, so a host
    keeps no libvirt object for it. Files are copied in order, the marker (``image.json``, equal
    to the built one) last: a copy cut short leaves no marker, and the next run copies again. The
    image stays on the host when the resource is deleted: images are a cache keyed by their
    recipe, which other stacks on that host may use (as this machine's images folder is)."""

    INPUTS = HostImageArgs
    REPLACE = frozenset({"uri", "name", "source", "folder", "files"})
    KIND = "image"

    def is_ours(self, obj: Any, props: dict[str, Any]) -> bool:
        """An image folder with this recipe's marker is this image, whoever copied it."""
        return True

    @contextlib.contextmanager
    def _opened(self, conn: libvirt.virConnect, props: dict[str, Any]) -> Iterator[libvirt.virStoragePool]:
        """The folder as a started pool, held for this run: a transient one (built when the folder
        is missing), destroyed on the way out. Its path is the lock: while another run holds the
        folder (its ``aihow-copy-`` pool), this one waits, so two copies never interleave; a pool
        of the operator's own on that path is used as it is."""
        folder, deadline = props["folder"], time.monotonic() + COPY_WAIT
        xml = pool_xml({"name": f"aihow-copy-{props['name']}-{uuid.uuid4().hex[:8]}", "path": folder,
                        "mode": "0755"})
        failures = 0
        while True:
            held = self._holder(conn, folder)
            if held is not None and not held.name().startswith("aihow-copy-"):
                held.refresh(0)
                yield held
                return
            if held is None:
                try:
                    pool = self._open(conn, xml, folder)
                    break
                except LibvirtError:
                    # Another run may have taken the folder between the look and the start (and
                    # be done already): look again; a failure of its own repeats.
                    failures += 1
                    if failures >= 3:
                        raise
            if time.monotonic() > deadline:
                raise LibvirtError(f"image folder {folder} on {props['uri']} is held by pool "
                                   f"{held.name() if held else '?'} for {COPY_WAIT // 60} minutes; allowed: wait for "
                                   "the run copying it, or, when none is, virsh pool-destroy that pool")
            time.sleep(1)
        try:
            yield pool
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                pool.destroy()

    @staticmethod
    def _holder(conn: libvirt.virConnect, folder: str) -> libvirt.virStoragePool | None:
        """The started pool on ``folder``, if any (a transient pool may vanish while listed)."""
        for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):
                if pool_path(pool) == folder:
                    return pool
        return None

    @staticmethod
    def _open(conn: libvirt.virConnect, xml: str, folder: str) -> libvirt.virStoragePool:
        """Start a transient pool on ``folder``; a missing folder is made (a build of one that is
        there would set its mode, so it is tried second)."""
        try:
            return conn.storagePoolCreateXML(xml, 0)
        except libvirt.libvirtError:
            pass
        try:
            return conn.storagePoolCreateXML(xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"opening image folder {folder}") from None

    def find(self, conn: libvirt.virConnect, props: dict[str, Any]) -> str | None:
        """The folder's path when the host has the image (its marker equals the built one)."""
        marker = props["files"][-1]
        expected = (Path(props["source"]) / marker).read_bytes()
        with self._opened(conn, props) as pool:
            vol = lookup("looking up image marker", pool.storageVolLookupByName, marker)
            if vol is None or vol.info()[1] != len(expected):
                return None
            stream = conn.newStream(0)
            call(f"reading {marker} of image {props['name']}", vol.download, stream, 0, len(expected), 0)
            got = bytearray()
            while len(got) < len(expected):
                chunk = stream.recv(len(expected) - len(got))
                if not chunk:
                    break
                got += chunk
            stream.finish()
            return str(props["folder"]) if bytes(got) == expected else None

    def remove(self, obj: Any, props: dict[str, Any]) -> None:
        """Nothing: the image stays on the host (a cache other stacks may use)."""

    def observe(self, obj: Any, props: dict[str, Any]) -> dict[str, Any]:
        """The inputs, with the folder as found on the host."""
        return {**props, "path": obj}

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Copy the image's files the host lacks (all of them, the marker last, when its marker is
        missing or another); none when it has the image."""
        with connect(props["uri"]) as conn:
            if self.find(conn, props) is None:
                with self._opened(conn, props) as pool:
                    for name in props["files"]:
                        self._copy(conn, pool, Path(props["source"]) / name)
            found = self.find(conn, props)
            if found is None:
                raise LibvirtError(f"image {props['name']} was copied to {props['uri']} but its marker does not "
                                   "read back the same; allowed: a host whose storage keeps what is written")
            return CreateResult(props["name"], self.observe(found, props))

    def _copy(self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, source: Path) -> None:
        """Copy one file into ``pool`` as a volume of its name, replacing a partial one."""
        old = lookup("looking up volume", pool.storageVolLookupByName, source.name)
        if old is not None:
            call(f"deleting partial copy {source.name}", old.delete, 0)
        size = source.stat().st_size
        vol = call(f"creating {source.name}", pool.createXML,
                   volume_xml({"name": source.name, "size_bytes": size, "format": "raw", "mode": "0644"}), 0)
        stream = conn.newStream(0)
        call(f"copying {source}", vol.upload, stream, 0, size, 0)
        try:
            with source.open("rb") as data:
                while chunk := data.read(CHUNK):
                    send_all(stream, chunk)
            stream.finish()
        except (OSError, libvirt.libvirtError) as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise LibvirtError(f"copying {source} to the host: {exc}") from None


class HostImage(Resource, module="libvirt", name="HostImage"):
    """A project image on one libvirt host (copied there when missing)."""

    path: pulumi.Output[str]

    def __init__(self, resource_name: str, props: HostImageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(HostImageProvider(), resource_name, {**props, "path": None}, opts)

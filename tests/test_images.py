"""Guest images: the recipe and its hash, the cache, and the in-image settings.

The build itself (mmdebstrap, mke2fs, qemu-img) runs in the end-to-end boot tests, which
boot what it makes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aihow_infra import images
from aihow_infra.errors import ImageError
from aihow_infra.images import (
    BASE_PACKAGES,
    IMAGE_ROLES,
    Recipe,
    customize,
    ensure_image,
    find_image,
    image_for,
    recipe_for,
)


def test_each_role_has_its_own_stable_key() -> None:
    keys = {role: recipe_for(role).key for role in ("base", "hpc", "cloud")}
    assert len(set(keys.values())) == 3
    assert keys == {role: recipe_for(role).key for role in ("base", "hpc", "cloud")}  # same recipe, same key
    assert {"slurmctld", "slurmd", "slurm-client", "munge"} <= set(recipe_for("hpc").packages)
    assert {"containerd", "runc", "containernetworking-plugins"} <= set(recipe_for("cloud").packages)
    assert set(BASE_PACKAGES) <= set(recipe_for("base").packages)


def test_the_gpu_host_simulator_image_is_a_workstation_not_a_node() -> None:
    # It carries what the project needs on a host (libvirt, qemu, a venv-capable Python) and is
    # built only when asked: `image.build --role all` makes the cluster roles.
    gpuhost = recipe_for("gpuhost")
    assert {"libvirt-daemon-system", "libvirt-daemon-driver-qemu", "qemu-system-x86", "python3-venv"} <= set(
        gpuhost.packages)
    assert gpuhost.key not in {recipe_for(role).key for role in IMAGE_ROLES} and "gpuhost" not in IMAGE_ROLES


def test_any_change_to_the_recipe_changes_the_key() -> None:
    base = recipe_for("base")
    changed = [Recipe(**{**base.__dict__, "packages": (*base.packages, "vim")}),
               Recipe(**{**base.__dict__, "files": (*base.files, ("/etc/motd", "hi\n"))}),
               Recipe(**{**base.__dict__, "size_gb": 3}),
               Recipe(**{**base.__dict__, "build_version": base.build_version + 1})]
    assert len({r.key for r in changed} | {base.key}) == 5


def test_unknown_role_is_one_clear_line() -> None:
    with pytest.raises(ImageError, match=r"^image role 'gpu' is unknown; allowed: base, hpc, cloud, gpuhost$"):
        recipe_for("gpu")


def _fake_build(root: Path, role: str, whole: bool = True) -> Path:
    folder = image_for(role, root).folder
    folder.mkdir(parents=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (folder / name).write_bytes(b"x")
    if whole:
        (folder / "image.json").write_text(json.dumps({"built_seconds": 1.5, "disk_bytes": 1}))
    return folder


def test_a_cached_image_is_reused_and_a_partial_one_is_not(tmp_path: Path) -> None:
    assert find_image(recipe_for("hpc"), tmp_path) is None
    _fake_build(tmp_path, "hpc", whole=False)  # an interrupted build: no manifest
    assert find_image(recipe_for("hpc"), tmp_path) is None
    (image_for("hpc", tmp_path).folder / "image.json").write_text("{}")
    image, built = ensure_image("hpc", root=tmp_path)
    assert not built and image.folder == tmp_path / recipe_for("hpc").name


def test_customize_leaves_nothing_clones_would_share(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc/ssh").mkdir(parents=True)
    (rootfs / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (rootfs / "etc/ssh/sshd_config").write_text("keep")
    (rootfs / "etc/hostname").write_text("builder")
    (rootfs / "etc/machine-id").write_text("0123456789abcdef\n")
    (rootfs / "etc/munge").mkdir()
    (rootfs / "etc/munge/munge.key").write_text("shared by every clone")
    (rootfs / "var/cache/apt/archives").mkdir(parents=True)
    (rootfs / "var/cache/apt/archives/x.deb").write_text("deb")
    customize(rootfs, recipe_for("base"))
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*")) and (rootfs / "etc/ssh/sshd_config").exists()
    assert not (rootfs / "etc/hostname").exists() and not (rootfs / "etc/munge/munge.key").exists()
    assert (rootfs / "etc/machine-id").read_text() == ""
    assert not (rootfs / "var/cache/apt/archives/x.deb").exists()
    assert "datasource_list: [NoCloud, None]" in (rootfs / "etc/cloud/cloud.cfg.d/90-aihow.cfg").read_text()
    assert (rootfs / "etc/systemd/system/apt-daily.timer").readlink() == Path("/dev/null")
    assert (rootfs / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service").is_symlink()


def test_a_second_task_waits_for_the_build_and_uses_its_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tasks needing one missing image (two test runs side by side, `up` of both stacks in
    two shells): one builds, the other waits for it and builds nothing."""
    builds: list[str] = []
    started, release = threading.Event(), threading.Event()

    def slow_build(recipe: Any, root: Path, say: Any) -> Any:
        builds.append(recipe.name)
        started.set()
        release.wait(10)
        _fake_build(root, recipe.role)
        return find_image(recipe, root)

    monkeypatch.setattr(images, "build_image", slow_build)
    said: list[str] = []
    first = threading.Thread(target=ensure_image, args=("hpc",), kwargs={"root": tmp_path})
    first.start()
    assert started.wait(10)
    second: list[tuple[Any, bool]] = []
    waiter = threading.Thread(target=lambda: second.append(ensure_image("hpc", root=tmp_path, progress=said.append)))
    waiter.start()
    deadline = time.monotonic() + 10
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    assert said == [f"the {recipe_for('hpc').name} image waits for another task's image build to end"] and not second
    release.set()
    first.join(10)
    waiter.join(10)
    assert builds == [recipe_for("hpc").name] and second[0][1] is False


def test_the_cloud_image_boots_with_containerd_configured_and_its_images_imported(tmp_path: Path) -> None:
    # What every Kubernetes node has is in the image (the roles' own files, read from the
    # checkout), the import's unit enabled from where the image writes it, the script runnable; the
    # other images carry none of it.
    rootfs = tmp_path / "rootfs"
    customize(rootfs, recipe_for("cloud"))
    for path, source in images.KUBERNETES_NODE_FILES.items():
        written = rootfs / path.lstrip("/")
        assert written.read_text() == (images.CHECKOUT / "ansible/roles" / source).read_text(), path
    assert (rootfs / "usr/local/sbin/aihow-import-images").stat().st_mode & 0o777 == 0o755
    assert (rootfs / "etc/containerd/config.toml").stat().st_mode & 0o777 == 0o644
    link = rootfs / "etc/systemd/system/multi-user.target.wants/aihow-images.service"
    assert link.readlink() == Path("/etc/systemd/system/aihow-images.service")
    assert (rootfs / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service").readlink() == Path(
        "/lib/systemd/system/systemd-networkd.service")
    for role in ("base", "hpc", "gpuhost"):
        assert recipe_for(role).kubernetes_node_files == 0
        assert "aihow-images.service" not in recipe_for(role).enabled_units
        other = tmp_path / role
        customize(other, recipe_for(role))
        assert not any((other / path.lstrip("/")).exists() for path in images.KUBERNETES_NODE_FILES)


# The digest of the node files the cloud image carries, by images.KUBERNETES_NODE_FILES_VERSION.
NODE_FILES = {1: "308fa6d4b74b80af7266c0a09eec2c09bbc79d064c754fd8c53259352637c17e"}


def test_the_node_files_the_cloud_image_carries_are_pinned_to_their_version() -> None:
    # The image is named by the version, not the files' bytes (a new cloud image asks to make every
    # Cloud disk anew): an edit to one of them decides, here, whether nodes get a new image.
    digest = hashlib.sha256(json.dumps(images.kubernetes_node_files(), sort_keys=True).encode()).hexdigest()
    assert NODE_FILES.get(images.KUBERNETES_NODE_FILES_VERSION) == digest, (
        f"the cloud image's node files changed (digest {digest}): bump images.KUBERNETES_NODE_FILES_VERSION "
        "and record the digest under it when nodes must boot with the change (a new cloud image: the next "
        "up asks to make every Cloud disk anew), or record it under the current version when the deploy "
        "laying it down is enough")
    assert recipe_for("cloud").kubernetes_node_files == images.KUBERNETES_NODE_FILES_VERSION

"""Guest images built from Debian packages alone: no download beyond the package mirror.

An image is a root file system made by ``mmdebstrap``, written straight into an ext4
file system by ``mke2fs -d`` (no loop device, no mount, no bootloader), converted to
qcow2, with the kernel and initrd beside it for libvirt's direct kernel boot. Each VM's
disk is a copy-on-write overlay on it; cloud-init grows the file system to the disk.

Images are cached by a hash of their recipe (packages, in-image files, build steps) in
a folder qemu can read; the downloaded .debs are kept too, so a rebuild needs no mirror.
A build happens in a temporary folder renamed into place when whole, so an interrupted
build leaves nothing a VM could use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from aihow_infra.config import IMAGE_ROOT_GB, ImageRole
from aihow_infra.errors import ImageError
from aihow_infra.kubebins import PAUSE_VERSION, KubeBinaries, content_key, ensure_binaries
from aihow_infra.oci import ImageSpec, write_archive
from aihow_infra.state.layout import CHECKOUT, built_images_dir
from aihow_infra.steps import Progress, run_step

# An image is a cluster role's, or the GPU-host simulator's: a stand-in workstation with an
# IOMMU, libvirt and qemu inside, for the passthrough tests (never a cluster node's image).
ImageName = Literal[ImageRole, "gpuhost"]
IMAGE_ROLES: tuple[ImageRole, ...] = ("base", "hpc", "cloud")
IMAGE_NAMES: tuple[ImageName, ...] = (*IMAGE_ROLES, "gpuhost")

SUITE = "bookworm"
# Bump when the build steps below change in a way the recipe does not show.
BUILD_VERSION = 1
KERNEL_CMDLINE = "root=LABEL=root rw console=ttyS0,115200 net.ifnames=0"
ROOT_FS_UUID = "5f0c1a5e-a1b0-4c1d-9a10-000000000a1a"  # fixed, for reproducible images

BASE_PACKAGES = (
    "linux-image-cloud-amd64", "systemd-sysv", "udev", "dbus", "cloud-init", "qemu-guest-agent",
    "openssh-server", "sudo", "iproute2", "e2fsprogs", "procps", "python3", "python3-apt", "netbase",
    "ca-certificates",
)
# The roles whose image carries the Kubernetes build and the container images (their nodes run
# the kubelet).
KUBERNETES_ROLES: frozenset[ImageName] = frozenset({"cloud"})
ROLE_PACKAGES: dict[ImageName, tuple[str, ...]] = {
    "base": (),
    "hpc": ("slurmctld", "slurmd", "slurm-client", "munge"),
    "cloud": ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "busybox-static"),
    # What a workstation running the project has: libvirt with its qemu driver, qemu itself,
    # what libvirt's networks need, and python3-venv for the project's interpreter.
    "gpuhost": ("libvirt-daemon-system", "libvirt-daemon-driver-qemu", "qemu-system-x86", "qemu-utils",
                "dnsmasq-base", "iptables", "python3-venv", "pciutils"),
}
KUBERNETES_BIN_DIR = "/usr/local/bin"
OCI_DIR = "/usr/local/share/aihow/oci"
PAUSE_IMAGE = f"registry.k8s.io/pause:{PAUSE_VERSION}"
# The kubelet names an image without a registry as docker.io's: this one names its own.
BUSYBOX_IMAGE = "localhost/busybox:1.35"
# Bump when add_kubernetes() puts something else into the image.
PAYLOAD_VERSION = 2
# What each archive of OCI_DIR holds; the image lists it in OCI_DIR/images.json for the playbook.
CONTAINER_IMAGES = (("pause.tar", PAUSE_IMAGE), ("busybox.tar", BUSYBOX_IMAGE))
# What every Kubernetes node of every cluster has, taken from the cloud playbook's own roles (path
# in the image -> file under ansible/roles): containerd's configuration, the import of the images
# above and its unit, the pod network's kernel modules and settings. The image carries them, with
# the unit enabled, so a node boots with containerd configured and the images imported, and its
# first deploy finds these files in place: a control plane's first converge spent 31 s of its 57
# restarting containerd and importing the images (2026-12-03, the Cloud cluster alone). The roles
# still lay them down, for nodes of an image without them or with an older copy.
KUBERNETES_NODE_FILES = {
    "/etc/containerd/config.toml": "containerd/files/config.toml",
    "/usr/local/sbin/aihow-import-images": "containerd/files/aihow-import-images",
    "/etc/systemd/system/aihow-images.service": "containerd/files/aihow-images.service",
    "/etc/modules-load.d/kubernetes.conf": "pod_network/files/kubernetes.conf",
    "/etc/sysctl.d/90-kubernetes.conf": "pod_network/files/90-kubernetes.conf",
}
# Names what the image carries of them, not their bytes: a new cloud image asks to make every Cloud
# disk anew, which an edit to a role's file must not do by itself. tests/test_images.py pins the
# files' digest to this version: bump it when nodes must boot with the change (a new image), or
# record the new digest under the same one when the deploy laying it down is enough (a comment).
KUBERNETES_NODE_FILES_VERSION = 1
KUBERNETES_NODE_UNITS = ("aihow-images.service",)
# The initramfs holds only what a virtio guest needs to find its root (5.7 MB, not 30).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "ext4", "crc32c_generic")
EXCLUDED_PATHS = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*")

# cloud-init's modules, by stage: only those the project's seeds and the cluster file's
# ``cloud_init`` keys (packages, write_files, runcmd) use, the rest of Debian's lists left out
# (grub-dpkg, set-passwords, keys-to-console took 2.2, 1.2 and 1.0 s of a boot's 12 s of modules
# under software emulation, 2026-12-02). The config stage keeps nothing: its two modules run
# first in the final stage, so its own Python start (a whole unit, 17 s of that boot) is masked.
CLOUD_INIT_MODULES = {
    "cloud_init_modules": ("migrator", "seed_random", "bootcmd", "write-files", "growpart", "resizefs", "mounts",
                           "set_hostname", "update_hostname", "update_etc_hosts", "users-groups", "ssh"),
    "cloud_config_modules": (),
    "cloud_final_modules": ("apt-configure", "runcmd", "package-update-upgrade-install", "write-files-deferred",
                            "scripts-vendor", "scripts-per-once", "scripts-per-boot", "scripts-per-instance",
                            "scripts-user", "final-message"),
}


def _module_lists() -> str:
    return "".join(f"{stage}: [{', '.join(modules)}]\n" for stage, modules in CLOUD_INIT_MODULES.items())


# Files written into every image (path -> content). cloud-init is told to look only at a
# NoCloud seed, render networkd, and make only an ed25519 host key (RSA takes seconds under
# software emulation); wait-online gives up early instead of stalling boot two minutes. sshd
# takes no password (the seed's ``ssh_pwauth: false`` is for images of the operator's own, whose
# cloud-init runs set-passwords).
IMAGE_FILES: dict[str, str] = {
    "/etc/cloud/cloud.cfg.d/90-aihow.cfg": (
        "datasource_list: [NoCloud, None]\n"
        "system_info:\n  network:\n    renderers: [networkd]\n"
        "ssh_genkeytypes: [ed25519]\n"
        "manage_etc_hosts: false\n"
        + _module_lists()
    ),
    "/etc/ssh/sshd_config.d/aihow.conf": "PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
    "/etc/systemd/system/systemd-networkd-wait-online.service.d/aihow.conf": (
        "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20\n"
    ),
    "/etc/default/locale": "LANG=C.UTF-8\n",
    "/etc/fstab": "LABEL=root / ext4 defaults,discard 0 1\n",
    "/etc/machine-id": "",
}
# Made by package scripts at build time, so every clone would share them: made per cluster instead.
REMOVED_FILES = ("/etc/munge/munge.key",)
ENABLED_UNITS = ("systemd-networkd.service",)
# Early units a guest does not need, each a program start of 1-4 s under software emulation
# (systemd-analyze blame of a cloud node's boot, 2026-12-02): the kernel loads those modules when
# something asks for them (a virtiofs mount, a loop device). cloud-config.service: see above.
MASKED_UNITS = ("e2scrub_all.timer", "e2scrub_reap.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                "cloud-config.service", "modprobe@drm.service", "modprobe@efi_pstore.service",
                "modprobe@fuse.service", "modprobe@configfs.service", "modprobe@dm_mod.service",
                "modprobe@loop.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
                "sys-kernel-debug.mount", "sys-kernel-tracing.mount")


# Fields added after images were first cached: left out of the hash while empty, so the images
# that do not use them keep their names.
LATER_FIELDS = ("kubernetes", "container_images", "kubernetes_node_files")


@dataclass(frozen=True)
class Recipe:
    """Everything an image is made from; its hash names the image."""

    role: ImageName
    suite: str = SUITE
    packages: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    removed_files: tuple[str, ...] = REMOVED_FILES
    enabled_units: tuple[str, ...] = ENABLED_UNITS
    masked_units: tuple[str, ...] = MASKED_UNITS
    initramfs_modules: tuple[str, ...] = INITRAMFS_MODULES
    size_gb: int = 2
    build_version: int = BUILD_VERSION
    kubernetes: str = ""  # the key of the Kubernetes build the image carries (none: "")
    container_images: tuple[tuple[str, str], ...] = ()  # OCI archives made into the image
    kubernetes_node_files: int = 0  # KUBERNETES_NODE_FILES_VERSION of those the image carries (none: 0)

    @property
    def key(self) -> str:
        """A short hash of the recipe (an image without Kubernetes hashes as before that field)."""
        fields = {k: v for k, v in asdict(self).items() if k not in LATER_FIELDS or v}
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """The image's folder name: ``<role>-<key>``."""
        return f"{self.role}-{self.key}"


def kubernetes_node_files() -> dict[str, str]:
    """``KUBERNETES_NODE_FILES`` read from the checkout's roles: path in the image -> content."""
    roles = CHECKOUT / "ansible" / "roles"
    return {path: (roles / source).read_text() for path, source in KUBERNETES_NODE_FILES.items()}


def recipe_for(role: str) -> Recipe:
    """The recipe of an image role; a clear error for an unknown one."""
    if role not in ROLE_PACKAGES:
        raise ImageError(f"image role {role!r} is unknown; allowed: {', '.join(IMAGE_NAMES)}")
    typed: ImageName = role
    carries = typed in KUBERNETES_ROLES
    return Recipe(role=typed, packages=tuple(sorted({*BASE_PACKAGES, *ROLE_PACKAGES[typed]})),
                  files=tuple(sorted(IMAGE_FILES.items())), size_gb=IMAGE_ROOT_GB[typed],
                  enabled_units=ENABLED_UNITS + (KUBERNETES_NODE_UNITS if carries else ()),
                  kubernetes_node_files=KUBERNETES_NODE_FILES_VERSION if carries else 0,
                  kubernetes=f"{content_key()}+payload{PAYLOAD_VERSION}" if carries else "",
                  container_images=CONTAINER_IMAGES if carries else ())


@dataclass(frozen=True)
class Image:
    """A built image: its disk, and the kernel and initrd to boot it with."""

    folder: Path
    role: str
    key: str
    built_seconds: float = 0.0
    disk_bytes: int = 0
    packages: list[str] = field(default_factory=list)

    @property
    def disk(self) -> Path:
        """The qcow2 disk VMs overlay."""
        return self.folder / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        """The kernel for direct boot."""
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        """The initrd for direct boot."""
        return self.folder / "initrd.img"

    @property
    def manifest(self) -> Path:
        """Written last: an image without it is not whole."""
        return self.folder / "image.json"

    @property
    def files(self) -> list[Path]:
        """Every file of the image, the manifest last (the order a copy to another host takes)."""
        return [self.disk, self.kernel, self.initrd, self.manifest]


def debs_dir() -> Path:
    """Where downloaded packages are kept for offline rebuilds."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("AIHOW_DEBS_DIR") or Path(cache) / "aihow-infra" / "debs")


def find_image(recipe: Recipe, root: Path | None = None) -> Image | None:
    """The built image of a recipe, or None when it is not (wholly) there."""
    folder = (root or built_images_dir()) / recipe.name
    manifest = folder / "image.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    image = Image(folder=folder, role=recipe.role, key=recipe.key, built_seconds=data.get("built_seconds", 0.0),
                  disk_bytes=data.get("disk_bytes", 0), packages=data.get("packages", []))
    return image if image.disk.is_file() and image.kernel.is_file() and image.initrd.is_file() else None


def image_for(role: str, root: Path | None = None) -> Image:
    """Where the image of a role is (or will be) once built; paths only, nothing is checked."""
    recipe = recipe_for(role)
    return Image(folder=(root or built_images_dir()) / recipe.name, role=recipe.role, key=recipe.key)


def ensure_image(role: str, *, force: bool = False, root: Path | None = None,
                 progress: Progress | None = None) -> tuple[Image, bool]:
    """The image of ``role``, built when missing (or when ``force``). Returns it and whether
    it was built now."""
    recipe = recipe_for(role)
    say = progress or (lambda _line: None)
    if not force and (image := find_image(recipe, root)) is not None:
        return image, False
    folder = root or built_images_dir()
    with _one_builder(folder, recipe.name, say):
        if not force and (image := find_image(recipe, root)) is not None:  # another task built it meanwhile
            return image, False
        return build_image(recipe, folder, say), True


@contextlib.contextmanager
def _one_builder(root: Path, name: str, say: Progress) -> Iterator[None]:
    """Hold the build lock of the images under ``root`` while image ``name`` is built: two tasks,
    or two test runs side by side, would otherwise build the same image, or fill the one .deb
    cache at once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"the {name} image waits for another task's image build to end")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _build_folder(root: Path, name: str) -> Iterator[Path]:
    """A scratch folder beside the final one; removed whatever happens."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    scratch = root / f".build-{name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _mirror() -> str:
    """The host's apt sources (the one mirror this machine may reach), else Debian's."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    return str(sources) if sources.is_file() else "http://deb.debian.org/debian"


def _mmdebstrap_command(recipe: Recipe, rootfs: Path, debs: Path) -> list[str]:
    modules = "\\n".join(recipe.initramfs_modules)
    return [
        "mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
        f"--include={','.join(recipe.packages)}",
        "--aptopt=Acquire::Check-Valid-Until \"false\"",
        "--aptopt=APT::Install-Recommends \"false\"",
        *[f"--dpkgopt=path-exclude={p}" for p in EXCLUDED_PATHS],
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        f"--setup-hook=mkdir -p \"$1/var/cache/apt/archives\" && cp -a {debs}/. \"$1/var/cache/apt/archives/\"",
        # Before the kernel's postinst runs: the initramfs gets only these modules.
        "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" && "
        "echo MODULES=list > \"$1/etc/initramfs-tools/conf.d/aihow.conf\" && "
        f"printf '{modules}\\n' > \"$1/etc/initramfs-tools/modules\"",
        f"--customize-hook=cp -a \"$1/var/cache/apt/archives/.\" {debs}/",
        recipe.suite, str(rootfs), _mirror(),
    ]


def customize(rootfs: Path, recipe: Recipe) -> None:
    """The in-image settings: files, units, and nothing that must differ between clones
    (machine-id, SSH host keys, hostname)."""
    files = dict(recipe.files) | (kubernetes_node_files() if recipe.kubernetes_node_files else {})
    for path, content in files.items():
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o755 if content.startswith("#!") else 0o644)  # a script is a program
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    own_units = {path for path in files if path.startswith("/etc/systemd/system/")}
    for unit in recipe.enabled_units:
        link = wants / unit
        if not os.path.lexists(link):  # an absolute link: exists() would follow it on the build host
            own = f"/etc/systemd/system/{unit}"
            link.symlink_to(own if own in own_units else f"/lib/systemd/system/{unit}")
    for unit in recipe.masked_units:
        mask = rootfs / "etc/systemd/system" / unit
        mask.unlink(missing_ok=True)
        mask.symlink_to("/dev/null")
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for path in ("etc/hostname", "var/lib/dbus/machine-id", *(p.lstrip("/") for p in recipe.removed_files)):
        (rootfs / path).unlink(missing_ok=True)
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (rootfs / folder).glob("*"):
            if item.is_file():
                item.unlink()


def add_kubernetes(rootfs: Path, binaries: KubeBinaries, images: tuple[tuple[str, str], ...], say: Progress) -> None:
    """The Kubernetes commands into the image's ``/usr/local/bin``, and the pause and busybox
    images as OCI archives for containerd to import (made from the build's pause binary and
    the image's own busybox-static)."""
    say(f"adding Kubernetes {binaries.manifest['kubernetes']} and the pause and busybox images")
    bin_dir = rootfs / KUBERNETES_BIN_DIR.lstrip("/")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in binaries.commands:
        if command != "pause":
            shutil.copyfile(binaries.path(command), bin_dir / command)
            os.chmod(bin_dir / command, 0o755)
    oci = rootfs / OCI_DIR.lstrip("/")
    busybox = rootfs / "bin/busybox"
    listed = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True)
    applets = {f"/{line.strip()}": "/bin/busybox" for line in listed.stdout.splitlines()
               if line.strip() and line.strip() != "bin/busybox"}
    specs = {PAUSE_IMAGE: ImageSpec(PAUSE_IMAGE, {"/pause": binaries.path("pause")}, entrypoint=["/pause"]),
             BUSYBOX_IMAGE: ImageSpec(BUSYBOX_IMAGE, {"/bin/busybox": busybox}, cmd=["sh"], symlinks=applets)}
    for archive, reference in images:
        write_archive(specs[reference], oci / archive)
    (oci / "images.json").write_text(json.dumps(dict(images), indent=2) + "\n")


def _boot_files(rootfs: Path) -> tuple[Path, Path]:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageError(f"the image has no kernel or initrd in /boot (found {[p.name for p in kernels + initrds]})")
    return kernels[-1], initrds[-1]


def build_image(recipe: Recipe, root: Path, say: Progress) -> Image:
    """Build the image of a recipe into ``root`` (replacing one of the same recipe)."""
    for tool in ("mmdebstrap", "mke2fs", "qemu-img"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            raise ImageError(f"building images needs {tool}; run ./bootstrap")
    started = time.monotonic()
    debs = debs_dir()
    debs.mkdir(parents=True, exist_ok=True)
    final = root / recipe.name
    with _build_folder(root, recipe.name) as scratch:
        rootfs, out = scratch / "rootfs", scratch / "image"
        out.mkdir()
        env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "LC_ALL": "C.UTF-8"}
        say(f"mmdebstrap {recipe.suite}: {len(recipe.packages)} packages")
        run_step(_mmdebstrap_command(recipe, rootfs, debs), say, f"mmdebstrap of the {recipe.role} image", env,
                 error=ImageError)
        customize(rootfs, recipe)
        if recipe.kubernetes:
            add_kubernetes(rootfs, ensure_binaries(say), recipe.container_images, say)
        kernel, initrd = _boot_files(rootfs)
        shutil.copyfile(kernel, out / "vmlinuz")
        shutil.copyfile(initrd, out / "initrd.img")
        raw = scratch / "disk.raw"
        say(f"mke2fs: {recipe.size_gb} GiB ext4 from the root file system")
        run_step(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-U", ROOT_FS_UUID, "-E",
                  f"hash_seed={ROOT_FS_UUID}", "-d", str(rootfs), str(raw), f"{recipe.size_gb}G"], say, "mke2fs", env,
                 error=ImageError)
        say("qemu-img convert to qcow2")
        run_step(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], say, "qemu-img convert",
                 error=ImageError)
        disk_bytes = (out / "disk.qcow2").stat().st_size
        manifest = {"role": recipe.role, "key": recipe.key, "suite": recipe.suite, "packages": list(recipe.packages),
                    "kernel_cmdline": KERNEL_CMDLINE, "built_seconds": round(time.monotonic() - started, 1),
                    "disk_bytes": disk_bytes}
        (out / "image.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for item in out.iterdir():
            os.chmod(item, 0o644)
        os.chmod(out, 0o755)
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    image = find_image(recipe, root)
    if image is None:
        raise ImageError(f"the {recipe.role} image was built but {final} is not whole")
    return image

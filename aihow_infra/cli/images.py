"""Tasks that build: guest images (``image.build``) and Kubernetes (``kubernetes.build``)."""

from __future__ import annotations

from invoke.context import Context

from aihow_infra.cli.common import err, out, task
from aihow_infra.cli.render import images_table


@task(help={"role": "base, hpc, cloud, or all of them; gpuhost: the passthrough test's GPU-host simulator",
            "force": "build again even when the cache has it"})
def image_build(c: Context, role: str = "all", force: bool = False) -> None:
    """Build guest images from Debian packages (cached by recipe; kept .debs make rebuilds offline)."""
    from aihow_infra.images import IMAGE_ROLES, ensure_image

    roles = list(IMAGE_ROLES) if role == "all" else [role]
    rows = []
    for name in roles:
        image, built = ensure_image(name, force=force, progress=lambda line: err.print(f"[dim]{line}[/dim]",
                                                                                         highlight=False))
        rows.append((name, image, built))
    out.print(images_table(rows))


@task()
def kubernetes_build(c: Context) -> None:
    """Build Kubernetes, etcd and pause from the Go module proxy (cached; image.build runs it)."""
    from aihow_infra.kubebins import ensure_binaries

    built = ensure_binaries(lambda line: err.print(f"[dim]{line}[/dim]", highlight=False))
    manifest = built.manifest
    sizes = manifest.get("bytes") or {}
    total = sum(sizes.values()) if isinstance(sizes, dict) else 0
    out.print(f"[green]Kubernetes {manifest['kubernetes']}[/green], etcd {manifest['etcd']}, built with "
              f"{manifest['go']}: {total / 2**20:.0f} MiB in {built.folder}")

"""Tasks that build: guest images (``image.build``) and Kubernetes (``kubernetes.build``)."""

from __future__ import annotations

from invoke.context import Context
from rich.table import Table

from aihow_infra.cli.common import err, out, task


@task(help={"role": "base, hpc, cloud, or all of them; gpuhost: the passthrough test's GPU-host simulator",
            "force": "build again even when the cache has it"})
def image_build(c: Context, role: str = "all", force: bool = False) -> None:
    """Build guest images from Debian packages (cached by recipe; kept .debs make rebuilds offline)."""
    from aihow_infra.images import IMAGE_ROLES, ensure_image

    roles = list(IMAGE_ROLES) if role == "all" else [role]
    table = Table(title="guest images", title_justify="left")
    for col in ("role", "built now", "build time", "disk", "folder"):
        table.add_column(col)
    for name in roles:
        image, built = ensure_image(name, force=force, progress=lambda line: err.print(f"[dim]{line}[/dim]",
                                                                                         highlight=False))
        table.add_row(name, "yes" if built else "no (cached)", f"{image.built_seconds:.0f} s",
                      f"{image.disk_bytes / 2**20:.0f} MiB", str(image.folder))
    out.print(table)


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

"""What a guest's boot costs under software emulation (TCG): the project's image against an
image built by another checkout (its folder under /var/lib/aihow/images), in one run.

    .venv/bin/python bench/guest_boot.py --baseline FOLDER [--role hpc] [--vms 3] [--rounds 2]

Boots ``--vms`` guests of each image at once (as a cluster's ``system.up`` does), the two images
alternating round by round, through the plain libvirt script of bench/run.py (the same seeds and
domains as the project's), and reports per image, as medians over guests: start to ready
(cloud-init done, seen through the guest agent), the host CPU seconds the guest's emulation used
to get there (libvirt's cpu_time: on a machine short of CPU, the figure that says what every
other guest and test loses), and the guest's own userspace boot (systemd) — each as a ratio
against the baseline image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_clock import cluster, ratio_cells, userspace_seconds
from run import ROOT, plain_libvirt_up

from aihow_infra.images import image_for


def boot(folder: Path, role: str, vms: int, image: Path) -> dict[str, list[float]]:
    """Boot ``vms`` guests of the image in ``image`` at once; each one's figures once ready."""
    import libvirt

    from aihow_infra.libvirt.guest import run

    prefix = f"aihb{uuid.uuid4().hex[:6]}"
    spec = cluster(prefix, vms)
    spec["clusters"]["hpc"]["image"] = role
    plan = folder / f"{prefix}.yaml"
    plan.write_text(yaml.safe_dump(spec))
    cpu: dict[str, float] = {}
    teardown, ready = plain_libvirt_up(plan, Path("/var/lib/libvirt/images") / prefix, image_folder=image,
                                       cpu_seconds=cpu)
    try:
        conn = libvirt.open("qemu:///system")
        userspace = [userspace_seconds(run(conn.lookupByName(name), ["systemd-analyze"], timeout=600).out)
                     for name in ready]
        conn.close()
        return {"ready": list(ready.values()), "cpu": list(cpu.values()), "userspace": userspace}
    finally:
        teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a built image's folder (another checkout's)")
    parser.add_argument("--role", default="hpc", choices=("base", "hpc", "cloud"))
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = {f"baseline {args.baseline.name}": args.baseline, f"this checkout's {image_for(args.role).folder.name}":
                image_for(args.role).folder}
    results: dict[str, list[dict[str, list[float]]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="aihow-bench-") as tmp:
        for round_ in range(args.rounds):
            for name in (list(variants) if round_ % 2 == 0 else list(reversed(variants))):
                began = time.monotonic()
                results[name].append(boot(Path(tmp), args.role, args.vms, variants[name]))
                print(f"round {round_ + 1}, {name}: {time.monotonic() - began:.0f} s {results[name][-1]}",
                      file=sys.stderr, flush=True)
    base = next(iter(variants))

    def median(name: str, key: str) -> float:
        return float(statistics.median(v for r in results[name] for v in r[key]))

    print(f"\n{args.vms} guests of the {args.role} image booted at once, {args.rounds} round(s), medians over "
          "guests:\n")
    print("| image | start to ready (s) | host CPU to ready (s) | userspace boot (s) |")
    print("|---|---:|---:|---:|")
    for name in variants:
        cells = ratio_cells(median, name, base, (("ready", ".0f"), ("cpu", ".0f"), ("userspace", ".0f")))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nrepository: {ROOT}")


if __name__ == "__main__":
    main()

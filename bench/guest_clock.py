"""What the guest's clocksource costs under software emulation (TCG).

    .venv/bin/python bench/guest_clock.py [--rounds 1] [--vms 3]    # needs libvirtd, ./bootstrap

A TCG guest's kernel marks the TSC unstable within a second of boot (its watchdog checks it
against jiffies, which lag on a busy host) and falls back to the ACPI PM timer: every clock read
becomes a system call and an emulated I/O port read. ``tsc=reliable`` keeps the TSC (TCG passes
the host's invariant TSC through). This boots ``--vms`` guests of the hpc image at once (as a
cluster's ``system.up`` does), with the project's command line without and with ``tsc=reliable``,
alternating, and reports per variant: start to ready (cloud-init done, seen through the guest
agent), the guest's own userspace boot time (systemd), the clocksource, the cost of one
``time.time()`` in the guest's Python and a fixed piece of guest work (``python3 -c 'import
cloudinit.cmd.main'``, what every cloud-init stage starts with) — each as a ratio against the
variant without.

The project does not use ``tsc=reliable``: the guest calibrates the TSC against the PM timer at
boot, a starved vCPU calibrates it wrong, and without the watchdog nothing corrects it (measured
in the main job: a guest's clock 42 minutes ahead after 17, munge refusing every credential).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, plain_libvirt_up

from aihow_infra.images import KERNEL_CMDLINE

VARIANTS = {"acpi_pm (the project's)": KERNEL_CMDLINE, "tsc=reliable": f"{KERNEL_CMDLINE} tsc=reliable"}
INSIDE = """cat /sys/devices/system/clocksource/clocksource0/current_clocksource
systemd-analyze | head -1
python3 -c 'import time; n = 20000; t = time.perf_counter()
for _ in range(n): time.time()
print((time.perf_counter() - t) / n * 1e6)'
python3 -c 'import time; t = time.perf_counter(); import cloudinit.cmd.main; print(time.perf_counter() - t)'
"""


def cluster(prefix: str, vms: int) -> dict[str, Any]:
    """An HPC cluster of ``vms`` guests (controller and computes) on an isolated network."""
    node = {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 4}
    return {"version": "1.0", "clusters": {"hpc": {
        "name": f"{prefix}-hpc", "image": "hpc", "hardware": {"acceleration": {"cpu_model": "qemu64"}},
        "network": {"subnet": "10.213.243.0/24", "bridge": f"{prefix}h0", "forward_mode": "isolated"},
        "controller": {**node, "ip_address": "10.213.243.10"},
        "compute_nodes": [{**node, "ip": f"10.213.243.{11 + i}"} for i in range(vms - 1)]}}}


def ratio_cells(median: Callable[[str, str], float], name: str, base: str,
                columns: Sequence[tuple[str, str]]) -> list[str]:
    """A table row's cells: each ``(key, format)`` column's median for variant ``name``, with its
    ratio to variant ``base`` (none on the base's own row)."""
    return [f"{median(name, key):{fmt}}" + ("" if name == base else f" ({median(name, key) / median(base, key):.2f}x)")
            for key, fmt in columns]


def userspace_seconds(line: str) -> float:
    """systemd-analyze's '... + 1min 10.037s (userspace) ...' in seconds."""
    match = re.search(r"\+ ((?:\d+)min )?([\d.]+)s \(userspace\)", line)
    return (int(match.group(1)[:-4]) * 60 if match and match.group(1) else 0) + float(match.group(2)) \
        if match else float("nan")


def boot(folder: Path, vms: int, cmdline: str) -> dict[str, list[float] | str]:
    """Boot the guests with ``cmdline``; what each says once ready."""
    import libvirt

    from aihow_infra.libvirt.guest import run

    prefix = f"aihc{uuid.uuid4().hex[:6]}"
    plan = folder / f"{prefix}.yaml"
    plan.write_text(yaml.safe_dump(cluster(prefix, vms)))
    images = Path("/var/lib/libvirt/images") / prefix
    try:
        teardown, ready = plain_libvirt_up(plan, images, cmdline=cmdline)
        try:
            conn = libvirt.open("qemu:///system")
            seen: dict[str, list[float] | str] = {"ready": list(ready.values()), "userspace": [], "time": [],
                                                  "import": [], "clocksource": ""}
            for name in ready:
                ran = run(conn.lookupByName(name), ["/bin/sh", "-c", INSIDE], timeout=600)
                source, analyze, clock, imported = ran.out.splitlines()[:4]
                seen["clocksource"] = source
                for key, value in (("userspace", userspace_seconds(analyze)), ("time", float(clock)),
                                   ("import", float(imported))):
                    seen[key].append(value)  # type: ignore[union-attr]
            conn.close()
            return seen
        finally:
            teardown()
    finally:
        shutil.rmtree(images, ignore_errors=True)  # the pools' parent folder, empty once they are gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--vms", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="aihow-bench-") as tmp:
        for round_ in range(args.rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                started = time.monotonic()
                results[name].append(boot(Path(tmp), args.vms, VARIANTS[name]))
                print(f"round {round_ + 1}, {name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    base = next(iter(VARIANTS))

    def median(name: str, key: str) -> float:
        return float(statistics.median(v for r in results[name] for v in r[key]))

    print(f"\n{args.vms} guests of the hpc image booted at once, {args.rounds} round(s), medians over guests:\n")
    print("| variant | clocksource | start to ready (s) | userspace boot (s) | time.time() (us) "
          "| import cloudinit (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in VARIANTS:
        cells = ratio_cells(median, name, base, (("ready", ".0f"), ("userspace", ".0f"), ("time", ".2f"),
                                                 ("import", ".1f")))
        print(f"| {name} | {results[name][-1]['clocksource']} | " + " | ".join(cells) + " |")
    print(f"\nrepository: {ROOT}")


if __name__ == "__main__":
    main()

"""What enabling a node's units costs under software emulation: one ``systemctl enable`` per unit
(each reloads systemd by itself), as a Kubernetes node's first converge did, against one
``systemctl enable --no-reload`` of them all and the one ``daemon-reload`` the new unit files
need, as ``aihow_converge`` does now; in one run, on one booted guest of the cloud image.

    .venv/bin/python bench/converge_units.py [--units 9] [--rounds 3]

Each round writes ``--units`` unit files (a control plane's converge enables nine: etcd, the API
server, the controller manager, the scheduler, containerd, the image import, the pod routes, the
kubelet, kube-proxy), runs each variant from all disabled, and times it inside the guest (one
shell command through the guest agent, so the agent's own round trips are not counted), with the
guest's host CPU (libvirt's cpu_time) over it. Medians over the rounds, the variants one after
the other in each round (before, then now).
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
from guest_clock import cluster
from run import plain_libvirt_up

UNIT = "[Unit]\nDescription=aihow bench unit {n}\n[Service]\nType=oneshot\nRemainAfterExit=true\n" \
       "ExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"


def variants(units: list[str]) -> dict[str, str]:
    """Each variant's shell command: it reloads for the new files and leaves every unit enabled."""
    names = " ".join(units)
    return {
        "one enable per unit (before)": "systemctl daemon-reload; " + "; ".join(f"systemctl enable -q {u}"
                                                                            for u in units),
        "one enable run, one reload (now)": f"systemctl enable -q --no-reload {names}; systemctl daemon-reload",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import libvirt

    from aihow_infra.libvirt.guest import run

    units = [f"aihow-bench-{n}.service" for n in range(args.units)]
    write = "; ".join(f"printf '{UNIT.format(n=n)}' > /etc/systemd/system/{u}" for n, u in enumerate(units))
    files = " ".join(f"/etc/systemd/system/{u}" for u in units)
    reset = f"systemctl disable -q --no-reload {' '.join(units)}; rm -f {files}"
    seen: dict[str, dict[str, list[float]]] = {name: {"seconds": [], "cpu": []} for name in variants(units)}
    with tempfile.TemporaryDirectory(prefix="aihow-bench-units-") as tmp:
        prefix = f"aihb{uuid.uuid4().hex[:6]}"
        spec = cluster(prefix, 1)
        spec["clusters"]["hpc"]["image"] = "cloud"
        plan = Path(tmp) / f"{prefix}.yaml"
        plan.write_text(yaml.safe_dump(spec))
        print("booting one guest of the cloud image", flush=True)
        teardown, ready = plain_libvirt_up(plan, Path("/var/lib/libvirt/images") / prefix)
        try:
            conn = libvirt.open("qemu:///system")
            dom = conn.lookupByName(next(iter(ready)))
            time.sleep(30)  # the boot's last units settle
            for round_ in range(1, args.rounds + 1):
                for name, command in variants(units).items():
                    run(dom, ["/bin/sh", "-c", f"{write}; systemctl daemon-reload"], timeout=600)
                    before = dom.info()[4] / 1e9
                    done = run(dom, ["/bin/sh", "-c", f"a=$(date +%s.%N); {command}; b=$(date +%s.%N); "
                                     'echo "$a $b"'], timeout=600)
                    cpu = dom.info()[4] / 1e9 - before
                    a, b = map(float, done.out.split()[-2:])
                    seen[name]["seconds"].append(b - a)
                    seen[name]["cpu"].append(cpu)
                    run(dom, ["/bin/sh", "-c", f"{reset}; systemctl daemon-reload"], timeout=600)
                    print(f"round {round_}, {name}: {b - a:.1f} s, guest's host CPU {cpu:.1f} s", flush=True)
            conn.close()
        finally:
            teardown()
    base = "one enable per unit (before)"
    print(f"\n| {args.units} units, median of {args.rounds} | in the guest | ratio | guest's host CPU | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, figures in seen.items():
        sec, cpu = (statistics.median(figures[k]) for k in ("seconds", "cpu"))
        bsec, bcpu = (statistics.median(seen[base][k]) for k in ("seconds", "cpu"))
        print(f"| {name} | {sec:.1f} s ({', '.join(f'{s:.1f}' for s in figures['seconds'])}) | {sec / bsec:.2f}x "
              f"| {cpu:.1f} s | {cpu / bcpu:.2f}x |")


if __name__ == "__main__":
    main()

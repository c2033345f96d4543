"""What the size of TCG's translation cache changes for the main job's two clusters under
software emulation: each size in turn, this checkout's code, only the size differs.

    .venv/bin/python bench/tcg_cache.py [--sizes 128,512] [--rounds 1]

Needs ./bootstrap and the hpc and cloud images; about 9 minutes a size and round here (2 vCPUs,
TCG). For each round and size: config/default.yaml's two clusters booted without deploying (on
names and subnets of their own, isolated networks), every running domain defined again with that size
(``<tcg><tb-cache>``, a qemu start option) and started again, then the Cloud and the HPC cluster
deployed for the first time, one after the other, as the project deploys them; then everything
destroyed. Reported per size (medians over rounds): the restart to ready, each first deploy, the
Kubernetes control plane's translation-cache flushes over the run (qemu's ``info jit``), the
host CPU its emulation used (libvirt's cpu_time) and the largest qemu's peak resident set; each
as a ratio against the first size.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402

from aihow_infra.libvirt.guest import wait_ready  # noqa: E402
from aihow_infra.ops import Operator  # noqa: E402
from tests.conftest import open_e2e, open_sandbox  # noqa: E402
from tests.test_e2e_main_job import default_example_on  # noqa: E402

STACKS = ("hpc", "cloud")
READY_TIMEOUT = 900.0


def jit_flushes(dom: libvirt.virDomain) -> int:
    """How often qemu has thrown the domain's translations away since it started."""
    out = libvirt_qemu.qemuMonitorCommand(dom, "info jit", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    found = re.search(r"TB flush count\s+(\d+)", out)
    return int(found.group(1)) if found else 0


def peak_mib(dom: libvirt.virDomain) -> float:
    """The domain's qemu process's peak resident set (VmHWM), MiB."""
    pid = int(Path(f"/run/libvirt/qemu/{dom.name()}.pid").read_text())
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) / 1024 if found else 0.0


def guests_cpu(conn: libvirt.virConnect, names: list[str]) -> float:
    """Host CPU seconds the domains' emulation has used (libvirt's cpu_time)."""
    return float(sum(conn.lookupByName(n).getCPUStats(True)[0]["cpu_time"] for n in names)) / 1e9


def restart_with(conn: libvirt.virConnect, names: list[str], mib: int) -> float:
    """Every domain shut off, defined again with a ``mib`` translation cache, started; seconds
    until all are ready."""
    for name in names:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        # libvirt gives the size back in KiB
        xml, count = re.subn(r"<tb-cache unit='\w+'>\d+</tb-cache>", f"<tb-cache unit='MiB'>{mib}</tb-cache>", xml)
        if count != 1:
            raise RuntimeError(f"{name}: no <tb-cache> in its definition (not a software-emulated domain?)")
        conn.defineXML(xml)
    began = time.monotonic()
    for name in names:
        conn.lookupByName(name).create()
    for name in names:
        wait_ready(conn.lookupByName(name), READY_TIMEOUT)
    return time.monotonic() - began


def one_run(root: Path, mib: int) -> dict[str, float]:
    """Both clusters booted, restarted with ``mib``, deployed; the figures."""
    work = root / f"work-{mib}-{time.monotonic_ns()}"
    work.mkdir()
    with open_sandbox() as box, open_e2e(box, work) as e2e:
        cluster_file = e2e.write_cluster_file(default_example_on(e2e))
        for stack in STACKS:
            e2e.configure(stack, cluster_file, ansibleConnection="agent", stopTimeout="60")
        op = Operator(e2e.workspace, progress=lambda _line: None)
        op.system_up(deploy=False)
        names = sorted(d.name() for d in box.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                       if d.name().startswith(box.prefix))  # the on-demand worker stays off, as in the main job
        plane = next(n for n in names if n.endswith("control-plane"))
        figures = {"restart to ready": restart_with(box.conn, names, mib)}
        cpu_before = guests_cpu(box.conn, names)
        for stack in ("cloud", "hpc"):
            figures[f"{stack} first deploy"] = op.deploy(stack).seconds
        figures["guests' host CPU over the deploys"] = guests_cpu(box.conn, names) - cpu_before
        figures["control plane's cache flushes"] = jit_flushes(box.conn.lookupByName(plane))
        figures["largest qemu's peak (MiB)"] = max(peak_mib(box.conn.lookupByName(n)) for n in names)
        op.system_destroy()
    return figures


def main() -> int:
    """Every size, round by round; the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,512", help="translation cache sizes in MiB, the first the baseline")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[int, list[dict[str, float]]] = {mib: [] for mib in sizes}
    with tempfile.TemporaryDirectory(prefix="aihow-bench-tcg-") as tmp:
        for round_ in range(args.rounds):
            for mib in sizes:
                runs[mib].append(one_run(Path(tmp), mib))
                print(f"round {round_ + 1}, {mib} MiB: {runs[mib][-1]}", flush=True)
    base = sizes[0]
    print(f"\n| what (median of {args.rounds}) | " + " | ".join(f"{mib} MiB" for mib in sizes) + " | ratio |")
    print("| --- |" + " --- |" * (len(sizes) + 1))
    for what in runs[base][0]:
        medians = [statistics.median(r[what] for r in runs[mib]) for mib in sizes]
        ratio = medians[-1] / medians[0] if medians[0] else float("nan")
        print(f"| {what} | " + " | ".join(f"{m:.1f}" for m in medians) + f" | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

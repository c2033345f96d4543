"""What a thing running on the Kubernetes control plane costs it: shared by the benchmarks that
bring up the Cloud cluster of config/default.yaml alone on a sandbox of their own and time
variants of a loop inside its control plane, interleaved with windows of nothing running.

The figure is the control plane's qemu process CPU on the host (every thread) over a window,
in % of one host core: under software emulation the guest's work costs the host many times
what it would under KVM, and what runs there shares the control plane's vCPUs with the API
server and etcd.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from idle import HZ, qemu_ticks  # noqa: E402  (bench/idle.py)

from aihow_infra.ops import Operator  # noqa: E402
from tests.conftest import open_e2e, open_sandbox  # noqa: E402
from tests.test_e2e_main_job import default_example_on  # noqa: E402

IDLE = "idle"


@contextlib.contextmanager
def cloud_alone() -> Iterator[tuple[str, libvirt.virDomain]]:
    """The Cloud cluster of config/default.yaml, deployed on a sandbox of its own (about 5
    minutes here): its control plane's domain name and domain; destroyed and removed after."""
    with tempfile.TemporaryDirectory(prefix="aihow-bench-cp-") as tmp, open_sandbox() as box, \
            open_e2e(box, Path(tmp)) as e2e:
        clusters = default_example_on(e2e)
        del clusters["hpc"]
        e2e.configure("cloud", e2e.write_cluster_file(clusters), ansibleConnection="agent", stopTimeout="60")
        op = Operator(e2e.workspace, progress=lambda line: print(f"  {line}", flush=True))
        op.system_up()
        name = f"{box.prefix}-cloud-control-plane"
        try:
            yield name, box.conn.lookupByName(name)
        finally:
            op.system_destroy()


def interleave(name: str, variants: dict[str, Callable[[float], None]], window: float,
               rounds: int) -> dict[str, list[float]]:
    """Each round: a window of nothing running, then each variant run for ``window`` seconds
    (it is given the window and returns when done); the domain's qemu CPU share of each, by
    variant (``IDLE`` first)."""
    seen: dict[str, list[float]] = {IDLE: [], **{what: [] for what in variants}}
    for round_ in range(1, rounds + 1):
        for what in seen:
            before, began = qemu_ticks(name) / HZ, time.monotonic()
            if what == IDLE:
                time.sleep(window)
            else:
                variants[what](window)
            share = 100 * (qemu_ticks(name) / HZ - before) / (time.monotonic() - began)
            seen[what].append(share)
            print(f"round {round_}, {what}: the control plane {share:.0f} % of one host core", flush=True)
    return seen


def table(title: str, seen: dict[str, list[float]]) -> str:
    """The medians (and each round's figure) as a Markdown table, with each over the idle one."""
    idle = statistics.median(seen[IDLE])
    rows = [f"| {title} | control plane, % of one host core | over idle |", "| --- | --- | --- |"]
    for what, shares in seen.items():
        rows.append(f"| {what} | {statistics.median(shares):.0f} ({', '.join(f'{s:.0f}' for s in shares)}) "
                    f"| {statistics.median(shares) - idle:+.0f} |")
    return "\n".join(rows)

"""What keeping the stacks' state, power records and GPU ledger in PostgreSQL costs the tasks,
against the folder backend and the ledger file, in one run (README, "Shared state").

    .venv/bin/python bench/state_backend.py [--rounds 5]

Measured, alternating the two backends round by round so both see the same machine load:

- ``system.up`` with nothing to change (the tasks find nothing changed and libvirt agreeing, and
  start no engine): both clusters of VMs defined but not started, on ``qemu:///system``;
- ``pulumi up`` with nothing to change (the engine reads and writes its state): the HPC stack;
- ``switch`` of a GPU between the clusters (each stack's engine run, the lease moved), on
  libvirt's test driver, which starts domains with PCI hostdevs without hardware.

A private PostgreSQL server (tests/postgres.py) on a unix socket; every libvirt object is named
by a sandbox (tests/sandbox.py) and removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aihow_infra.ops import Operator  # noqa: E402
from tests.conftest import open_e2e, open_sandbox  # noqa: E402
from tests.postgres import private_postgres  # noqa: E402
from tests.sandbox import E2E, Sandbox, shared_gpu_clusters  # noqa: E402

BACKENDS = ("folder", "postgresql")


def idle_clusters(box: Sandbox) -> dict[str, Any]:
    """Both clusters, two VMs each, defined and never started (no guest CPU in the measurement)."""
    clusters = {kind: box.cluster(kind, box.subnet(), [box.node(None)]) for kind in ("hpc", "cloud")}
    for body in clusters.values():
        for key in ("controller", "control_plane"):
            if key in body:
                body[key]["auto_start"] = False
        for node in [*body.get("compute_nodes", []), *body.get("worker_nodes", [])]:
            node["auto_start"] = False
    return clusters


@contextlib.contextmanager
def projects(box: Sandbox, folder: Path, url: str, kind: str) -> Iterator[dict[str, E2E]]:
    """A project per backend (its own stacks), configured for ``kind`` (idle or gpu)."""
    with contextlib.ExitStack() as stack:
        found = {}
        for backend in BACKENDS:
            root = folder / f"{kind}-{backend}"
            if backend == "folder":
                e2e = stack.enter_context(open_e2e(box, root))
            else:
                state = url.replace("postgresql://", "postgres://", 1) + f"&table=state_{kind}"
                e2e = stack.enter_context(open_e2e(box, root, state, f"{url}&ledger={kind}"))
            if kind == "idle":
                cluster_file = e2e.write_cluster_file(idle_clusters(box))
                settings: dict[str, str] = {}
            else:
                cluster_file = e2e.write_cluster_file(shared_gpu_clusters(box, cloud_auto_start=False))
                settings = {"libvirtUri": "test:///default"}
            for name in ("hpc", "cloud"):
                e2e.configure(name, cluster_file, **settings)
            found[backend] = e2e
        yield found


def alternate(rounds: int, runs: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
    """Each of ``runs``, ``rounds`` times, interleaved; seconds of each run."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return times


def row(what: str, times: dict[str, list[float]]) -> str:
    folder, database = statistics.median(times["folder"]), statistics.median(times["postgresql"])
    return (f"| {what} | {database:.2f} s (max {max(times['postgresql']):.2f}) | {folder:.2f} s "
            f"(max {max(times['folder']):.2f}) | {database / folder:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = ["| what (median of rounds) | PostgreSQL | folder + ledger file (baseline) | ratio |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="aihow-bench-") as tmp, open_sandbox() as box, \
            private_postgres() as server:
        folder = Path(tmp)
        with projects(box, folder, server.url, "idle") as found:
            ops = {backend: Operator(e2e.workspace) for backend, e2e in found.items()}
            for op in ops.values():
                op.system_up(deploy=False)
            rows.append(row("system.up, nothing to change (no engine run)", alternate(
                args.rounds, {b: lambda op=op: op.system_up(deploy=False) for b, op in ops.items()})))
            rows.append(row("pulumi up -s hpc, nothing to change", alternate(
                args.rounds, {b: lambda e2e=e2e: e2e.workspace.up("hpc") for b, e2e in found.items()})))
        with projects(box, folder, server.url, "gpu") as found:
            ops = {backend: Operator(e2e.workspace) for backend, e2e in found.items()}
            for e2e in found.values():
                e2e.workspace.up("hpc")
                e2e.workspace.up("cloud")
            targets = iter(["cloud", "hpc"] * args.rounds)
            switches: dict[str, list[float]] = {b: [] for b in BACKENDS}
            for _ in range(args.rounds):
                to = next(targets)
                for backend, op in ops.items():
                    began = time.perf_counter()
                    op.switch(to)
                    switches[backend].append(time.perf_counter() - began)
            rows.append(row("switch of the GPU between the clusters (test driver)", switches))
    print("\n".join(rows))


if __name__ == "__main__":
    main()

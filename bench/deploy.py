"""Deploy cost of the main job's two clusters: the playbooks of a baseline commit against this
checkout's, side by side on the same booted VMs and the same static inventory, each run as plain
``ansible-playbook`` through the guest agent.

    .venv/bin/python bench/deploy.py [--baseline REV]   # default: 5f904ad, before one-run converges

Needs ./bootstrap, the hpc and cloud images (``aihow image.build``) and about 35 minutes here
(2 vCPUs, software emulation). It boots config/default.yaml's two clusters (on names and subnets
of its own, isolated networks) without deploying, then for each stack:

1. the baseline's playbook: first deploy, then again with nothing to change;
2. this checkout's playbook on the same VMs (it takes them over), then again with nothing to change;
3. everything destroyed, both clusters booted again, and this checkout's first deploy.

A node's ``vm.start`` to idle or Ready is measured by tests/test_e2e_main_job.py (its phase times):
here the plain runs are not recorded as deploys, so a start would not join the node.

Every figure of a table comes from this one run; ratios are baseline / this checkout.

    .venv/bin/python bench/deploy.py --baseline REV --alternate N

measures only the deploy with nothing to change (about 15 minutes): both clusters booted and
deployed once with this checkout's playbooks, then N rounds, each one no-op run of the baseline's
playbooks and one of this checkout's, in turn (for a baseline whose playbooks leave the nodes as
this checkout's do, e.g. a change of the converge's check: then only the no-op path differs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aihow_infra.inventory import to_yaml  # noqa: E402
from aihow_infra.ops import Operator  # noqa: E402
from tests.conftest import open_e2e, open_sandbox  # noqa: E402
from tests.test_e2e_main_job import default_example_on  # noqa: E402

STACKS = ("hpc", "cloud")


def playbook_run(ansible_dir: Path, stack: str, inventory: Path) -> float:
    """Seconds of one plain ``ansible-playbook`` of ``ansible_dir/<stack>.yml``; raises when it fails."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ansible_dir / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    env.pop("AIHOW_KUBECONFIG", None)
    began = time.monotonic()
    done = subprocess.run([str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(inventory), f"{stack}.yml"],
                          cwd=ansible_dir, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise RuntimeError(f"{ansible_dir.name}/{stack}.yml failed: {done.stdout[-3000:]}")
    return seconds


def baseline_ansible(rev: str, folder: Path) -> None:
    """The ``ansible/`` folder of commit ``rev``, laid out in ``folder`` (its playbooks run there)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "ansible"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder), "--strip-components=1"], input=archive, check=True)


@contextlib.contextmanager
def booted_pair(root: Path) -> Iterator[Operator]:
    """config/default.yaml's two clusters on a sandbox of their own under ``root``, booted, not
    deployed; removed afterwards."""
    work = root / "work"
    work.mkdir()
    with open_sandbox() as box, open_e2e(box, work) as e2e:
        cluster_file = e2e.write_cluster_file(default_example_on(e2e))
        for stack in STACKS:
            e2e.configure(stack, cluster_file, ansibleConnection="agent", stopTimeout="60")
        op = Operator(e2e.workspace, progress=lambda line: print(f"  {line}", flush=True))
        began = time.monotonic()
        op.system_up(deploy=False)
        print(f"booted both clusters in {time.monotonic() - began:.0f} s", flush=True)
        yield op


def main() -> int:
    """Boot, deploy both ways, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="5f904ad", help="the commit whose ansible/ is the baseline")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="only no-op deploys, N rounds of baseline and this checkout in turn")
    args = parser.parse_args()
    if args.alternate:
        return alternate(args.baseline, args.alternate)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="aihow-bench-deploy-") as tmp:
        root = Path(tmp)
        old = root / "baseline"
        old.mkdir()
        baseline_ansible(args.baseline, old)
        new = ROOT / "ansible"
        with booted_pair(root) as op:
            inventories = {}
            for stack in STACKS:
                inventories[stack] = root / f"{stack}.yml"
                inventories[stack].write_text(to_yaml(op.inventory(stack)))
            figures: dict[tuple[str, str], float] = {}
            for stack in STACKS:
                figures[(stack, "old first")] = playbook_run(old, stack, inventories[stack])
                figures[(stack, "old again")] = playbook_run(old, stack, inventories[stack])
                figures[(stack, "takeover")] = playbook_run(new, stack, inventories[stack])
                figures[(stack, "new again")] = playbook_run(new, stack, inventories[stack])
                print(stack, {k[1]: round(v, 1) for k, v in figures.items() if k[0] == stack}, flush=True)
            op.system_destroy()
            began = time.monotonic()
            op.system_up(deploy=False)
            print(f"booted both clusters again in {time.monotonic() - began:.0f} s", flush=True)
            for stack in STACKS:
                inventories[stack].write_text(to_yaml(op.inventory(stack)))
                figures[(stack, "new first")] = playbook_run(new, stack, inventories[stack])
            op.system_destroy()
    for stack in STACKS:
        rows += [(f"{stack}: first deploy", figures[(stack, "old first")], figures[(stack, "new first")]),
                 (f"{stack}: deploy, nothing to change", figures[(stack, "old again")],
                  figures[(stack, "new again")])]
    print(f"\n| {'what':40} | baseline {args.baseline} | this checkout | ratio |")
    print(f"| {'-' * 40} | {'-' * 17} | {'-' * 13} | {'-' * 5} |")
    for what, base, now in rows:
        print(f"| {what:40} | {base:15.0f} s | {now:11.0f} s | {base / now:4.1f}x |")
    for stack in STACKS:
        print(f"{stack}: taking over the baseline's cluster {figures[(stack, 'takeover')]:.0f} s")
    return 0


def alternate(baseline: str, rounds: int) -> int:
    """Both clusters booted and deployed, then ``rounds`` no-op deploys of each side in turn; a
    table of medians and maxima."""
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="aihow-bench-deploy-") as tmp:
        root = Path(tmp)
        sides = {"baseline": root / "baseline", "this checkout": ROOT / "ansible"}
        sides["baseline"].mkdir()
        baseline_ansible(baseline, sides["baseline"])
        with booted_pair(root) as op:
            for stack in STACKS:
                inventory = root / f"{stack}.yml"
                inventory.write_text(to_yaml(op.inventory(stack)))
                first = playbook_run(sides["this checkout"], stack, inventory)
                print(f"{stack}: first deploy {first:.0f} s", flush=True)
                for _ in range(rounds):
                    for side, folder in sides.items():
                        runs.setdefault((stack, side), []).append(playbook_run(folder, stack, inventory))
                    print(stack, {k[1]: [round(v, 1) for v in r] for k, r in runs.items() if k[0] == stack}, flush=True)
            op.system_destroy()
    print(f"\n| deploy, nothing to change ({rounds} rounds) | baseline {baseline} | this checkout | ratio |")
    print("| ------------------------------ | ----------------- | ------------- | ----- |")
    for stack in STACKS:
        base, now = runs[(stack, "baseline")], runs[(stack, "this checkout")]
        print(f"| {stack:30} | {statistics.median(base):5.1f} s (max {max(base):5.1f}) | "
              f"{statistics.median(now):5.1f} s (max {max(now):5.1f}) | "
              f"{statistics.median(base) / statistics.median(now):4.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

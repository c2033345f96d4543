"""The peer benchmark: this project against OpenTofu with the libvirt provider, and against
kcli, on the same topology (the default example's five VMs, blank disks, isolated networks),
in interleaved rounds: create, a no-op plan, a no-op re-apply, destroy.

    .venv/bin/python bench/peers.py                 # builds the peers once (cached), then runs
    .venv/bin/python bench/peers.py --rounds 3 --only aihow,tofu

Opt-in and never in CI: the first run builds OpenTofu and terraform-provider-libvirt from
the Go module proxy (about 4 minutes on 2 cores) and installs kcli from PyPI, all under
``~/.cache/aihow-infra/peers``. Every tool gets its own names (``aihp<tool>...``) and
subnets, and everything is removed after each round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from measure import Sample, measured

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aihow-infra" / "peers"
TOFU = ("github.com/opentofu/opentofu", "v1.10.10", "cmd/tofu", "-X github.com/opentofu/opentofu/version.dev=no")
PROVIDER = ("github.com/dmacvicar/terraform-provider-libvirt", "v0.8.3", "", "")
KCLI = "kcli==99.0.202610251748"
STEPS = ("create", "no-op plan", "no-op re-apply", "destroy")
# The default example's shape: (cluster, VM, IP suffix); 1 vCPU, 1 GiB, a 4 GiB blank disk each.
VMS = [("hpc", "controller", 10), ("hpc", "compute-01", 11), ("hpc", "compute-02", 12),
       ("cloud", "control-plane", 10), ("cloud", "cpu-worker-01", 11)]
SUBNETS = {"aihow": 40, "tofu": 42, "kcli": 44}  # 10.214.<n>.0/24 (hpc) and <n+1> (cloud)


def say(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


# --- building the peers (cached) ---------------------------------------------------------------


def _replaces(module: str, version: str) -> list[str]:
    """The replace directives of a module's own go.mod (a build outside its module needs them)."""
    info = json.loads(subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"], check=True,
                                     capture_output=True, text=True).stdout)
    text = Path(info["GoMod"]).read_text()
    lines = re.findall(r"^replace\s+(.+)$", text, re.M)
    block = re.search(r"^replace\s*\(\n(.*?)\n\)", text, re.M | re.S)
    lines += block.group(1).splitlines() if block else []
    found = []
    for line in (raw.split("//")[0].strip() for raw in lines):
        old, _arrow, new = line.partition("=>")
        if not new.strip() or new.strip().startswith((".", "/")):
            continue  # a local path is of no use outside the module's own tree
        found.append(f"{'@'.join(old.split())}={'@'.join(new.split())}")
    return found


def go_build(module: str, version: str, package: str, ldflags: str, binary: str) -> Path:
    """Build ``module/package`` at ``version`` in a wrapper module of our own (cached)."""
    folder = CACHE / f"{Path(module).name}-{version}"
    out = folder / binary
    if out.exists():
        return out
    say(f"building {module}@{version} from the Go module proxy (once)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "go.mod").write_text(f"module aihow.local/peer/{Path(module).name}\n\ngo 1.24\n")
    subprocess.run(["go", "mod", "edit", f"-require={module}@{version}",
                    *[f"-replace={r}" for r in _replaces(module, version)]], cwd=folder, check=True)
    target = f"{module}/{package}" if package else module
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    subprocess.run(["go", "build", "-trimpath", "-ldflags", f"-s -w {ldflags}".strip(), "-o", str(out), target],
                   cwd=folder, check=True, env=env)
    return out


def tofu_setup() -> tuple[Path, Path]:
    """OpenTofu, and a CLI config that installs the libvirt provider from a local mirror."""
    tofu = go_build(*TOFU, "tofu")
    provider = go_build(*PROVIDER, "terraform-provider-libvirt")
    version = PROVIDER[1].lstrip("v")
    mirror = CACHE / "tofu-mirror" / "registry.opentofu.org" / "dmacvicar" / "libvirt" / version / "linux_amd64"
    mirror.mkdir(parents=True, exist_ok=True)
    installed = mirror / f"terraform-provider-libvirt_v{version}"
    if not installed.exists():
        shutil.copy2(provider, installed)
    rc = CACHE / "tofu.rc"
    rc.write_text('provider_installation {\n'
                  f'  filesystem_mirror {{\n    path = "{CACHE / "tofu-mirror"}"\n  }}\n'
                  '}\n')
    return tofu, rc


def kcli_setup() -> Path:
    """kcli in a virtualenv of its own (with libvirt-python, as ours)."""
    venv = CACHE / "kcli-venv"
    kcli = venv / "bin" / "kcli"
    if not kcli.exists():
        say(f"installing {KCLI} from PyPI (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", KCLI, "libvirt-python"], check=True)
    return kcli


# --- one tool's steps ---------------------------------------------------------------------------


@dataclass
class Tool:
    """A tool under test: a folder of its own and a command per step."""

    name: str
    folder: Path
    env: dict[str, str]
    commands: dict[str, list[str]]
    ok: dict[str, tuple[int, ...]] = field(default_factory=dict)
    cleanup: list[list[str]] = field(default_factory=list)  # after destroy, untimed

    def clean(self) -> None:
        """Remove what the tool's destroy leaves on purpose (kcli keeps its pool)."""
        for cmd in self.cleanup:
            subprocess.run(cmd, cwd=self.folder, env=self.env, capture_output=True, check=False)

    def step(self, step: str) -> Sample | None:
        cmd = self.commands.get(step)
        return measured(cmd, self.folder, self.env, self.ok.get(step, (0,))) if cmd else None


def _net(tool: str, cluster: str) -> str:
    return f"10.214.{SUBNETS[tool] + (cluster == 'cloud')}"


def aihow_tool(work: Path) -> Tool:
    """This project: system.up (no deploy: blank disks), preview, system.up, system.destroy."""
    folder = work / "aihow"
    project = folder / "project"
    project.mkdir(parents=True)
    (project / "Pulumi.yaml").write_text(yaml.safe_dump({
        "name": "aihow", "runtime": {"name": "python", "options": {"toolchain": "pip",
                                                                   "virtualenv": str(ROOT / ".venv")}},
        "options": yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["options"]}))
    (project / "__main__.py").symlink_to(ROOT / "__main__.py")
    clusters: dict[str, dict[str, Any]] = {}
    for cluster, vm, ip in VMS:
        spec = clusters.setdefault(cluster, {
            "name": f"aihpa-{cluster}", "network": {"subnet": f"{_net('aihow', cluster)}.0/24",
                                                     "bridge": f"aihpa{cluster[0]}0", "forward_mode": "isolated"},
            "hardware": {"acceleration": {"cpu_model": "qemu64"}}})
        node = {"cpu_cores": 1, "memory_gb": 1, "disk_gb": 4, "ip": f"{_net('aihow', cluster)}.{ip}"}
        head = {"controller": "controller", "control-plane": "control_plane"}.get(vm)
        if head:
            spec[head] = node
        else:
            key = "compute_nodes" if cluster == "hpc" else "worker_nodes"
            spec.setdefault(key, []).append(node)
    (folder / "clusters.yaml").write_text(yaml.safe_dump({"version": "1.0", "clusters": clusters}))
    for stack in ("hpc", "cloud"):
        (project / f"Pulumi.{stack}.yaml").write_text(yaml.safe_dump({"config": {
            "aihow:clusterFile": str(folder / "clusters.yaml"), "aihow:imagesDir": "/var/lib/libvirt/images/aihpa",
            "aihow:ledgerPath": str(folder / "leases.json"), "aihow:stopTimeout": "30"}}))
    (folder / "state").mkdir()
    env = {**os.environ, "AIHOW_PROJECT_DIR": str(project), "PULUMI_BACKEND_URL": f"file://{folder / 'state'}"}
    invoke = [str(ROOT / ".venv" / "bin" / "invoke"), "-r", str(ROOT)]
    return Tool("this project", folder, env, {
        "create": [*invoke, "system.up", "--no-deploy", "--yes"],
        "no-op plan": [*invoke, "preview"],
        "no-op re-apply": [*invoke, "system.up", "--no-deploy", "--yes"],
        "destroy": [*invoke, "system.destroy", "--yes"],
    })


def tofu_tool(work: Path) -> Tool:
    """OpenTofu with terraform-provider-libvirt: init once, then apply, plan, apply, destroy."""
    tofu, rc = tofu_setup()
    folder = work / "tofu"
    folder.mkdir()
    lines = ['terraform {\n  required_providers {\n    libvirt = {\n      source  = "dmacvicar/libvirt"\n'
             f'      version = "{PROVIDER[1].lstrip("v")}"\n    }}\n  }}\n}}\n',
             'provider "libvirt" {\n  uri = "qemu:///system"\n}\n',
             'resource "libvirt_pool" "pool" {\n  name = "aihpt-pool"\n  type = "dir"\n'
             '  target {\n    path = "/var/lib/libvirt/images/aihpt"\n  }\n}\n']
    for cluster in ("hpc", "cloud"):
        lines.append(f'resource "libvirt_network" "{cluster}" {{\n  name = "aihpt-{cluster}-network"\n'
                     f'  mode = "none"\n  bridge = "aihpt{cluster[0]}0"\n'
                     f'  addresses = ["{_net("tofu", cluster)}.0/24"]\n  autostart = true\n}}\n')
    for cluster, vm, ip in VMS:
        name = f"{cluster}-{vm}"
        lines.append(f'resource "libvirt_volume" "{name}" {{\n  name = "aihpt-{name}.qcow2"\n'
                     f'  pool = libvirt_pool.pool.name\n  size = {4 * 2**30}\n  format = "qcow2"\n}}\n')
        lines.append(
            f'resource "libvirt_domain" "{name}" {{\n  name = "aihpt-{name}"\n  type = "qemu"\n'
            f'  memory = 1024\n  vcpu = 1\n  running = true\n'
            f'  disk {{\n    volume_id = libvirt_volume.{name}.id\n  }}\n'
            f'  network_interface {{\n    network_id = libvirt_network.{cluster}.id\n'
            f'    addresses = ["{_net("tofu", cluster)}.{ip}"]\n  }}\n'
            # Guests without a DHCP lease show their addresses as a change on every plan otherwise.
            '  lifecycle {\n    ignore_changes = [network_interface[0].addresses]\n  }\n}\n')
    (folder / "main.tf").write_text("\n".join(lines))
    env = {**os.environ, "TF_CLI_CONFIG_FILE": str(rc), "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    subprocess.run([str(tofu), "init", "-input=false"], cwd=folder, env=env, check=True, capture_output=True)
    t = str(tofu)
    return Tool("OpenTofu + libvirt provider", folder, env, {
        "create": [t, "apply", "-auto-approve", "-input=false"],
        "no-op plan": [t, "plan", "-input=false", "-detailed-exitcode"],
        "no-op re-apply": [t, "apply", "-auto-approve", "-input=false"],
        "destroy": [t, "destroy", "-auto-approve", "-input=false"],
    })


def kcli_tool(work: Path) -> Tool:
    """kcli with a plan file: create, create again (it keeps what exists), delete."""
    kcli = str(kcli_setup())
    folder = work / "kcli"
    folder.mkdir()
    plan: dict[str, object] = {
        "aihpk-pool": {"type": "pool", "path": "/var/lib/libvirt/images/aihpk"}}
    for cluster in ("hpc", "cloud"):
        plan[f"aihpk-{cluster}-net"] = {"type": "network", "cidr": f"{_net('kcli', cluster)}.0/24",
                                       "isolated": True, "dhcp": True}
    for cluster, vm, ip in VMS:
        plan[f"aihpk-{cluster}-{vm}"] = {
            "memory": 1024, "numcpus": 1, "pool": "aihpk-pool", "disks": [4], "image": None, "start": True,
            # The same software emulation as the others here (kvm_pvm cannot run a guest kernel).
            "cpumodel": "qemu64", "virttype": "qemu", "nested": False, "cloudinit": False,
            "nets": [{"name": f"aihpk-{cluster}-net", "ip": f"{_net('kcli', cluster)}.{ip}",
                      "netmask": "255.255.255.0", "gateway": f"{_net('kcli', cluster)}.1"}]}
    (folder / "plan.yml").write_text(yaml.safe_dump(plan, sort_keys=False))
    env = {**os.environ, "HOME": str(folder)}  # its own ~/.kcli
    return Tool("kcli", folder, env, {
        "create": [kcli, "create", "plan", "-f", "plan.yml", "aihpk"],
        "no-op re-apply": [kcli, "create", "plan", "-f", "plan.yml", "aihpk"],
        "destroy": [kcli, "delete", "plan", "aihpk", "-y"],
    }, cleanup=[["virsh", "-c", "qemu:///system", "pool-destroy", "aihpk-pool"],
                ["virsh", "-c", "qemu:///system", "pool-delete", "aihpk-pool"],
                ["virsh", "-c", "qemu:///system", "pool-undefine", "aihpk-pool"]])


MAKERS: dict[str, Callable[[Path], Tool]] = {"aihow": aihow_tool, "tofu": tofu_tool, "kcli": kcli_tool}


# --- the run ------------------------------------------------------------------------------------


def run(tools: list[str], rounds: int) -> dict[str, dict[str, list[Sample]]]:
    """Interleaved rounds (the order rotates), every step of every tool in each."""
    results: dict[str, dict[str, list[Sample]]] = {t: {s: [] for s in STEPS} for t in tools}
    with tempfile.TemporaryDirectory(prefix="aihow-peers-") as tmp:
        made = {name: MAKERS[name](Path(tmp)) for name in tools}
        for index in range(rounds):
            order = tools[index % len(tools):] + tools[:index % len(tools)]
            for name in order:
                tool = made[name]
                try:
                    for step in STEPS:
                        sample = tool.step(step)
                        if sample is not None:
                            results[name][step].append(sample)
                            say(f"round {index + 1} {tool.name}: {step} {sample.seconds:.2f} s")
                except BaseException:
                    with contextlib.suppress(RuntimeError):
                        tool.step("destroy")  # leave nothing behind, then report the failure
                    raise
                finally:
                    tool.clean()
    return results


def table(results: dict[str, dict[str, list[Sample]]], rounds: int) -> str:
    """The Markdown table: medians, and each tool's ratio to OpenTofu where it ran."""
    names = {"aihow": "this project", "tofu": "OpenTofu + libvirt provider", "kcli": "kcli"}
    tools = list(results)
    head = "| step | " + " | ".join(names[t] for t in tools) + " |"
    lines = [head, "|---" * (len(tools) + 1) + "|"]
    base = results.get("tofu")
    for step in STEPS:
        cells = []
        for tool in tools:
            samples = results[tool][step]
            if not samples:
                cells.append("(none)")
                continue
            median = statistics.median(s.seconds for s in samples)
            cell = f"{median:.2f} s"
            if base and base[step] and tool != "tofu":
                cell += f" ({median / statistics.median(s.seconds for s in base[step]):.2f}x)"
            cells.append(cell)
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    for label, attr in (("CPU per command (user+sys, median)", "cpu"), ("peak memory, largest process", "peak_mib")):
        cells = []
        for tool in tools:
            values = [getattr(s, attr) for step in STEPS for s in results[tool][step]]
            unit = "s" if attr == "cpu" else "MiB"
            cells.append(f"{statistics.median(values):.2f} {unit}" if values else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cpus = os.cpu_count()
    lines.append("")
    lines.append(f"{rounds} interleaved rounds, medians; {platform.node()}: {cpus} vCPUs, "
                 f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
                 f"{time.strftime('%Y-%m-%d')}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="aihow,tofu,kcli", help="comma-separated: aihow, tofu, kcli")
    parser.add_argument("--build-only", action="store_true", help="build and install the peers, run nothing")
    args = parser.parse_args()
    tools = [t for t in args.only.split(",") if t]
    unknown = [t for t in tools if t not in MAKERS]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: unknown; allowed: {', '.join(MAKERS)}")
    if args.build_only:
        tofu_setup()
        kcli_setup()
        return
    print(table(run(tools, args.rounds), args.rounds))


if __name__ == "__main__":
    main()

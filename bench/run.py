"""Benchmarks: how much the infrastructure-as-code layer adds, and how cost grows with size.

    .venv/bin/python bench/run.py              # everything (needs libvirtd and ./bootstrap)
    .venv/bin/python bench/run.py --only validate,lease,scale --sizes 10,100
    .venv/bin/python bench/run.py --only kubebuild   # Kubernetes from empty Go caches (~10 min)

Every figure is a ratio against a baseline measured in the same run, because timings on
a shared machine are noisy: system.up against a plain libvirt-python script doing the
same work, invoke vm.start against virsh start, cost at N VMs against cost at the
smallest N, lease throughput under 16 contenders against one process alone, the Kubernetes
build from empty Go caches against a rebuild from the caches it filled.
Real-libvirt parts use isolated networks named ``aihb<hex>`` and remove all they make.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from measure import measured

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aihow_infra.gpu.ledger import Ledger  # noqa: E402
from aihow_infra.loading import load_cluster_file  # noqa: E402
from aihow_infra.stacks import Workspace  # noqa: E402

Row = tuple[str, str, str, str]  # what, measured, baseline, ratio


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """Wall time and peak RSS (MiB) of the largest process in ``cmd``'s tree."""
    sample = measured(cmd, cwd, env)
    return sample.seconds, int(sample.peak_mib)


# --- generated configs -------------------------------------------------------------------------


def generated_config(n_vms: int, prefix: str = "gen", gpus: int = 0) -> dict[str, Any]:
    """An HPC cluster of ``n_vms`` VMs (controller + compute) on a /16, optionally some with GPUs."""
    net = ipaddress.IPv4Network("10.212.0.0/16")
    hosts = list(net.hosts())
    nodes = []
    for i in range(n_vms - 1):
        node: dict[str, Any] = {"cpu_cores": 2, "memory_gb": 4, "disk_gb": 20, "ip": str(hosts[20 + i])}
        if i < gpus:
            bus = f"{(i % 250) + 1:02x}"
            node["pcie_passthrough"] = {"enabled": True, "devices": [
                {"pci_address": f"0000:{bus}:00.0", "device_type": "gpu", "vendor_id": "10de", "device_id": "2805"},
                {"pci_address": f"0000:{bus}:00.1", "device_type": "audio"}]}
        nodes.append(node)
    return {"version": "1.0", "clusters": {"hpc": {
        "name": f"{prefix}-hpc", "network": {"subnet": str(net), "bridge": f"{prefix}h0", "forward_mode": "isolated"},
        "hardware": {"acceleration": {"cpu_model": "qemu64"}},
        "controller": {"cpu_cores": 2, "memory_gb": 4, "disk_gb": 20, "ip_address": str(hosts[9])},
        "compute_nodes": nodes}}}


def write_config(folder: Path, data: dict[str, Any], name: str) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench_validate_1000(folder: Path) -> list[Row]:
    """Issue 3: validate a generated 1,000-node file, against parsing the YAML alone."""
    path = write_config(folder, generated_config(1000, gpus=100), "gen-1000.yaml")
    parse = min(timed(lambda: yaml.safe_load(path.read_text())) for _ in range(3))
    full = min(timed(lambda: load_cluster_file(path)) for _ in range(3))
    return [("validate 1,000-node file (in process)", f"{full * 1000:.0f} ms", f"YAML parse {parse * 1000:.0f} ms",
             f"{full / parse:.2f}x")]


# --- GPU lease throughput ------------------------------------------------------------------------


def _contender(path: str, holder: str, rounds: int, address: str) -> None:
    ledger = Ledger(path)
    done = 0
    while done < rounds:
        try:
            ledger.acquire(holder, [address])
        except Exception:
            continue
        ledger.release(holder, [address])
        done += 1


def lease_throughput(folder: Path, contenders: int, rounds: int) -> float:
    path = str(folder / f"ledger-{contenders}.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_contender, args=(path, f"b/{i}", rounds, "0000:01:00.0")) for i in range(contenders)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return contenders * rounds / (time.perf_counter() - start)


def bench_lease(folder: Path) -> list[Row]:
    """Issue 5/7: acquire+release cycles per second with 16 contenders on one GPU."""
    alone = lease_throughput(folder, 1, 400)
    crowd = lease_throughput(folder, 16, 50)
    return [("GpuLease acquire+release, 16 contenders", f"{crowd:.0f} /s", f"1 process {alone:.0f} /s",
             f"{crowd / alone:.2f}x")]


# --- cost against size (libvirt test driver) -----------------------------------------------------


@contextlib.contextmanager
def temp_project(folder: Path, name: str) -> Iterator[Workspace]:
    project = folder / name
    project.mkdir()
    (project / "Pulumi.yaml").write_text(yaml.safe_dump({
        "name": "aihow", "runtime": {"name": "python", "options": {"virtualenv": str(ROOT / ".venv")}}}))
    os.symlink(ROOT / "__main__.py", project / "__main__.py")
    (folder / f"{name}-state").mkdir()
    yield Workspace(project_dir=project, backend_url=f"file://{folder / f'{name}-state'}")


def bench_scale(folder: Path, sizes: list[int]) -> list[Row]:
    """pulumi preview, invoke topology and invoke validate at N VMs, against the smallest N."""
    rows: list[Row] = []
    base: dict[str, tuple[float, int]] = {}
    invoke = [sys.executable, "-m", "invoke", "-r", str(ROOT)]
    for n in sizes:
        path = write_config(folder, generated_config(n, gpus=min(n // 10, 200)), f"scale-{n}.yaml")
        with temp_project(folder, f"scale{n}") as ws:
            (ws.project_dir / "Pulumi.hpc.yaml").write_text(yaml.safe_dump({"config": {
                "aihow:clusterFile": str(path), "aihow:libvirtUri": "test:///default",
                "aihow:ledgerPath": str(folder / "scale-ledger.json")}}))
            ws.ensure_stack("hpc")
            env = ws.env()
            measured = {
                "pulumi preview": run_measured(["pulumi", "preview", "-s", "hpc", "--non-interactive"], env,
                                               ws.project_dir),
                "invoke topology --config": run_measured([*invoke, "topology", "--json", "--config", str(path)], env),
                "invoke validate --config": run_measured([*invoke, "validate", "--config", str(path)], env),
            }
        for what, (seconds, mib) in measured.items():
            base.setdefault(what, (seconds, mib))
            b_s, b_m = base[what]
            rows.append((f"{what}, {n} VMs", f"{seconds:.2f} s, {mib} MiB", f"{sizes[0]} VMs {b_s:.2f} s, {b_m} MiB",
                         f"{seconds / b_s:.2f}x time, {mib / b_m:.2f}x mem"))
    return rows


# --- real libvirt: system.up and vm.start ---------------------------------------------------------


def plain_libvirt_up(plan_file: Path, images: Path, uri: str = "qemu:///system",
                     cmdline: str | None = None, image_folder: Path | None = None,
                     cpu_seconds: dict[str, float] | None = None) -> tuple[Callable[[], None], dict[str, float]]:
    """The baseline: a plain libvirt-python script that defines and starts the same networks,
    pools, volumes (overlays on the same image), seeds and domains, then polls the same guest
    agent until every VM is ready. Returns its teardown and each VM's start-to-ready seconds.
    ``cmdline``: the guests' whole kernel command line (default: what the project renders);
    ``image_folder``: a built image to boot instead of the current recipe's (another checkout's);
    ``cpu_seconds`` is given each guest's host CPU seconds (libvirt's cpu_time) when it was ready."""
    import libvirt

    from aihow_infra.cloudinit import SeedSpec, seed_files, seed_iso
    from aihow_infra.host import Host, choose_virt_type
    from aihow_infra.images import KERNEL_CMDLINE, image_for
    from aihow_infra.libvirt.guest import console_log_path, probe
    from aihow_infra.libvirt.render import domain_xml, network_xml, pool_xml, volume_xml
    from aihow_infra.plan import plan_all
    from aihow_infra.sshkeys import login_key

    conn = libvirt.open(uri)
    virt_type = choose_virt_type("auto", Host(Path("/")), _kvm(conn)).virt_type  # as the project decides
    made: list[Callable[[], None]] = []
    started: dict[str, tuple[Any, float]] = {}
    key = login_key(None, plan_file.parent).public

    def teardown() -> None:
        for undo in reversed(made):
            with contextlib.suppress(libvirt.libvirtError):
                undo()
        conn.close()

    try:
        for plan in plan_all(load_cluster_file(plan_file)):
            net = conn.networkDefineXML(network_xml({
                "name": plan.network_name, "bridge": plan.bridge, "forward_mode": plan.forward_mode,
                "dns_domain": plan.dns_domain, "dns_servers": [], "gateway": plan.gateway,
                "netmask": plan.netmask, "dhcp_start": plan.dhcp_start, "dhcp_end": plan.dhcp_end,
                "hosts": [{"mac": v.mac, "name": v.name, "ip": v.ip} for v in plan.vms if v.ip]}))
            made.append(lambda n=net: n.undefine())
            made.append(lambda n=net: n.isActive() and n.destroy())
            net.create()
            pool = conn.storagePoolDefineXML(pool_xml({"name": plan.pool_name, "path": str(images / plan.name)}), 0)
            made.append(lambda p=pool: p.undefine())
            pool.build(0)
            made.append(lambda p=pool: p.delete(0))
            made.append(lambda p=pool: p.isActive() and p.destroy())
            pool.create(0)
            for vm in plan.vms:
                image = image_for(vm.image) if vm.image else None
                if image is not None and image_folder is not None:
                    image = replace(image, folder=image_folder)
                vol = pool.createXML(volume_xml({"name": f"{vm.name}.qcow2", "size_gb": vm.disk_gb,
                                                 "base_image": str(image.disk) if image else None}), 0)
                made.append(lambda v=vol: v.delete(0))
                spec = SeedSpec(vm.name, vm.mac, vm.ip, plan.subnet, None, (plan.gateway,), plan.dns_domain, "aihow",
                                (key,), tuple((v.ip, v.name) for v in plan.vms if v.ip))
                data = seed_iso(seed_files(spec))
                seed = pool.createXML(volume_xml({"name": f"{vm.name}-seed.iso", "size_bytes": len(data),
                                                  "format": "raw"}), 0)
                stream = conn.newStream(0)
                seed.upload(stream, 0, len(data), 0)
                stream.send(data)
                stream.finish()
                made.append(lambda v=seed: v.delete(0))
                boot = {"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": KERNEL_CMDLINE} \
                    if image else None
                xml = domain_xml({
                    "name": vm.name, "cluster": vm.cluster_name, "role": vm.role, "stack": "plain",
                    "vcpus": vm.cpu_cores, "memory_mib": vm.memory_gb * 1024, "disk_path": vol.path(), "mac": vm.mac,
                    "network": plan.network_name, "devices": [], "mounts": [], "seed_path": seed.path(), "boot": boot,
                    "console_log": str(console_log_path(vm.name)),
                    "acceleration": {"cpu_model": vm.acceleration.cpu_model}}, virt_type)
                if cmdline is not None:
                    xml = re.sub(r"<cmdline>.*</cmdline>", f"<cmdline>{cmdline}</cmdline>", xml)
                dom = conn.defineXML(xml)
                made.append(lambda d=dom: d.undefine())
                made.append(lambda d=dom: d.isActive() and d.destroy())
                if vm.auto_start:
                    dom.create()
                    started[vm.name] = (dom, time.perf_counter())
        ready: dict[str, float] = {}
        deadline = time.perf_counter() + 1800
        while len(ready) < len(started) and time.perf_counter() < deadline:
            for name, (dom, when) in started.items():
                if name not in ready and probe(dom).ready:
                    ready[name] = time.perf_counter() - when
                    if cpu_seconds is not None:  # what the guest's emulation cost the host to get there
                        cpu_seconds[name] = dom.getCPUStats(True)[0]["cpu_time"] / 1e9
            time.sleep(1)
    except BaseException:  # a failure or Ctrl-C midway: nothing made is left behind
        teardown()
        raise
    if len(ready) < len(started):
        teardown()
        raise RuntimeError(f"plain script: {sorted(set(started) - set(ready))} not ready in 30 minutes")
    return teardown, ready


def qemu_rss_mib(prefix: str) -> list[int]:
    """Peak resident memory (MiB) of each running qemu whose VM name starts with ``prefix``."""
    sizes = []
    for pid_file in Path("/run/libvirt/qemu").glob(f"{prefix}*.pid"):
        with contextlib.suppress(OSError, ValueError):
            status = Path(f"/proc/{int(pid_file.read_text())}/status").read_text()
            sizes += [int(line.split()[1]) // 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return sizes


def _kvm(conn: Any) -> bool:
    from aihow_infra.libvirt.connection import kvm_usable

    return kvm_usable(conn)


def default_like(prefix: str) -> dict[str, Any]:
    """config/default.yaml with this run's names and subnets (10.213.241-242.0/24)."""
    data = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    for key, third in (("hpc", 241), ("cloud", 242)):
        cluster = data["clusters"][key]
        old = ipaddress.IPv4Network(cluster["network"]["subnet"])
        new = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        cluster.update(name=f"{prefix}-{key}")
        cluster["network"].update(subnet=str(new), bridge=f"{prefix}{key[0]}")
        heads = [cluster[k] for k in ("controller", "control_plane") if k in cluster]
        for node in [*heads, *cluster.get("compute_nodes", []), *cluster.get("worker_nodes", [])]:
            field = "ip_address" if "ip_address" in node else "ip"
            offset = int(ipaddress.IPv4Address(node[field])) - int(old.network_address)
            node[field] = str(new.network_address + offset)
    return data


def bench_images(folder: Path) -> list[Row]:
    """Issue 12: the hpc image built with no .deb cache, again from the .deb cache, and found
    in the image cache, each against the cold build."""
    from aihow_infra.images import ensure_image

    root = folder / "images"
    env_before = dict(os.environ)
    try:
        os.environ["AIHOW_DEBS_DIR"] = str(folder / "debs")  # empty: every package from the mirror
        cold = timed(lambda: ensure_image("hpc", force=True, root=root))
        warm = timed(lambda: ensure_image("hpc", force=True, root=root))
        cached = timed(lambda: ensure_image("hpc", root=root))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    size = sum(p.stat().st_size for p in root.glob("*/disk.qcow2")) / 2**20
    return [("hpc image build, no .deb cache", f"{cold:.1f} s, {size:.0f} MiB qcow2", "(the baseline)", "1.00x"),
            ("hpc image rebuild from the .deb cache", f"{warm:.1f} s", f"cold {cold:.1f} s", f"{warm / cold:.2f}x"),
            ("hpc image from the image cache", f"{cached * 1000:.0f} ms", f"cold {cold:.1f} s",
             f"{cached / cold:.4f}x")]


def bench_real(folder: Path) -> list[Row]:
    """system.up of the two-cluster example, from nothing to every VM ready, against the plain
    script; invoke vm.start (ready) against virsh start plus the same agent poll."""
    from aihow_infra.images import ensure_image
    from aihow_infra.libvirt.guest import console_log_path, wait_ready
    from aihow_infra.ops import Operator

    for role in ("hpc", "cloud"):  # both runs boot the same, already built images
        ensure_image(role)
    rows: list[Row] = []
    images = Path("/var/lib/libvirt/images")
    # Baseline first, with its own names, torn down before the Pulumi run.
    plain_prefix = f"aihb{uuid.uuid4().hex[:5]}"
    plain_file = write_config(folder, default_like(plain_prefix), "plain.yaml")
    start = time.perf_counter()
    teardown, boot_to_ready = plain_libvirt_up(plain_file, images / plain_prefix)
    plain = time.perf_counter() - start
    plain_rss = qemu_rss_mib(plain_prefix)
    teardown()
    shutil.rmtree(images / plain_prefix, ignore_errors=True)

    prefix = f"aihb{uuid.uuid4().hex[:5]}"
    cluster_file = write_config(folder, default_like(prefix), "iac.yaml")
    with temp_project(folder, "real") as ws:
        for stack in ("hpc", "cloud"):
            (ws.project_dir / f"Pulumi.{stack}.yaml").write_text(yaml.safe_dump({"config": {
                "aihow:clusterFile": str(cluster_file), "aihow:imagesDir": str(images / prefix),
                "aihow:ledgerPath": str(folder / "real-ledger.json"), "aihow:stopTimeout": "60",
                "aihow:ansibleConnection": "agent"}}))
        op = Operator(ws)
        try:
            iac = timed(lambda: op.system_up(deploy=False))
            iac_rss = qemu_rss_mib(prefix)
            rows.append(("system.up, two-cluster example, 5 VMs to ready", f"{iac:.1f} s",
                         f"plain libvirt script {plain:.1f} s", f"{iac / plain:.2f}x"))
            per_vm = sorted(boot_to_ready.values())
            rows.append(("boot to ready per VM (plain script, 5 at once)",
                         f"median {statistics.median(per_vm):.0f} s", f"fastest {per_vm[0]:.0f} s",
                         f"{statistics.median(per_vm) / per_vm[0]:.2f}x"))
            rows.append(("qemu memory per 1 GiB guest (peak RSS)", f"median {statistics.median(iac_rss):.0f} MiB",
                         f"plain script {statistics.median(plain_rss):.0f} MiB",
                         f"{statistics.median(iac_rss) / statistics.median(plain_rss):.2f}x"))
            rows += bench_deploy(op, folder)
            vm = f"{prefix}-hpc-compute-01"
            env = {**ws.env(), "AIHOW_PROJECT_DIR": str(ws.project_dir)}
            invoke_times, virsh_times = [], []
            import libvirt

            conn = libvirt.open("qemu:///system")
            for _ in range(2):  # alternating, medians: both paths see the same machine load
                op.vm_stop(vm, force=True)
                invoke_times.append(run_measured([sys.executable, "-m", "invoke", "-r", str(ROOT), "vm.start", vm],
                                                 env)[0])
                subprocess.run(["virsh", "-c", "qemu:///system", "destroy", vm], check=True, capture_output=True)
                started = time.perf_counter()
                conn.lookupByName(vm).create()
                wait_ready(conn.lookupByName(vm), 900, console_log_path(vm))
                virsh_times.append(time.perf_counter() - started)
            conn.close()
            invoke_start, virsh_start = statistics.median(invoke_times), statistics.median(virsh_times)
            rows.append(("invoke vm.start to ready (one VM, median of 2)", f"{invoke_start:.1f} s",
                         f"libvirt start + agent poll {virsh_start:.1f} s", f"{invoke_start / virsh_start:.2f}x"))
        finally:
            with contextlib.suppress(Exception):
                op.system_destroy()
            shutil.rmtree(images / prefix, ignore_errors=True)
    return rows


def bench_deploy(op: Any, folder: Path) -> list[Row]:
    """Issue 13: the HPC deploy, first and with nothing to change, against plain ansible-playbook
    running the same playbook on a static copy of the same inventory (no plugin, no wrapper)."""
    from aihow_infra.deploy import ANSIBLE_DIR
    from aihow_infra.inventory import to_yaml

    first = timed(lambda: op.deploy("hpc"))
    again = timed(lambda: op.deploy("hpc"))
    cloud_first = timed(lambda: op.deploy("cloud"))  # ends when every running node is Ready
    cloud_again = timed(lambda: op.deploy("cloud"))
    static = folder / "hpc-inventory.yml"
    static.write_text(to_yaml(op.inventory("hpc")))
    env = {**op.workspace.env(), "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
           "ANSIBLE_STDOUT_CALLBACK": "default"}
    plain = timed(lambda: subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(static),
                                          str(ANSIBLE_DIR / "hpc.yml")], cwd=ANSIBLE_DIR, env=env, check=True,
                                         capture_output=True))
    return [("deploy hpc, first run (3 VMs, guest agent)", f"{first:.0f} s", f"no-change run {again:.0f} s",
             f"{first / again:.2f}x"),
            ("deploy hpc, nothing to change", f"{again:.0f} s", f"plain ansible-playbook {plain:.0f} s",
             f"{again / plain:.2f}x"),
            ("deploy cloud to every node Ready (Kubernetes, 2 VMs)", f"{cloud_first:.0f} s",
             f"no-change run {cloud_again:.0f} s", f"{cloud_first / cloud_again:.2f}x")]


def _folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def bench_kubebuild(folder: Path) -> list[Row]:
    """Issue 14: the one-time build of Kubernetes, etcd and pause with empty Go caches (every
    module from the proxy), against a rebuild from the caches it filled."""
    from aihow_infra import kubebins

    caches = {"GOMODCACHE": folder / "gomod", "GOCACHE": folder / "gocache", "GOFLAGS": "-modcacherw"}
    env_before = dict(os.environ)
    try:
        os.environ.update({k: str(v) for k, v in caches.items()})
        build = ("import sys; from pathlib import Path; from aihow_infra.kubebins import ensure_binaries; "
                 "ensure_binaries(root=Path(sys.argv[1]))")
        cold = run_measured([sys.executable, "-c", build, str(folder / "k8s-cold")], dict(os.environ), ROOT)
        warm = run_measured([sys.executable, "-c", build, str(folder / "k8s-warm")], dict(os.environ), ROOT)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    downloads = _folder_mib(folder / "gomod" / "cache" / "download")
    go_caches = _folder_mib(folder / "gomod") + _folder_mib(folder / "gocache")
    binaries = _folder_mib(folder / "k8s-cold")
    key = kubebins.build_key()
    return [(f"Kubernetes build, empty Go caches ({key.split('-')[0]})", f"{cold[0]:.0f} s, peak {cold[1]} MiB",
             f"rebuild from the caches {warm[0]:.0f} s", f"{cold[0] / warm[0]:.1f}x"),
            ("  its downloads / Go caches / binaries kept", f"{downloads:.0f} / {go_caches:.0f} / {binaries:.0f} MiB",
             "-", "-")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="validate,lease,scale,images,kubebuild,real",
                        help="comma-separated parts: validate, lease, scale, images, kubebuild, real")
    parser.add_argument("--sizes", default="10,100,500", help="VM counts for the scale part")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aihow-bench-") as tmp:
        folder = Path(tmp)
        if "validate" in parts:
            rows += bench_validate_1000(folder)
        if "lease" in parts:
            rows += bench_lease(folder)
        if "scale" in parts:
            rows += bench_scale(folder, [int(s) for s in args.sizes.split(",")])
        if "images" in parts:
            rows += bench_images(folder)
        if "kubebuild" in parts:
            rows += bench_kubebuild(folder)
        if "real" in parts:
            rows += bench_real(folder)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {memory} GiB, Python {platform.python_version()}")
    widths = [max(len(r[i]) for r in [("what", "measured", "baseline", "ratio"), *rows]) for i in range(4)]
    for row in [("what", "measured", "baseline", "ratio"), tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()

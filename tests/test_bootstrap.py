"""./bootstrap leaves every program the tasks and tests call on PATH.

A missing one fails here, by name, instead of as a confusing error deep in another
test on the next new machine (xmllint was lost once: it is only a recommendation of
libvirt-clients, and bootstrap installs without recommendations).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from aihow_infra.stacks import offline_env

ROOT = Path(__file__).resolve().parents[1]

# program -> who calls it, and the Debian package (or bootstrap step) that brings it
PROGRAMS = {
    "virsh": "tests, bootstrap (libvirt-clients)",
    "virt-xml-validate": "XML schema tests (libvirt-clients)",
    "xmllint": "virt-xml-validate runs it (libxml2-utils)",
    "qemu-img": "the volume provider, for base images (qemu-utils)",
    "qemu-system-x86_64": "libvirt runs the guests (qemu-system-x86)",
    "libvirtd": "the daemon (libvirt-daemon-system)",
    "virtlogd": "the daemon's log helper (libvirt-daemon-system)",
    "dnsmasq": "DHCP and DNS of libvirt networks (dnsmasq-base)",
    "ip": "the sandbox picks free test subnets (iproute2)",
    "bridge": "the SSH test waits for its port on a libvirt bridge (iproute2)",
    "mmdebstrap": "image.build makes guest root file systems (mmdebstrap)",
    "mke2fs": "image.build writes them into ext4 (e2fsprogs)",
    "ssh": "vm.ssh, and deploys over SSH (openssh-client)",
    "sysctl": "the SSH test's namespace keeps IPv6 off the host's side (procps)",
    "pulumi": "the engine (built by bootstrap into .tools/bin)",
    "pulumi-language-python": "the engine's Python host (built by bootstrap)",
    "ansible-inventory": "inventory tests (ansible-core, in .venv)",
    "ansible-playbook": "invoke deploy (ansible-core, in .venv)",
    "aihow": "the operator's command from any folder (pyproject's console script, in .venv)",
    "go": "the Pulumi engine and the Kubernetes binaries are built with it",
    "gcc": "the pause binary of the Kubernetes images (gcc, libc6-dev)",
    "strip": "the pause binary (binutils)",
    "unshare": "slurmctld reads slurm.conf in namespaces of its own (util-linux; tests/consumers.py)",
    "apt-get": "the images' cloud-init and slurmctld are unpacked for the consumer tests (tests/consumers.py)",
}


def test_postgresql_is_installed_for_the_shared_ledger_tests() -> None:
    from tests.postgres import PG_BIN

    for program in ("initdb", "pg_ctl", "createdb", "postgres"):
        assert (PG_BIN / program).exists(), f"{PG_BIN / program} is missing: the ledger's PostgreSQL tests start a " \
                                            "private server with it (postgresql-15); run ./bootstrap"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_is_on_path(program: str) -> None:
    path = offline_env()["PATH"] + os.pathsep + "/usr/sbin:/sbin"
    assert shutil.which(program, path=path), f"{program} is missing: needed by {PROGRAMS[program]}; run ./bootstrap"


def test_debian_python_runs_cloud_inits_dependencies() -> None:
    # tests/consumers.py runs the images' cloud-init on Debian's python3, with its Depends from Debian.
    done = subprocess.run(["/usr/bin/python3", "-c", "import yaml, jsonschema, jsonpatch, jinja2, configobj, "
                           "requests, netifaces"], capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stderr.strip()}; run ./bootstrap"


def test_libvirt_finds_a_virtiofs_daemon() -> None:
    # Shares (a node's virtiofs mounts, the GPU-host simulator's checkout) need one; libvirt looks
    # for it in qemu's vhost-user descriptions, not on PATH (qemu-system-common brings both).
    found = [json.loads(p.read_text()) for p in sorted(Path("/usr/share/qemu/vhost-user").glob("*.json"))]
    daemons = [d["binary"] for d in found if d.get("type") == "fs" and Path(d.get("binary", "")).is_file()]
    assert daemons, "no virtiofs daemon in /usr/share/qemu/vhost-user; run ./bootstrap (qemu-system-x86)"


def test_xml_validation_works_end_to_end(tmp_path: Path) -> None:
    # virt-xml-validate is a shell script that needs xmllint: run it, not only find it.
    doc = tmp_path / "pool.xml"
    doc.write_text("<pool type='dir'><name>p</name><target><path>/tmp/p</path></target></pool>")
    proc = subprocess.run(["virt-xml-validate", str(doc), "storagepool"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_bootstrap_refuses_an_unknown_argument() -> None:
    proc = subprocess.run([str(ROOT / "bootstrap"), "--nope"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "[bootstrap] error: unknown argument --nope; allowed: --no-system, --help"


def test_the_shell_settings_match_the_tasks() -> None:
    env_file = ROOT / ".tools" / "env"
    assert env_file.exists(), "run ./bootstrap"
    shell = subprocess.run(["bash", "-c", f". {env_file} && env"], capture_output=True, text=True, check=True,
                           env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")})
    from_shell = dict(line.split("=", 1) for line in shell.stdout.splitlines() if line.startswith("PULUMI_"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PULUMI_")}
    expected = {k: v for k, v in offline_env(environ=clean).items() if k.startswith("PULUMI_")}
    # The backend is not set there: a plain pulumi reads backend.url in Pulumi.yaml, whatever it
    # says at the time (a PostgreSQL URL set after ./bootstrap included), which the tasks resolve
    # to the same folder or database.
    assert "PULUMI_BACKEND_URL" not in from_shell
    assert expected.pop("PULUMI_BACKEND_URL") == f"file://{ROOT / '.state'}"
    assert yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["backend"]["url"] == "file://./.state"
    assert from_shell == expected


def test_aihow_works_from_any_folder(tmp_path: Path) -> None:
    """The console script runs the project's tasks on the project's stacks wherever it is
    started; a folder with a tasks.py of its own changes nothing."""
    (tmp_path / "tasks.py").write_text("raise SystemExit('the wrong tasks.py')\n")
    aihow = ROOT / ".venv" / "bin" / "aihow"
    listed = subprocess.run([str(aihow), "--list"], cwd=tmp_path, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "system.status" in listed.stdout and "kubectl" in listed.stdout
    shown = subprocess.run([str(aihow), "validate", "--config", str(ROOT / "config" / "default.yaml")],
                           cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "aihow-hpc" in shown.stdout


def with_progress(tmp_path: Path, step: str) -> subprocess.CompletedProcess[str]:
    """bootstrap's ``with_progress`` (sourced alone from the script, lines every 0.5 s) running
    ``step``, a shell command; what it prints, and after it whether a ticker still runs."""
    lines = (ROOT / "bootstrap").read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith("package_line="))
    end = next(i for i in range(begin, len(lines)) if lines[i] == "}")
    (tmp_path / "progress.sh").write_text("\n".join([
        "set -euo pipefail", "say() { printf '[bootstrap] %s\\n' \"$*\" >&2; }", *lines[begin:end + 1],
        f"with_progress 'doing the step (1 of 1)' {tmp_path}/step.log bash -c {shlex.quote(step)}"
        " && echo ok || echo \"failed $?\"", "sleep 1", "pgrep -f \"sleep 0.5\" || echo 'no ticker'"]))
    return subprocess.run(["bash", str(tmp_path / "progress.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "AIHOW_PROGRESS_EVERY": "0.5"})


def test_a_long_build_step_says_that_it_still_runs_and_what_it_compiled(tmp_path: Path) -> None:
    done = with_progress(tmp_path, "for p in example.com/a example.com/b; do echo $p >&2; sleep 0.6; done")
    assert done.stdout.split() == ["ok", "no", "ticker"], done.stdout
    said = done.stderr.splitlines()
    assert said and all(line.startswith("[bootstrap] ... still doing the step (1 of 1): ") for line in said), said
    assert said[-1].endswith(" s, 2 packages compiled"), said


def test_a_failed_build_step_shows_its_errors_not_its_package_lines(tmp_path: Path) -> None:
    done = with_progress(tmp_path, "echo example.com/a >&2; echo 'a.go:3:1: syntax error' >&2; exit 3")
    assert done.stdout.split() == ["failed", "3", "no", "ticker"], done.stdout
    assert done.stderr.splitlines() == ["a.go:3:1: syntax error", f"[bootstrap] whole log: {tmp_path}/step.log"]

"""The real consumers of the files the project generates, for tests: cloud-init and slurmctld at the
versions the guest images install (Debian 12's packages, unpacked from the same mirror the images
are built from, cached outside the work tree), libvirtd itself, and Ansible's own templating.

Nothing here is a stand-in: a file a consumer refuses fails the test with the consumer's words.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import init_plugin_loader
from ansible.template import Templar, trust_as_template

ROOT = Path(__file__).resolve().parents[1]
# Debian's python3 runs cloud-init's own code, with its Python dependencies from Debian (./bootstrap).
DEBIAN_PYTHON = "/usr/bin/python3"
# What slurmctld logs once it has read its whole configuration (nodes and partitions come first).
READ_ALL = "Backfill scheduler plugin loaded"
CLOUD_INIT_CHECK = """
import sys, yaml
from cloudinit.net import network_state, networkd
from cloudinit.config import schema
kind, path = sys.argv[1], sys.argv[2]
text = open(path).read()
if kind == "network-config":
    state = network_state.parse_net_config_data(yaml.safe_load(text))
    for name, content in networkd.Renderer({})._render_content(state).items():
        print(f"--- {name}.network"); print(content)
else:
    assert text.startswith("#cloud-config\\n"), "user-data does not start with #cloud-config"
    schema.validate_cloudconfig_schema(yaml.safe_load(text), schema.get_schema(), strict=True)
    print("valid")
"""


def _cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aihow-infra" / "consumers"


def _candidate(package: str) -> str:
    shown = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=True).stdout
    for line in shown.splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"apt-cache knows no package {package}: run `apt-get update`")


def debian_packages(*packages: str) -> Path:
    """The packages' files unpacked (``dpkg -x``) into one folder, at the versions Debian's mirror
    offers now (those the images install), downloaded once and cached by name and version."""
    key = "+".join(f"{p}_{_candidate(p)}".replace(":", "%") for p in packages)
    folder = _cache() / key
    if (folder / ".complete").exists():
        return folder
    _cache().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=_cache()) as scratch:
        os.chmod(scratch, 0o755)  # apt's _apt user writes the downloads
        subprocess.run(["apt-get", "download", "-q", *packages], cwd=scratch, check=True, capture_output=True)
        unpacked = Path(scratch) / "root"
        for deb in sorted(Path(scratch).glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
        (unpacked / ".complete").touch()
        shutil.rmtree(folder, ignore_errors=True)
        unpacked.rename(folder)
    return folder


def containerd_reads(text: str, tmp: Path) -> str:
    """The configuration containerd (the images' Debian package) makes of ``text``, as
    ``containerd config dump`` prints it: the file merged over containerd's defaults.
    ``AssertionError`` with containerd's words when it refuses the file."""
    root = debian_packages("containerd")
    path = tmp / "config.toml"
    path.write_text(text)
    done = subprocess.run([str(root / "usr/bin/containerd"), "--config", str(path), "config", "dump"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"containerd refuses this config.toml:\n{text}\n{done.stderr[-2000:]}"
    return done.stdout


def cloud_init(kind: str, text: str) -> str:
    """What the images' cloud-init makes of a seed file: ``network-config`` parsed and rendered
    for systemd-networkd (as the images render it), ``user-data`` checked against its schema.
    ``AssertionError`` with cloud-init's own error when it refuses the file."""
    root = debian_packages("cloud-init")
    with tempfile.NamedTemporaryFile("w", suffix=f".{kind}") as file:
        file.write(text)
        file.flush()
        done = subprocess.run([DEBIAN_PYTHON, "-c", CLOUD_INIT_CHECK, kind, file.name], capture_output=True,
                              text=True, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH":
                                              str(root / "usr/lib/python3/dist-packages")})
    assert done.returncode == 0, f"cloud-init refuses this {kind}:\n{text}\n{done.stderr.strip()}"
    return done.stdout


def slurmctld_reads(conf: str, tmp: Path, programs: Mapping[str, str] | None = None, until: str = READ_ALL,
                    seconds: float = 60) -> str:
    """Start the images' slurmctld on ``conf`` until a line of its log has ``until`` (by default:
    it has read all of it, its scheduler plugin loading after the nodes and partitions), then stop
    it; its log. It runs in network, UTS and mount namespaces of its own: it listens nowhere else,
    its host name is the controller's, so it reads the file as the controller does, and
    ``programs`` (path in /usr/local/sbin -> script text) are there for it alone, bind-mounted over
    that folder. ``AssertionError`` with slurmctld's words when it refuses the file or ``until``
    does not come within ``seconds``."""
    root = debian_packages("slurmctld", "slurm-wlm-basic-plugins", "libmunge2")
    plugins = root / "usr/lib/x86_64-linux-gnu/slurm-wlm"
    state = tmp / "slurmctld"
    state.mkdir(exist_ok=True)
    controller = re.search(r"^SlurmctldHost=([^(\s]+)", conf, re.M)
    assert controller, f"slurm.conf names no SlurmctldHost:\n{conf}"
    local = "\n".join(line for line in conf.splitlines()
                      if not line.startswith(("SlurmUser=", "StateSaveLocation=", "SlurmctldPidFile=")))
    path = tmp / "slurm.conf"
    path.write_text(f"{local}\nPluginDir={plugins}\nSlurmUser=root\nStateSaveLocation={state}\n"
                    f"SlurmctldPidFile={tmp}/slurmctld.pid\nMailProg=/bin/true\n")
    (tmp / "gres.conf").write_text("")
    sbin = tmp / "sbin"
    sbin.mkdir(exist_ok=True)
    for name, text in (programs or {}).items():
        (sbin / Path(name).name).write_text(text)
        (sbin / Path(name).name).chmod(0o755)
    env = {"PATH": os.environ.get("PATH", ""), "SLURM_CONF": str(path),
           "LD_LIBRARY_PATH": f"{plugins}:{root / 'usr/lib/x86_64-linux-gnu'}"}
    command = (f"mount --bind {sbin} /usr/local/sbin && hostname {controller.group(1)} && "
               f"exec {root / 'usr/sbin/slurmctld-wlm'} -D -c -v -f {path}")
    log: list[str] = []
    with subprocess.Popen(["unshare", "--net", "--uts", "--mount", "sh", "-c", command], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env) as daemon:
        timer = threading.Timer(seconds, daemon.kill)
        timer.start()
        try:
            assert daemon.stdout is not None
            for line in daemon.stdout:
                log.append(line.rstrip())
                if until in line:
                    break
        finally:
            timer.cancel()
            daemon.kill()
    text = "\n".join(log)
    refused = [line for line in log if "fatal" in line or "Parse error" in line]
    assert not refused and any(until in line for line in log), \
        f"slurmctld refuses this slurm.conf:\n{conf}\n" + "\n".join(refused or log[-5:])
    return text


def _hosts_of(pattern: str, groups: Mapping[str, list[str]]) -> list[str]:
    return list(groups.get(pattern, []))


def _groups(inventory: Mapping[str, Any]) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    groups: dict[str, list[str]] = {}
    hostvars: dict[str, dict[str, Any]] = {}

    def walk(name: str, group: Mapping[str, Any]) -> list[str]:
        members = list((group.get("hosts") or {}).keys())
        for host, values in (group.get("hosts") or {}).items():
            hostvars.setdefault(host, {}).update(values or {})
        for child, sub in (group.get("children") or {}).items():
            members += walk(child, sub)
        groups[name] = sorted(set(members))
        return groups[name]

    walk("all", inventory["all"])
    return groups, hostvars


@functools.cache
def _plugin_loader() -> None:
    init_plugin_loader()  # as ansible-playbook does first: lookups are found through it


def rendered_templates(playbook: Path, inventory: Mapping[str, Any], registered: Mapping[str, Any]
                       ) -> Iterator[tuple[str, str, str]]:
    """(host, destination, text) of every file an ``aihow_converge`` task of a playbook writes,
    rendered by Ansible's own templating (its ``template`` and ``file`` lookups included, found
    in the role's folder first) with the play's variables, its ``vars_files``, its roles' vars and
    the inventory, as a deploy renders them. The plays' tasks and their roles' tasks run in order
    as far as files go: a role whose ``when`` is false is skipped, ``set_fact`` sets its facts
    (``converge_parts``), ``aihow_converge`` yields its files; ``registered`` stands for what the
    other tasks registered, by variable name (the munge key, ``pki``), given to every host."""
    groups, hostvars = _groups(inventory)
    common = inventory["all"].get("vars") or {}
    for name in hostvars:
        hostvars[name] = {**common, "inventory_hostname": name, **hostvars[name], **registered}
    _plugin_loader()
    loader = DataLoader()
    loader.set_basedir(str(playbook.parent))

    def trusted(values: Any) -> Any:
        if isinstance(values, str):
            return trust_as_template(values)
        if isinstance(values, Mapping):
            return {k: trusted(v) for k, v in values.items()}
        if isinstance(values, list):
            return [trusted(v) for v in values]
        return values

    def steps(play: Mapping[str, Any]) -> Iterator[tuple[Path, Any, dict[str, Any], Mapping[str, Any]]]:
        """(search folder, when, role vars, task) of the play's roles' tasks, then its own tasks."""
        for entry in play.get("roles") or []:
            role = entry if isinstance(entry, str) else entry["role"]
            folder = playbook.parent / "roles" / role
            role_vars = folder / "vars" / "main.yml"
            values = trusted(yaml.safe_load(role_vars.read_text())) if role_vars.exists() else {}
            for task in yaml.safe_load((folder / "tasks" / "main.yml").read_text()) or []:
                yield folder, None if isinstance(entry, str) else entry.get("when"), values, task
        for task in play.get("tasks") or []:
            yield playbook.parent, None, {}, task

    for play in yaml.safe_load(playbook.read_text()):
        play_vars: dict[str, Any] = {}
        for vars_file in play.get("vars_files") or []:
            play_vars.update(trusted(yaml.safe_load((playbook.parent / vars_file).read_text())))
        play_vars.update(trusted(play.get("vars") or {}))
        for host in _hosts_of(play["hosts"], groups):
            facts: dict[str, Any] = {}
            for folder, when, role_vars, task in steps(play):
                variables = {**hostvars[host], "hostvars": hostvars, "groups": groups, **play_vars, **role_vars,
                             **trusted(task.get("vars") or {}), **facts,
                             "ansible_search_path": [str(folder), str(playbook.parent)]}
                templar = Templar(loader=loader, variables=variables)
                if when is not None and not templar.template(trust_as_template(f"{{{{ {when} }}}}")):
                    continue
                if "ansible.builtin.set_fact" in task:
                    for key, value in task["ansible.builtin.set_fact"].items():
                        facts[key] = templar.template(trusted(value))
                    continue
                args = task.get("aihow_converge")
                if not args or "files" not in args:
                    continue
                files = args["files"]
                specs = templar.template(trust_as_template(files) if isinstance(files, str) else files)
                for spec in specs:
                    if "content" not in spec:  # bytes (content_base64): a key, nothing a consumer reads
                        continue
                    dest = str(templar.template(trust_as_template(spec["dest"])))
                    yield host, dest, str(templar.template(trust_as_template(spec["content"])))

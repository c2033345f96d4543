"""Every key the cluster-file model accepts is used: read by a renderer, the plan or a check (an
attribute or key of that name in the project's code, templates or playbooks), or listed below as
accepted for compatibility with ai-how and documented in the README as ignored. A new key that
nothing reads fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from aihow_infra.config import accepted_fields

ROOT = Path(__file__).resolve().parents[1]
# Keys ai-how files carry that the project takes but does not act on, each with the reason. The
# README's "Cluster files" section names them as ignored.
IGNORED = {
    "ClusterFile.global_": "ai-how's global settings block; nothing in it applies to libvirt objects",
    "Metadata.description": "descriptive only",
    "Acceleration.enable_kvm": "aihow:virtType decides (KVM only where a guest kernel can run under it)",
    "Acceleration.numa_topology": "ai-how does not render it either",
    "NumaTopology.memory_per_node": "ai-how does not render it either",
    "NumaTopology.nodes": "ai-how does not render it either",
    "Storage.beegfs": "shared storage is the operator's playbook's (BeeGFS needs packages no image has)",
    "Storage.virtio_fs": "shares are per node (virtio_fs_mounts)",
    "VirtioFsMount.owner": "a virtiofs share keeps the host folder's owner; chown in the guest would change it",
    "VirtioFsMount.group": "a virtiofs share keeps the host folder's group",
    "VirtioFsMount.mode": "a virtiofs share keeps the host folder's mode",
}


def accepted_keys() -> dict[str, str]:
    """``Model.field`` -> field name, for every key a cluster file may hold."""
    return {f"{model}.{name}": name for model, name, _key in accepted_fields()}


def names_read() -> tuple[set[str], str]:
    """Attribute names and string keys in the project's code (its declarations aside), and the text
    of its templates and playbooks."""
    read: set[str] = set()
    code = [*ROOT.glob("aihow_infra/**/*.py"), *ROOT.glob("providers/*.py"), ROOT / "tasks.py", ROOT / "__main__.py"]
    for path in code:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                read.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                read.add(node.value)
    texts = [*ROOT.glob("templates/*.j2"), *ROOT.glob("ansible/**/*.j2"), *ROOT.glob("ansible/*.yml")]
    return read, "\n".join(p.read_text() for p in texts)


def test_every_accepted_key_is_used_or_ignored_with_a_reason() -> None:
    read, text = names_read()
    unused = sorted(key for key, name in accepted_keys().items()
                    if name not in read and not re.search(rf"\b{name}\b", text) and key not in IGNORED)
    assert not unused, f"accepted but read nowhere: {unused}; use them, refuse them, or list them in IGNORED"


def test_the_ignored_keys_exist_and_the_readme_names_them() -> None:
    keys = accepted_keys()
    assert set(IGNORED) <= set(keys), sorted(set(IGNORED) - set(keys))
    readme = (ROOT / "README.md").read_text()
    for key in IGNORED:
        name = keys[key].rstrip("_")
        assert re.search(rf"`[^`]*\b{name}\b[^`]*`", readme), f"README does not name the ignored key {name}"

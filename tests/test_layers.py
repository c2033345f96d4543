"""The architecture, checked: each module imports only the layers below it, and the path the
operator's tasks take never loads Pulumi (it would cost every task a second of imports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom up. A module may import a module of a lower layer, or one of its own package
# (aihow_infra.libvirt.*, .kinds.*, .state.*, providers.*); never one of its own layer or above.
LAYERS: list[list[str]] = [
    ["aihow_infra.errors", "aihow_infra.libvirt_names"],
    ["aihow_infra.state", "aihow_infra.files", "aihow_infra.interrupts", "aihow_infra.database",
     "aihow_infra.eventlog"],
    ["aihow_infra.steps", "aihow_infra.kubepki", "aihow_infra.backend"],
    ["aihow_infra.config"],
    ["aihow_infra.settings", "aihow_infra.plan", "aihow_infra.changes", "aihow_infra.kubebins", "aihow_infra.oci",
     "aihow_infra.host"],
    ["aihow_infra.crosscheck", "aihow_infra.placement"],
    ["aihow_infra.loading", "aihow_infra.progress"],
    ["aihow_infra.gpu", "aihow_infra.gpu.ledger", "aihow_infra.desired", "aihow_infra.images",
     "aihow_infra.cloudinit",
     "aihow_infra.sshkeys"],
    ["aihow_infra.libvirt", "aihow_infra.stacks", "aihow_infra.gpu.custody", "aihow_infra.hostrecord"],
    ["aihow_infra.gpu.homes", "aihow_infra.gpu.hosts", "aihow_infra.status"],
    ["providers", "aihow_infra.deploy", "aihow_infra.lastrun"],
    ["aihow_infra.kinds"],
    ["aihow_infra.inventory"],
    ["aihow_infra.components", "aihow_infra.ops"],
    ["aihow_infra.topology", "aihow_infra.gpu.leases", "aihow_infra.hostcheck"],
    ["aihow_infra.cli"],
    ["__main__", "tasks"],
]
# What the tasks run: none of it may reach Pulumi, the providers or the components.
TASK_PATH = ["aihow_infra.cli", "aihow_infra.interrupts", "aihow_infra.stacks", "aihow_infra.ops", "aihow_infra.status",
             "aihow_infra.placement",
             "aihow_infra.topology", "aihow_infra.inventory", "aihow_infra.gpu.leases", "aihow_infra.hostcheck",
             "aihow_infra.gpu.homes", "aihow_infra.gpu.hosts", "aihow_infra.gpu.custody", "aihow_infra.hostrecord",
             "aihow_infra.images",
             "aihow_infra.deploy", "aihow_infra.kinds",
             "aihow_infra.kubebins", "aihow_infra.oci", "aihow_infra.progress", "aihow_infra.lastrun"]
# Packages whose modules may import each other (each keeps its own order: ops/ is a chain).
OWN_PACKAGES = ("aihow_infra.cli", "aihow_infra.config", "aihow_infra.libvirt", "aihow_infra.kinds",
                "aihow_infra.state", "aihow_infra.ops", "providers")
PULUMI_SIDE = ("pulumi", "providers", "aihow_infra.components")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*ROOT.glob("aihow_infra/**/*.py"), *ROOT.glob("providers/**/*.py"), ROOT / "tasks.py",
             ROOT / "__main__.py"]
    modules = {_module_name(f): f for f in files}
    assert modules.pop("aihow_infra").read_text().count("import") == 0  # the package itself is only a docstring
    return modules


def _layer(module: str) -> tuple[int, str]:
    """(layer index, the group the module belongs to: a package or the module itself). The
    longest name wins, so a package's modules may sit on different layers (aihow_infra.gpu)."""
    found = [(index, name) for index, group in enumerate(LAYERS) for name in group
             if module == name or module.startswith(name + ".")]
    if not found:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return max(found, key=lambda item: len(item[1]))


def _imports(path: Path) -> set[str]:
    """Every project module imported anywhere in the file (also inside functions and
    ``if TYPE_CHECKING``: a layer edge is an edge whenever it is taken)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _project_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    return {name for name in _imports(path) if name in modules}


def test_every_module_imports_only_layers_below_it() -> None:
    modules = _modules()
    wrong = []
    for module, path in sorted(modules.items()):
        layer, group = _layer(module)
        for target in sorted(_project_imports(path, modules)):
            target_layer, target_group = _layer(target)
            if target_group == group and group in OWN_PACKAGES:
                continue
            if target_layer >= layer:
                wrong.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
    assert wrong == []


def test_the_task_path_names_no_pulumi_module() -> None:
    modules = _modules()
    wrong = [f"{module} imports {name}" for module in TASK_PATH
             for name in sorted(_imports(modules[module]))
             if name.startswith(PULUMI_SIDE)]
    assert wrong == []


@pytest.mark.parametrize("module", [*TASK_PATH, "tasks"])
def test_importing_the_task_path_loads_no_pulumi(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({PULUMI_SIDE!r})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_the_layer_checker_sees_a_wrong_edge(tmp_path: Path) -> None:
    # The walk must find imports hidden in functions and TYPE_CHECKING blocks.
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aihow_infra.operations import X\n"
                    "def f():\n    import aihow_infra.plan\n")
    assert {"aihow_infra.operations", "aihow_infra.plan"} <= _imports(path)


def test_libvirt_knows_nothing_of_leases_and_kinds_nothing_of_the_operator() -> None:
    """The libvirt package works without Pulumi and without the GPU ledger (the providers take
    and release leases); a kind of cluster never reaches back into the Operator."""
    modules = _modules()
    forbidden = {"aihow_infra.libvirt": ("aihow_infra.gpu", "aihow_infra.ops"),
                 "aihow_infra.kinds": ("aihow_infra.ops",)}
    wrong = [f"{module} imports {target}" for module, path in sorted(modules.items())
             for package, targets in forbidden.items() if module.startswith(package)
             for target in _project_imports(path, modules) if target.startswith(targets)]
    assert wrong == []


def test_every_package_is_packaged() -> None:
    """pyproject.toml names its packages one by one: a new room must be among them, or an
    installed (not editable) copy would miss it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in [*ROOT.glob("aihow_infra/**/__init__.py"),
                                                                   *ROOT.glob("providers/__init__.py")]}
    assert found == listed


def test_the_providers_process_loads_no_cluster_file_models() -> None:
    # The dynamic providers start in a process of their own at every engine run; the cluster
    # file's models (pydantic) were a third of its imports (0.46 -> 0.33 s here, 2026-12-03; about
    # 15x that inside the GPU-host simulator, on every engine run there).
    providers = sorted(_module_name(p) for p in (ROOT / "providers").glob("*.py") if p.stem != "__init__")
    models = ("aihow_infra.config", "aihow_infra.plan", "pydantic")
    code = f"import sys, {', '.join(providers)}; print(sorted(m for m in sys.modules if m.startswith({models!r})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"

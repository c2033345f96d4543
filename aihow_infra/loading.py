"""Loading a cluster file: YAML, ``${VAR}`` expansion, validation, and the wording of errors.

Every mistake becomes one line naming the key path, the bad value and what is
allowed (see ``ConfigError``); checks that span several keys come from ``plan``.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from aihow_infra.config import ClusterFile, NodeSpec, accepted_fields, types_in
from aihow_infra.crosscheck import cross_check
from aihow_infra.errors import ConfigError

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _known_keys() -> set[str]:
    return {key for _model, _field, key in accepted_fields()} | {"ip_address", "count"}


def _keys_at(loc: tuple[int | str, ...]) -> set[str]:
    """The keys the model at ``loc`` (pydantic's error location, union tags included) accepts;
    every known key when the walk loses its way."""
    models: list[type[BaseModel]] = [ClusterFile]
    for part in loc:
        if isinstance(part, int):
            continue
        if _is_union_tag(part):
            models = [m for m in models if m.__name__ == part] or models
            continue
        found = [t for m in models for f, info in m.model_fields.items() if part in (f, info.alias)
                 for t in types_in(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found and not any(part in (f, i.alias) for m in models for f, i in m.model_fields.items()):
            return _known_keys()
        models = found
    keys = {info.alias or name for m in models for name, info in m.model_fields.items()}
    if any(issubclass(m, NodeSpec) for m in models):
        keys |= {"ip_address", "count"}  # a head's spelling of 'ip'; N identical nodes
    return keys or _known_keys()


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_union_tag(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _lookup(data: Any, loc: tuple[int | str, ...]) -> Any:
    for part in loc:
        in_mapping = isinstance(data, Mapping) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and part < len(data)
        if in_mapping or in_list:
            data = data[part]
        elif part == "ip" and isinstance(data, Mapping) and "ip_address" in data:
            data = data["ip_address"]
        else:
            return None
    return data


def _is_union_tag(part: int | str) -> bool:
    """pydantic names the branch of a union in the error location ('list[NodeSpec]',
    'WorkerGroups', 'function-after[...]'); no key of the file looks like that."""
    return isinstance(part, str) and (part == "WorkerGroups" or part.startswith(("list[", "function-")))
_SHAPE_ERRORS = {"list_type", "dict_type", "model_type", "model_attributes_type"}


def _relevant(errors: list[Any]) -> list[Any]:
    """Drop the complaint of the union branch that does not apply ('a valid list' for a
    ``{cpu, gpu}`` mapping) when the branch that applies has errors of its own below it."""
    def loc(e: Any) -> tuple[Any, ...]:
        return tuple(p for p in e["loc"] if not _is_union_tag(p))

    return [e for e in errors
            if not (e["type"] in _SHAPE_ERRORS and any(
                loc(o)[:len(loc(e))] == loc(e) and len(loc(o)) > len(loc(e)) for o in errors))]


def _hint(loc: tuple[int | str, ...]) -> str | None:
    """The key at ``loc``'s level closest to its last part, if any is close."""
    found = difflib.get_close_matches(str(loc[-1]), sorted(_keys_at(loc[:-1])), n=1)
    return found[0] if found else None


def _misspelt_not_missing(errors: list[Any]) -> list[Any]:
    """A required key written wrong is one mistake: the unknown key (with its 'did you mean'),
    not also the missing one."""
    typos = {(tuple(e["loc"][:-1]), _hint(tuple(e["loc"]))) for e in errors if e["type"] == "extra_forbidden"}
    return [e for e in errors if not (e["type"] == "missing" and (tuple(e["loc"][:-1]), e["loc"][-1]) in typos)]


def _describe(error: Mapping[str, Any], raw: Any) -> str:
    loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
    path = _format_loc(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        key, hint = str(loc[-1]), _hint(tuple(error["loc"]))
        here = ", ".join(sorted(k for k in _keys_at(tuple(error["loc"][:-1])) if k != key))
        if hint == key:  # a key of another form of this place (a {count: N} group is the whole list's form)
            return f"{path}: {key!r} is not a key of this form; allowed here: {here}"
        allowed = f"did you mean '{hint}'?" if hint else f"allowed here: {here}"
        return f"{path}: unknown key {key!r}; {allowed}"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind in {"value_error", "assertion_error"}:
        keyed = re.match(r"^([a-z_]+(?:\.[a-z_]+|\[\d+\])*): (.*)$", message)
        return f"{path}.{keyed.group(1)}: {keyed.group(2)}" if keyed else f"{path}: {message}"
    value = _lookup(raw, loc)
    return f"{path}: {value!r} is invalid; allowed: {_allowed(message)}"


def _allowed(message: str) -> str:
    """Turn pydantic's 'Input should be X' into the 'X' an operator may write."""
    for prefix in ("Input should be ", "Input is not ", "Value should be "):
        if message.startswith(prefix):
            message = message.removeprefix(prefix)
            break
    message = message.removeprefix("String should match pattern ")
    # pydantic explains how it failed ("unable to parse string as an integer"); the value is
    # already quoted, what is allowed is what the operator needs.
    message = re.split(r", (?:unable to|got|invalid character|input is)", message)[0]
    return message.replace("not a valid", "a valid")


def expand_variables(data: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$VAR`` in every string; ``$$`` is a literal ``$``."""
    problems: list[str] = []

    def expand(text: str, where: str) -> str:
        def sub(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group(1) or match.group(3)
            if name in env:
                return env[name]
            if match.group(2) is not None:
                return match.group(2)
            problems.append(f"{where}: {text!r} uses ${{{name}}}, which is not set; "
                            f"allowed: set {name} in the environment or write ${{{name}:-default}}")
            return match.group(0)

        return _VAR_RE.sub(sub, text)

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, str):
            return expand(node, where or "(top level)")
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        return node

    return walk(data, path), problems


def project_root(start: Path) -> Path:
    """The folder holding Pulumi.yaml or .git above ``start`` (ai-how's ``TOT``), else ``start``."""
    for folder in [start, *start.parents]:
        if (folder / "Pulumi.yaml").exists() or (folder / ".git").exists():
            return folder
    return start


def absolute_host_paths(data: Any, base: Path) -> Any:
    """Relative ``base_image_path`` and ``host_path`` values made absolute against ``base``
    (the cluster file's folder): qemu-img would take a relative backing file from the
    overlay's folder, and libvirt from its own."""
    if isinstance(data, list):
        return [absolute_host_paths(v, base) for v in data]
    if not isinstance(data, dict):
        return data
    return {k: os.path.normpath(base / v) if k in ("base_image_path", "host_path") and isinstance(v, str) and v
            else absolute_host_paths(v, base) for k, v in data.items()}


def parse_cluster_file(
    data: Any, *, env: Mapping[str, str] | None = None, base_dir: Path | None = None,
    check_images: bool = True, allow_system_paths: bool = False, source: str = "cluster file",
    pwd: Path | None = None,
) -> ClusterFile:
    """Validate already-parsed YAML; raise ``ConfigError`` listing every problem. Host paths
    are taken from ``base_dir`` and ``${PWD}`` is ``pwd`` (each by default the current folder)."""
    base = base_dir or Path.cwd()
    variables = {"TOT": str(project_root(base)), "PWD": str(pwd or Path.cwd()),
                 **(env if env is not None else os.environ)}
    if data is None:
        raise ConfigError(["(top level): the file is empty; allowed: a YAML mapping with 'clusters'"], source)
    if not isinstance(data, Mapping):
        given = {"list": "a list", "str": "a plain string", "int": "a number", "float": "a number",
                 "bool": "true/false"}.get(type(data).__name__, type(data).__name__)
        raise ConfigError([f"(top level): {given} given; allowed: a YAML mapping with 'clusters'"], source)
    expanded, problems = expand_variables(dict(data), variables)
    if problems:
        raise ConfigError(problems, source)
    expanded = absolute_host_paths(expanded, base)
    try:
        model = ClusterFile.model_validate(expanded)
    except ValidationError as exc:
        errors = _misspelt_not_missing(_relevant(exc.errors()))
        problems = [_describe(e, expanded) for e in errors]
        problems += _cross_check_around(expanded, errors, check_images, allow_system_paths)
        raise ConfigError(problems, source) from None
    problems = cross_check(model, check_images=check_images, allow_system_paths=allow_system_paths)
    if problems:
        raise ConfigError(problems, source)
    return model


# Placeholders for values of the wrong type, so that the checks across keys still run: a
# number of what is needed, a flag. Only the kind of error says what the value should be.
_PLACEHOLDERS: dict[str, Any] = {"int_parsing": 1, "int_type": 1, "int_from_float": 1, "greater_than": 1,
                                 "greater_than_equal": 1, "float_parsing": 1.0, "bool_parsing": False,
                                 "bool_type": False}


def _cross_check_around(data: dict[str, Any], errors: list[Any], check_images: bool,
                        allow_system_paths: bool) -> list[str]:
    """The checks across keys of a file that has errors of single keys too, so that one run
    shows them all: each bad value is replaced by a placeholder (or an unknown key dropped)
    and the file validated again. When a value cannot be stood in for, only the errors of
    single keys are reported. Problems at a replaced key are not reported twice."""
    repaired = copy.deepcopy(data)
    replaced: list[str] = []
    for error in errors:
        loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
        parent = _lookup(repaired, loc[:-1])
        if not loc or not isinstance(parent, (dict, list)):
            return []
        if error["type"] == "extra_forbidden" and isinstance(parent, dict):
            del parent[loc[-1]]
        elif error["type"] in _PLACEHOLDERS and isinstance(parent, dict) and loc[-1] in parent:
            parent[loc[-1]] = _PLACEHOLDERS[error["type"]]
        else:
            return []
        replaced.append(_format_loc(loc))
    try:
        model = ClusterFile.model_validate(repaired)
    except ValidationError:
        return []
    found = cross_check(model, check_images=check_images, allow_system_paths=allow_system_paths)
    return [p for p in found if not any(p.startswith(f"{path}:") for path in replaced)]


def key_lines(text: str) -> dict[tuple[int | str, ...], int]:
    """The line (1-based) of every key and list item of a YAML text, by its path."""
    lines: dict[tuple[int | str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[int | str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*path, str(key.value))
                lines[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, index)] = item.start_mark.line + 1
                walk(item, (*path, index))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def line_of(problem: str, lines: Mapping[tuple[int | str, ...], int]) -> int | None:
    """The line of the key path a problem starts with (the nearest enclosing key when the key
    itself is missing), or None."""
    found = re.match(r"^([A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+|\[\d+\])*):", problem)
    if not found:
        return None
    parts = tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", found.group(1)))
    for end in range(len(parts), 0, -1):
        if parts[:end] in lines:
            return lines[parts[:end]]
        if parts[end - 1] == "ip" and (*parts[:end - 1], "ip_address") in lines:
            return lines[(*parts[:end - 1], "ip_address")]
    return None


class _Loader(yaml.SafeLoader):
    """YAML as the cluster file means it: ``24:00:00`` is a time (a string), not YAML 1.1's
    base-60 integer 86400, as YAML 1.2 reads it too; a key given twice in one mapping is an error
    (PyYAML would keep the last value silently; YAML 1.2 forbids it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key]}); allowed: "
                    "each key once", key_node.start_mark)
            if isinstance(key, str | int):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if not (tag == "tag:yaml.org,2002:int" and regexp.match("24:00:00"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """Parse a cluster file's text (``yaml.YAMLError`` when it is not YAML)."""
    return yaml.load(text, Loader=_Loader)


def load_cluster_file(
    path: str | Path, *, env: Mapping[str, str] | None = None, check_images: bool = True,
    allow_system_paths: bool = False, pwd: Path | None = None,
) -> ClusterFile:
    """Read, expand and validate a cluster file.

    Relative host paths (images, shares) are taken from the file's own folder, so the file
    means the same from wherever it is used (ai-how took them from the current folder);
    ``${PWD}`` is ``pwd`` (the project folder, where the Pulumi program runs), by default the
    current folder.
    """
    file = Path(path)
    source = f"cluster file {file}"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot be read ({exc.strerror}); allowed: a readable YAML file"],
                          source) from None
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{file}: not valid YAML at {where}: {problem}"], source) from None
    try:
        return parse_cluster_file(data, env=env, base_dir=file.resolve().parent, check_images=check_images,
                                  allow_system_paths=allow_system_paths, source=source, pwd=pwd)
    except ConfigError as exc:
        lines = key_lines(text)
        located = sorted(((p, line_of(p, lines)) for p in exc.problems), key=lambda pl: pl[1] or 0)  # file order
        raise ConfigError([p for p, _ in located], source, [line for _, line in located], str(file)) from None

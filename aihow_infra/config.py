"""The cluster file: pydantic models of the ai-how format, and how a file is loaded.

Pure data, no pulumi import: the Pulumi program, the tasks and the tests all
validate a file the same way, once, at the edge. Every mistake becomes one line
naming the key path, the bad value and what is allowed (see ``ConfigError``).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from aihow_infra.errors import ConfigError

PCI_ADDRESS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
HEX_ID_RE = re.compile(r"^[0-9a-f]{4}$")
# Linux interface names: at most 15 bytes, no '/', ':' or whitespace.
BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
CLUSTER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?$")


class Model(BaseModel):
    """Base of every cluster-file model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class DeviceType(StrEnum):
    """What a passthrough device is; ``gpu`` gets a ROM bar and makes a GPU node."""

    GPU = "gpu"
    AUDIO = "audio"
    NETWORK = "network"
    STORAGE = "storage"
    OTHER = "other"


class PciDevice(Model):
    """One host PCI function handed to a VM by VFIO."""

    pci_address: str
    device_type: DeviceType
    vendor_id: str | None = None
    device_id: str | None = None
    iommu_group: Annotated[int, Field(ge=0)] | None = None

    @field_validator("pci_address", mode="before")
    @classmethod
    def _pci_address(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if not PCI_ADDRESS_RE.match(text):
            raise ValueError(
                f"{value!r} is not a PCI address; allowed: DDDD:BB:SS.F in hex with function 0-7, "
                "e.g. '0000:01:00.0'"
            )
        return text

    @field_validator("vendor_id", "device_id", mode="before")
    @classmethod
    def _hex_id(cls, value: Any) -> str | None:
        if value is None:
            return None
        text = str(value).strip().lower().removeprefix("0x")
        if not HEX_ID_RE.match(text):
            raise ValueError(f"{value!r} is not a PCI id; allowed: 4 hex digits, e.g. '10de'")
        return text

    @property
    def slot(self) -> str:
        """The physical device this function belongs to: ``DDDD:BB:SS``."""
        return self.pci_address.rsplit(".", 1)[0]


class PciePassthrough(Model):
    """The ``pcie_passthrough`` block of a node."""

    enabled: bool = False
    devices: list[PciDevice] = Field(default_factory=list)


class VirtioFsMount(Model):
    """A host folder shared into the guest with virtiofs."""

    tag: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]+$")]
    host_path: str
    mount_point: Annotated[str, Field(pattern=r"^/")]
    owner: str = "admin"
    group: str = "admin"
    mode: Annotated[str, Field(pattern=r"^0[0-7]{3}$")] = "0755"
    options: str = "rw,relatime"


class Node(Model):
    """A VM of either cluster: controller, compute node, control plane or worker.

    Controllers in ai-how files say ``ip_address`` and other nodes ``ip``; both
    are accepted everywhere. ``ip: DHCP`` (or no IP) means no static reservation.
    """

    name: str | None = None
    worker_type: Literal["cpu", "gpu"] | None = None
    cpu_cores: Annotated[int, Field(gt=0)]
    memory_gb: Annotated[int, Field(gt=0)]
    disk_gb: Annotated[int, Field(gt=0)]
    ip: ipaddress.IPv4Address | None = None
    auto_start: bool = True
    base_image_path: str | None = None
    pcie_passthrough: PciePassthrough = Field(default_factory=PciePassthrough)
    virtio_fs_mounts: list[VirtioFsMount] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _ip_alias(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "ip_address" in data:
            data = dict(data)
            if "ip" in data:
                raise ValueError("give either 'ip' or 'ip_address', not both")
            data["ip"] = data.pop("ip_address")
        if isinstance(data, Mapping) and str(data.get("ip", "")).upper() == "DHCP":
            data = {**data, "ip": None}
        return data

    @property
    def devices(self) -> list[PciDevice]:
        """The passthrough devices this VM takes (none when passthrough is disabled)."""
        return list(self.pcie_passthrough.devices) if self.pcie_passthrough.enabled else []

    @property
    def has_gpu(self) -> bool:
        """True when a passed-through device is a GPU (the ai-how rule for a GPU worker)."""
        return any(d.device_type is DeviceType.GPU for d in self.devices)


class Network(Model):
    """A cluster's libvirt network; gateway and DHCP range default from the subnet."""

    subnet: ipaddress.IPv4Network
    bridge: str
    gateway_ip: ipaddress.IPv4Address | None = None
    dhcp_start: ipaddress.IPv4Address | None = None
    dhcp_end: ipaddress.IPv4Address | None = None
    dns_servers: list[ipaddress.IPv4Address] = Field(default_factory=list)
    forward_mode: Literal["nat", "isolated"] = "nat"

    @field_validator("subnet", mode="before")
    @classmethod
    def _subnet(cls, value: Any) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.IPv4Network(str(value), strict=True)
        except ValueError as exc:
            raise ValueError(
                f"{value!r} is not an IPv4 subnet; allowed: network address/prefix, e.g. '192.168.100.0/24' "
                f"({exc})"
            ) from None
        if net.prefixlen > 29:
            raise ValueError(f"{value!r} is too small; allowed: a prefix of /29 or shorter")
        return net

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, value: str) -> str:
        if len(value) > 15:
            raise ValueError(f"{value!r} has {len(value)} characters; allowed: at most 15 (Linux limit)")
        if not BRIDGE_RE.match(value):
            raise ValueError(f"{value!r} is not an interface name; allowed: letters, digits, '-', '_', '.'")
        return value

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The host's address on the network (default: the first host address)."""
        return self.gateway_ip or self.subnet.network_address + 1

    @property
    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """The dynamic range (default: from .10, or the third address on tiny nets, to broadcast-1)."""
        size = self.subnet.num_addresses
        start = self.dhcp_start or self.subnet.network_address + (10 if size > 16 else 2)
        end = self.dhcp_end or self.subnet.broadcast_address - 1
        return start, end

    @model_validator(mode="after")
    def _addresses_in_subnet(self) -> Network:
        net = self.subnet
        reserved = {net.network_address: "network address", net.broadcast_address: "broadcast address"}
        for key, addr in (("gateway_ip", self.gateway_ip), ("dhcp_start", self.dhcp_start),
                          ("dhcp_end", self.dhcp_end)):
            if addr is None:
                continue
            if addr not in net:
                raise ValueError(f"{key}: '{addr}' is outside subnet {net}; allowed: a host address of {net}")
            if addr in reserved:
                raise ValueError(f"{key}: '{addr}' is the {reserved[addr]} of {net}; allowed: a host address")
        start, end = self.dhcp_range
        if start > end:
            raise ValueError(f"dhcp_start: '{start}' is after dhcp_end '{end}'; allowed: start <= end")
        if self.gateway in (start, end) or start < self.gateway < end:
            raise ValueError(f"gateway_ip: '{self.gateway}' lies in the DHCP range {start}-{end}; "
                             "allowed: an address outside it")
        return self


class CpuTopology(Model):
    """Requested CPU topology; cores always follow the node's ``cpu_cores``."""

    sockets: Annotated[int, Field(ge=1, le=4)] = 1
    cores: Annotated[int, Field(ge=1, le=64)] = 1
    threads: Annotated[int, Field(ge=1, le=2)] = 1


class NumaTopology(Model):
    """Accepted for compatibility; not rendered (as in ai-how)."""

    nodes: Annotated[int, Field(ge=1, le=8)]
    memory_per_node: Annotated[int, Field(ge=1024)]


class Performance(Model):
    """Memory and CPU tuning knobs of ``hardware.acceleration.performance``."""

    enable_hugepages: bool = False
    hugepage_size: Literal["2M", "1G"] = "2M"
    cpu_pinning: bool = False
    memory_backing: Literal["default", "hugepages", "memfd"] = "default"


class Acceleration(Model):
    """``hardware.acceleration``: how guests use the host CPU."""

    enable_kvm: bool = True
    enable_nested: bool = False
    cpu_model: Literal["host", "host-passthrough", "host-model", "qemu64"] = "host-passthrough"
    cpu_features: list[Annotated[str, Field(pattern=r"^[+-]?[A-Za-z0-9_.]+$")]] = Field(default_factory=list)
    numa_topology: NumaTopology | None = None
    cpu_topology: CpuTopology = Field(default_factory=CpuTopology)
    performance: Performance = Field(default_factory=Performance)


class Hardware(Model):
    """The ``hardware`` block of a cluster."""

    acceleration: Acceleration = Field(default_factory=Acceleration)


class SlurmConfig(Model):
    """SLURM settings handed to the inventory."""

    partitions: list[str] = Field(default_factory=lambda: ["compute"])
    default_partition: str | None = None
    max_job_time: str | None = None


class Storage(Model):
    """HPC shared storage switches (BeeGFS, virtio-fs); only the inventory reads them."""

    model_config = ConfigDict(extra="allow", frozen=True)
    beegfs: dict[str, Any] | None = None
    virtio_fs: dict[str, Any] | None = None


def _expand_node_group(value: Any) -> Any:
    """Accept ai-how's template form ``{count: N, ip: DHCP, ...}`` as N identical nodes."""
    if isinstance(value, Mapping) and "count" in value:
        spec = {k: v for k, v in value.items() if k != "count"}
        count = value["count"]
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count: {count!r} is not a positive integer; allowed: 1 or more")
        return [dict(spec) for _ in range(count)]
    return value


class ClusterBase(Model):
    """What both clusters share: name, image, network, hardware."""

    name: str
    base_image_path: str | None = None
    network: Network
    hardware: Hardware = Field(default_factory=Hardware)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not CLUSTER_NAME_RE.match(value) or len(value) > 40:
            raise ValueError(
                f"{value!r} is not a cluster name; allowed: lowercase letters, digits and '-', "
                "at most 40 characters, starting and ending with a letter or digit"
            )
        return value


class HpcCluster(ClusterBase):
    """``clusters.hpc``: a SLURM controller and compute nodes."""

    controller: Node
    compute_nodes: list[Node] = Field(default_factory=list)
    slurm_config: SlurmConfig = Field(default_factory=SlurmConfig)
    storage: Storage | None = None

    @field_validator("compute_nodes", mode="before")
    @classmethod
    def _template_form(cls, value: Any) -> Any:
        return _expand_node_group(value)


class WorkerGroups(Model):
    """The older ``worker_nodes: {cpu: [...], gpu: [...]}`` form."""

    cpu: list[Node] = Field(default_factory=list)
    gpu: list[Node] = Field(default_factory=list)


class CloudCluster(ClusterBase):
    """``clusters.cloud``: a Kubernetes control plane and CPU/GPU workers."""

    control_plane: Node
    worker_nodes: list[Node] | WorkerGroups = Field(default_factory=list)
    kubernetes_config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("worker_nodes", mode="before")
    @classmethod
    def _template_form(cls, value: Any) -> Any:
        return _expand_node_group(value)

    @property
    def workers(self) -> list[Node]:
        """Workers in file order (CPU list first for the grouped form)."""
        if isinstance(self.worker_nodes, WorkerGroups):
            return [*self.worker_nodes.cpu, *self.worker_nodes.gpu]
        return list(self.worker_nodes)


class Clusters(Model):
    """``clusters``: either cluster may be absent, not both."""

    hpc: HpcCluster | None = None
    cloud: CloudCluster | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Clusters:
        if self.hpc is None and self.cloud is None:
            raise ValueError("no cluster defined; allowed: 'hpc', 'cloud' or both")
        return self


class Metadata(Model):
    """Descriptive only."""

    name: str = "ai-how"
    description: str = ""


class ClusterFile(Model):
    """A whole cluster file as the ai-how tool writes it."""

    version: str = "1.0"
    metadata: Metadata = Field(default_factory=Metadata)
    global_: dict[str, Any] = Field(default_factory=dict, alias="global")
    clusters: Clusters

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> str:
        text = str(value)
        if text != "1.0":
            raise ValueError(f"{value!r} is not supported; allowed: '1.0'")
        return text


# --- loading -----------------------------------------------------------------

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _known_keys() -> set[str]:
    keys: set[str] = set()
    pending: list[type[BaseModel]] = [ClusterFile]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            keys.add(field.alias or name)
            for arg in _types_in(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    pending.append(arg)
    return keys | {"ip_address", "count"}


def _types_in(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _types_in(arg)
    yield from getattr(annotation, "__metadata__", ()) or ()


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS:
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


_UNION_TAGS = {"list[Node]", "WorkerGroups"}
_SHAPE_ERRORS = {"list_type", "dict_type", "model_type", "model_attributes_type"}


def _relevant(errors: list[Any]) -> list[Any]:
    """Drop the complaint of the union branch that does not apply ('a valid list' for a
    ``{cpu, gpu}`` mapping) when the branch that applies has errors of its own below it."""
    def loc(e: Any) -> tuple[Any, ...]:
        return tuple(p for p in e["loc"] if p not in _UNION_TAGS)

    return [e for e in errors
            if not (e["type"] in _SHAPE_ERRORS and any(
                loc(o)[:len(loc(e))] == loc(e) and len(loc(o)) > len(loc(e)) for o in errors))]


def _describe(error: Mapping[str, Any], raw: Any) -> str:
    loc = tuple(p for p in error["loc"] if p not in _UNION_TAGS)
    path = _format_loc(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, sorted(_known_keys()), n=1)
        allowed = f"did you mean '{hint[0]}'?" if hint else "remove it"
        return f"{path}: unknown key {key!r}; {allowed}"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind in {"value_error", "assertion_error"}:
        keyed = re.match(r"^([a-z_]+): (.*)$", message)
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


def parse_cluster_file(
    data: Any, *, env: Mapping[str, str] | None = None, base_dir: Path | None = None,
    check_images: bool = True, source: str = "cluster file",
) -> ClusterFile:
    """Validate already-parsed YAML; raise ``ConfigError`` listing every problem."""
    from aihow_infra.plan import cross_check  # derived facts live in plan.py

    base = base_dir or Path.cwd()
    variables = {"TOT": str(project_root(base)), "PWD": str(Path.cwd()), **(env if env is not None else os.environ)}
    if not isinstance(data, Mapping):
        raise ConfigError([f"(top level): {type(data).__name__} given; allowed: a YAML mapping with 'clusters'"],
                          source)
    expanded, problems = expand_variables(dict(data), variables)
    if problems:
        raise ConfigError(problems, source)
    try:
        model = ClusterFile.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError([_describe(e, expanded) for e in _relevant(exc.errors())], source) from None
    problems = cross_check(model, check_images=check_images)
    if problems:
        raise ConfigError(problems, source)
    return model


def load_cluster_file(
    path: str | Path, *, env: Mapping[str, str] | None = None, check_images: bool = True,
) -> ClusterFile:
    """Read, expand and validate a cluster file.

    Relative image paths are taken from the current directory, as ai-how did.
    """
    file = Path(path)
    source = f"cluster file {file}"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot be read ({exc.strerror}); allowed: a readable YAML file"],
                          source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{file}: not valid YAML at {where}: {problem}"], source) from None
    return parse_cluster_file(data, env=env, base_dir=file.resolve().parent, check_images=check_images,
                              source=source)

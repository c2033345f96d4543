"""A cluster file's clusters: the network, SLURM's and Kubernetes' settings, the HPC and Cloud
cluster, and the whole file (``ClusterFile``) with every key it accepts."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aihow_infra.config.base import (
    BOOT_SECONDS,
    BRIDGE_RE,
    CLUSTER_NAME_RE,
    LIBVIRT_URI_FORM,
    Model,
    libvirt_uri_problem,
)
from aihow_infra.config.nodes import CloudInit, Hardware, ImageChoice, NodeSpec
from aihow_infra.libvirt_names import ForwardMode, canonical_uri


class NetworkSpec(Model):
    """A cluster's libvirt network; gateway and DHCP range default from the subnet.

    ``forward_mode``: ``nat`` (libvirt makes ``bridge``, with DHCP, DNS and NAT to the host's
    uplink), ``isolated`` (the same, no route out), or ``bridge``: the guests join an existing
    host bridge named ``bridge`` (a LAN, or the layer-2 path between hosts), which libvirt does
    not make or change; ``subnet`` and ``gateway_ip`` are then the LAN's, there is no DHCP (every
    node has a static ``ip``; ``dhcp_start``/``dhcp_end`` are refused) and name servers are
    only ``dns_servers``.
    """

    subnet: ipaddress.IPv4Network
    bridge: str
    gateway_ip: ipaddress.IPv4Address | None = None
    dhcp_start: ipaddress.IPv4Address | None = None
    dhcp_end: ipaddress.IPv4Address | None = None
    dns_servers: list[ipaddress.IPv4Address] = Field(default_factory=list)
    forward_mode: ForwardMode = "nat"

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
    def _addresses_in_subnet(self) -> NetworkSpec:
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
        if self.forward_mode == "bridge":
            for key, addr in (("dhcp_start", self.dhcp_start), ("dhcp_end", self.dhcp_end)):
                if addr is not None:
                    raise ValueError(f"{key}: '{addr}' is set, but forward_mode 'bridge' has no DHCP (the guests "
                                     "join an existing host bridge, where libvirt serves none); allowed: leave it "
                                     "out and give every node a static ip")
            return self  # no DHCP range: the LAN's router may be any host address
        start, end = self.dhcp_range
        if start > end:
            raise ValueError(f"dhcp_start: '{start}' is after dhcp_end '{end}'; allowed: start <= end")
        if self.gateway in (start, end) or start < self.gateway < end:
            raise ValueError(f"gateway_ip: '{self.gateway}' lies in the DHCP range {start}-{end}; "
                             "allowed: an address outside it")
        return self


# A SLURM partition name as slurm.conf can take it: one word (a space ends the value), and not
# "DEFAULT", which slurm.conf reads as the defaults for every partition, in any case.
PARTITION_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# SLURM's time formats (slurm.conf(5) MaxTime): minutes, minutes:seconds, hours:minutes:seconds,
# days-hours, days-hours:minutes, days-hours:minutes:seconds, or a word for no limit.
SLURM_TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}(:\d{1,2})?)?)$")
SLURM_NO_LIMIT = ("INFINITE", "UNLIMITED")
# SLURM power saving's defaults, in seconds: idle before an on-demand node is powered down, and to come up.
SUSPEND_TIME, RESUME_TIMEOUT = 600, 900
# Seconds an on-demand Kubernetes worker runs with no work before the broker stops it: the
# cluster autoscaler's --scale-down-unneeded-time default (10 minutes).
SCALE_DOWN_UNNEEDED_TIME = 600


def _check_partition(name: str) -> str:
    if name.upper() == "DEFAULT":
        raise ValueError(f"{name!r} is reserved: slurm.conf reads PartitionName=DEFAULT as the defaults of "
                         "every partition; allowed: another name, e.g. 'compute'")
    if not PARTITION_RE.match(name):
        raise ValueError(f"{name!r} is not a SLURM partition name; allowed: 1-64 letters, digits, '_', '-', '.' "
                         "(no spaces)")
    return name


# Each name is checked on its own, so every bad one is reported, at its index.
PartitionName = Annotated[str, AfterValidator(_check_partition)]


class SlurmConfig(Model):
    """SLURM settings handed to the inventory: partitions (the default one first in slurm.conf),
    the longest a job may run in them (every partition's ``MaxTime``), and power saving for the
    compute nodes marked ``on_demand``: seconds idle before SLURM powers one down
    (``SuspendTime``) and seconds a powered-down node may take to boot and answer before SLURM
    marks it down and requeues its jobs (``ResumeTimeout``)."""

    partitions: list[PartitionName] = Field(default_factory=lambda: ["compute"])
    default_partition: str | None = None
    max_job_time: str = "INFINITE"
    suspend_time: int = SUSPEND_TIME
    resume_timeout: int = RESUME_TIMEOUT

    @field_validator("suspend_time", mode="after")
    @classmethod
    def _idle_time(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"{value!r} seconds is no idle time; allowed: 1 or more seconds idle before an on-demand "
                             "node is powered down (leave on_demand off for nodes that always run)")
        return value

    @field_validator("resume_timeout", mode="after")
    @classmethod
    def _fits_a_boot(cls, value: int) -> int:
        if value < BOOT_SECONDS["kvm"]:
            raise ValueError(f"{value!r} seconds is shorter than a compute node's boot "
                             f"({BOOT_SECONDS['kvm']} s under KVM, estimated; {BOOT_SECONDS['qemu']} s under "
                             f"software emulation, measured); allowed: at least {BOOT_SECONDS['kvm']} under KVM, "
                             f"{BOOT_SECONDS['qemu']} under software emulation (the host decides), e.g. 900")
        return value

    @field_validator("partitions", mode="after")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        duplicates = sorted({n for n in value if value.count(n) > 1})
        if duplicates:
            raise ValueError(f"{duplicates[0]!r} is listed twice; allowed: each partition once")
        return value

    @field_validator("default_partition", mode="after")
    @classmethod
    def _default_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A partition name, and one of ``partitions`` (checked here, not after the model, so a
        mistake elsewhere in the block does not hide this one)."""
        if value is None:
            return None
        _check_partition(value)
        listed = info.data.get("partitions")  # absent when the list has a mistake of its own
        if listed is not None and value not in listed:
            raise ValueError(f"{value!r} is not in partitions {listed}; allowed: one of them")
        return value

    @model_validator(mode="before")
    @classmethod
    def _only_a_default(cls, data: Any) -> Any:
        """Only a default partition given: it is the cluster's one partition."""
        if isinstance(data, Mapping) and data.get("default_partition") is not None and "partitions" not in data:
            return {**data, "partitions": [data["default_partition"]]}
        return data

    @field_validator("max_job_time", mode="before")
    @classmethod
    def _time(cls, value: Any) -> str:
        text = str(value).strip()
        if text.upper() in SLURM_NO_LIMIT:
            return "INFINITE"
        if not SLURM_TIME_RE.match(text):
            raise ValueError(f"{value!r} is not a SLURM time; allowed: 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', "
                             "'D-HH:MM', 'D-HH:MM:SS' or 'INFINITE', e.g. '24:00:00'")
        return text




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


class ClusterBase(ImageChoice):
    """What both clusters share: name, image, network, hardware."""

    name: str
    # The host (a name under the file's ``hosts``) the cluster runs on; None: the stack's
    # ``aihow:libvirtUri``.
    host: str | None = None
    cloud_init: CloudInit = Field(default_factory=CloudInit)
    network: NetworkSpec
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

    controller: NodeSpec
    compute_nodes: list[NodeSpec] = Field(default_factory=list)
    slurm_config: SlurmConfig = Field(default_factory=SlurmConfig)
    storage: Storage | None = None

    @field_validator("compute_nodes", mode="before")
    @classmethod
    def _template_form(cls, value: Any) -> Any:
        return _expand_node_group(value)

    @field_validator("controller", mode="after")
    @classmethod
    def _controller_always_runs(cls, value: NodeSpec) -> NodeSpec:
        if value.on_demand:
            raise ValueError("on_demand: true on the controller; allowed: false (slurmctld on the controller is "
                             "what powers the compute nodes up and down)")
        return value

    @model_validator(mode="after")
    def _power_saving_needs_a_node(self) -> HpcCluster:
        _used_only_on_demand(self.slurm_config, ("suspend_time", "resume_timeout"), "slurm_config",
                             any(node.on_demand for node in self.compute_nodes), "a compute node")
        return self


class WorkerGroups(Model):
    """The older ``worker_nodes: {cpu: [...], gpu: [...]}`` form."""

    cpu: list[NodeSpec] = Field(default_factory=list)
    gpu: list[NodeSpec] = Field(default_factory=list)


class KubernetesConfig(Model):
    """``kubernetes_config``: the Cloud cluster's pod and service networks, and how long a worker
    marked ``on_demand`` runs with no work (no pod but a DaemonSet's) before the power broker
    drains and stops it (``scale_down_unneeded_time``, seconds, named after the cluster
    autoscaler's flag).

    Pods get their addresses from the CNI bridge plugin, one /24 of ``pod_subnet`` per node
    (the node's host number in the cluster network picks it), with a route to each peer's.
    Calico, an ingress controller or a storage class would need images from a registry, which
    the project does not assume: those keys are refused rather than ignored.
    """

    cni: Literal["bridge"] = "bridge"
    pod_subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.244.0.0/16")
    service_subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.96.0.0/12")
    scale_down_unneeded_time: int = SCALE_DOWN_UNNEEDED_TIME

    @field_validator("scale_down_unneeded_time", mode="after")
    @classmethod
    def _unneeded_time(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"{value!r} seconds is no idle time; allowed: 1 or more seconds with no work before an "
                             "on-demand worker is stopped (leave on_demand off for workers that always run)")
        return value

    @field_validator("cni", mode="before")
    @classmethod
    def _cni(cls, value: Any) -> Any:
        if value != "bridge":
            raise ValueError(f"{value!r} is not available: it needs images from a container registry; "
                             "allowed: 'bridge' (pod subnets per node, routed between nodes)")
        return value

    @field_validator("pod_subnet", mode="after")
    @classmethod
    def _room_per_node(cls, value: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if value.prefixlen > 16:
            raise ValueError(f"'{value}' is too small; allowed: a /16 or larger (one /24 per node)")
        return value


class CloudCluster(ClusterBase):
    """``clusters.cloud``: a Kubernetes control plane and CPU/GPU workers."""

    control_plane: NodeSpec
    worker_nodes: list[NodeSpec] | WorkerGroups = Field(default_factory=list)
    kubernetes_config: KubernetesConfig = Field(default_factory=KubernetesConfig)

    @field_validator("worker_nodes", mode="before")
    @classmethod
    def _template_form(cls, value: Any) -> Any:
        return _expand_node_group(value)

    @model_validator(mode="after")
    def _control_plane_always_runs(self) -> CloudCluster:
        if self.control_plane.on_demand:
            raise ValueError("control_plane.on_demand: true: the control plane runs the API server every node "
                             "needs; allowed: false (on-demand is for workers, started for a pending pod)")
        _used_only_on_demand(self.kubernetes_config, ("scale_down_unneeded_time",), "kubernetes_config",
                             any(node.on_demand for node in self.workers), "a worker")
        return self

    @property
    def workers(self) -> list[NodeSpec]:
        """Workers in file order (CPU list first for the grouped form)."""
        if isinstance(self.worker_nodes, WorkerGroups):
            return [*self.worker_nodes.cpu, *self.worker_nodes.gpu]
        return list(self.worker_nodes)


def _used_only_on_demand(section: Model, keys: tuple[str, ...], name: str, any_on_demand: bool, what: str) -> None:
    """``ValueError`` for a key of ``section`` written in the file that only on-demand nodes use,
    when the cluster has none: accepted, it would do nothing."""
    written = [key for key in keys if key in section.model_fields_set]
    if written and not any_on_demand:
        key = written[0]
        raise ValueError(f"{name}.{key}: {getattr(section, key)!r} is set, but no node of this cluster has "
                         f"on_demand: true, so nothing would use it; allowed: on_demand: true on {what}, or leave "
                         f"{key} out")


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


class HostSpec(Model):
    """``hosts.<name>``: a libvirt host clusters are placed on, by its connection URI."""

    uri: str

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError(f"{data!r} is not a host entry; allowed: {{uri: URI}}, e.g. "
                             "{uri: qemu+ssh://root@gpu2/system}")
        return data

    @field_validator("uri")
    @classmethod
    def _libvirt_uri(cls, value: str) -> str:
        problem = libvirt_uri_problem(value)
        if problem:
            raise ValueError(f"{value!r} is {problem}; allowed: {LIBVIRT_URI_FORM}")
        return canonical_uri(value)


HOST_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,38}[a-z0-9])?$")


def _host_names(value: dict[str, HostSpec]) -> dict[str, HostSpec]:
    for name in value:
        if not HOST_NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a host name; allowed: lowercase letters, digits and '-', at most 40 "
                             "characters, starting and ending with a letter or digit")
    return value


class ClusterFile(Model):
    """A whole cluster file as the ai-how tool writes it."""

    version: str = "1.0"
    metadata: Metadata = Field(default_factory=Metadata)
    global_: dict[str, Any] = Field(default_factory=dict, alias="global")
    # The libvirt hosts clusters may be placed on (``clusters.<key>.host``), by name.
    hosts: Annotated[dict[str, HostSpec], AfterValidator(_host_names)] = Field(default_factory=dict)
    clusters: Clusters

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> str:
        text = str(value)
        if text != "1.0":
            raise ValueError(f"{value!r} is not supported; allowed: '1.0'")
        return text


def types_in(annotation: Any) -> Iterator[Any]:
    """Every type an annotation names, through unions, generics and ``Annotated``."""
    yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from types_in(arg)
    yield from getattr(annotation, "__metadata__", ()) or ()


def accepted_fields() -> list[tuple[str, str, str]]:
    """Every key a cluster file may hold, as (model, field, key as written in YAML): the fields of
    every model reachable from ``ClusterFile``."""
    found: list[tuple[str, str, str]] = []
    pending: list[type[BaseModel]] = [ClusterFile]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            found.append((model.__name__, name, info.alias or name))
            pending += [t for t in types_in(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    return found

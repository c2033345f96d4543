"""A node of a cluster file: its size, disk and image, PCI passthrough devices, shared folders,
cloud-init additions, and the hardware (CPU model, topology, NUMA, hugepages) it gets."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from aihow_infra.config.base import HEX_ID_RE, PCI_ADDRESS_RE, ImageRole, Model


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


class WriteFile(Model):
    """A file cloud-init writes in the guest."""

    path: Annotated[str, Field(pattern=r"^/")]
    content: str
    permissions: Annotated[str, Field(pattern=r"^0[0-7]{3}$")] = "0644"
    owner: str = "root:root"


class CloudInit(Model):
    """User-data added to the project's own, per cluster and per node (the node's come last)."""

    packages: list[str] = Field(default_factory=list)
    write_files: list[WriteFile] = Field(default_factory=list)
    runcmd: list[str | list[str]] = Field(default_factory=list)

    def user_data(self) -> dict[str, Any]:
        """The non-empty keys, as cloud-config."""
        data = self.model_dump(exclude_defaults=True)
        return {k: v for k, v in data.items() if v}


class ImageChoice(Model):
    """A disk to boot: a project image (``image``) or the operator's own (``base_image_path``)."""

    base_image_path: str | None = None
    image: ImageRole | None = None

    @model_validator(mode="after")
    def _one_image(self) -> ImageChoice:
        if self.image is not None and self.base_image_path is not None:
            raise ValueError(f"image: {self.image!r} given with base_image_path {self.base_image_path!r}; "
                             "allowed: one of them")
        return self


class NodeSpec(ImageChoice):
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
    on_demand: bool = False  # SLURM power saving: off until a job needs it, off again when idle
    host: str | None = None  # a host of the file's ``hosts`` to run on, when not its cluster's
    cloud_init: CloudInit = Field(default_factory=CloudInit)
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

    @model_validator(mode="after")
    def _on_demand_starts_on_demand(self) -> NodeSpec:
        if self.on_demand and self.auto_start and "auto_start" in self.model_fields_set:
            raise ValueError("auto_start: true with on_demand: true; allowed: one of them (an on-demand node "
                             "starts when a job needs it)")
        return self

    @property
    def devices(self) -> list[PciDevice]:
        """The passthrough devices this VM takes (none when passthrough is disabled)."""
        return list(self.pcie_passthrough.devices) if self.pcie_passthrough.enabled else []

    @property
    def has_gpu(self) -> bool:
        """True when a passed-through device is a GPU (the ai-how rule for a GPU worker)."""
        return any(d.device_type is DeviceType.GPU for d in self.devices)


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



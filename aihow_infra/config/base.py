"""What every cluster-file model shares: the strict base model, the formats of names and
addresses, the cluster keys and the image roles."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationInfo,
    field_validator,
)

PCI_ADDRESS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
HEX_ID_RE = re.compile(r"^[0-9a-f]{4}$")
# Linux interface names: at most 15 bytes, no '/', ':' or whitespace.
BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
CLUSTER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?$")
# A libvirt connection URI (https://libvirt.org/uri.html) of a driver the project drives: QEMU's
# system daemon (networks and PCI passthrough need it; the session daemon has neither), with any
# transport, or libvirt's test driver.
LIBVIRT_URI_RE = re.compile(r"^(qemu(\+(unix|ssh|libssh|libssh2|tcp|tls|ext))?://[^/\s]*/system(\?\S*)?"
                            r"|test(\+\w+)?://[^/\s]*/\S+)$")
LIBVIRT_URI_FORM = "a URI of libvirt's QEMU system daemon, such as qemu:///system or qemu+ssh://USER@HOST/system"


def libvirt_uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not a libvirt URI the project can place VMs on (the message's middle: ``'x'
    is ...``), or None when it is."""
    if LIBVIRT_URI_RE.match(uri):
        return None
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme.split("+")[0] == "qemu":
        if urlsplit(uri).path == "/session":
            return "QEMU's session daemon, which has no networks of its own and no PCI passthrough"
        return f"not a path of QEMU's daemons ({urlsplit(uri).path or 'none'}; the system daemon's is /system)"
    if scheme and scheme.split("+")[0] in ("xen", "lxc", "vbox", "vmware", "esx", "bhyve", "openvz", "ch", "hyperv"):
        return f"a libvirt URI of the {scheme.split('+')[0]} driver, which the project does not drive"
    return "not a libvirt URI"

# Seconds from a compute node's start to its guest ready, per libvirt virt type, and how each is
# known. qemu (software emulation, TCG): measured here, a compute node booted beside four others
# (3 min 35 s, cloud-init's stages most of it). kvm: estimated, as KVM cannot run a guest kernel
# here (kvm_pvm): the same guest idle under TCG spends 2.7 s per cloud-init stage against ~30 s
# loaded, so 60 s is a generous bound.
BOOT_SECONDS = {"kvm": 60, "qemu": 215}
BOOT_SOURCE = {"kvm": "estimated", "qemu": "measured"}

ClusterKey = Literal["hpc", "cloud"]
CLUSTER_KEYS: tuple[ClusterKey, ...] = ("hpc", "cloud")


class Model(BaseModel):
    """Base of every cluster-file model: unknown keys are errors, and so is true or false where a
    number goes (pydantic would read them as 1 and 0: ``suspend_time: true`` as one second)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float, int | None,
                                                                                    float | None):
            raise ValueError(f"{str(value).lower()} is not a number; allowed: a number")
        return value


ImageRole = Literal["base", "hpc", "cloud"]
# The root file system of each project image, in GiB (images.py builds them this big): a VM's disk is
# a copy-on-write overlay on it, and one smaller than the file system cuts it off, so the guest does
# not boot. The cloud image carries container archives no registry can give (aihow_infra.oci).
IMAGE_ROOT_GB: dict[str, int] = {"base": 2, "hpc": 2, "cloud": 3, "gpuhost": 3}

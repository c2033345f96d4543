"""libvirt XML from the Jinja templates in ``templates/``.

Each function takes a provider's inputs (plain JSON-like dicts, as Pulumi
stores them) and returns the XML libvirt is given. Kept free of libvirt calls
so golden-file and schema tests can render without a daemon.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from aihow_infra.host import TCG_CACHE_MIB, TCG_CMDLINE
from aihow_infra.state.layout import CHECKOUT

if TYPE_CHECKING:
    import jinja2

TEMPLATES = CHECKOUT / "templates"
METADATA_NS = "urn:x-aihow:vm:1"


@cache
def _env() -> jinja2.Environment:
    import jinja2  # only providers render; the Pulumi program need not pay for the import

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def whole_numbers(value: Any) -> Any:
    """Pulumi carries every number as a float; give whole ones back their int type."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def _render(template: str, **values: Any) -> str:
    return _env().get_template(template).render(**whole_numbers(values))


def dhcp_host_xml(host: dict[str, Any]) -> str:
    """One ``<host mac name ip/>`` reservation, as the network's own XML has it (for
    ``virNetworkUpdate``, which takes the element alone)."""
    return _render("dhcp-host.xml.j2", host=host)


def network_xml(props: dict[str, Any]) -> str:
    """The ``<network>`` of a cluster: bridge, gateway, DHCP range, one reservation per VM."""
    return _render(
        "network.xml.j2",
        name=props["name"],
        stack=props.get("stack"),
        metadata_ns=METADATA_NS,
        bridge=props["bridge"],
        forward_mode=props["forward_mode"],
        dns_domain=props["dns_domain"],
        dns_servers=props.get("dns_servers") or [],
        gateway=props["gateway"],
        netmask=props["netmask"],
        dhcp_start=props["dhcp_start"],
        dhcp_end=props["dhcp_end"],
        hosts=props.get("hosts") or [],
    )


def pool_xml(props: dict[str, Any]) -> str:
    """A directory storage pool; its folder, when libvirt makes it, of ``mode`` (default 0711:
    others may reach the files but not list them)."""
    return _render("pool.xml.j2", name=props["name"], path=props["path"], mode=props.get("mode", "0711"))


def volume_xml(props: dict[str, Any], backing_format: str = "qcow2") -> str:
    """A qcow2 volume of ``size_gb``, an overlay on ``base_image`` when one is named; or a raw
    volume of ``size_bytes`` (a seed, a copied image file). Readable by its owner only, unless
    ``mode`` (octal, e.g. ``0644`` for an image every VM of the host reads) says otherwise."""
    return _render("volume.xml.j2", name=props["name"], size_gb=props.get("size_gb"),
                   size_bytes=props.get("size_bytes"), format=props.get("format", "qcow2"),
                   backing_path=props.get("base_image"), backing_format=backing_format,
                   mode=props.get("mode", "0600"))


def _topology(vcpus: int, sockets: int, threads: int) -> tuple[int, int, int]:
    """sockets x cores x threads that multiply to exactly ``vcpus`` (ai-how's could not)."""
    if sockets * threads > 0 and vcpus % (sockets * threads) == 0:
        return sockets, vcpus // (sockets * threads), threads
    return 1, vcpus, 1


def _features(accel: dict[str, Any], cpu_mode: str | None) -> list[dict[str, str]]:
    if cpu_mode is None:  # software emulation: host CPU features do not apply
        return []
    features: dict[str, str] = {}
    for raw in accel.get("cpu_features") or []:
        name = raw.lstrip("+-")
        features[name] = "disable" if raw.startswith("-") else "require"
    if accel.get("enable_nested") and cpu_mode != "host-passthrough":
        # Only the host's own virtualization flag exists; 'optional' takes whichever it is.
        for name in ("vmx", "svm"):
            features.setdefault(name, "optional")
    return [{"name": n, "policy": p} for n, p in features.items()]


def domain_xml(props: dict[str, Any], virt_type: str, uuid: str | None = None) -> str:
    """The ``<domain>`` of a VM for ``virt_type`` ('kvm' or 'qemu'); ``uuid`` when redefining
    an existing domain (libvirt matches a definition to its domain by name and UUID)."""
    props = whole_numbers(props)
    accel: dict[str, Any] = props.get("acceleration") or {}
    hostdevs = []
    for dev in props.get("devices") or []:
        domain, bus, rest = dev["address"].split(":")
        slot, function = rest.split(".")
        hostdevs.append({"domain": domain, "bus": bus, "slot": slot, "function": function,
                         "rom_bar": dev["type"] == "gpu"})
    has_gpu = any(d["rom_bar"] for d in hostdevs)
    cpu_mode: str | None = None
    if virt_type == "kvm":
        model = accel.get("cpu_model") or "host-passthrough"
        cpu_mode = {"host": "host-passthrough", "qemu64": None}.get(model, model)
    sockets, cores, threads = _topology(props["vcpus"], int(accel.get("sockets") or 1),
                                        int(accel.get("threads") or 1))
    hugepages = None
    if accel.get("enable_hugepages") or accel.get("memory_backing") == "hugepages":
        size = accel.get("hugepage_size") or "2M"
        hugepages = {"size": size[:-1], "unit": size[-1]}
    mounts = props.get("mounts") or []
    boot = props.get("boot")
    if boot and virt_type == "qemu":
        boot = {**boot, "cmdline": f"{boot['cmdline']} {TCG_CMDLINE}"}
    return _render(
        "domain.xml.j2",
        virt_type=virt_type,
        name=props["name"],
        uuid=uuid,
        metadata_ns=METADATA_NS,
        cluster=props["cluster"],
        role=props["role"],
        stack=props["stack"],
        memory_mib=props["memory_mib"],
        vcpus=props["vcpus"],
        hugepages=hugepages,
        memfd=bool(mounts) or accel.get("memory_backing") == "memfd",
        # virtiofsd (vhost-user) maps the guest's memory: libvirt refuses a virtiofs share
        # without shared memory, hugepages too.
        shared_memory=bool(mounts),
        cpu_pinning=bool(accel.get("cpu_pinning")),
        hide_kvm=has_gpu and virt_type == "kvm",
        cpu_mode=cpu_mode,
        sockets=sockets,
        cores=cores,
        threads=threads,
        cpu_features=_features(accel, cpu_mode),
        disk_path=props["disk_path"],
        seed_path=props.get("seed_path"),
        boot=boot,
        console_log=props.get("console_log"),
        tcg_cache_mib=TCG_CACHE_MIB if virt_type == "qemu" else None,
        mac=props["mac"],
        network=props["network"],
        mounts=mounts,
        hostdevs=hostdevs,
        # A VNC console only when asked, on a socket only root reaches (never a TCP port).
        graphics=props.get("graphics") == "vnc-socket" and not has_gpu,
    )

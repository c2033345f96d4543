"""Host checks for VFIO passthrough: KVM, libvirtd, IOMMU, VFIO, and every configured device.

Everything is read from sysfs and /proc under a root folder, so a recorded host
(hostrecord.py: ``record_host``, ``materialize``) is checked exactly like the live one. Each
failure comes with the command that fixes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aihow_infra.config import BOOT_SECONDS, BOOT_SOURCE, PciDevice
from aihow_infra.crosscheck import bridge_problems, host_words, subnet_collisions
from aihow_infra.errors import AihowError, ConfigError
from aihow_infra.gpu.custody import device_files, open_by
from aihow_infra.gpu.homes import at_home, boot_binding, describe_driver
from aihow_infra.gpu.ledger import DEFAULT_HOME, Home
from aihow_infra.host import (
    VFIO_DRIVER,
    Host,
    SubnetInUse,
    VirtChoice,
    VirtType,
    choose_virt_type,
    host_subnets,
)
from aihow_infra.libvirt_names import runs_here
from aihow_infra.loading import key_lines, line_of, load_cluster_file
from aihow_infra.plan import ClusterPlan, VmPlan, plan_all
from aihow_infra.settings import DEFAULT_LIBVIRT_URI

if TYPE_CHECKING:  # libvirt is imported when a live host is checked, not for a recorded one
    from aihow_infra.libvirt.inspect import PciFunction


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, whether it passed, and how to fix it. A check that no
    configured device needs (IOMMU and VFIO on a host without passthrough) is reported, but
    never makes the host not ready; nor does an advisory one (no KVM: VMs run, only slower)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    needed: bool = True
    advisory: bool = False

    @property
    def verdict(self) -> str:
        """``ok``, ``FAIL``, ``WARN`` (advisory) or ``not needed``."""
        if self.ok:
            return "ok"
        return "not needed" if not self.needed else "WARN" if self.advisory else "FAIL"


@dataclass
class Report:
    """All findings; the host is ready when every one passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """True when nothing that is needed failed."""
        return all(c.ok or not c.needed or c.advisory for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"ready": self.ready, "checks": [{**asdict(c), "verdict": c.verdict} for c in self.checks]}


def _system_checks(host: Host, live: bool, passthrough: bool, uris: Iterable[str], kept_on_vfio: bool) -> list[Check]:
    checks = []
    kvm = host.path("/dev/kvm").exists()
    checks.append(Check("kvm", kvm, "/dev/kvm present" if kvm else "/dev/kvm is missing: VMs run under software "
                                                                   "emulation, many times slower",
                        "" if kvm else "enable VT-x/AMD-V in the firmware, then `modprobe kvm_intel` "
                                       "(or `modprobe kvm_amd`)", advisory=True))
    # What aihow:virtType auto picks here; software emulation works, only slower, so never a
    # failure. A /dev/kvm that cannot run a real guest (kvm_pvm) is a warning of its own (a missing
    # one is the kvm check's).
    choice = choose_virt_type("auto", host, kvm) if kvm else VirtChoice("qemu", "software emulation: no /dev/kvm")
    unusable = kvm and choice.virt_type != "kvm"
    checks.append(Check("acceleration", not unusable, f"{choice.virt_type}: {choice.reason}",
                        "nothing to fix for the VMs to work; for KVM speed, a host whose /dev/kvm runs real "
                        "guests (kvm_intel or kvm_amd)" if unusable else "", advisory=True))
    if live:
        import libvirt

        for uri in uris:
            try:
                libvirt.open(uri).close()
                checks.append(Check("libvirtd", True, f"{uri} answers"))
            except libvirt.libvirtError as exc:
                checks.append(Check("libvirtd", False, f"{uri} does not answer ({exc.get_error_message()})",
                                    "start it: `libvirtd -d` (or `systemctl start libvirtd`), or run ./bootstrap; "
                                    "or name the right one in the stack's aihow:libvirtUri"))
    groups_dir = host.path("/sys/kernel/iommu_groups")
    groups = list(groups_dir.iterdir()) if groups_dir.is_dir() else []
    # A host that is itself a VM (a cloud GPU instance) has no firmware setting to turn: its
    # hypervisor must give it a virtual IOMMU.
    in_vm = "hypervisor" in (host.read("/proc/cpuinfo") or "").split()
    enable = ("this host is itself a VM: give it a virtual IOMMU from its hypervisor (QEMU: `-device "
              "intel-iommu,intremap=on,caching-mode=on`), then add" if in_vm else
              "enable VT-d/AMD-Vi in the firmware and add")
    checks.append(Check(
        "iommu", bool(groups), f"{len(groups)} IOMMU groups" if groups else "no IOMMU groups: the IOMMU is off",
        "" if groups else f"{enable} `intel_iommu=on iommu=pt` (or `amd_iommu=on iommu=pt`) to GRUB_CMDLINE_LINUX, "
                          "then `update-grub` and reboot",
        needed=passthrough))
    # A device kept on vfio-pci needs the driver loaded; one whose home is the host's driver does
    # not: libvirt loads it when the VM that takes the device starts.
    vfio = "vfio_pci" in host.modules()
    on_demand = passthrough and not kept_on_vfio
    checks.append(Check("vfio", vfio or on_demand, "vfio_pci loaded" if vfio else "vfio_pci is not loaded"
                        + ("; libvirt loads it when a VM that passes a device through starts" if on_demand else ""),
                        "" if vfio else "`modprobe vfio-pci` (and add vfio-pci to /etc/modules-load.d/vfio.conf)",
                        needed=kept_on_vfio))
    return checks


def _bind_fix(address: str, driver: str | None) -> str:
    unbind = f"echo {address} > /sys/bus/pci/drivers/{driver}/unbind; " if driver else ""
    return (f"{unbind}echo {VFIO_DRIVER} > /sys/bus/pci/devices/{address}/driver_override; "
            f"echo {address} > /sys/bus/pci/drivers_probe  (or `driverctl set-override {address} {VFIO_DRIVER}`)")


def _home_checks(host: Host, address: str, name: str, home: Home | None, live: bool) -> list[Check]:
    """The device against its home (gpu/homes.py): at home, held by a VM, or stuck; and the
    home agreeing with the boot configuration. On the live host, a host process holding it open
    (a VM start is refused until it ends). ``home`` None: not known here (a recorded host's
    homes are in its own ledger), so any driver passes."""
    driver = host.driver(address)
    if home is None:
        return [Check(f"{name} driver", True, f"{describe_driver(driver)} (its home is in that host's GPU lease "
                                              "ledger)" + ("" if driver == VFIO_DRIVER else
                                                           "; libvirt binds it to vfio-pci when its VM starts"))]
    holders = open_by(host, device_files(host, address)) if live else []
    vms = sorted({h.vm for h in holders if h.vm})
    checks = []
    where = boot_binding(host, address) if home == "host" else None
    if where:
        checks.append(Check(f"{name} home", False,
                            f"home host (the GPU lease ledger) but {where} binds it to {VFIO_DRIVER} at boot: a home "
                            "set differently in two places",
                            f"aihow gpu.home {address} --to {VFIO_DRIVER}, or remove that boot setting"))
    if vms:
        checks.append(Check(f"{name} driver", driver == VFIO_DRIVER,
                            f"{describe_driver(driver)}, held by the running VM {', '.join(vms)} (home: {home})"))
        return checks
    if at_home(driver, home):
        detail = f"at home {describe_driver(driver)} (home: {home})"
        checks.append(Check(f"{name} driver", True, detail + ("; libvirt binds it to vfio-pci when its VM starts"
                                                              if home == "host" else "")))
    elif home == "host":
        checks.append(Check(f"{name} driver", False, f"stuck on {VFIO_DRIVER} with no holder (home: the host's "
                            "driver): the host cannot use it", f"aihow gpu.home {address}", advisory=True))
    else:
        checks.append(Check(f"{name} driver", False, f"bound to {driver or 'no driver'} (home: {VFIO_DRIVER})",
                            f"aihow gpu.home {address}  (or by hand: {_bind_fix(address, driver)})"))
    others = [h for h in holders if not h.vm]
    if others:
        checks.append(Check(f"{name} open", False, "held open on the host: " + "; ".join(str(h) for h in others)
                            + ": a VM start is refused until that ends",
                            f"end those first (`kill {' '.join(str(p) for p in sorted({h.pid for h in others}))}`, "
                            "or stop the program that uses the device)"))
    return checks


def _device_checks(host: Host, address: str, vendor: str | None, device: str | None, users: str,
                   configured: frozenset[str] = frozenset(), home: Home | None = DEFAULT_HOME,
                   live: bool = False) -> list[Check]:
    name = f"device {address} ({users})"
    if not host.device(address).is_dir():
        return [Check(name, False, "not present on this host",
                      "check the address with `lspci -D -nn` and fix pci_address in the cluster file")]
    checks = []
    found_vendor = (host.read(f"/sys/bus/pci/devices/{address}/vendor") or "").removeprefix("0x")
    found_device = (host.read(f"/sys/bus/pci/devices/{address}/device") or "").removeprefix("0x")
    mismatch = [f"{label} is {found} but the cluster file says {wanted}"
                for label, found, wanted in (("vendor", found_vendor, vendor), ("device", found_device, device))
                if wanted and found != wanted]
    checks.append(Check(f"{name} ids", not mismatch,
                        "; ".join(mismatch) or f"{found_vendor}:{found_device} as configured",
                        f"set vendor_id: '{found_vendor}' and device_id: '{found_device}' for {address}"
                        if mismatch else ""))
    checks += _home_checks(host, address, name, home, live)
    checks.append(_reset_check(host, address, name))
    group = host.iommu_group(address)
    if group is None:
        checks.append(Check(f"{name} iommu group", False, "has no IOMMU group",
                            "turn the IOMMU on (see the iommu check)"))
        return checks
    # The device and the other configured ones have driver checks of their own (at home on the
    # host's driver, libvirt detaches them when their VM starts).
    others = [m for m in host.group_members(group)
              if m != address and m not in configured and host.driver(m) not in (VFIO_DRIVER, None, "pcieport")]
    in_use = [m for m in others if m not in configured and _host_class(host, m)]
    if in_use:
        # Unbinding these would take the host's disk, network or display away: never suggest it.
        held = ", ".join(f"{m} ({_host_class(host, m)}, driver {host.driver(m)})" for m in in_use)
        checks.append(Check(
            f"{name} iommu group {group}", False,
            f"cannot be passed through in this slot: IOMMU group {group} also holds {held}, which the host uses, "
            "and VFIO takes a whole group",
            "move the card to a slot with an IOMMU group of its own (`find /sys/kernel/iommu_groups -type l` "
            "lists them), or enable ACS in the firmware; do not unbind the host's devices"))
        return checks
    checks.append(Check(
        f"{name} iommu group {group}", not others,
        f"every device of group {group} is on {VFIO_DRIVER} or on no driver" if not others else
        "also in the group and not on vfio-pci: " + ", ".join(f"{m} ({host.driver(m)})" for m in others),
        "; ".join(_bind_fix(m, host.driver(m)) for m in others)))
    return checks


def _reset_check(host: Host, address: str, name: str) -> Check:
    """How the kernel resets the device between VMs (sysfs ``reset_method``, kernel 5.15 and later:
    flr, pm, bus, ...). Without one a VM restart or a hand-over finds the device as the last guest
    left it: advisory, the VMs still start."""
    methods = host.reset_methods(address)
    if methods:
        return Check(f"{name} reset", True, f"reset by {', '.join(methods)}")
    if methods is None:
        return Check(f"{name} reset", False, "reset method unknown: no device of this host shows one",
                     f"`lspci -vv -s {address}` lists FLReset+ under DevCap when the device resets itself; "
                     "record the host again with `aihow host.record FILE` on Linux 5.15 or later", advisory=True)
    return Check(f"{name} reset", False,
                 "has no reset method: a VM restart or a hand-over to another VM gets the device as the last "
                 "guest left it (a GPU may hang until the host reboots)",
                 "put the card in a slot where it is alone behind its bridge (the kernel can then reset the bus; "
                 f"`cat /sys/bus/pci/devices/{address}/reset_method` says `bus`), or keep one VM holding it and "
                 "reboot the host to recover it", advisory=True)


# PCI base classes (the first byte of ``class``) of devices a host runs on: unbinding one from its
# driver takes the host's storage, network, display or input away.
HOST_CLASSES = {"01": "storage controller", "02": "network controller", "03": "display controller",
                "0c": "serial bus controller (USB)"}


def _host_class(host: Host, address: str) -> str:
    """What the host uses the device for ("" for a device a VM may take): a storage, network,
    display or USB controller bound to a driver."""
    if host.driver(address) in (None, VFIO_DRIVER, "pcieport"):
        return ""
    found = (host.read(f"/sys/bus/pci/devices/{address}/class") or "").removeprefix("0x")
    return HOST_CLASSES.get(found[:2], "")


HUGEPAGE_KIB = {"2M": 2048, "1G": 1048576}


@dataclass(frozen=True)
class HugepageNeed:
    """The hugepages of one size the VMs back their memory with, against the host's pool."""

    size: str
    users: list[VmPlan]
    have: int  # pages reserved (nr_hugepages)
    need: int  # pages for every such VM's memory at once
    fix: str  # the command that reserves them ("" when enough are)


def _hugepage_needs(host: Host, vms: list[VmPlan]) -> list[HugepageNeed]:
    needs: dict[str, list[VmPlan]] = {}
    for vm in vms:
        perf = vm.acceleration.performance
        if perf.enable_hugepages or perf.memory_backing == "hugepages":
            needs.setdefault(perf.hugepage_size, []).append(vm)
    found = []
    for size, users in sorted(needs.items()):
        kib = HUGEPAGE_KIB[size]
        pool = f"/sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"
        have = int(host.read(pool) or 0)
        need = sum(vm.memory_gb for vm in users) * 1048576 // kib
        fix = "" if have >= need else (f"echo {need} > {pool} (1G pages are surest at boot: add `hugepagesz=1G "
                                       f"hugepages={need}` to GRUB_CMDLINE_LINUX, `update-grub`, reboot)"
                                       if size == "1G" else f"echo {need} > {pool}")
        found.append(HugepageNeed(size, users, have, need, fix))
    return found


def _hugepage_checks(host: Host, vms: list[VmPlan]) -> list[Check]:
    """For each hugepage size the VMs back their memory with: the host's pool of that size
    (``nr_hugepages``) holds every such VM's memory at once."""
    return [Check(f"hugepages {n.size}", n.have >= n.need, f"{n.have} pages of {n.size} reserved; {n.need} needed "
                  f"for the memory of {', '.join(vm.name for vm in n.users)}", n.fix)
            for n in _hugepage_needs(host, vms)]


def check_hugepages(plans: list[ClusterPlan], file: str | Path, root: Path = Path("/")) -> None:
    """``ConfigError`` when this host does not reserve the hugepages the VMs' memory is backed by
    (libvirt would refuse to start them), naming the key and its line in the cluster ``file``."""
    problems = []
    for n in _hugepage_needs(Host(root), [vm for plan in plans for vm in plan.vms]):
        if n.have < n.need:
            key = f"clusters.{n.users[0].cluster_key}.hardware.acceleration.performance.hugepage_size"
            problems.append(f"{key}: '{n.size}' pages back the memory of {', '.join(vm.name for vm in n.users)}, "
                            f"{n.need} of them, and this host reserves {n.have}; allowed: reserve them first "
                            f"({n.fix}), or turn hugepages off")
    _refuse(problems, file)


def check_shares(plans: list[ClusterPlan], file: str | Path) -> None:
    """``ConfigError`` when a virtio-fs share's folder is not a folder on this host (virtiofsd
    would fail as the VM starts), naming the key and its line in the cluster ``file``."""
    _refuse([f"{vm.key_path}.virtio_fs_mounts[{i}].host_path: '{mount.host_path}' is not a folder on this host; "
             "allowed: an existing folder to share"
             for plan in plans for vm in plan.vms for i, mount in enumerate(vm.mounts)
             if not Path(mount.host_path).is_dir()], file)


ACCELERATION_WORDS = {"kvm": "KVM", "qemu": "software emulation"}


def check_resume_timeout(plans: list[ClusterPlan], virt_type: VirtType, file: str | Path) -> None:
    """``ConfigError`` when a cluster with on-demand nodes gives SLURM less time to bring one up
    (``resume_timeout``) than a compute node's boot takes under ``virt_type`` here: SLURM would
    mark every node it powers up down and requeue its jobs."""
    boot, known, under = BOOT_SECONDS[virt_type], BOOT_SOURCE[virt_type], ACCELERATION_WORDS[virt_type]
    problems = [f"clusters.{plan.key}.slurm_config.resume_timeout: {plan.resume_timeout} seconds is shorter than a "
                f"compute node's boot under {under} on this host ({boot} s {known}); allowed: at least {boot}, "
                "e.g. 900" for plan in plans
                if plan.key == "hpc" and any(vm.on_demand for vm in plan.vms) and plan.resume_timeout < boot]
    _refuse(problems, file)


def check_host(root: Path, cluster_files: Iterable[str | Path],
               libvirt_uris: Iterable[str] = (DEFAULT_LIBVIRT_URI,), homes: Mapping[str, Home] | None = None) -> Report:
    """Every check for the host under ``root``, the hugepages and the passthrough devices of
    ``cluster_files``; on the live host (``root`` is /) each of ``libvirt_uris`` must answer (the
    stacks' ``aihow:libvirtUri``) and no host process may hold a device open. ``homes``: each
    device's home as the host's GPU lease ledger records it (``host`` when absent); None when
    they are not known (a recorded host: any driver passes)."""
    host = Host(root)
    devices: dict[str, tuple[str | None, str | None, list[str]]] = {}
    vms: list[VmPlan] = []
    elsewhere: list[VmPlan] = []  # on a host the cluster file names that is not this machine
    for path in cluster_files:
        for plan in plan_all(load_cluster_file(path, check_images=False, allow_system_paths=True)):
            for vm in plan.vms:
                if vm.host_uri is not None and not runs_here(vm.host_uri):
                    elsewhere.append(vm)
                    continue
                vms.append(vm)
                for dev in vm.devices:
                    vendor, device, users = devices.setdefault(dev.pci_address, (dev.vendor_id, dev.device_id, []))
                    users.append(vm.name)
    live = root == Path("/")
    kept_on_vfio = homes is not None and any(homes.get(a, DEFAULT_HOME) == VFIO_DRIVER for a in devices)
    uris = list(dict.fromkeys([*libvirt_uris, *(vm.host_uri for vm in elsewhere if vm.host_uri)]))
    report = Report(_system_checks(host, live=live, passthrough=bool(devices), uris=uris,
                                   kept_on_vfio=kept_on_vfio))
    report.checks += _hugepage_checks(host, vms)
    for address, (vendor, device, users) in sorted(devices.items()):
        report.checks += _device_checks(host, address, vendor, device, ", ".join(users), frozenset(devices),
                                        None if homes is None else homes.get(address, DEFAULT_HOME), live)
    if live:
        report.checks += _remote_device_checks(elsewhere)
    return report


def _remote_device_check(vm: VmPlan, dev: PciDevice, found: PciFunction | None, uri: str) -> Check:
    """One passthrough device of a VM on another machine against what that host's libvirt says."""
    name = f"device {dev.pci_address} ({vm.name}) on host {vm.host}"
    if found is None:
        return Check(name, False, "not present on that host",
                     f"`virsh -c {uri} nodedev-list --cap pci` lists its devices; fix pci_address")
    ids = f"{found.vendor_id}:{found.device_id}"
    if any(want and want != has for want, has in ((dev.vendor_id, found.vendor_id), (dev.device_id, found.device_id))):
        return Check(name, False, f"{ids} but the cluster file says {dev.vendor_id}:{dev.device_id}",
                     f"set vendor_id and device_id as that host has them ({ids})")
    if found.iommu_group is None:
        return Check(name, False, f"{ids}, in no IOMMU group: that host's IOMMU is off",
                     "on that host: `intel_iommu=on iommu=pt` (or `amd_iommu=on`) on its kernel command line, then "
                     "reboot it")
    return Check(name, True, f"{ids}, IOMMU group {found.iommu_group}")


def _remote_device_checks(vms: list[VmPlan]) -> list[Check]:
    """The passthrough devices of VMs on other machines, as each host's libvirt describes them
    (node-device API): present, with the configured ids, in an IOMMU group. A host that does not
    answer is the libvirtd check's."""
    from aihow_infra.libvirt.connection import connect
    from aihow_infra.libvirt.inspect import pci_function

    checks: list[Check] = []
    for uri in dict.fromkeys(vm.host_uri for vm in vms if vm.devices and vm.host_uri):
        try:
            with connect(uri) as conn:
                for vm in (v for v in vms if v.host_uri == uri):
                    checks += [_remote_device_check(vm, dev, pci_function(conn, dev.pci_address), uri)
                               for dev in vm.devices]
        except AihowError:
            continue  # said by the libvirtd check of that URI
    return checks


def subnets_in_use(uri: str) -> list[SubnetInUse]:
    """Every IPv4 subnet the host uses: its interfaces and routes (when libvirt runs on this
    machine) and every libvirt network of ``uri``, active or not."""
    from aihow_infra.libvirt.connection import connect
    from aihow_infra.libvirt.inspect import network_subnets

    with connect(uri) as conn:
        local = conn.getType() == "QEMU" and runs_here(conn.getURI())
        return subnets_of(host_subnets() if local else [], network_subnets(conn))


def subnets_of(host: list[SubnetInUse], networks: list[tuple[str, str, str]]) -> list[SubnetInUse]:
    """The host's interface and route subnets, each on a libvirt network's bridge marked as that
    network's, then the ``(name, bridge, subnet)`` of each libvirt network. A cluster whose own
    network (found by name) moves to a new bridge then does not collide with its old bridge."""
    owner = {bridge: name for name, bridge, _ in networks if bridge}
    return ([replace(used, network=owner.get(used.interface, "")) for used in host]
            + [SubnetInUse(subnet, f"libvirt network '{name}' (bridge {bridge or 'none'})", bridge, name)
               for name, bridge, subnet in networks])


def check_bridges(plans: list[ClusterPlan], uri: str, file: str | Path) -> None:
    """``ConfigError`` naming each cluster on ``forward_mode: bridge`` whose bridge the libvirt
    host of ``uri`` does not have (or has as another kind of interface), and each of its nodes
    given the host's own address on that bridge, with their lines."""
    from aihow_infra.libvirt.connection import connect
    from aihow_infra.libvirt.inspect import host_addresses, missing_bridge

    joining = [plan for plan in plans if plan.forward_mode == "bridge"]
    if not joining:
        return
    with connect(uri) as conn:
        problems = [p for plan in joining
                    for p in bridge_problems(plan, missing_bridge(conn, plan.bridge), host_addresses(conn, plan.bridge),
                                             host_words(plan, uri))]
    _refuse(problems, file)



def check_hosts(plans: list[ClusterPlan], file: str | Path) -> None:
    """``ConfigError`` naming each host a cluster or a node is placed on (``host``: a name under
    ``hosts``) that cannot be reached, and each that reaches the same machine as another name (its
    GPU leases and networks would be counted twice), with their lines."""
    from aihow_infra.libvirt.identity import host_identity

    problems: list[str] = []
    seen: dict[str, str] = {}  # host identity -> the first host name reaching it
    placed = {(plan.host, plan.host_uri) for plan in plans} | {(vm.host, vm.host_uri) for p in plans for vm in p.vms}
    for host, uri in sorted((h, u) for h, u in placed if h is not None and u is not None):
        try:
            identity = host_identity(uri)
        except AihowError as exc:
            problems.append(f"hosts.{host}.uri: {uri!r} cannot be reached ({exc}); allowed: a host whose libvirt "
                            "daemon answers (see `virsh -c URI version`)")
            continue
        if identity in seen:
            problems.append(f"hosts.{host}.uri: {uri!r} reaches the same machine as hosts.{seen[identity]} "
                            f"({identity}); allowed: one name per host")
        seen.setdefault(identity, host)
    _refuse(problems, file)


def check_devices_through_libvirt(plans: list[ClusterPlan], uri: str, file: str | Path) -> None:
    """``ConfigError`` naming each passthrough device of ``plans``' VMs that the libvirt host of
    ``uri`` does not have as configured: no PCI function at that address, other vendor or device
    ids, another IOMMU group than the file says, or none (its IOMMU off). For a host that is not
    this machine, whose sysfs ``check_host`` cannot read: libvirt's node-device API answers."""
    from aihow_infra.libvirt.connection import connect
    from aihow_infra.libvirt.inspect import pci_function

    problems = []
    with connect(uri) as conn:
        for plan in plans:
            for vm in plan.vms:
                where = f"host {vm.host!r} ({uri})" if vm.host else f"the host at {uri}"
                for i, device in enumerate(vm.devices):
                    key, address = f"{vm.key_path}.pcie_passthrough.devices[{i}]", device.pci_address
                    found = pci_function(conn, address)
                    if found is None:
                        problems.append(f"{key}.pci_address: '{address}' is not a PCI function of {where}; allowed: "
                                        f"an address `virsh -c {uri} nodedev-list --cap pci` lists")
                        continue
                    problems += [f"{key}.{label}: '{wanted}', but the device at {address} on {where} has '{has}'; "
                                 f"allowed: '{has}'"
                                 for label, wanted, has in (("vendor_id", device.vendor_id, found.vendor_id),
                                                            ("device_id", device.device_id, found.device_id))
                                 if wanted and wanted != has]
                    if found.iommu_group is None:
                        problems.append(f"{key}.pci_address: '{address}' on {where} is in no IOMMU group (the "
                                        "host's IOMMU is off); allowed: a host with its IOMMU on (intel_iommu=on "
                                        "or amd_iommu=on)")
                    elif device.iommu_group is not None and device.iommu_group != found.iommu_group:
                        problems.append(f"{key}.iommu_group: {device.iommu_group}, but the device at {address} on "
                                        f"{where} is in group {found.iommu_group}; allowed: {found.iommu_group}")
    _refuse(problems, file)


def check_subnets(plans: list[ClusterPlan], uri: str, file: str | Path) -> None:
    """``ConfigError`` naming each cluster subnet the host already uses (before anything is made),
    with its line in the cluster ``file``."""
    problems = subnet_collisions(plans, subnets_in_use(uri))
    _refuse(problems, file)


def checks_on_hosts(plans: list[ClusterPlan], default_uri: str, virt_type: str, file: str | Path,
                    bridges: bool = True) -> list[Callable[[], None]]:
    """The checks of ``plans`` on each host they run on (``default_uri`` for what the file places
    on no host), each with the VMs there, in order: subnets, bridges (unless ``bridges`` is
    false), virtio-fs share folders and hugepages (this machine's files and /proc) or the devices
    (another host's, through its libvirt), the resume timeout under the virt type ``virt_type``
    resolves to there."""
    from aihow_infra.libvirt.connection import connect, resolve_virt_type
    from aihow_infra.placement import by_host

    checks: list[Callable[[], None]] = []
    for uri, on_host in by_host(plans, default_uri).items():
        with connect(uri) as conn:
            choice = resolve_virt_type(conn, virt_type)
        checks += [partial(check_subnets, on_host, uri, file),
                   *([partial(check_bridges, on_host, uri, file)] if bridges else []),
                   *([partial(check_shares, on_host, file), partial(check_hugepages, on_host, file)] if runs_here(uri)
                     else [partial(check_devices_through_libvirt, on_host, uri, file)]),
                   *([partial(check_resume_timeout, on_host, choice.virt_type, file)] if choice else [])]
    return checks


def check_all(checks: Sequence[Callable[[], None]]) -> None:
    """Run every host check of a cluster file; one ``ConfigError`` with all their problems (each
    with its line), not only the first kind's, in the file's order (a problem with no line last)."""
    found: list[ConfigError] = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            found.append(exc)
    if found:
        located = sorted(((p, line) for e in found for p, line in zip(e.problems, e.lines, strict=True)),
                         key=lambda pair: (pair[1] is None, pair[1] or 0))
        raise ConfigError([p for p, _line in located], found[0].source, [line for _p, line in located],
                          found[0].file)


def _refuse(problems: list[str], file: str | Path) -> None:
    """``ConfigError`` for ``problems`` (none: nothing), each with its line in the cluster ``file``."""
    if problems:
        try:
            lines = key_lines(Path(file).read_text(encoding="utf-8"))
        except OSError:
            lines = {}
        raise ConfigError(problems, f"cluster file {file}", [line_of(p, lines) for p in problems], str(file))


def sysfs_root(value: str) -> Path:
    """The folder ``--sysfs-root`` names; ``AihowError`` for a file or a missing path."""
    path = Path(value)
    if not path.exists():
        raise AihowError(f"--sysfs-root: {value} does not exist; allowed: a folder laid out as /sys and /proc")
    if not path.is_dir():
        raise AihowError(f"--sysfs-root: {value} is a file; allowed: a folder laid out as /sys and /proc "
                         "(a recorded host's JSON is --recorded FILE)")
    return path

"""Powering libvirt domains on and off, shared by the domain provider and the tasks."""

from __future__ import annotations

import contextlib
import time

import libvirt

from aihow_infra.errors import LibvirtError
from aihow_infra.interrupts import RUNS
from aihow_infra.libvirt.connection import call, translate

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

# The state of a domain that does not exist.
UNDEFINED = "undefined"
# States in which a domain holds its devices (and so its GPU leases).
LIVE_STATES = frozenset({"running", "paused", "blocked", "shutdown"})


def is_live(state: str) -> bool:
    """True for a state in which the domain still holds its devices."""
    return state in LIVE_STATES


def state_name(dom: libvirt.virDomain) -> str:
    """libvirt's state of a domain as a word (``running``, ``shutoff``, ...)."""
    state, _reason = dom.state()
    return STATE_NAMES.get(state, "unknown")


def stop_domain(dom: libvirt.virDomain, timeout: float) -> None:
    """Ask the guest agent to shut down (else ACPI), wait up to ``timeout`` seconds, then power off."""
    name = dom.name()
    if not dom.isActive():
        return
    if timeout <= 0:
        _power_off(dom, name)
        return
    try:
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    except libvirt.libvirtError:  # no agent (a VM with nothing to boot, or not up yet)
        with contextlib.suppress(libvirt.libvirtError):
            dom.shutdown()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not dom.isActive():
                return
        except libvirt.libvirtError:
            return
        RUNS.pause(0.25, f"shutting down {name}")
    _power_off(dom, name)


def _power_off(dom: libvirt.virDomain, name: str) -> None:
    """Power off; a domain that is off or gone meanwhile (another process was faster) is fine."""
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        try:
            active = dom.isActive()
        except libvirt.libvirtError:
            return  # undefined meanwhile
        if active:
            raise LibvirtError(f"powering off domain {name}: {exc.get_error_message()}") from None


def start_domain(dom: libvirt.virDomain) -> None:
    """Start a defined domain; a domain already running is left as it is. (The GPU leases of a
    VM that did not start are released by the one that took them: providers/domain.py.)"""
    if dom.isActive():
        return
    call(f"starting domain {dom.name()}", dom.create)


_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def undefine(dom: libvirt.virDomain, name: str) -> None:
    """Undefine with everything libvirt keeps beside a definition (managed save, snapshot and
    checkpoint metadata, NVRAM); a libvirt too old for a flag gets a plain undefine, any
    other failure is reported as it is."""
    try:
        dom.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise translate(exc, f"undefining domain {name}") from None
        call(f"undefining domain {name}", dom.undefine)

"""Talking to a guest through its qemu guest agent: no IP traffic from the host at all.

A VM is *ready* when its agent answers and cloud-init has finished without error
(``/run/cloud-init/result.json`` exists and lists no errors). The addresses are the ones
the agent reports, not DHCP leases (which an isolated, statically addressed VM has none of).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from aihow_infra.errors import GuestError
from aihow_infra.interrupts import RUNS
from aihow_infra.steps import Progress

RESULT_FILE = "/run/cloud-init/result.json"
CONSOLE_LOG_DIR = Path("/var/log/libvirt/qemu")
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class GuestState:
    """What the agent says of a guest."""

    agent: bool
    cloud_init: str  # 'none' (no agent), 'running', 'done' or 'error'
    errors: tuple[str, ...] = ()
    addresses: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Agent answers and cloud-init is done without error."""
        return self.agent and self.cloud_init == "done"


def console_log_path(vm_name: str) -> Path:
    """Where virtlogd keeps a VM's serial console (the domain XML points its serial port here)."""
    return CONSOLE_LOG_DIR / f"{vm_name}-console.log"


def agent_command(dom: libvirt.virDomain, execute: str, timeout: int = 5, **arguments: Any) -> Any:
    """Run one guest-agent command and return its ``return`` value; ``libvirtError`` when the
    agent is not there or the command fails."""
    command: dict[str, Any] = {"execute": execute}
    if arguments:
        command["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), timeout, 0)
    return json.loads(reply).get("return")


@dataclass(frozen=True)
class Ran:
    """A command run in a guest."""

    code: int
    out: str
    err: str


def run(dom: libvirt.virDomain, argv: list[str], timeout: float = 120) -> Ran:
    """Run a command in the guest through its agent and wait for it; ``GuestError`` when the
    agent cannot run it or it does not finish in time."""
    try:
        pid = agent_command(dom, "guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})["pid"]
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            status = agent_command(dom, "guest-exec-status", pid=pid)
            if status.get("exited"):
                out, err = (base64.b64decode(status.get(key, "")).decode(errors="replace")
                            for key in ("out-data", "err-data"))
                return Ran(int(status.get("exitcode", -1)), out, err)
            # Most commands end within a fraction of a second: poll often at first, then less.
            time.sleep(min(0.3, max(0.01, (time.monotonic() - began) / 10)))
    except libvirt.libvirtError as exc:
        raise GuestError(f"VM {dom.name()}: cannot run {argv[0]} through the guest agent "
                         f"({exc.get_error_message()})") from None
    raise GuestError(f"VM {dom.name()}: {' '.join(argv)} did not finish within {timeout:.0f} s")


def read_file(dom: libvirt.virDomain, path: str) -> str | None:
    """A small file of the guest (up to 1 MiB), or None when it does not exist."""
    try:
        handle = agent_command(dom, "guest-file-open", path=path, mode="r")
    except libvirt.libvirtError:
        return None
    try:
        chunk = agent_command(dom, "guest-file-read", handle=handle, count=1 << 20)
        return base64.b64decode(chunk.get("buf-b64", "")).decode(errors="replace")
    finally:
        agent_command(dom, "guest-file-close", handle=handle)


def silence(dom: libvirt.virDomain, deployed_marker: str, service: str) -> str:
    """Why a running head node's ``service`` gave no answer, in status's words: ``not deployed``
    (``deployed_marker``, a file a deploy leaves, is not there), ``deployed, SERVICE not answering
    (guest load L)`` with the guest's 1-minute load average, or that its guest agent is silent."""
    try:
        ran = run(dom, ["/bin/sh", "-c", f"test -e {deployed_marker} && cut -d' ' -f1 /proc/loadavg"], timeout=30)
    except GuestError:
        return "no answer from the guest agent"
    if ran.code != 0:
        return "not deployed"
    return f"deployed, {service} not answering (guest load {ran.out.strip()})"


def addresses(dom: libvirt.virDomain) -> dict[str, list[str]]:
    """IPv4 addresses by interface, as the agent reports them (loopback left out)."""
    try:
        found = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
    except libvirt.libvirtError:
        return {}
    return {name: [a["addr"] for a in iface.get("addrs") or [] if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4]
            for name, iface in found.items() if name != "lo"}


def probe(dom: libvirt.virDomain) -> GuestState:
    """The guest's state now, without waiting."""
    try:
        if not dom.isActive():
            return GuestState(agent=False, cloud_init="none")
        agent_command(dom, "guest-ping", timeout=2)
    except libvirt.libvirtError:
        return GuestState(agent=False, cloud_init="none")
    text = read_file(dom, RESULT_FILE)
    if text is None:
        return GuestState(agent=True, cloud_init="running")
    try:
        errors = tuple(str(e) for e in json.loads(text).get("v1", {}).get("errors") or ())
    except ValueError:
        errors = (f"{RESULT_FILE} is not JSON",)
    return GuestState(agent=True, cloud_init="error" if errors else "done", errors=errors, addresses=addresses(dom))


def console_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a console log, joined on one line ('' when there is none)."""
    try:
        text = path.read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.replace("\r", "").splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def wait_ready(dom: libvirt.virDomain, timeout: float, console_log: Path | None = None,
               progress: Progress | None = None) -> GuestState:
    """Wait until the guest is ready; ``GuestError`` naming the VM, what is missing and the
    console's last lines when it is not within ``timeout`` seconds (or cloud-init failed)."""
    name = dom.name()
    say = progress or (lambda _msg: None)
    deadline = time.monotonic() + timeout
    state = GuestState(agent=False, cloud_init="none")
    said_agent = False
    while time.monotonic() < deadline:
        state = probe(dom)
        if state.ready:
            return state
        if state.cloud_init == "error":
            break
        if not dom.isActive():
            state = GuestState(agent=False, cloud_init="none", errors=("the VM shut down",))
            break
        if state.agent and not said_agent:
            say(f"{name}: guest agent answers; waiting for cloud-init")
            said_agent = True
        RUNS.pause(POLL_SECONDS, f"waiting for {name} to be ready")
    if state.errors:
        why = f"cloud-init failed: {'; '.join(state.errors)}"
    elif state.agent:
        why = f"cloud-init did not finish within {timeout:.0f} s"
    else:
        why = f"its guest agent did not answer within {timeout:.0f} s"
    tail = console_tail(console_log) if console_log else ""
    raise GuestError(f"VM {name} is not ready: {why}" + (f"; console: {tail}" if tail else ""))

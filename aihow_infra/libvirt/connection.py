"""Opening libvirt connections and turning libvirt errors into the project's own.

This is the one place that knows libvirt's error codes. Providers open a
connection inside each method (a provider object is pickled into Pulumi's
state, so it must hold no connection) through ``connect``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import libvirt

from aihow_infra.errors import LibvirtError, NotFoundError
from aihow_infra.host import Host, VirtChoice, choose_virt_type
from aihow_infra.libvirt_names import runs_here

T = TypeVar("T")

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_NETWORK,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_NODE_DEVICE,
}

# libvirt's own refusal to give a host device to a second running domain.
_DEVICE_IN_USE = re.compile(r"PCI device (\S+) is in use by driver \w+, domain (\S+)")

# libvirt prints every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def translate(exc: libvirt.libvirtError, doing: str) -> LibvirtError:
    """The project's exception for a libvirt error, with what we were doing."""
    text = exc.get_error_message() or str(exc)
    message = f"{doing}: {text}"
    if held := _DEVICE_IN_USE.search(text):
        # Only when the lease ledger was bypassed: a VM started outside the project, or a ledger moved away.
        address, holder = held.groups()
        message = (f"{doing}: PCI device {address} is in use by the running VM {holder}, which the GPU lease "
                   f"ledger has no record of (started outside the project?); stop {holder} first "
                   f"(libvirt: {text})")
    if exc.get_error_code() in _NOT_FOUND:
        return NotFoundError(message)
    return LibvirtError(message)


# libvirt frees the test driver's in-memory objects when its last connection closes;
# one connection kept per process lets them live as long as the (provider) process.
_TEST_DRIVER_KEEPALIVE: dict[str, libvirt.virConnect] = {}


# A remote host that stops answering (its network cut, the machine gone) must fail the call
# waiting on it, not hang it for TCP's quarter of an hour: libvirt's keepalive probes the
# connection every KEEPALIVE_INTERVAL seconds and closes it after KEEPALIVE_COUNT unanswered (which
# needs an event loop running in the process), and the connect itself waits CONNECT_TIMEOUT at most.
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3
CONNECT_TIMEOUT = 30.0


@functools.cache
def _event_loop() -> None:
    """libvirt's default event loop, run by a thread of its own for the life of the process."""
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()


def _open_remote(uri: str) -> libvirt.virConnect:
    """Open a connection to another machine's libvirtd, within ``CONNECT_TIMEOUT``, with keepalive."""
    _event_loop()
    done: dict[str, object] = {}
    lock = threading.Lock()

    def attempt() -> None:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            done["error"] = exc
            return
        with lock:
            if "abandoned" in done:  # the caller gave up meanwhile
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                return
            done["conn"] = conn

    worker = threading.Thread(target=attempt, name=f"libvirt-connect {uri}", daemon=True)
    worker.start()
    worker.join(CONNECT_TIMEOUT)
    with lock:
        if "conn" not in done and "error" not in done:
            done["abandoned"] = True
            raise LibvirtError(f"connecting to libvirt at {uri}: no answer within {CONNECT_TIMEOUT:.0f} s; allowed: a "
                               "host whose libvirtd answers (is it up, and its network?)")
    if "error" in done:
        raise done["error"]  # type: ignore[misc]
    conn = done["conn"]
    assert isinstance(conn, libvirt.virConnect)
    conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    return conn


@contextlib.contextmanager
def connect(uri: str) -> Iterator[libvirt.virConnect]:
    """A read-write connection to ``uri``, closed on exit; errors become ``LibvirtError``. One to
    another machine gives up after ``CONNECT_TIMEOUT`` and fails a call the host stops answering
    within about ``KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1)`` seconds."""
    try:
        if uri.startswith("test:") and uri not in _TEST_DRIVER_KEEPALIVE:
            _TEST_DRIVER_KEEPALIVE[uri] = libvirt.open(uri)
        conn = libvirt.open(uri) if runs_here(uri) else _open_remote(uri)
    except libvirt.libvirtError as exc:
        raise translate(exc, f"connecting to libvirt at {uri}") from None
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def call(doing: str, fn: Callable[..., T], *args: object) -> T:
    """Run a libvirt call, translating its error."""
    try:
        return fn(*args)
    except libvirt.libvirtError as exc:
        raise translate(exc, doing) from None


def lookup(doing: str, fn: Callable[[str], T], name: str) -> T | None:
    """Look an object up by name; ``None`` when it does not exist."""
    try:
        return fn(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in _NOT_FOUND:
            return None
        raise translate(exc, doing) from None


def discard(obj: libvirt.virNetwork | libvirt.virStoragePool) -> None:
    """Stop (when active) and undefine a network or pool, ignoring errors: the undo of a
    create that failed half-way, where the original error is the one to report."""
    with contextlib.suppress(libvirt.libvirtError):
        if obj.isActive():
            obj.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        obj.undefine()


def remove_pool(pool: libvirt.virStoragePool) -> None:
    """Stop a pool, remove its folder when empty (files we did not make stay), undefine it."""
    name = pool.name()
    if pool.isActive():
        call(f"stopping pool {name}", pool.destroy)
    with contextlib.suppress(libvirt.libvirtError):
        pool.delete(0)
    call(f"undefining pool {name}", pool.undefine)


def kvm_usable(conn: libvirt.virConnect) -> bool:
    """True when libvirt reports KVM acceleration usable on this host."""
    if conn.getType() != "QEMU":
        return False
    try:
        conn.getDomainCapabilities(None, None, None, "kvm", 0)
    except libvirt.libvirtError:
        return False
    return True


def resolve_virt_type(conn: libvirt.virConnect, wanted: str) -> VirtChoice | None:
    """The acceleration for ``aihow:virtType`` (None on libvirt's test driver). The host's
    modules are read only when libvirt runs on this host."""
    if conn.getType() != "QEMU":
        return None
    local = urlparse(conn.getURI()).hostname in (None, "", "localhost")
    host = Host(Path("/") if local else Path("/nonexistent"))
    return choose_virt_type(wanted, host, kvm_usable(conn))

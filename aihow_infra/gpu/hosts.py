"""Which host's GPU leases a stack takes: in a ledger several hosts share (a database), each
libvirt host has its own, keyed by its identity (libvirt/identity.py), so two URIs naming one
host (``qemu:///system`` on it, ``qemu+ssh://it/system`` elsewhere) share leases and one PCI
address on two hosts is two GPUs."""

from __future__ import annotations

from aihow_infra.database import is_database_url
from aihow_infra.gpu.ledger import for_host
from aihow_infra.libvirt.identity import host_identity


def host_ledger(ledger_path: str, uri: str) -> str:
    """Where the GPU leases of the host at ``uri`` are, in the ledger ``ledger_path`` (a stack's
    ``aihow:ledgerPath``): a database ledger's row for that host, or the file itself (a file
    serves one host, and libvirt is not asked). ``LibvirtError`` when a database ledger's host
    cannot be reached."""
    return for_host(ledger_path, host_identity(uri)) if is_database_url(ledger_path) else ledger_path

"""What libvirt names that the cluster file, the dynamic providers and the host checks share:
connection URIs (https://libvirt.org/uri.html: one spelling per daemon, and whether a daemon runs
on this machine) and a network's forward modes (https://libvirt.org/formatnetwork.html). Plain
rules below the cluster file's models, so the providers' process does not load those."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

# The forward modes the project makes networks with (libvirt has more: route, open, hostdev...).
ForwardMode = Literal["nat", "isolated", "bridge"]


def canonical_uri(uri: str) -> str:
    """One spelling per libvirt daemon: ``qemu+unix:///system`` is ``qemu:///system`` (a
    different spelling must not replace anything)."""
    scheme, sep, rest = uri.partition("://")
    driver, _plus, transport = scheme.partition("+")
    if sep and transport == "unix" and rest.startswith("/"):
        return f"{driver}://{rest}"
    return uri


def runs_here(uri: str) -> bool:
    """Whether the libvirt daemon of ``uri`` runs on this machine: the URI names no host (or
    ``localhost``), so the files and /sys this process reads are that host's."""
    return urlsplit(uri).hostname in (None, "", "localhost")

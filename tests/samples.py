"""A small valid cluster file with both clusters, for tests that change one thing of it."""

from __future__ import annotations

from typing import Any


def base() -> dict[str, Any]:
    """A small valid file with both clusters; each bad case changes one thing."""
    return {
        "version": "1.0",
        "metadata": {"name": "t", "description": "d"},
        "clusters": {
            "hpc": {
                "name": "hpc",
                "network": {"subnet": "10.1.0.0/24", "bridge": "br-hpc"},
                "controller": {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip_address": "10.1.0.10"},
                "compute_nodes": [
                    {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip": "10.1.0.11",
                     "pcie_passthrough": {"enabled": True, "devices": [
                         {"pci_address": "0000:01:00.0", "device_type": "gpu", "vendor_id": "10de",
                          "device_id": "2805"},
                         {"pci_address": "0000:01:00.1", "device_type": "audio"}]}},
                ],
            },
            "cloud": {
                "name": "cloud",
                "network": {"subnet": "10.2.0.0/24", "bridge": "br-cloud"},
                "control_plane": {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip_address": "10.2.0.10"},
                "worker_nodes": [
                    {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip": "10.2.0.11"},
                    {"cpu_cores": 2, "memory_gb": 2, "disk_gb": 10, "ip": "10.2.0.12", "auto_start": False,
                     "pcie_passthrough": {"enabled": True, "devices": [
                         {"pci_address": "0000:01:00.0", "device_type": "gpu"}]}},
                ],
            },
        },
    }

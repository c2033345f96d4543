"""Ansible inventory plugin: the hosts and groups of an ai-how stack, read live from its outputs.

    # inventory/hpc.yml
    plugin: aihow_stack
    stack: hpc

Nothing is copied: every run asks the stack (and libvirt, for which VMs run) anew.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin

DOCUMENTATION = r"""
name: aihow_stack
short_description: the VMs of an ai-how stack (hpc or cloud), from its Pulumi outputs
description:
  - Groups follow SLURM (hpc) or Kubespray (cloud); only running VMs are in the play groups,
    the others are in C(stopped) with their state.
options:
  plugin:
    description: the name of this plugin
    required: true
    choices: [aihow_stack]
  stack:
    description: the stack, hpc or cloud
    required: true
    choices: [hpc, cloud]
"""


class InventoryModule(BaseInventoryPlugin):  # type: ignore[misc]
    """Reads ``inventory/<stack>.yml`` files naming this plugin."""

    NAME = "aihow_stack"

    def verify_file(self, path: str) -> bool:
        """Only YAML files (the plugin option inside says whether they are ours)."""
        return bool(super().verify_file(path) and path.endswith((".yml", ".yaml")))

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        """Fill the inventory from the stack's outputs."""
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        from aihow_infra.errors import AihowError
        from aihow_infra.ops import Operator

        try:
            data = Operator().inventory(self.get_option("stack"))
        except AihowError as exc:
            raise AnsibleParserError(str(exc)) from None
        self._add_group("all", data["all"])

    def _add_group(self, name: str, body: dict[str, Any]) -> None:
        if name != "all":
            self.inventory.add_group(name)
        for key, value in (body.get("vars") or {}).items():
            self.inventory.set_variable(name, key, value)
        for host, host_vars in (body.get("hosts") or {}).items():
            self.inventory.add_host(host, group=name)
            for key, value in (host_vars or {}).items():
                self.inventory.set_variable(host, key, value)
        for child, child_body in (body.get("children") or {}).items():
            self._add_group(child, child_body or {})
            if name != "all":
                self.inventory.add_child(name, child)

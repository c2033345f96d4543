"""Ansible: a stack's inventory, and its deploys (the project's playbook or the operator's),
recorded so that ``system.up`` deploys only what changed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from aihow_infra.deploy import DeployResult, fingerprint, project_playbook, run_playbook
from aihow_infra.errors import AihowError
from aihow_infra.inventory import Access, build_inventory, to_yaml
from aihow_infra.ops.converge import Converging


class Deploying(Converging):
    """Inventories and deploys."""

    def inventory(self, stack: str) -> dict[str, Any]:
        """The stack's Ansible inventory: its outputs, its VMs' live states, and the access its
        ``aihow:ansibleConnection`` names."""
        view = self.view(stack)
        key = self.login(view).private_path
        access = Access(view.settings.ansible_connection, view.settings.libvirt_uri, str(key) if key else None)
        return build_inventory(self.workspace.outputs(stack), stack, access, self.live_states(view),
                               str(self.kube_pki_path(stack)))

    def deploy(self, stack: str, limit: str | None = None, playbook: Path | None = None,
               inventory: dict[str, Any] | None = None) -> DeployResult:
        """Run the stack's playbook (the project's ``ansible/<kind>.yml`` or ``playbook``) on its
        running VMs; a full run of the project's playbook is recorded for ``system.up``."""
        key = self.view(stack).plan.key
        own = project_playbook(key)
        book = playbook or own
        if book is None:
            raise AihowError(f"stack {stack} has no project playbook (ansible/{key}.yml) yet; "
                             "allowed: --playbook FILE (e.g. Kubespray's cluster.yml)")
        inventory = inventory or self.inventory(stack)
        self.progress(f"deploying {stack}: {book.name}" + (f" on {limit}" if limit else ""))
        kubeconfig = self.kubeconfig_path(stack)
        kubeconfig.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # before the fetch writes into it
        env = {**self.workspace.env(), "AIHOW_PROJECT_DIR": str(self.workspace.project_dir),
               "AIHOW_KUBECONFIG": str(kubeconfig)}
        # The inventory just computed, as a file: the live inventory plugin would compute it again
        # inside ansible-playbook (the stack's outputs from the engine, libvirt's states), seconds
        # of a deploy with nothing to change.
        with tempfile.TemporaryDirectory(prefix="aihow-inventory-") as tmp:
            static = Path(tmp) / f"{stack}.yml"
            static.write_text(to_yaml(inventory))
            try:
                result = run_playbook(book, stack, env, limit, self.progress, inventory=static)
            finally:
                if kubeconfig.exists():
                    kubeconfig.chmod(0o600)
        if book == own and limit is None:
            self.deploys.save(stack, fingerprint(inventory, book), result)
        self.progress(f"{stack} deployed in {result.seconds:.0f} s, {result.changed} change(s)")
        return result

    def deploy_if_changed(self, stack: str) -> DeployResult | None:
        """Deploy when anything the project's playbook depends on changed since the last deploy.
        A stack with a VM that boots no project image (a blank disk, or an image of the operator's
        own) is left to ``aihow deploy``: there may be nothing there to configure."""
        view = self.view(stack)
        book = project_playbook(view.plan.key)
        if book is None:
            return None
        unknown = [vm.name for vm in view.plan.vms if not vm.waits_ready]
        if unknown:
            self.progress(f"{stack}: not deployed ({', '.join(unknown)} boot no project image); "
                          f"run `aihow deploy --stack {stack}` when they are ready for it")
            return None
        inventory = self.inventory(stack)
        if self.deploys.last(stack) == fingerprint(inventory, book):
            self.progress(f"{stack}: nothing changed since the last deploy")
            return None
        return self.deploy(stack, inventory=inventory)

    def deploy_due(self, stack: str) -> bool:
        """Whether the stack was deployed and what its project playbook uses changed since (an
        address, a node added or started): ``up`` changes the VMs only, and SLURM or Kubernetes
        go on with what they were told until a deploy."""
        book = project_playbook(self.view(stack).plan.key)
        last = self.deploys.last(stack)
        return book is not None and last is not None and last != fingerprint(self.inventory(stack), book)

    def kubeconfig_path(self, stack: str) -> Path:
        """Where a deploy of a Kubernetes stack leaves its admin kubeconfig (0600, git-ignored)."""
        return self.state.kubeconfig(stack)

    def kube_pki_path(self, stack: str) -> Path:
        """Where a Kubernetes stack's certificates and kubeconfigs are kept (0700; kubepki.py)."""
        return self.state.kube_pki(stack)

"""Access to the guests (ssh_config, the serial console, kubectl on the control plane, what runs
on a node), and the whole Operator: every part of ops/ in one typed object the tasks get."""

from __future__ import annotations

from pathlib import Path

from aihow_infra.errors import AihowError, GuestError
from aihow_infra.gpu.ledger import holder_for
from aihow_infra.kinds import cloud, hpc, kind_of
from aihow_infra.ops.project import ledger_of
from aihow_infra.ops.status import Status


class Operator(Status):
    """The operations behind ``tasks.py``; each raises an ``AihowError`` with one clear line."""

    def ssh_config(self) -> str:
        """An ssh_config for every VM that boots and has an address (``ssh -F FILE <vm>``)."""
        blocks = []
        for view in self.views():
            key = self.login(view)
            for vm in view.plan.vms:
                if not (vm.boots and vm.ip):
                    continue
                lines = [f"Host {vm.name}", f"  HostName {vm.ip}", f"  User {view.settings.login_user}",
                         "  StrictHostKeyChecking accept-new",
                         f"  UserKnownHostsFile {self.state.ssh / 'known_hosts'}"]
                if key.private_path:
                    lines += [f"  IdentityFile {key.private_path}", "  IdentitiesOnly yes"]
                blocks.append("\n".join(lines))
        return "\n\n".join(blocks) + "\n" if blocks else ""

    def write_ssh_config(self) -> Path:
        """``ssh_config`` into the project's state (git-ignored), for ``vm.ssh``."""
        path = self.state.ssh / "config"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(self.ssh_config())
        return path

    def console_command(self, name: str) -> list[str]:
        """The command that attaches to a VM's serial console (leave it with Ctrl-]) ."""
        view, vm = self.find_vm(name)
        return ["virsh", "-c", view.uri_of(vm), "console", name]

    def kubectl(self, stack: str, args: list[str]) -> tuple[int, str, str]:
        """``kubectl ARGS`` on the stack's control plane, through its guest agent: the exit code,
        standard output and standard error."""
        view = self.view(stack)
        if kind_of(view.plan.key).software != "Kubernetes":
            raise AihowError(f"stack {stack} runs no Kubernetes; allowed: a stack of a cloud cluster")
        with self.running_head(view) as head:
            if head is None:
                raise AihowError(f"the control plane of {view.plan.name} is not running; "
                                 f"run `aihow system.up` or `aihow up --stack {stack}`")
            ran = cloud.kubectl(head, args, timeout=600)
        return ran.code, ran.out, ran.err

    def gpu_holders(self, name: str) -> list[str]:
        """Who holds the GPUs VM ``name`` takes, other than itself (``<stack>/<vm>``, as the
        ledger records them), in claim order."""
        view, vm = self.find_vm(name)
        ledger, own = ledger_of(view.settings, view.uri_of(vm)), holder_for(view.stack, name)
        holders = [lease.holder for c in vm.claims if (lease := ledger.holder_of(c.address)) is not None]
        return list(dict.fromkeys(h for h in holders if h and h != own))

    def work_on(self, name: str) -> tuple[list[str], str]:
        """What runs on VM ``name`` that stopping it would cut short (SLURM's jobs, Kubernetes'
        pods), and ``""``; or ``[]`` and why that cannot be told (its cluster's head is not running,
        its software does not answer, or the VM is not one of this project's)."""
        try:
            view, _vm = self.find_vm(name)
        except AihowError:
            return [], f"{name} is not a VM of this project's stacks"
        kind = kind_of(view.plan.key)
        with self.running_head(view) as head:
            if head is None:
                return [], f"the {kind.head_role} of {view.plan.name} is not running"
            try:
                return kind.work_on(head, name), ""
            except GuestError as exc:
                return [], str(exc)

    def slurm_power_down(self, name: str) -> None:
        """Ask SLURM to power on-demand compute node ``name`` down once idle (``POWER_DOWN_ASAP``):
        its SuspendProgram then asks the broker to stop the VM."""
        view, _vm = self.find_vm(name)
        with self.running_head(view) as head:
            if head is None:
                raise AihowError(f"the controller of {view.plan.name} is not running; SLURM cannot power {name} down")
            hpc.power_down_when_idle(head, [name])

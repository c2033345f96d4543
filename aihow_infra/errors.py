"""The project's exception tree: every error an operator can see is one of these.

    AihowError
    ├── ConfigError             the cluster file or a stack setting is invalid
    ├── LibvirtError            libvirt refused or failed an operation
    │   └── NotFoundError       the object does not exist
    ├── LeaseError              the GPU lease ledger cannot be read or written
    │   └── LeaseConflictError  another VM holds the GPU
    ├── CustodyError            a device cannot be handed to a VM safely now (held open on the host)
    ├── ImageError              a guest image cannot be built or found
    ├── GuestError              a guest did not become ready
    ├── DeployError             a playbook failed (host, task, message)
    ├── StackError              a pulumi run failed
    ├── StateFileError          a state file (ledger, power records) cannot be written
    └── BusyError               another process holds a lock longer than allowed

Each carries a message that fits on one line and says what to change; tasks print
``str(error)`` and exit non-zero, tracebacks are kept for bugs.
"""

from __future__ import annotations


class AihowError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(AihowError):
    """The cluster file (or a stack setting) is invalid; nothing was created.

    ``problems`` holds one line per mistake, each naming the key path, the bad
    value and what is allowed.
    """

    def __init__(self, problems: list[str], source: str = "cluster file",
                 lines: list[int | None] | None = None, file: str = "") -> None:
        self.problems = problems
        self.source = source
        self.lines = lines or [None] * len(problems)  # each problem's line in ``file``, when known
        self.file = file
        count = len(problems)
        first = f"line {self.lines[0]}: {problems[0]}" if self.lines[0] else problems[0]
        head = first if count == 1 else f"{count} problems; first: {first}"
        super().__init__(f"invalid {source}: {head}")

    def located(self) -> list[str]:
        """Each problem as ``FILE:LINE: problem`` where its line is known (the form editors jump to),
        ``FILE: problem`` where only the file is."""
        return [f"{self.file}:{line}: {p}" if line else f"{self.file}: {p}" if self.file else p
                for p, line in zip(self.problems, self.lines, strict=True)]

    def report(self) -> str:
        """All problems, one per line, for operators who want the whole list."""
        lines = [f"invalid {self.source} ({len(self.problems)} problem(s)):"]
        lines += [f"  - {p}" for p in self.located()]
        return "\n".join(lines)


class LibvirtError(AihowError):
    """libvirt refused or failed an operation (translated in ``aihow_infra.libvirt.connection``)."""


class NotFoundError(LibvirtError):
    """The libvirt object (domain, network, pool, volume) does not exist."""


class LeaseError(AihowError):
    """The GPU lease ledger could not be read or written."""


class LeaseConflictError(LeaseError):
    """A GPU is held by another VM; the message names the holder and how to free it."""


class CustodyError(AihowError):
    """A PCI device cannot be handed to a VM safely now: a host process holds it open, or the
    host still drives a function of its IOMMU group. The message names the device, what was found
    and what to do; the VM was not started."""


class ImageError(AihowError):
    """A guest image could not be built or found."""


class GuestError(AihowError):
    """A guest did not become ready (its agent did not answer, or cloud-init failed); the
    message names the VM and ends with the tail of its console."""


class DeployError(AihowError):
    """An Ansible deploy failed; the message names the host, the task and Ansible's message."""


class StackError(AihowError):
    """A Pulumi operation run by a task failed; the message carries the engine's cause."""


class StateFileError(AihowError):
    """A state file of the project (the lease ledger, the power records) cannot be read or
    written: a full disk, a read-only folder, a corrupt file. Its old content is kept."""


class BusyError(AihowError):
    """Another process holds a lock (a stack, the ledger) for longer than the wait allowed."""

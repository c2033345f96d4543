"""The Operator: what the tasks do, one module per question it answers.

- ``project``: the loaded project (stacks, settings, cluster files, views, records);
- ``converge``: a stack's engine runs (images, the gate, ``pulumi up``, roll back on failure);
- ``ansible``: inventories and deploys;
- ``lifecycle``: VMs and both clusters started, stopped (drained first), restarted, switched;
- ``teardown``: ``destroy`` and the sweep of what a cut run left;
- ``status``: what runs, and how each cluster's software sees it;
- ``access``: ssh_config, consoles, kubectl; and ``Operator``, every part in one typed object.

Each part builds on the one before (``Operator`` is the last), so a reader follows a task from
``tasks.py`` into the one file that answers it. Pulumi stays the record: a VM's desired power
lives in its stack's power records (``aihow_infra.desired``), and every change goes through
``pulumi up`` of that stack under the stack's hold; only a restart, which changes nothing Pulumi
records, talks to libvirt directly.
"""

from aihow_infra.ops.access import Operator
from aihow_infra.ops.converge import planned_changes
from aihow_infra.ops.project import Refused, StackView, refuse_risks

__all__ = ["Operator", "Refused", "StackView", "planned_changes", "refuse_risks"]

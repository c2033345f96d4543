"""Operator tasks (``invoke --list``), one module per namespace under ``aihow_infra/cli/``,
composed here. Thin: parse arguments, call the library, print.

Every task prints one clear line per error and exits non-zero on failure.
"""

from __future__ import annotations

from invoke.collection import Collection

from aihow_infra.cli.broker import broker
from aihow_infra.cli.common import AihowProgram, version
from aihow_infra.cli.dev import test
from aihow_infra.cli.gpu import gpu_forget, gpu_home, gpu_leases, gpu_reclaim
from aihow_infra.cli.images import image_build, kubernetes_build
from aihow_infra.cli.stacks import destroy, preview, stacks, up, validate
from aihow_infra.cli.system import switch, system_destroy, system_down, system_status, system_up
from aihow_infra.cli.views import host_check, host_record, inventory, topology
from aihow_infra.cli.vm import (
    deploy,
    kubectl,
    ssh_config,
    vm_console,
    vm_restart,
    vm_ssh,
    vm_start,
    vm_status,
    vm_stop,
)

vm = Collection("vm")
vm.add_task(vm_start, "start")
vm.add_task(vm_stop, "stop")
vm.add_task(vm_restart, "restart")
vm.add_task(vm_status, "status")
vm.add_task(vm_console, "console")
vm.add_task(vm_ssh, "ssh")
system = Collection("system")
system.add_task(system_up, "up")
system.add_task(system_down, "down")
system.add_task(system_status, "status")
system.add_task(system_destroy, "destroy")
gpu = Collection("gpu")
gpu.add_task(gpu_leases, "leases")
gpu.add_task(gpu_home, "home")
gpu.add_task(gpu_reclaim, "reclaim")
gpu.add_task(gpu_forget, "forget")
host = Collection("host")
host.add_task(host_check, "check")
host.add_task(host_record, "record")
image = Collection("image")
image.add_task(image_build, "build")
kube = Collection("kubernetes")
kube.add_task(kubernetes_build, "build")

ns = Collection(stacks, up, preview, destroy, deploy, kubectl, validate, switch, topology, inventory, ssh_config, test,
                broker, vm, system, gpu, host, image, kube)

# `aihow ARGS` (pyproject's console script): the same tasks, from any folder. The project is the
# checkout this file is in (AIHOW_PROJECT_DIR overrides it), never the current folder.
program = AihowProgram(namespace=ns, name="aihow", binary="aihow", version=version())

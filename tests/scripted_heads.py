"""Stand-ins for the cluster software on the heads, for the power broker in the GPU-host
simulator: a SLURM controller (its power queue, jobs, ``scontrol``, ``squeue``, ``sinfo``) and a
Kubernetes API server (nodes and pods read by ``aihow-kube-get``, ``kubectl drain``), answering the commands
the project sends its heads through their guest agents (``aihow_infra.kinds.hpc`` and
``.cloud``). The simulator's nodes boot nothing (nested emulation), so no slurmctld or API
server can run there; the booted clusters' own software is exercised by test_e2e_main_job.py.

The test plays what the software does on its own: a job submitted for a powered-down node
(slurmctld runs the ResumeProgram, which queues ``resume``), a job starting and ending, the
scheduler placing a pod, a pod ending. What SLURM and Kubernetes do in answer to the project is
done here: ``POWER_DOWN_ASAP`` of an idle node queues its ``suspend`` (its SuspendProgram), a node
marked DOWN has its jobs requeued, a drained Kubernetes node is cordoned and its pods evicted.
Everything else is the project's own: the broker, the lifecycle, the lease ledger, libvirt and
VFIO in the simulator.

The state is one JSON file, changed under a lock by the test and by the broker's process.
``python -m tests.scripted_heads STATE -- ARGS`` runs the project's ``aihow ARGS`` with the heads'
commands answered from STATE (the checkout must be the working folder).
"""

from __future__ import annotations

import fcntl
import json
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aihow_infra.kinds.cloud import KUBE_GET_COMMAND, KUBECTL
from aihow_infra.kinds.hpc import LIST_QUEUE, POWER_QUEUE
from aihow_infra.libvirt.guest import Ran
from tests.samples import pod

State = dict[str, Any]


class ScriptedHeads:
    """The heads' software, kept in the JSON file at ``path``. ``heads`` maps each head's domain
    name to its stack (``hpc``, ``cloud``); ``compute`` names the SLURM nodes ``sinfo`` lists."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path, heads: dict[str, str], compute: list[str]) -> ScriptedHeads:
        """A new state: an empty power queue, no jobs, no pods."""
        path.write_text(json.dumps({
            "heads": heads, "seq": 0, "asked": [],
            "hpc": {"compute": compute, "queue": {}, "queue_reads": 0, "jobs": {}, "down": {}, "power_down_asap": []},
            "cloud": {"nodes": {}, "pods": {}},
        }))
        return cls(path)

    @contextmanager
    def changing(self) -> Iterator[State]:
        """The state, written back when the block ends (one change at a time)."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state: State = json.loads(self.path.read_text())
            yield state
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(self.path)

    def read(self) -> State:
        """The state now."""
        with self.changing() as state:
            return state

    # What the software does on its own (the test's part).

    def submit(self, job: str, node: str) -> None:
        """``sbatch -w NODE`` for a powered-down node: the job waits (CONFIGURING) on it, and
        slurmctld's ResumeProgram queues a ``resume`` of it."""
        with self.changing() as state:
            state["hpc"]["jobs"][job] = {"node": node, "state": "CONFIGURING"}
            _queue(state, "resume", node)

    def job_runs(self, job: str) -> None:
        """slurmd registered: the job runs."""
        with self.changing() as state:
            state["hpc"]["jobs"][job]["state"] = "RUNNING"

    def job_ends(self, job: str) -> None:
        """The job is done; a node asked to power down once idle now is (its SuspendProgram)."""
        with self.changing() as state:
            node = state["hpc"]["jobs"].pop(job)["node"]
            _power_down_idle(state, [node])

    def pod_waits(self, name: str, **spec: Any) -> None:
        """A pod the scheduler cannot place (Pending, Unschedulable)."""
        with self.changing() as state:
            state["cloud"]["pods"][name] = pod(name, **spec)

    def pod_runs(self, name: str, node: str) -> None:
        """The scheduler placed the pod on ``node`` (which has joined) and it runs."""
        with self.changing() as state:
            item = state["cloud"]["pods"][name]
            item["spec"]["nodeName"] = node
            item["status"] = {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}
            state["cloud"]["nodes"].setdefault(node, {"unschedulable": False})

    def pod_ends(self, name: str) -> None:
        """The pod's containers exited 0."""
        with self.changing() as state:
            state["cloud"]["pods"][name]["status"]["phase"] = "Succeeded"

    # What the project asks of the heads (the guest agent's part).

    def run(self, dom: Any, argv: list[str], timeout: float = 120) -> Ran:
        """Answer ``argv`` as the head ``dom`` would; a command these stand-ins do not know
        fails, as an unknown command does."""
        with self.changing() as state:
            stack = state["heads"].get(dom.name())
            state["asked"].append(f"{dom.name()}: {shlex.join(argv)}")
            answer = {"hpc": _slurm, "cloud": _kubernetes}.get(stack)
            if answer is None:
                return Ran(127, "", f"{dom.name()}: no stand-in answers here")
            return answer(state, argv)


def _queue(state: State, action: str, node: str) -> None:
    state["seq"] += 1
    state["hpc"]["queue"][f"{state['seq']:06d}-{action}.req"] = f"{action} {node}"


def _power_down_idle(state: State, nodes: list[str]) -> None:
    """SLURM's ``POWER_DOWN_ASAP``: each asked node with no job left is suspended (its
    SuspendProgram queues ``suspend``); the others when their jobs end."""
    slurm = state["hpc"]
    busy = {job["node"] for job in slurm["jobs"].values()}
    suspending = {text.split()[1] for text in slurm["queue"].values() if text.startswith("suspend ")}
    for node in nodes:
        if node in slurm["power_down_asap"] and node not in busy:
            slurm["power_down_asap"].remove(node)
            if node not in suspending:  # asked again while its suspend waits: one SuspendProgram run
                _queue(state, "suspend", node)


def _options(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a)


def _slurm(state: State, argv: list[str]) -> Ran:
    slurm = state["hpc"]
    if argv == ["/bin/sh", "-c", LIST_QUEUE]:
        slurm["queue_reads"] += 1
        return Ran(0, "".join(f"{ident} {text}\n" for ident, text in sorted(slurm["queue"].items())), "")
    if argv[0] == "/bin/rm" and argv[-1].startswith(f"{POWER_QUEUE}/"):
        slurm["queue"].pop(argv[-1].rsplit("/", 1)[1], None)
        return Ran(0, "", "")
    if argv[:2] == ["/usr/bin/scontrol", "update"]:
        options = _options(argv)
        nodes, word = options["nodename"].split(","), options["state"]
        if word == "down":  # its jobs are requeued, waiting for another node
            slurm["down"] |= dict.fromkeys(nodes, options.get("reason", ""))
            for job in slurm["jobs"].values():
                if job["node"] in nodes:
                    job.update(node=None, state="PENDING")
        elif word == "power_down_asap":
            slurm["power_down_asap"] = sorted(set(slurm["power_down_asap"]) | set(nodes))
            _power_down_idle(state, nodes)
        elif word != "drain":
            return Ran(1, "", f"scontrol: state={word} not known to the stand-in")
        return Ran(0, "", "")
    if argv[:3] == ["/usr/bin/squeue", "-h", "-w"]:
        names = argv[3].split(",")
        return Ran(0, "".join(f"{j}\n" for j, job in slurm["jobs"].items() if job["node"] in names), "")
    if argv[:2] == ["/usr/bin/sinfo", "-h"]:
        return Ran(0, "".join(f"{n} {'down' if n in slurm['down'] else 'idle'}\n" for n in slurm["compute"]), "")
    return Ran(127, "", f"{argv[0]}: not answered by the SLURM stand-in")


def _kubernetes(state: State, argv: list[str]) -> Ran:
    kube = state["cloud"]
    nodes = [{"metadata": {"name": name}, "spec": {"unschedulable": node["unschedulable"]},
              "status": {"conditions": [{"type": "Ready", "status": "True"}]}} for name, node in kube["nodes"].items()]
    if tuple(argv[:4]) == KUBE_GET_COMMAND:  # GETs, answered as the API server would
        bodies = {"/api/v1/nodes": {"kind": "NodeList", "items": nodes}, "/readyz": "ok",
                  "/api/v1/pods": {"kind": "PodList", "items": [
                      {k: v for k, v in p.items() if k != "kind"} for p in kube["pods"].values()]}}
        args, paths = iter(argv[4:]), []
        for arg in args:  # the reader's flags (-kubeconfig FILE, -timeout=D), then its paths
            if arg == "-kubeconfig":
                next(args)
            elif not arg.startswith("-"):
                paths.append(arg)
        answers = [{"path": path, "code": 200 if path in bodies else 404,
                    "body": bodies.get(path, {"kind": "Status", "message": "the server could not find it"})}
                   for path in paths]
        return Ran(0 if all(a["code"] == 200 for a in answers) else 1, json.dumps(answers), "")
    if argv[0] != KUBECTL:
        return Ran(127, "", f"{argv[0]}: not answered by the Kubernetes stand-in")
    args = argv[3:]  # after --kubeconfig FILE
    if args[0] == "drain" and args[1] in kube["nodes"]:  # cordoned, and its pods evicted
        kube["nodes"][args[1]]["unschedulable"] = True
        kube["pods"] = {n: p for n, p in kube["pods"].items() if p["spec"].get("nodeName") != args[1]}
        return Ran(0, f"node/{args[1]} drained\n", "")
    return Ran(1, "", f"kubectl {shlex.join(args)}: not answered by the Kubernetes stand-in")


def answered_by(heads: ScriptedHeads) -> Callable[[], None]:
    """Send the heads' commands of ``aihow_infra.kinds`` to ``heads``; returns the undo."""
    from aihow_infra.kinds import cloud, hpc

    before = {module: vars(module)["run"] for module in (hpc, cloud)}  # each imported guest.run by name
    for module in before:
        vars(module)["run"] = heads.run

    def undo() -> None:
        for module, run in before.items():
            vars(module)["run"] = run

    return undo


def main(argv: list[str]) -> None:
    """``STATE -- ARGS``: the project's ``aihow ARGS``, the heads answered from STATE."""
    split = argv.index("--")
    answered_by(ScriptedHeads(Path(argv[0])))
    from tasks import program

    program.run(["aihow", *argv[split + 1:]])


if __name__ == "__main__":
    main(sys.argv[1:])

"""What every task shares: the consoles, the Operator the tasks get (signals taken over, risky
changes asked about), one clean line per error, and the checks of common options."""

from __future__ import annotations

import difflib
import functools
import re
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from invoke.exceptions import Exit, ParseError
from invoke.parser.context import ParserContext
from invoke.program import Program
from invoke.tasks import Task
from invoke.tasks import task as invoke_task
from rich.console import Console
from rich.markup import escape

from aihow_infra.errors import AihowError, ConfigError

if TYPE_CHECKING:
    from aihow_infra.changes import Risk
    from aihow_infra.ops import Operator

# Wide enough for the tables when output is piped (rich assumes 80 columns then).
# No emoji codes: a value such as "domain:bus:slot" is text, never a picture.
out = Console(emoji=False) if sys.stdout.isatty() else Console(width=160, emoji=False)
err = Console(stderr=True, emoji=False) if sys.stderr.isatty() else Console(stderr=True, width=160, emoji=False)
F = TypeVar("F", bound=Callable[..., Any])
STACK_HELP = "the cluster stack: hpc or cloud"
YES_HELP = "apply changes that delete a disk or replace or restart a VM without asking"


def version() -> str:
    """This package's version, as installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aihow-infra")
    except PackageNotFoundError:
        return "unknown"


def operator(yes: bool = False) -> Operator:
    """The library object behind the tasks (imported late: tasks stay quick to list). A change
    that deletes a disk or replaces or restarts a VM is listed and asked about (``yes``: applied)."""
    from aihow_infra.interrupts import RUNS
    from aihow_infra.ops import Operator, refuse_risks

    def confirm(found: list[Risk]) -> bool:
        err.print("[yellow]These planned changes delete data or interrupt a guest:[/yellow]")
        for risk in found:
            err.print(f"  - {risk}", highlight=False, soft_wrap=True)
        if yes:
            return True
        if not sys.stdin.isatty():
            refuse_risks(found)
        return input("Apply them? [y/N] ").strip().lower() in ("y", "yes")

    # Engines run in sessions of their own, often from worker threads (both stacks at once): the
    # task's main thread takes over SIGINT, SIGTERM and SIGHUP now, so a signal reaches every
    # engine as a clean cancel and none is left running.
    RUNS.install()
    return Operator(progress=lambda msg: err.print(f"[dim]... {msg}[/dim]"), confirm=confirm)


def clean_errors(fn: F) -> F:
    """One red line per error and exit code 1, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            for problem in exc.located():
                err.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
            raise Exit(code=1) from None
        except AihowError as exc:
            # The message quotes the operator's values: printed as they are, never read as markup.
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise Exit(code=1) from None
        except KeyboardInterrupt:
            # Between engine runs (a wait, a build): what ran is recorded, and every task is
            # idempotent, so the same command again goes on from there.
            err.print("[red]interrupted:[/red] no engine was running; the same command again goes on from "
                      "where this one stopped", highlight=False, soft_wrap=True)
            raise Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def task(help: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Task[Any]]:
    """An invoke task whose errors are one clean line (every operator task is one)."""

    def decorate(fn: Callable[..., Any]) -> Task[Any]:
        made: Task[Any] = invoke_task(help=help or {})(clean_errors(fn))
        return made

    return decorate


def _settled(deploy: bool) -> bool:
    """True when every configured stack is as its last successful run left it (and, with
    ``deploy``, deployed since): checked before the library's heavier imports."""
    from aihow_infra.lastrun import LastRuns
    from aihow_infra.stacks import Workspace

    workspace = Workspace()
    stacks = [s for s in ("hpc", "cloud") if (workspace.project_dir / f"Pulumi.{s}.yaml").exists()]
    runs = LastRuns(workspace.project_dir)
    return bool(stacks) and all(not runs.changes(s, workspace.state_stamp(s), settled=deploy) for s in stacks)


def _check_stack(stack: str) -> None:
    if not stack:
        raise AihowError("--stack is missing; allowed: --stack hpc or --stack cloud (`stacks` lists them)")
    if stack not in ("hpc", "cloud"):
        raise AihowError(f"--stack {stack!r} is not a cluster stack; allowed: hpc or cloud")


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise AihowError(f"{question} needs confirmation; pass --yes to run without a terminal")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise Exit("cancelled", code=1)




class AihowProgram(Program):
    """invoke's ``Program``, saying an unknown task or option in the project's words: what is
    allowed, and the nearest name when one is close (``sytem.up`` -> ``system.up``)."""

    def parse_core(self, argv: list[str] | None) -> None:
        """Parse the options before the first task; a ``ParseError`` names the nearest one."""
        try:
            super().parse_core(argv)
        except ParseError as exc:
            raise ParseError(self._explained(str(exc), exc.context), exc.context) from None
        if self.args.config.value is not None:
            # invoke's own -f/--config (a settings file for invoke): before the task it silently
            # took the cluster file meant for the task, and the task ran on the default one.
            raise ParseError(f"error: --config {self.args.config.value} before the task name is not the cluster "
                             "file; allowed: after the task, e.g. `aihow validate --config FILE`")

    def parse_tasks(self) -> None:
        """Parse the task names and their options; a ``ParseError`` names the nearest one."""
        try:
            super().parse_tasks()
        except ParseError as exc:
            raise ParseError(self._explained(str(exc), exc.context), exc.context) from None

    def _explained(self, message: str, context: ParserContext | None) -> str:
        needs = re.fullmatch(r"Flag <Argument: (\S+?)(?: \(\w\))?> needed value and was not given one!", message)
        if needs is not None:
            where = context.name if context is not None and context.name else "aihow"
            return f"error: {where} --{needs.group(1).replace('_', '-')} needs a value"
        if "did not receive required positional arguments" in message:
            name = context.name if context is not None else ""
            return f"error: {message} (`aihow --help {name}` shows them)"
        unknown = re.fullmatch(r"No idea what '(.+)' is!", message)
        if unknown is None:
            return f"error: {message}"
        word = unknown.group(1)
        if word.startswith("-") and context is not None:
            return _unknown_option(word, context)
        # invoke takes an unknown option before a task's positional value for that value, and
        # then finds the next word no task: the option is the mistake.
        contexts = {name: c for c in self.collection.to_contexts() for name in (c.name, *c.aliases)}
        task = None
        for token in (self.argv or [])[1:]:
            if token in contexts:
                task = contexts[token]
            elif token.startswith("--") and task is not None and token.split("=")[0] not in task.flags:
                return _unknown_option(token.split("=")[0], task)
        argv = list(self.argv or [])
        if "kubectl" in argv and "--" not in argv and "kubectl" in contexts:  # its words read as task names
            ours, theirs, words = [], [], iter(argv[argv.index("kubectl") + 1:])
            for token in words:
                if token.split("=")[0] in contexts["kubectl"].flags:  # --stack NAME stays the task's
                    ours += [token] if "=" in token else [token, next(words, "")]
                else:
                    theirs.append(token)
            line = " ".join(shlex.quote(a) for a in ["kubectl", *ours, "--", *theirs])
            return f"error: no task named {word!r}; kubectl's arguments go after --: `aihow {line}`"
        near = difflib.get_close_matches(word, list(self.collection.task_names), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"error: no task named {word!r}{hint} (`aihow --list` lists them)"


def _unknown_option(flag: str, context: ParserContext) -> str:
    """One line: the task has no such option, the nearest one, and those it has."""
    flags = sorted(f for f in context.flags if f.startswith("--"))
    near = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"error: {context.name or 'aihow'} has no option {flag}{hint} (allowed: {', '.join(flags)})"

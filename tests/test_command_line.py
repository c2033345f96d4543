"""The command line itself (`aihow`): a mistyped task or option is one line saying what is allowed, with
the nearest name when one is close."""

from __future__ import annotations

import pytest

from tests.cli import run_task


@pytest.mark.parametrize(("argv", "said"), [
    (["sytem.up"], "error: no task named 'sytem.up'; did you mean system.up? (`aihow --list` lists them)"),
    (["frobnicate"], "error: no task named 'frobnicate' (`aihow --list` lists them)"),
    (["system.up", "--no-deploi"], "error: system.up has no option --no-deploi; did you mean --no-deploy? (allowed: "
                                   "--no-deploy, --yes)"),
    (["gpu.home", "0000:01:00.0", "--too", "host"], "error: gpu.home has no option --too; did you mean --to? "
                                                    "(allowed: --address, --to)"),
    (["--lis"], "error: aihow has no option --lis; did you mean --list? (allowed: --command-timeout, "),
    # invoke takes an option before the positional value for that value: the option is named.
    (["gpu.home", "--too", "host", "0000:01:00.0"], "error: gpu.home has no option --too; did you mean --to? "),
    (["gpu.home", "--foo", "0000:01:00.0"], "error: gpu.home has no option --foo (allowed: --address, --to)"),
    (["gpu.home", "0000:01:00.0", "--to"], "error: gpu.home --to needs a value"),
    (["gpu.home"], "error: 'gpu.home' did not receive required positional arguments: 'address' (`aihow --help "
                   "gpu.home` shows them)"),
    # invoke's own --config before the task once validated the default file instead, and said "valid".
    (["--config", "mine.yaml", "validate"], "error: --config mine.yaml before the task name is not the cluster "
                                            "file; allowed: after the task, e.g. `aihow validate --config FILE`"),
    (["-f", "mine.yaml", "validate"], "error: --config mine.yaml before the task name is not the cluster file"),
    # kubectl's own words without the -- before them read as task names: the line to type instead.
    (["kubectl", "get", "nodes", "-o", "wide"], "error: no task named 'get'; kubectl's arguments go after --: "
                                                "`aihow kubectl -- get nodes -o wide`"),
    (["kubectl", "--stack", "cloud", "get", "pods"], "error: no task named 'get'; kubectl's arguments go after --: "
                                                     "`aihow kubectl --stack cloud -- get pods`"),
    (["broker", "--interval", "0"], "error: --interval: '0' is not a number of seconds; allowed: a number greater "
                                    "than 0"),
    (["broker", "--interval", "abc"], "error: --interval: 'abc' is not a number of seconds"),
    (["broker", "--passes", "-3"], "error: --passes: '-3' is not a whole number of passes; allowed: a number greater "
                                   "than 0"),
])
def test_a_mistyped_task_or_option_names_the_nearest(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                     said: str) -> None:
    code, out, err = run_task(capsys, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(said) and len(err.splitlines()) == 1, err

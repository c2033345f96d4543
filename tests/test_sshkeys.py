"""The login key: the stack's setting, else the operator's key, else the project's own."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from aihow_infra.errors import ConfigError
from aihow_infra.sshkeys import login_key, project_key

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOp1FjS4jC1fvPm2mlJzgK9yDZcD9nlqWxFGvz8Xr5bY op@host"


def test_setting_as_key_text_or_file(tmp_path: Path) -> None:
    assert login_key(KEY, tmp_path / "state", home=tmp_path).public == KEY
    pub = tmp_path / "mine.pub"
    pub.write_text(KEY + "\n")
    (tmp_path / "mine").write_text("private")
    key = login_key(str(pub), tmp_path / "state", home=tmp_path)
    assert (key.public, key.private_path) == (KEY, tmp_path / "mine")


@pytest.mark.parametrize("setting", ["/nonexistent.pub", "not a key"])
def test_bad_setting_is_one_line_naming_the_key(tmp_path: Path, setting: str) -> None:
    with pytest.raises(ConfigError, match=r"aihow:sshPublicKey: .* allowed: "):
        login_key(setting, tmp_path / "state", home=tmp_path)


def test_a_file_without_a_key_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pub"
    empty.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"holds no public key"):
        login_key(str(empty), tmp_path / "state", home=tmp_path)


def test_operator_key_then_project_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    made = login_key(None, tmp_path / "state", home=home)
    assert made.source.startswith("the project's key") and made.public.startswith("ssh-ed25519 ")
    assert made.private_path is not None and stat.S_IMODE(made.private_path.stat().st_mode) == 0o600
    assert made.private_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert project_key(tmp_path / "state") == made  # made once, then reused
    (home / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    assert login_key(None, tmp_path / "state", home=home).public == KEY

"""The login key: the stack's setting, else the operator's key, else the project's own."""

from __future__ import annotations

import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

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


def test_two_programs_asking_at_once_get_one_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """system.up runs both stacks' programs side by side, each asking for the project's key on a
    new machine: one makes it, the other gets the same (two keys made, the last file written won
    and one cluster's guests trusted a key whose private half was gone: seen on 2026-12-04)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    generate = ed25519.Ed25519PrivateKey.generate

    def slow_generate() -> ed25519.Ed25519PrivateKey:
        time.sleep(0.3)  # both callers are past "is there a key?" before either writes one
        return generate()

    monkeypatch.setattr(ed25519.Ed25519PrivateKey, "generate", staticmethod(slow_generate))
    with ThreadPoolExecutor(2) as pool:
        keys = list(pool.map(lambda _n: project_key(tmp_path / "state"), range(2)))
    assert keys[0] == keys[1] == project_key(tmp_path / "state")
    folder = tmp_path / "state" / "ssh"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "id_ed25519", "id_ed25519.pub"]
    private = serialization.load_ssh_private_key((folder / "id_ed25519").read_bytes(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert keys[0].public == public.decode() + " aihow-infra"

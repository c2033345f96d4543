"""The SSH key that logs into guests: the stack's setting, else the operator's own key, else
one the project makes once and keeps private and git-ignored in its state folder."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from aihow_infra.errors import ConfigError

OPERATOR_KEYS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519@", "sk-ecdsa-sha2-")


@dataclass(frozen=True)
class LoginKey:
    """A public key for the seed, and the private key file that goes with it (when known)."""

    public: str
    private_path: Path | None
    source: str


def _valid(text: str) -> bool:
    return text.startswith(KEY_TYPES) and len(text.split()) >= 2


def project_key(state_dir: Path) -> LoginKey:
    """The project's own ed25519 key under ``state_dir/ssh``, made on first use (mode 0600).

    Both stacks' programs may ask at once (``system.up`` runs them side by side): the first makes
    the key under a lock and the other waits and reads it. Each file is written beside its place
    and renamed in, the public half last, so a key found whole is one pair."""
    folder = state_dir / "ssh"
    private, public = folder / "id_ed25519", folder / "id_ed25519.pub"
    if not (private.exists() and public.exists()):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (private.exists() and public.exists()):
                _make_key(private, public)
    return LoginKey(public.read_text().strip(), private, f"the project's key {public}")


def _make_key(private: Path, public: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    text = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for path, content, mode in ((private, pem, 0o600), (public, text + b" aihow-infra\n", 0o644)):
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        scratch.replace(path)


def login_key(setting: str | None, state_dir: Path, home: Path | None = None) -> LoginKey:
    """The key for guests: ``aihow:sshPublicKey`` (a key or a .pub file), else the operator's
    ``~/.ssh/id_*.pub``, else the project's own (``project_key(state_dir)``)."""
    if setting:
        text = setting.strip()
        if not _valid(text):
            path = Path(text).expanduser()
            try:
                text = path.read_text().strip()
            except OSError as exc:
                raise ConfigError([f"aihow:sshPublicKey: {setting!r} is neither a public key nor a readable file "
                                   f"({exc.strerror}); allowed: 'ssh-ed25519 AAAA...' or a path to a .pub file"],
                                  "stack settings") from None
            if not _valid(text):
                raise ConfigError([f"aihow:sshPublicKey: {setting!r} holds no public key; allowed: a file with "
                                   "one line such as 'ssh-ed25519 AAAA... comment'"], "stack settings")
            private = path.with_suffix("") if path.suffix == ".pub" else None
            return LoginKey(text, private if private and private.exists() else None, f"aihow:sshPublicKey ({path})")
        return LoginKey(text, None, "aihow:sshPublicKey")
    ssh_dir = (home or Path.home()) / ".ssh"
    for name in OPERATOR_KEYS:
        path = ssh_dir / name
        if path.is_file() and _valid(text := path.read_text().strip()):
            private = path.with_suffix("")
            return LoginKey(text, private if private.exists() else None, f"the operator's key {path}")
    return project_key(state_dir)

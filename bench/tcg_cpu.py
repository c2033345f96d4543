"""What the guest CPU model changes for a Kubernetes control plane under software emulation (TCG).

    .venv/bin/python bench/tcg_cpu.py        # needs Go and qemu-user (apt-get install qemu-user)

The control plane spends its CPU on TLS (handshakes with client certificates, AES-GCM records,
SHA-256) besides Go's own work. ``tcgcrypto`` (bench/tcgcrypto, Go) times those operations; it
runs here natively and under QEMU's TCG (``qemu-x86_64``, the same translator a software-emulated
guest runs on) with each CPU model a domain can get: ``qemu64`` (libvirt's default under TCG,
what the project's domains use) and ``max`` (every feature TCG emulates: AES-NI, PCLMULQDQ, AVX2).
Each figure is a ratio against the native run and against qemu64, all in this one run.

Measured 2026-12-01 on this machine (2 vCPUs, while an image was building), microseconds per op:

| operation                          | native | qemu64 |  max  | max / qemu64 |
|------------------------------------|-------:|-------:|------:|-------------:|
| TLS 1.3 mutual handshake, RSA-2048 |   3532 |  23563 | 23930 |         1.02 |
| TLS 1.3 mutual handshake, ECDSA    |   1014 |   8356 |  9021 |         1.08 |
| RSA-2048 sign                      |   1224 |   6736 |  8246 |         1.22 |
| ECDSA P-256 sign                   |     48 |    393 |   417 |         1.06 |
| AES-128-GCM seal, 16 KiB           |     19 |    735 |  1243 |         1.69 |
| SHA-256, 16 KiB                    |     14 |    415 |   358 |         0.86 |

So the CPU model is not the lever (TCG's AES-NI helpers are slower than Go's table AES), and a
handshake with an ECDSA P-256 certificate costs about a third of one with RSA-2048: the cloud
playbook's kubeadm configuration asks for ECDSA certificates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "tcgcrypto"
MODELS = ("qemu64", "max")


def run(cmd: list[str]) -> dict[str, float]:
    """``tcgcrypto``'s lines as operation -> microseconds per op."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {name: float(value) for name, value in (line.split() for line in out.splitlines() if line.strip())}


def main() -> int:
    """Build, run natively and under each CPU model, print the table."""
    for tool in ("go", "qemu-x86_64"):
        if not shutil.which(tool):
            print(f"tcg_cpu: {tool} is not on PATH; allowed: install Go, and qemu-user for qemu-x86_64",
                  file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="aihow-tcgcrypto-") as tmp:
        binary = Path(tmp) / "tcgcrypto"
        subprocess.run(["go", "build", "-o", str(binary), "."], cwd=SOURCE, check=True,
                       env={**os.environ, "CGO_ENABLED": "0"})
        native = run([str(binary)])
        emulated = {model: run(["qemu-x86_64", "-cpu", model, str(binary)]) for model in MODELS}
    print(f"{'operation':36} {'native':>8} " + " ".join(f"{m:>8} {m + '/native':>14}" for m in MODELS)
          + f" {'max/qemu64':>11}")
    for name, base in native.items():
        cells = " ".join(f"{emulated[m][name]:8.0f} {emulated[m][name] / base:14.1f}" for m in MODELS)
        print(f"{name:36} {base:8.0f} {cells} {emulated['max'][name] / emulated['qemu64'][name]:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

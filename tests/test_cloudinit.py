"""The cloud-init seed: what it says (golden files) and the ISO that carries it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pycdlib
import pytest

from aihow_infra.cloudinit import SEED_FILES, SeedSpec, seed_files, seed_iso

GOLDEN = Path(__file__).parent / "golden" / "seed"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOp1FjS4jC1fvPm2mlJzgK9yDZcD9nlqWxFGvz8Xr5bY test@aihow"
SPEC = SeedSpec(
    hostname="hpc-compute-01", mac="52:54:00:12:34:56", ip="10.213.10.11", subnet="10.213.10.0/24",
    gateway=None, dns_servers=("10.213.10.1",), domain="hpc.local", user="aihow", ssh_keys=(KEY,),
    hosts=(("10.213.10.10", "hpc-controller"), ("10.213.10.11", "hpc-compute-01")),
    extra={"runcmd": [["touch", "/var/tmp/aihow-ran"]], "packages": ["munge"]},
)


@pytest.mark.parametrize("name", SEED_FILES)
def test_seed_files_match_golden(name: str) -> None:
    files = seed_files(SPEC)
    golden = GOLDEN / name
    if os.environ.get("AIHOW_UPDATE_GOLDEN"):
        golden.write_text(files[name])
    assert files[name] == golden.read_text()


def test_dhcp_vm_and_nat_gateway() -> None:
    dhcp = seed_files(SeedSpec(**{**SPEC.__dict__, "ip": None}))["network-config"]
    assert "dhcp4: true" in dhcp and "addresses" not in dhcp
    nat = seed_files(SeedSpec(**{**SPEC.__dict__, "gateway": "10.213.10.1"}))["network-config"]
    assert "via: 10.213.10.1" in nat


def test_iso_is_a_cidata_volume_with_the_three_files() -> None:
    files = seed_files(SPEC)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(seed_iso(files)))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        for name, text in files.items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            assert out.getvalue().decode() == text
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
            assert out.getvalue().decode() == text
    finally:
        iso.close()

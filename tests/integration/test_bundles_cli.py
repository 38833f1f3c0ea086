"""End to end as an operator and a device would do it: real processes, files and keys.

The operator runs ``python -m firmware_bundles.cli`` (the hook until the main
``driftless`` CLI wires in ``keys``/``bundle``); the "device" is the library
verifying and unpacking with only the root metadata it was provisioned with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firmware_bundles import archive
from firmware_bundles.errors import RollbackError
from firmware_bundles.trust import TrustedRoot, check_rollback

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def cli(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "firmware_bundles.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ok(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    done = cli(*argv, env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def test_operator_to_device(tmp_path: Path) -> None:
    fleet, release = tmp_path / "fleet", tmp_path / "release.pem"
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "thermostat").write_text("#!/bin/sh\nexec sleep 1000\n")
    (src / "bin" / "thermostat").chmod(0o755)
    env = {"ROOT_PASS": "root secret", "RELEASE_PASS": "release secret"}

    ok("keys", "init-root", "--dir", fleet, "--threshold", "2", "--keys", "3",
       "--passphrase-env", "ROOT_PASS", env=env)  # fmt: skip
    provisioned = (fleet / "root.json").read_bytes()  # what the device ships with
    ok("keys", "add", "--dir", fleet, "--role", "release", "--out", release,
       "--passphrase-env", "RELEASE_PASS", "--root-passphrase-env", "ROOT_PASS",
       env=env)  # fmt: skip
    bundles = {}
    for version, security in (("1.0.0", 1), ("2.0.0", 2)):
        path = tmp_path / f"thermostat-{version}.bundle"
        ok("bundle", "build", src, "--name", "thermostat", "--version", version,
           "--security-version", str(security), "--arch", "x86_64", "--arch", "aarch64",
           "--command", "bin/thermostat", "--health-command", "true", "--out", path)  # fmt: skip
        ok("bundle", "sign", path, "--key", release, "--passphrase-env", "RELEASE_PASS", env=env)
        assert ok("bundle", "verify", path, "--root", fleet / "root.json").startswith("ok: ")
        bundles[version] = path

    # The device: provisioned root, then the newer root version, then the bundle.
    device = TrustedRoot.from_bytes(provisioned)
    device.update((fleet / "2.root.json").read_bytes(), time.time())
    manifest = archive.verify(bundles["2.0.0"], device, time.time())
    check_rollback(manifest, {"thermostat": 1})
    installs = tmp_path / "device" / "installs"
    installs.mkdir(parents=True)
    archive.unpack(bundles["2.0.0"], manifest, installs / "thermostat-2.0.0")
    assert os.access(installs / "thermostat-2.0.0" / "bin" / "thermostat", os.X_OK)

    # Having installed security version 2, the device refuses the older bundle.
    older = archive.verify(bundles["1.0.0"], device, time.time())
    with pytest.raises(RollbackError):
        check_rollback(older, {"thermostat": manifest.security_version})

    # A tampered copy fails verification with one line on stderr and a non-zero status.
    tampered = tmp_path / "tampered.bundle"
    data = bytearray(bundles["2.0.0"].read_bytes())
    data[data.index(b'"version":"2.0.0"') + 11] = ord("9")
    tampered.write_bytes(bytes(data))
    done = cli("bundle", "verify", tampered, "--root", fleet / "root.json")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("error: ThresholdNotMetError: release: 0 valid signature")
    assert done.stderr.count("\n") == 1

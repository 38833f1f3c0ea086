"""``driftless apply/diff/get/describe/delete`` as an operator runs them: the real console
script as a child process against a real hub (real Mosquitto, real bundles).

The file is applied, diffed again (nothing to change: exit 0), changed (exit 1 with
the change listed), and the hub's own view agrees with what the command printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.bundle_support import Keys, build_bundle, hub_with_root, upload
from tests.pki import TestBroker
from tests.support import HubProcess, wait_until

pytestmark = pytest.mark.integration

DRIFTLESS = str(Path(sys.executable).with_name("driftless"))


@dataclass
class Stack:
    hub: HubProcess
    token_file: Path
    bundles: tuple[str, str]
    workdir: Path

    def run(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The console script with the hub's address and token from the environment."""
        env = {
            **os.environ,
            "DRIFTLESS_HUB_URL": self.hub.base_url,
            "DRIFTLESS_TOKEN_FILE": str(self.token_file),
        }
        env.pop("DRIFTLESS_TOKEN", None)
        return subprocess.run(
            [DRIFTLESS, *argv],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    def write(self, name: str, spec: dict[str, Any]) -> str:
        path = self.workdir / "deploy.yaml"
        path.write_text(
            "# yaml-language-server: $schema=deployment.schema.json\n"
            "apiVersion: driftless/v1\nkind: Deployment\n"
            f"metadata:\n  name: {name}\nspec: {json.dumps(spec)}\n"
        )
        return str(path)


@pytest.fixture
def stack(broker: TestBroker, tmp_path: Path) -> Iterator[Stack]:
    keys = Keys(tmp_path / "keys")
    hub = hub_with_root(tmp_path / "hub", broker, keys)
    try:
        shas = tuple(
            upload(hub, build_bundle(tmp_path / f"{v}.bundle", keys, version=v, payload_bytes=1000))
            for v in ("1.0.0", "2.0.0")
        )
        for device_id, env in (("pump-01", "prod"), ("pump-02", "prod"), ("pump-03", "dev")):
            hub.api.post(
                "/devices", json={"id": device_id, "labels": {"env": env}}
            ).raise_for_status()
        token_file = tmp_path / "token"
        token_file.write_text(hub.token + "\n")
        token_file.chmod(0o600)
        yield Stack(hub, token_file, (shas[0], shas[1]), tmp_path)
    finally:
        hub.kill()
        hub.api.close()


def _desired_workloads(hub: HubProcess, device_id: str) -> list[dict[str, Any]]:
    device = hub.api.get(f"/devices/{device_id}").json()
    config = device.get("desired_config") or {}
    workloads: list[dict[str, Any]] = config.get("workloads") or []
    return workloads


def test_apply_diff_change_get_describe_delete_from_the_command_line(stack: Stack) -> None:
    sha1, sha2 = stack.bundles
    spec: dict[str, Any] = {
        "kind": "fleet",
        "selector": "env=prod",
        "priority": 10,
        "workloads": [{"name": "web", "bundle": sha1, "config": {"rate": 10}}],
    }
    path = stack.write("web", spec)

    # The preview before anything exists: both prod devices get the workload.
    first = stack.run("diff", "-f", path)
    assert first.returncode == 1, first.stderr
    assert 'deployment/web: created (fleet, priority 10, selector "env=prod")' in first.stdout
    assert "~ 2 devices: pump-01, pump-02" in first.stdout
    assert f"+ web  bundle {sha1[:12]}…" in first.stdout
    assert "2 devices change" in first.stdout

    # No terminal and no --yes: the preview, then a refusal; nothing stored.
    refused = stack.run("apply", "-f", path)
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr
    assert stack.hub.api.get("/deployments/web").status_code == 404

    applied = stack.run("apply", "-f", path, "--yes")
    assert applied.returncode == 0, applied.stderr
    assert "deployment/web created (version 1): 2 devices change" in applied.stdout
    for device_id in ("pump-01", "pump-02"):
        wait_until(
            lambda d=device_id: (
                [w.get("bundle") for w in _desired_workloads(stack.hub, d)] == [sha1]
            ),
            what=f"{device_id}'s document holds the deployment's workload",
        )
    assert _desired_workloads(stack.hub, "pump-03") == []

    # The same file again: nothing to change.
    again = stack.run("diff", "-f", path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "deployment/web: unchanged" in again.stdout
    assert "0 devices change" in again.stdout

    # A changed file: exit 1 and the change named, field by field.
    spec["workloads"][0].update(bundle=sha2, config={"rate": 20})
    stack.write("web", spec)
    changed = stack.run("diff", "-f", path)
    assert changed.returncode == 1, changed.stderr
    assert "deployment/web: configured" in changed.stdout
    assert "~ 2 devices: pump-01, pump-02" in changed.stdout
    assert "~ web  (from deployment:web)" in changed.stdout
    assert f"bundle: {sha1[:12]}… -> {sha2[:12]}…" in changed.stdout
    assert 'config: {"rate":10} -> {"rate":20}' in changed.stdout
    stored = stack.hub.api.get("/deployments/web").json()
    assert stored["version"] == 1  # diff wrote nothing

    listed = stack.run("get", "deployments")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:4] == ["web", "fleet", "10", "env=prod"]
    as_json = json.loads(stack.run("get", "deployment", "web", "-o", "json").stdout)
    assert as_json["spec"]["workloads"][0]["bundle"] == sha1

    described = stack.run("describe", "deployment", "web")
    assert described.returncode == 0, described.stderr
    assert "Name:        web" in described.stdout
    assert "Targeted:" in described.stdout

    deleted = stack.run("delete", "deployment", "web", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "deployment/web deleted" in deleted.stdout
    assert stack.hub.api.get("/deployments/web").status_code == 404


def test_invalid_files_and_refusals_from_the_real_hub(stack: Stack) -> None:
    bad = stack.write("web", {"workloads": [{"name": "web", "bundle": "nope"}]})
    invalid = stack.run("apply", "-f", bad, "--yes")
    assert invalid.returncode == 2
    assert "$.spec.workloads[0].bundle" in invalid.stderr and "nothing was sent" in invalid.stderr

    # Valid for the schema, refused by the hub: a selector that does not parse.
    broken = stack.write(
        "web",
        {"selector": "region in (eu", "workloads": [{"name": "web", "bundle": stack.bundles[0]}]},
    )
    refused = stack.run("apply", "-f", broken, "--yes")
    assert refused.returncode == 1
    assert "PUT /api/v1/deployments/web?dry_run=true: 422" in refused.stderr
    assert stack.run("diff", "-f", broken).returncode == 4

    wrong_token = stack.run("get", "deployments", "--token", "not-a-token")
    assert wrong_token.returncode == 1
    assert (
        "401" in wrong_token.stderr and "--token-file FILE or DRIFTLESS_TOKEN" in wrong_token.stderr
    )

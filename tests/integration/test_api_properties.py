"""The whole admin API under a property-based fuzzer (schemathesis), on a real hub process.

Two passes, each with a fixed seed and a bounded number of examples:

- with an admin token: every schemathesis check (no 5xx, status codes, content
  types and bodies as the schema declares, schema-valid requests accepted and
  invalid ones refused, Allow headers, stateful links between operations); the
  one operation left out is revoking tokens, which would revoke the fuzzer's own
  (it is in the second pass and in the unit tests);
- without a token: every guarded operation answers 401 before anything else,
  whatever was generated for it (``schemathesis_hooks.guarded_operations_answer_401``).

A failure prints schemathesis' report with a curl line that reproduces it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.broker import free_port
from firmware_bundles.devfleet import DevFleet
from tests.support import HubProcess

pytestmark = pytest.mark.integration

SEED = "20261206"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A hub as it runs (fleet root, signing key, CA), with no broker: the API alone."""
    fleet = DevFleet(tmp_path / "fleet")
    process = HubProcess(tmp_path / "hub", f"mqtt://127.0.0.1:{free_port()}")
    process.argv += ["--trust-root", str(fleet.root_path)]
    process.argv += ["--signing-key", str(fleet.hub_key_path)]
    process.argv += ["--identity-dir", str(tmp_path / "identity")]
    process.start(wait_mqtt=False)
    try:
        yield process
    finally:
        process.close()


# A bundle upload is any bytes to the schema, but the hub stores only a bundle signed by
# the fleet's release keys: schema-valid random bytes are refused with 422, as they must be.
# Likewise what a schema cannot say: a label selector's grammar (``selector``), a
# deployment's meaning (placed-only fields on a fleet deployment, a workload naming a
# bundle the hub does not hold), and a label patch that would leave more than 32 labels:
# schema-valid, refused with 422 and a problem detail that says why.
CONFIG = """
[[operations]]
include-operation-id = "upload_bundle_api_v1_bundles_post"
checks.positive_data_acceptance.expected-statuses = [200, 201, 422]

[[operations]]
include-operation-id = "list_devices_api_v1_devices_get"
checks.positive_data_acceptance.expected-statuses = [200, 422]

[[operations]]
include-operation-id = "put_deployment_api_v1_deployments__name__put"
checks.positive_data_acceptance.expected-statuses = [200, 422]

[[operations]]
include-operation-id = "patch_labels_api_v1_devices__device_id__labels_patch"
checks.positive_data_acceptance.expected-statuses = [200, 404, 409, 422]
"""


def schemathesis(
    hub: HubProcess, tmp_path: Path, *args: str, hooks: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the schemathesis CLI at ``hub``; ``hooks``: with the custom checks registered."""
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if hooks:
        env["SCHEMATHESIS_HOOKS"] = "tests.integration.schemathesis_hooks"
    return subprocess.run(
        [
            str(SCHEMATHESIS), "--no-color", "run", f"{hub.base_url}/openapi.json",
            "--seed", SEED, "--max-examples", "25", "--request-timeout", "10",
            "--report", "junit", "--report-dir", str(tmp_path / "report"), *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # reads CONFIG, no one else's schemathesis.toml
        env=env,
        check=False,
    )  # fmt: skip


def test_every_operation_holds_to_the_schema_under_fuzzing(hub: HubProcess, tmp_path: Path) -> None:
    result = schemathesis(
        hub, tmp_path,
        "-H", f"Authorization: Bearer {hub.token}",
        "--checks", "all",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--exclude-path", "/api/v1/tokens/{name}", "--exclude-method", "DELETE",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    assert "Tested: 2" in result.stdout  # it did reach the operations (23 today)


def test_without_a_token_every_guarded_operation_answers_401(
    hub: HubProcess, tmp_path: Path
) -> None:
    result = schemathesis(
        hub, tmp_path,
        "--checks", "guarded_operations_answer_401,not_a_server_error",
        "--phases", "examples,coverage,fuzzing",
        hooks=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]

"""Packages point one way (``[tool.importlinter]`` in pyproject.toml, docs/architecture.md).

The command line on top; devtools (the demo prints previews with ctl's renderer);
the operator's command line (``ctl``, a client of the admin API that imports none
of the hub, agent, simulator or devtools); the simulator; hub and agent side by side and
independent; the wire contract; the bundle format and trust; plumbing at the
bottom. The agent and the wire contract never import the hub's web or database
stack (every device would pay for it). The hub's routes never reach its MQTT link:
a desired change goes through the desired-state service, which signals delivery.
A broken direction fails here, naming the import chain.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_contract_is_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in result.stdout

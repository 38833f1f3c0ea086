"""The operator's command line: ``driftless apply/diff/delete/get/describe``.

An HTTP client of the hub's admin API (``docs/cli.md``): it reads Deployment
documents from YAML or JSON files, checks them against the published JSON Schema
(``ctl/schema/deployment.schema.json``), and calls ``/api/v1/deployments``. It
imports nothing of the hub, the agent, the simulator or devtools (an
import-linter contract in pyproject.toml), so an operator's machine needs only
httpx, PyYAML and jsonschema.
"""

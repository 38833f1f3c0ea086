"""Domain errors of the deployment resource; only :mod:`hub.deployments.routes` turns
them into HTTP status codes. All of them are the caller's fault."""

from __future__ import annotations

from hub.errors import HubError


class DeploymentNotFound(HubError):
    """No deployment with this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"deployment {name!r} does not exist")
        self.name = name


class InvalidSpec(HubError):
    """A spec whose shape is right but whose meaning is not (selector syntax, a
    placed-only field on a fleet deployment, a constraint's value)."""

    def __init__(self, name: str, why: str) -> None:
        named = why.startswith(f"deployment {name!r}")
        super().__init__(why if named else f"deployment {name!r}: {why}")
        self.name = name
        self.why = why

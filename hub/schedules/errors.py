"""Domain errors of the window resource; only :mod:`hub.schedules.routes` turns them into
HTTP status codes. All of them are the caller's fault."""

from __future__ import annotations

from collections.abc import Sequence

from hub.errors import HubError


class WindowNotFound(HubError):
    """No window with this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"window {name!r} does not exist")
        self.name = name


class InvalidWindow(HubError):
    """A window whose cron, duration or time zone cannot be used."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"window {name!r}: {why}")
        self.name = name
        self.why = why


class WindowInUse(HubError):
    """A rollout that has not finished names the window: it cannot be deleted."""

    def __init__(self, name: str, rollout_ids: Sequence[int]) -> None:
        ids = ", ".join(str(i) for i in rollout_ids)
        super().__init__(
            f"window {name!r} is named by rollouts that have not finished ({ids}); "
            "abort them or wait until they finish"
        )
        self.name = name
        self.rollout_ids = tuple(rollout_ids)

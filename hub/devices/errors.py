"""Domain errors of the device resource.

Rules:
- :mod:`hub.devices.store` (and the desired-state service) raise these; only the
  routes (:mod:`hub.devices.routes`, :mod:`hub.enrollment.routes`) turn them into
  HTTP status codes.
- Each error says whose fault it is: all of these are the caller's (bad request),
  none means a local bug or a database outage (those propagate as they are).
"""

from __future__ import annotations

from hub.errors import HubError


class DeviceNotFound(HubError):
    """No device with this id is registered."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is not registered")
        self.device_id = device_id


class DeviceExists(HubError):
    """A device with this id is already registered."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is already registered")
        self.device_id = device_id


class ConfigTooLarge(HubError):
    """A desired config whose JSON encoding exceeds the configured limit."""

    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(
            f"desired config is {size_bytes} bytes of JSON; the limit is {limit_bytes} bytes "
            "(max_config_bytes) so that the whole desired document fits in one MQTT message"
        )
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class UnknownBundles(HubError):
    """A desired config references bundles the store does not hold."""

    def __init__(self, missing: list[str]) -> None:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        super().__init__(
            f"the config references {len(missing)} bundle(s) the hub does not hold: {shown} "
            "(upload them first: POST /api/v1/bundles)"
        )
        self.missing = missing


class DeviceDecommissioned(HubError):
    """The device was decommissioned: it gets no desired state and cannot be registered
    again under its id until it is purged or enrolled again."""

    def __init__(self, device_id: str, detail: str = "") -> None:
        super().__init__(
            f"device {device_id!r} is decommissioned" + (f"; {detail}" if detail else "")
        )
        self.device_id = device_id


class CutOffPending(HubError):
    """The broker has not yet confirmed that a decommissioned device's live connections
    are closed; re-using or forgetting its id must wait for that."""

    def __init__(self, device_id: str) -> None:
        super().__init__(
            f"the broker has not confirmed yet that decommissioned device {device_id!r} is "
            "cut off (its live connection closed); try again in a few seconds, and check "
            "that the hub is connected to the broker"
        )
        self.device_id = device_id


class DeviceActive(HubError):
    """Only a decommissioned device can be purged."""

    def __init__(self, device_id: str) -> None:
        super().__init__(
            f"device {device_id!r} is active: decommission it first (DELETE without purge)"
        )
        self.device_id = device_id

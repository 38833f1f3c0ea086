"""Topic names: ``driftless/v1/devices/{device_id}/{channel}``.

Rules:
- A device id matches ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``, so it can never hold
  ``+``, ``#`` or ``/`` and cannot widen a subscription or escape its subtree.
- Every topic this module builds round-trips through :func:`parse_topic`.
- Every channel has a direction: a device publishes only on its own
  ``device -> hub`` channels and subscribes only to its ``hub -> device`` ones.
"""

from __future__ import annotations

import enum
import re

from protocols.errors import ProtocolError, Reason

TOPIC_ROOT = "driftless/v1/devices"
DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


class Direction(enum.StrEnum):
    """Who publishes on a channel (the other side subscribes)."""

    HUB_TO_DEVICE = "hub -> device"
    DEVICE_TO_HUB = "device -> hub"


class Channel(enum.StrEnum):
    """Per-device channels, all QoS 1; :attr:`direction` and :attr:`retained` say how."""

    DESIRED = "desired"  # retained
    BIRTH = "birth"  # on every connect
    STATUS = "status"  # retained; the Last Will sets it offline
    REPORTED = "reported"
    BUNDLE_REQ = "bundle_req"  # JSON BundleRequest
    BUNDLE_DATA = "bundle_data"  # binary chunk frames
    CERT_REQ = "cert_req"  # CertRequest (renewal)
    CERT = "cert"  # CertIssued

    @property
    def direction(self) -> Direction:
        """Pure: who publishes on this channel."""
        return _DIRECTIONS[self]

    @property
    def retained(self) -> bool:
        """Pure: whether messages on this channel are published retained."""
        return self in _RETAINED


_DIRECTIONS: dict[Channel, Direction] = {
    Channel.DESIRED: Direction.HUB_TO_DEVICE,
    Channel.BIRTH: Direction.DEVICE_TO_HUB,
    Channel.STATUS: Direction.DEVICE_TO_HUB,
    Channel.REPORTED: Direction.DEVICE_TO_HUB,
    Channel.BUNDLE_REQ: Direction.DEVICE_TO_HUB,
    Channel.BUNDLE_DATA: Direction.HUB_TO_DEVICE,
    Channel.CERT_REQ: Direction.DEVICE_TO_HUB,
    Channel.CERT: Direction.HUB_TO_DEVICE,
}
_RETAINED = frozenset({Channel.DESIRED, Channel.STATUS})


def is_valid_device_id(device_id: str) -> bool:
    """Pure: whether ``device_id`` is a legal device id."""
    return _DEVICE_ID_RE.fullmatch(device_id) is not None


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged; raise ProtocolError(BAD_DEVICE_ID) if illegal."""
    if not is_valid_device_id(device_id):
        raise ProtocolError(
            Reason.BAD_DEVICE_ID,
            f"device id {device_id[:80]!r} must match {DEVICE_ID_PATTERN}",
        )
    return device_id


def topic(device_id: str, channel: Channel) -> str:
    """Build the topic for one device's channel; raises ProtocolError on a bad id."""
    return f"{TOPIC_ROOT}/{validate_device_id(device_id)}/{channel.value}"


def subscription(channel: Channel) -> str:
    """The wildcard filter matching ``channel`` for every device."""
    return f"{TOPIC_ROOT}/+/{channel.value}"


def shared_subscription(group: str, channel: Channel) -> str:
    """An MQTT 5 shared subscription so several hub workers split the load."""
    return f"$share/{group}/{subscription(channel)}"


def parse_topic(name: str) -> tuple[str, Channel]:
    """Pure: split a device topic into ``(device_id, channel)``.

    Raises ProtocolError(BAD_TOPIC) for anything outside the device tree or an
    unknown channel, and ProtocolError(BAD_DEVICE_ID) for an illegal id.
    """
    prefix = TOPIC_ROOT + "/"
    if not name.startswith(prefix):
        raise ProtocolError(Reason.BAD_TOPIC, f"topic {name[:120]!r} is outside {TOPIC_ROOT}/")
    parts = name[len(prefix) :].split("/")
    if len(parts) != 2:
        raise ProtocolError(
            Reason.BAD_TOPIC, f"topic {name[:120]!r} must be {TOPIC_ROOT}/<device>/<channel>"
        )
    device_id, channel_name = parts
    validate_device_id(device_id)
    try:
        channel = Channel(channel_name)
    except ValueError:
        raise ProtocolError(
            Reason.BAD_TOPIC, f"unknown channel {channel_name[:40]!r} in {name[:120]!r}"
        ) from None
    return device_id, channel

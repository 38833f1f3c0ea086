"""Shared by hub, agent and simulator: broker addresses and reconnect backoff (pure, stdlib).

Rules:
- A broker URL is ``mqtt://HOST[:PORT]`` (or ``mqtts://`` for TLS); anything
  else raises ValueError saying what is wrong, at start-up, not at first connect.
- Backoff delays grow ``min_s, 2*min_s, 4*min_s …`` up to ``max_s``; each is drawn
  from the upper half of its step ("equal jitter"), so a fleet that lost its
  broker at one instant does not return at one instant, yet never retries
  faster than ``min_s / 2``. Randomness is an input.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    """Where one MQTT broker listens."""

    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Pure: parse ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``; raises ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"broker URL {url!r} must start with mqtt:// or mqtts:// (got scheme {parts.scheme!r})"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host (expected mqtt://HOST:PORT)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r} must be only mqtt://HOST:PORT")
    if parts.username or parts.password:
        raise ValueError(f"broker URL {url!r}: credentials in the URL are not supported")
    return BrokerAddress(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
    )


class Backoff:
    """Jittered exponential backoff; call :meth:`reset` after a stable connection."""

    def __init__(
        self, *, min_s: float = 0.2, max_s: float = 30.0, rng: random.Random | None = None
    ) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError("need 0 < min_s <= max_s")
        self._min_s = min_s
        self._max_s = max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay_s(self) -> float:
        """The delay before the next attempt; each call moves one step up."""
        cap = min(self._max_s, self._min_s * (2 ** min(self._attempt, 32)))
        self._attempt += 1
        return self._rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self._attempt = 0

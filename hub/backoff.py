"""Jittered exponential backoff for reconnect loops (pure: randomness is an input).

Rules:
- Delays grow ``min_s, 2*min_s, 4*min_s ...`` up to ``max_s``; each delay is drawn
  uniformly from the upper half of that step ("equal jitter"), so a fleet of hubs
  restarted together does not reconnect in lockstep, yet never retries faster
  than ``min_s / 2``.
- :meth:`reset` returns to the first step (call it after a stable connection).
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, *, min_s: float, max_s: float, rng: random.Random) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError("need 0 < min_s <= max_s")
        self._min_s = min_s
        self._max_s = max_s
        self._rng = rng
        self._attempt = 0

    def next_delay_s(self) -> float:
        """The delay before the next attempt; each call moves one step up."""
        cap = min(self._max_s, self._min_s * (2 ** min(self._attempt, 32)))
        self._attempt += 1
        return self._rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self._attempt = 0

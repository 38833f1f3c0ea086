"""Jittered exponential backoff, pure: randomness is an input.

Rule: delays grow ``min_s * 2**n`` up to ``max_s``; each delay is drawn from the
upper half of that range ("equal jitter"), so a fleet that lost its broker at
the same instant does not come back at the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    min_s: float = 0.2
    max_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempts = 0

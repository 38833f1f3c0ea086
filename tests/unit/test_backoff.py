"""Jittered exponential backoff."""

from __future__ import annotations

import random

from edge_agent.backoff import Backoff


def test_grows_to_cap_with_jitter_in_upper_half() -> None:
    backoff = Backoff(min_s=1.0, max_s=8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_jitter_spreads_a_fleet() -> None:
    delays = {round(Backoff(rng=random.Random(seed)).next_delay(), 6) for seed in range(50)}
    assert len(delays) == 50


def test_reset_starts_over() -> None:
    backoff = Backoff(min_s=1.0, max_s=60.0, rng=random.Random(2))
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0

"""The reconnect backoff (pure: randomness is an input)."""

from __future__ import annotations

import random

import pytest

from hub.backoff import Backoff


def test_delays_grow_with_jitter_up_to_the_cap_and_reset() -> None:
    backoff = Backoff(min_s=0.2, max_s=10.0, rng=random.Random(7))
    delays = [backoff.next_delay_s() for _ in range(12)]
    caps = [min(10.0, 0.2 * 2**i) for i in range(12)]
    for delay, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= delay <= cap
    assert max(delays) <= 10.0 and delays[-1] >= 5.0
    assert len(set(delays)) == len(delays)  # jittered, not lockstep
    backoff.reset()
    assert 0.1 <= backoff.next_delay_s() <= 0.2


def test_many_attempts_do_not_overflow() -> None:
    backoff = Backoff(min_s=0.2, max_s=10.0, rng=random.Random(1))
    for _ in range(5000):
        assert backoff.next_delay_s() <= 10.0


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (2, 1), (-1, 1)])
def test_bad_bounds(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="min_s"):
        Backoff(min_s=lo, max_s=hi, rng=random.Random())

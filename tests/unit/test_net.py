"""The reconnect backoff (pure: randomness is an input)."""

from __future__ import annotations

import random

import pytest

from plumbing.net import Backoff, parse_broker_url


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


def test_grows_to_cap_with_jitter_in_upper_half() -> None:
    backoff = Backoff(min_s=1.0, max_s=8.0, rng=random.Random(1))
    delays = [backoff.next_delay_s() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_jitter_spreads_a_fleet() -> None:
    delays = {round(Backoff(rng=random.Random(seed)).next_delay_s(), 6) for seed in range(50)}
    assert len(delays) == 50


def test_reset_starts_over() -> None:
    backoff = Backoff(min_s=1.0, max_s=60.0, rng=random.Random(2))
    for _ in range(5):
        backoff.next_delay_s()
    backoff.reset()
    assert backoff.next_delay_s() <= 1.0


@pytest.mark.parametrize(
    "url, expected",
    [
        pytest.param("mqtt://h", ("h", 1883, False), id="default-port"),
        pytest.param("mqtts://h", ("h", 8883, True), id="tls-default-port"),
        pytest.param("mqtt://127.0.0.1:1884", ("127.0.0.1", 1884, False), id="explicit-port"),
    ],
)
def test_broker_url(url: str, expected: tuple[str, int, bool]) -> None:
    address = parse_broker_url(url)
    assert (address.host, address.port, address.tls) == expected
    assert parse_broker_url(address.url) == address


@pytest.mark.parametrize(
    "url",
    ["http://h:1", "h:1883", "mqtt://", "mqtt://h:notaport", "mqtt://h/x", "mqtt://u:p@h"],
)
def test_bad_broker_url_says_what_is_wrong(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_broker_url(url)

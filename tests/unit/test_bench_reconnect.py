"""The bare reconnect baseline's pure parts: the devices' schedule, Wills and queued messages."""

from __future__ import annotations

from simulator.bench import reconnect
from simulator.bench.converge import DOCUMENT_BYTES
from simulator.bench.storm import StormConfig
from simulator.fleet import device_ids
from simulator.profiles import storm_windows


def test_bare_clients_return_when_the_devices_do_in_the_same_storm() -> None:
    cfg = StormConfig(devices=200, repeats=3, offline_s=6.0, reconnect_window_s=1.0, seed=4)
    spec = cfg.profile().storm
    assert spec is not None
    devices = device_ids(200, "storm")
    for round_no in (1, 2, 3):
        offline = reconnect.offline_times(spec, 4, devices, round_no)
        windows = [list(storm_windows(spec, 4, d))[round_no - 1] for d in devices]
        assert [round(s, 9) for s in offline] == [round(w.end_s - w.start_s, 9) for w in windows]
        assert all(6.0 <= s <= 7.0 for s in offline) and max(offline) - min(offline) > 0.9
    assert reconnect.offline_times(spec, 4, devices, 1) != reconnect.offline_times(
        spec, 4, devices, 2
    )


def test_a_will_names_its_round_and_is_about_a_devices_size() -> None:
    payload = reconnect.will_payload("bare-04999", 3)
    assert reconnect.will_round(payload) == 3
    assert 70 <= len(payload) <= 100  # a device's Will: 85 bytes
    assert reconnect.will_round(b"not json") is None
    assert reconnect.will_round(b'{"round": "3"}') is None
    assert reconnect.will_round(b"[]") is None


def test_the_queued_message_has_the_documents_size_and_the_rounds_tag() -> None:
    payload = reconnect.queued_payload(12, DOCUMENT_BYTES)
    assert len(payload) == DOCUMENT_BYTES
    assert payload.startswith(reconnect.round_tag(12))
    assert not payload.startswith(reconnect.round_tag(1))  # "bare-round-1:" vs "bare-round-12:"

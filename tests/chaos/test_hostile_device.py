"""Chaos: a stolen device attacks a converging fleet on the secure stack.

A mutual-TLS Mosquitto with the device ACL and a CRL, and a hub over mTLS that
signs every desired document. A simulated fleet, enrolled as real devices are
(``driftless sim run --enroll``), goes through a fleet-wide desired change
every few seconds. Meanwhile one enrolled device -- a valid certificate of its
own in hostile hands -- does its worst:

- garbage on its own topics: malformed JSON, a wrong kind, a wrong version,
  an oversized payload, invalid fields, bodies naming another device;
- a flood: a bounded burst as fast as it can, half valid reports of its own
  (each one a database write on the hub), half malformed;
- impersonation: births, reports, a retained offline status, a retained
  desired document, a bundle request and a certificate request in other
  devices' names on their topics; a certificate renewal on its own topic with
  a valid proof of possession and a CSR naming another device; subscriptions
  to other devices' desired, bundle and certificate topics (and to ``#``) held
  across fleet-wide changes; connections with another device's client id and
  with the hub's;
- with a claim token stolen beside it: enrollment as the hub (``hub:…``, the
  hub's certificate names, refused) and under the hub's former names
  (``driftless-hub``, ``driftless-hub-bundles``: plain devices), whose
  certificates then forge on a victim's topics.

At the end:

- every simulated device reached the newest generation, no session of theirs
  was cut (the stable profile drops nobody; a takeover would show), and at
  least one change came after the attack;
- nothing the hostile device sent changed another device's record: for every
  device the hub's reported generation, session and boot epoch equal what the
  device itself recorded, and no forged value shows anywhere;
- every forbidden publish got PUBACK 0x87 and reached nobody; the hostile
  device received nothing from any other device's topic, and the hub issued
  it no certificate for another device;
- the hub's rejected counters equal the garbage it sent, reason by reason, and
  its record of the hostile device shows it processed the whole flood;
- the hub stayed up, its MQTT link never reconnected.

The normal run uses 60 devices and a 2,000-message flood;
``DRIFTLESS_CHAOS_FULL=1`` runs 300 devices and 6,000 messages. Figures are
printed either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edge_agent.enroll import EnrollError, enroll
from hub.broker_config import hub_identities
from protocols import Channel, topic
from simulator.fleet import device_ids
from simulator.journal import read_all
from tests.chaos.hostile import (
    FORGED,
    FORGED_AGENT,
    NOT_AUTHORIZED,
    HostileDevice,
    cert_request,
    forgeries,
    garbage,
    report,
)
from tests.secure_stack import SecureStack, secure_stack
from tests.support import HubProcess, wait_until

pytestmark = pytest.mark.integration

FULL = os.environ.get("DRIFTLESS_CHAOS_FULL") == "1"
DEVICES = 300 if FULL else 60
WORKERS = 4 if FULL else 2
FLOOD = 6000 if FULL else 2000
DURATION_S = 60 if FULL else 20
CHANGE_EVERY_S = 4
PREFIX = "fleet"
HOSTILE = "stolen-1"
SPY_CHANGES = 2  # fleet-wide changes the hostile subscriptions are held across


def read_summary(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def hub_devices(hub: HubProcess) -> dict[str, dict[str, Any]]:
    devices: dict[str, dict[str, Any]] = {}
    for page in range(DEVICES // 1000 + 2):
        items = hub.api.get(
            "/devices", params={"limit": 1000, "offset": page * 1000, "label": f"sim={PREFIX}"}
        ).json()["items"]
        devices.update({d["id"]: d for d in items})
        if len(items) < 1000:
            break
    return devices


def start_fleet(stack: SecureStack, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    summary = tmp_path / "sim.json"
    argv = [
        *(sys.executable, "-m", "driftless.cli", "--log-level", "warning", "sim", "run"),
        *("--enroll", "--broker", stack.broker.url, "--hub", stack.hub.base_url),
        *("--token", stack.hub.token, "--devices", str(DEVICES), "--workers", str(WORKERS)),
        *("--profile", "stable", "--seed", "11", "--prefix", PREFIX),
        *("--duration-s", str(DURATION_S), "--change-every-s", str(CHANGE_EVERY_S)),
        *("--settle-s", "120", "--json", str(summary), "--state-dir", str(tmp_path / "sim")),
    ]
    with (tmp_path / "sim.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return proc, summary


def test_a_stolen_device_cannot_disturb_the_fleet_or_the_hub(tmp_path: Path) -> None:
    ids = device_ids(DEVICES, PREFIX)
    victims = [ids[0], ids[DEVICES // 2], ids[-1]]
    sent: Counter[str] = Counter()  # what the hostile device did, by kind
    expected_rejects: Counter[str] = Counter()
    # No wait between renewals: the thief's CSR in another's name meets the CSR check itself.
    with secure_stack(tmp_path, hub_args=["--cert-renew-min-interval-s", "0"]) as stack:
        hub = stack.hub
        sim, summary_path = start_fleet(stack, tmp_path)
        attacker: HostileDevice | None = None
        try:
            # The thief's device was enrolled like any other: its own key, its own certificate.
            token = hub.api.post("/enrollment-tokens", json={"device_id": HOSTILE}).json()["token"]
            identity = enroll(
                hub_url=hub.base_url, token=token, device_id=HOSTILE, data_dir=tmp_path / "thief"
            )
            creds = {"ca": identity.ca, "cert": identity.cert, "key": identity.key}
            port = stack.broker.port
            wait_until(
                lambda: (s := read_summary(summary_path)) and s.get("connected") == DEVICES,
                timeout_s=90,
                what="the enrolled fleet connected over mTLS",
            )
            hub_before = {d: hub.device(d) for d in victims}

            attacker = HostileDevice(port, client_id=HOSTILE, **creds)
            assert attacker.connect() == 0
            spying = [
                "#",
                "driftless/v1/devices/#",
                "driftless/v1/devices/+/desired",
                *(
                    topic(v, c)
                    for v in victims
                    for c in (Channel.DESIRED, Channel.BUNDLE_DATA, Channel.CERT)
                ),
            ]
            granted = attacker.subscribe(spying)  # Mosquitto grants, and delivers nothing
            changes_at_spy = len((read_summary(summary_path) or {}).get("changes", []))

            # Garbage on its own topics: the broker takes it, the hub must refuse it.
            mids = []
            for name, payload, reason in garbage(HOSTILE, victims[0]):
                mids.append(attacker.publish(name, payload))
                expected_rejects[reason] += 1
            own = attacker.wait_acked(mids, timeout_s=30)
            assert all(code < 0x80 for code in own.values()), own
            sent["garbage"] += len(mids)

            # A renewal of its own, with a valid proof of possession, carrying a CSR in a
            # victim's name: answered, not issued.
            mine = topic(HOSTILE, Channel.CERT)
            attacker.publish(
                topic(HOSTILE, Channel.CERT_REQ),
                cert_request(HOSTILE, csr_for=victims[0], proof_with=(identity.cert, identity.key)),
            )
            sent["cert_req"] += 1
            wait_until(
                lambda: any(t == mine for t, _ in attacker.received),
                timeout_s=20,
                what="the hub's answer to the thief's renewal",
            )
            renewal = json.loads(next(p for t, p in attacker.received if t == mine))

            # A flood: half valid reports of its own (database writes), half malformed.
            flood_started = time.monotonic()
            mids = []
            reported = topic(HOSTILE, Channel.REPORTED)
            for i in range(FLOOD):
                if i % 2 == 0:
                    mids.append(attacker.publish(reported, report(HOSTILE, seq=i // 2 + 1)))
                else:
                    mids.append(attacker.publish(reported, b'{"v": 1, "kind": '))
                    expected_rejects["malformed"] += 1
            flood = attacker.wait_acked(mids, timeout_s=120)
            flood_s = time.monotonic() - flood_started
            assert all(code < 0x80 for code in flood.values())
            sent["flood"] += FLOOD

            # Impersonation on the victims' topics, and its own desired: refused, every one.
            mids = [attacker.publish(topic(HOSTILE, Channel.DESIRED), b"{}", retain=True)]
            for victim in victims:
                for name, payload, retain in forgeries(victim):
                    mids.append(attacker.publish(name, payload, retain=retain))
            forged = attacker.wait_acked(mids, timeout_s=30)
            sent["forged"] += len(mids)
            refused = sum(code == NOT_AUTHORIZED for code in forged.values())
            assert refused == len(mids), forged

            # Hold the spying subscriptions across fleet-wide changes.
            wait_until(
                lambda: (
                    len((read_summary(summary_path) or {}).get("changes", []))
                    >= changes_at_spy + SPY_CHANGES
                ),
                timeout_s=CHANGE_EVERY_S * (SPY_CHANGES + 2),
                interval_s=0.2,
                what=f"{SPY_CHANGES} fleet-wide changes while the thief listens",
            )
            attacker.close()
            received = list(attacker.received)

            def forge_as(client_id: str, victim: str, files: dict[str, Path]) -> None:
                """Connect as ``client_id`` with ``files``, forge on ``victim``'s topics: every
                publish refused, nothing received, the hub's link undisturbed."""
                nonlocal refused
                impostor = HostileDevice(port, client_id=client_id, **files)
                try:
                    assert impostor.connect() == 0
                    impostor.subscribe(["driftless/v1/devices/+/reported"])
                    mids = [
                        impostor.publish(name, payload, retain=retain)
                        for name, payload, retain in forgeries(victim)
                    ]
                    codes = impostor.wait_acked(mids, timeout_s=30)
                    sent["forged"] += len(mids)
                    refused += sum(code == NOT_AUTHORIZED for code in codes.values())
                    assert set(codes.values()) == {NOT_AUTHORIZED}, codes
                    taken_over.append(hub.stats()["mqtt_connected"])
                    received.extend(impostor.received)
                finally:
                    impostor.close()

            # Another device's client id, then the hub's: the certificate's name wins.
            taken_over: list[bool] = []
            for client_id in (victims[1], *hub_identities("driftless-hub"), "driftless-hub"):
                forge_as(client_id, victims[1], creds)

            # A claim token stolen with the device: enroll as the hub. Service names are
            # refused; the hub's former names enroll as plain devices, with no more rights.
            claim = hub.api.post("/enrollment-tokens", json={"uses": 10}).json()["token"]
            as_hub: dict[str, str] = {}
            former = ("driftless-hub", "driftless-hub-bundles")
            for name in (*hub_identities("driftless-hub"), *former):
                try:
                    stolen = enroll(
                        hub_url=hub.base_url, token=claim, device_id=name,
                        data_dir=tmp_path / f"as-{name.replace(':', '_')}",
                    )  # fmt: skip
                except EnrollError as exc:
                    as_hub[name] = f"refused: {exc}"
                    continue
                as_hub[name] = "enrolled as a plain device"
                sent["enrolled_as_hub"] += 1
                forge_as(
                    name, victims[2], {"ca": stolen.ca, "cert": stolen.cert, "key": stolen.key}
                )
            changes_after_attack = len((read_summary(summary_path) or {}).get("changes", []))

            assert sim.wait(timeout=DURATION_S + 240) == 0, (tmp_path / "sim.log").read_text()[
                -4000:
            ]
        finally:
            if attacker is not None:
                attacker.close()
            if sim.poll() is None:
                sim.kill()
                sim.wait(timeout=30)

        summary = read_summary(summary_path)
        assert summary is not None and summary["state"] == "finished"
        states = read_all(tmp_path / "sim")
        devices = hub_devices(hub)
        stats = hub.stats()
        thief = hub.device(HOSTILE)
        hub_alive = hub.exited() is None and hub.api.get("/health").json()["mqtt_connected"]

    newest = max(d["desired_generation"] for d in devices.values())
    changes = summary["changes"]
    figures = {
        "devices": DEVICES,
        "workers": WORKERS,
        "changes": len(changes),
        "changes_after_attack": len(changes) - changes_after_attack,
        "newest_generation": newest,
        "hostile_sent": dict(sent),
        "hostile_refused_0x87": refused,
        "flood_messages": FLOOD,
        "flood_s": round(flood_s, 2),
        "flood_per_s": round(FLOOD / flood_s),
        "hostile_received": len(received),
        "renewal_answer": renewal["error"],
        "enroll_as_hub": as_hub,
        "hub_rejected": stats["rejected"],
        "enrollment_s": summary["enrollment"]["enroll_s"],
        "sim_disconnects": summary["disconnects"],
    }
    print(f"\nhostile device: {json.dumps(figures)}")

    # The fleet: everyone reached the newest generation, nobody's session was cut.
    assert len(devices) == DEVICES and len(states) == DEVICES
    assert [d for d, s in states.items() if s.applied_generation != newest] == []
    assert summary["final"]["in_sync"] == DEVICES
    assert summary["disconnects"] == 0, "a simulated device lost its session"
    assert summary["rejected"] == 0  # no device took anything it should not have
    assert changes_after_attack < len(changes), "no change came after the attack"

    # Nothing it sent changed another device's record.
    def forged(row: dict[str, Any]) -> bool:
        inventory = row.get("inventory") or {}
        return FORGED in (row["session"], row["last_report_epoch"], row["reported_generation"]) or (
            FORGED_AGENT in (row["agent_version"], inventory.get("arch"))
        )

    assert [d for d, row in devices.items() if forged(row)] == []
    mismatched = [
        device_id
        for device_id, row in devices.items()
        if (row["reported_generation"], row["session"], row["last_report_epoch"])
        != (states[device_id].applied_generation, states[device_id].session,
            states[device_id].boot_epoch)
    ]  # fmt: skip
    assert mismatched == []
    for victim in victims:  # their sessions went on as their own: no forged jump
        assert devices[victim]["session"] == hub_before[victim]["session"]

    # Refused, delivered to nobody, and it heard nothing of anyone else.
    assert renewal["certificate_pem"] is None, renewal
    assert "CSR refused" in renewal["error"] and victims[0] in renewal["error"], renewal
    assert granted and all(code < 0x80 for code in granted)
    assert refused == sent["forged"]
    assert [t for t, _ in received if not t.startswith(f"driftless/v1/devices/{HOSTILE}/")] == []

    # The hub counted its garbage exactly, processed the whole flood, and stayed up.
    assert stats["rejected"] == dict(expected_rejects)
    assert thief["last_report_seq"] == FLOOD // 2
    assert thief["labels"] == {}  # not one of the fleet: never targeted by its changes
    assert [n for n, outcome in as_hub.items() if ":" in n and "refused" not in outcome] == []
    assert all(taken_over) and hub_alive
    assert stats["reconnects"] == 0 and stats["connects"] == 1

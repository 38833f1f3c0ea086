"""Table-driven tests of the hub's pure ingest rules (hub.devices.rules): no MQTT, no DB."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from hub.devices.rules import (
    CertFact,
    Decision,
    Reject,
    Rejected,
    Stale,
    Tracking,
    classify,
    decide,
)
from protocols import Birth, Desired, Reported, Status, encode

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def birth(**kw: object) -> Birth:
    fields: dict[str, object] = dict(
        device_id="d1",
        session=5,
        boot_epoch=3,
        seq=0,
        applied_generation=2,
        failed_generation=0,
        agent_version="1.0",
        ts=1.0,
    )
    fields.update(kw)
    return Birth(**fields)  # type: ignore[arg-type]


def status(**kw: object) -> Status:
    fields: dict[str, object] = dict(device_id="d1", online=True, session=5, ts=1.0)
    fields.update(kw)
    return Status(**fields)  # type: ignore[arg-type]


def report(**kw: object) -> Reported:
    fields: dict[str, object] = dict(
        device_id="d1",
        boot_epoch=3,
        seq=10,
        phase="applied",
        generation=4,
        applied_generation=4,
        failed_generation=0,
        error=None,
        ts=1.0,
    )
    fields.update(kw)
    return Reported(**fields)  # type: ignore[arg-type]


# A device that has been seen: session 5, newest report (3, 7), generation 2 applied.
SEEN = Tracking(
    desired_generation=4,
    session=5,
    online=True,
    last_seen=T0,
    agent_version="0.9",
    reported_generation=2,
    failed_generation=0,
    report_phase="applied",
    report_error=None,
    report_generation=2,
    last_report_epoch=3,
    last_report_seq=7,
)
NEW = Tracking()  # registered, never heard from


def same(t: Tracking) -> Tracking:
    return t


CASES = [
    # -- birth -------------------------------------------------------------------------
    pytest.param(
        SEEN,
        birth(session=4, seq=99, applied_generation=1),
        Decision(SEEN, stale=Stale.BIRTH),
        id="birth-older-session-is-ignored-entirely",
    ),
    pytest.param(
        NEW,
        birth(session=0, boot_epoch=0, seq=0, applied_generation=0),
        Decision(
            Tracking(
                session=0,
                online=True,
                last_seen=NOW,
                online_changed_at=NOW,  # it was offline: the flip is now
                agent_version="1.0",
                report_phase="applied",
                last_report_epoch=0,
                last_report_seq=0,
            )
        ),
        id="birth-first-ever-session-0-no-desired-no-republish",
    ),
    pytest.param(
        SEEN,
        birth(session=6, boot_epoch=4, seq=0, applied_generation=4),
        Decision(
            Tracking(
                desired_generation=4,
                session=6,
                online=True,
                last_seen=NOW,
                agent_version="1.0",
                reported_generation=4,
                report_phase="applied",
                report_generation=4,
                last_report_epoch=4,
                last_report_seq=0,
            )
        ),
        id="birth-newer-boot-counts-as-report-in-sync-no-republish",
    ),
    pytest.param(
        SEEN,
        birth(session=6, boot_epoch=4, seq=0, applied_generation=2),
        Decision(
            Tracking(
                desired_generation=4,
                session=6,
                online=True,
                last_seen=NOW,
                agent_version="1.0",
                reported_generation=2,
                report_phase="applied",
                report_generation=2,
                last_report_epoch=4,
                last_report_seq=0,
            ),
            republish=True,
        ),
        id="birth-behind-desired-republishes",
    ),
    pytest.param(
        SEEN,
        birth(session=5, boot_epoch=3, seq=7, applied_generation=2),
        Decision(
            Tracking(
                desired_generation=4,
                session=5,
                online=True,
                last_seen=NOW,
                agent_version="1.0",
                reported_generation=2,
                report_phase="applied",
                report_generation=2,
                last_report_epoch=3,
                last_report_seq=7,
            ),
            republish=True,
        ),
        id="birth-same-session-old-report-key-keeps-report-still-republishes",
    ),
    pytest.param(
        SEEN,
        birth(session=6, boot_epoch=3, seq=2, applied_generation=9),
        Decision(
            Tracking(
                desired_generation=4,
                session=6,
                online=True,
                last_seen=NOW,
                agent_version="1.0",
                reported_generation=2,
                report_phase="applied",
                report_generation=2,
                last_report_epoch=3,
                last_report_seq=7,
            )
        ),
        id="birth-out-of-order-report-key-does-not-overwrite-report",
    ),
    pytest.param(
        SEEN,
        birth(session=6, boot_epoch=4, seq=0, applied_generation=3, failed_generation=4),
        Decision(
            Tracking(
                desired_generation=4,
                session=6,
                online=True,
                last_seen=NOW,
                agent_version="1.0",
                reported_generation=3,
                failed_generation=4,
                report_phase="failed",
                report_generation=4,
                last_report_epoch=4,
                last_report_seq=0,
            ),
            republish=True,
        ),
        id="birth-with-failed-generation-reports-failed",
    ),
    pytest.param(
        Tracking(desired_generation=0, session=1, last_report_epoch=1, last_report_seq=1),
        birth(session=2, boot_epoch=2, applied_generation=0),
        Decision(
            Tracking(
                session=2,
                online=True,
                last_seen=NOW,
                online_changed_at=NOW,
                agent_version="1.0",
                report_phase="applied",
                last_report_epoch=2,
                last_report_seq=0,
            )
        ),
        id="birth-nothing-desired-never-republishes",
    ),
    # -- status / will -----------------------------------------------------------------
    pytest.param(
        SEEN,
        status(online=False, session=4),
        Decision(SEEN, stale=Stale.STATUS),
        id="will-from-older-session-after-newer-birth-is-stale",
    ),
    pytest.param(
        SEEN,
        status(online=False, session=5),
        Decision(
            Tracking(
                **{**SEEN.__dict__, "online": False, "last_seen": NOW, "online_changed_at": NOW}
            )
        ),
        id="will-of-current-session-marks-offline",
    ),
    pytest.param(
        Tracking(**{**SEEN.__dict__, "online": False}),
        status(online=True, session=6),
        Decision(
            Tracking(
                **{
                    **SEEN.__dict__,
                    "session": 6,
                    "online": True,
                    "last_seen": NOW,
                    "online_changed_at": NOW,
                }
            )
        ),
        id="status-newer-session-online",
    ),
    pytest.param(
        SEEN,
        status(online=True, session=6),
        Decision(Tracking(**{**SEEN.__dict__, "session": 6, "last_seen": NOW})),
        id="status-online-again-keeps-when-it-came-online",
    ),
    # -- reported ----------------------------------------------------------------------
    pytest.param(
        SEEN,
        report(boot_epoch=3, seq=7),
        Decision(SEEN, stale=Stale.REPORT),
        id="report-duplicate-key-is-stale",
    ),
    pytest.param(
        SEEN,
        report(boot_epoch=3, seq=6, applied_generation=9),
        Decision(SEEN, stale=Stale.REPORT),
        id="report-older-seq-same-boot-is-stale",
    ),
    pytest.param(
        SEEN,
        report(boot_epoch=2, seq=1000),
        Decision(SEEN, stale=Stale.REPORT),
        id="report-older-boot-high-seq-is-stale",
    ),
    pytest.param(
        SEEN,
        report(boot_epoch=3, seq=8, phase="applying", generation=4, applied_generation=2),
        Decision(
            Tracking(
                **{
                    **SEEN.__dict__,
                    "report_phase": "applying",
                    "report_generation": 4,
                    "last_report_seq": 8,
                    "last_seen": NOW,
                }
            )
        ),
        id="report-newer-seq-applying",
    ),
    pytest.param(
        SEEN,
        report(
            boot_epoch=4,
            seq=0,
            phase="failed",
            generation=4,
            applied_generation=2,
            failed_generation=4,
            error="boom",
        ),
        Decision(
            Tracking(
                **{
                    **SEEN.__dict__,
                    "failed_generation": 4,
                    "report_phase": "failed",
                    "report_generation": 4,
                    "report_error": "boom",
                    "last_report_epoch": 4,
                    "last_report_seq": 0,
                    "last_seen": NOW,
                }
            )
        ),
        id="report-newer-boot-seq-reset-failed-with-error",
    ),
    pytest.param(
        SEEN,
        report(boot_epoch=3, seq=8, applied_generation=4),
        Decision(
            Tracking(
                **{
                    **SEEN.__dict__,
                    "reported_generation": 4,
                    "report_generation": 4,
                    "last_report_seq": 8,
                    "last_seen": NOW,
                    "healthy_reports": 1,  # soak evidence: a healthy report of generation 4
                    "healthy_since": NOW,
                }
            )
        ),
        id="report-newer-applied-never-republishes",
    ),
]


@pytest.mark.parametrize(("tracking", "message", "expected"), CASES)
def test_rules(tracking: Tracking, message: Birth | Status | Reported, expected: Decision) -> None:
    assert decide(tracking, message, now=NOW) == expected


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([report(seq=8), report(seq=9), report(seq=8)], id="report-duplicate"),
        pytest.param([report(seq=9), report(seq=8)], id="report-out-of-order"),
        pytest.param([birth(session=6), status(online=False, session=5)], id="will-after-birth"),
    ],
)
def test_replaying_a_delivery_changes_nothing(messages: list[Birth | Status | Reported]) -> None:
    t = SEEN
    for m in messages:
        t = decide(t, m, now=NOW).tracking
    replayed = t
    for m in messages:
        replayed = decide(replayed, m, now=NOW).tracking
    assert replayed == t


# -- classification of raw topic + payload ---------------------------------------------

GOOD_REPORT = encode(report())


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        pytest.param(
            "driftless/v1/devices/d1/nope", GOOD_REPORT, "bad_topic", id="unknown-channel"
        ),
        pytest.param(
            "driftless/v1/devices/d1/reported/extra", GOOD_REPORT, "bad_topic", id="extra-level"
        ),
        pytest.param("other/d1/reported", GOOD_REPORT, "bad_topic", id="outside-root"),
        pytest.param(
            "driftless/v1/devices/-bad/reported", GOOD_REPORT, "bad_device_id", id="bad-id"
        ),
        pytest.param("driftless/v1/devices/d1/reported", b"{not json", "malformed", id="malformed"),
        pytest.param(
            "driftless/v1/devices/d1/reported",
            GOOD_REPORT.replace(b'"v":1', b'"v":2'),
            "unsupported_version",
            id="version",
        ),
        pytest.param(
            "driftless/v1/devices/d1/reported",
            b" " * (256 * 1024 + 1),
            "oversized",
            id="oversized",
        ),
        pytest.param(
            "driftless/v1/devices/d1/reported",
            encode(birth()),
            "wrong_kind",
            id="birth-on-reported",
        ),
        pytest.param(
            "driftless/v1/devices/d1/reported",
            GOOD_REPORT.replace(b'"seq":10', b'"seq":-1'),
            "invalid_fields",
            id="negative-seq",
        ),
        pytest.param(
            "driftless/v1/devices/d2/reported", GOOD_REPORT, "device_mismatch", id="mismatch"
        ),
        pytest.param(
            "driftless/v1/devices/d1/desired",
            encode(Desired(device_id="d1", generation=1, config={}, issued_at=1.0)),
            "unexpected_channel",
            id="desired-from-device",
        ),
    ],
)
def test_classify_rejects(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        classify(topic, payload)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        pytest.param("driftless/v1/devices/d1/birth", birth(), id="birth"),
        pytest.param("driftless/v1/devices/d1/status", status(), id="status"),
        pytest.param("driftless/v1/devices/d1/reported", report(), id="reported"),
    ],
)
def test_classify_accepts(topic: str, message: Birth | Status | Reported) -> None:
    assert classify(topic, encode(message)) == message


@pytest.mark.parametrize(
    "desired_generation, applied, failed, rekey",
    [
        pytest.param(0, 7, 0, False, id="no-desired-state-no-rekey"),
        pytest.param(7, 7, 0, False, id="in-sync"),
        pytest.param(8, 7, 0, False, id="behind"),
        pytest.param(2, 7, 0, True, id="device-ahead-after-reregistration"),
        pytest.param(2, 1, 5, True, id="failed-ahead"),
    ],
)
def test_rekey_when_device_reports_past_desired(
    desired_generation: int, applied: int, failed: int, rekey: bool
) -> None:
    t = Tracking(desired_generation=desired_generation, session=1)
    report = Reported(
        device_id="d1",
        boot_epoch=1,
        seq=1,
        phase="applied",
        generation=applied,
        applied_generation=applied,
        failed_generation=failed,
        ts=1.0,
    )
    decision = decide(t, report, now=NOW)
    assert decision.rekey is rekey
    assert decision.republish is rekey


# ---------------------------------------------------------------- admission


SEEN = Tracking(session=5, online=True, last_report_epoch=3, last_report_seq=7)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(birth(session=6), id="birth"),
        pytest.param(status(session=6), id="status"),
        pytest.param(report(seq=11), id="report"),
    ],
)
def test_everything_from_a_decommissioned_device_is_refused(message: object) -> None:
    t = dataclasses.replace(SEEN, decommissioned_at=T0)
    decision = decide(t, message, now=NOW, cert=CertFact.CURRENT)  # type: ignore[arg-type]
    assert decision.reject is Reject.DECOMMISSIONED and decision.tracking == t


def test_a_birth_from_a_revoked_certificates_session_is_refused() -> None:
    decision = decide(SEEN, birth(session=6), now=NOW, cert=CertFact.REVOKED)
    assert decision.reject is Reject.REVOKED_CERTIFICATE and decision.tracking == SEEN


AWAITING = dataclasses.replace(Tracking(), awaiting_birth=True)  # re-enrolled: a new unit


@pytest.mark.parametrize(
    ("message", "cert"),
    [
        pytest.param(status(session=9), CertFact.CURRENT, id="status-before-birth"),
        pytest.param(report(seq=99), CertFact.CURRENT, id="report-before-birth"),
        pytest.param(birth(session=9), CertFact.NONE, id="birth-naming-no-certificate"),
        pytest.param(birth(session=9), CertFact.UNKNOWN, id="birth-naming-unknown-cert"),
    ],
)
def test_a_re_enrolled_id_counts_nothing_before_a_birth_with_a_current_certificate(
    message: object, cert: CertFact
) -> None:
    decision = decide(AWAITING, message, now=NOW, cert=cert)  # type: ignore[arg-type]
    assert decision.stale is Stale.AWAITING_BIRTH and decision.tracking == AWAITING


def test_the_new_units_birth_is_taken_and_ends_the_wait() -> None:
    decision = decide(AWAITING, birth(session=1, boot_epoch=50), now=NOW, cert=CertFact.CURRENT)
    assert decision.stale is None and decision.reject is None
    assert decision.tracking.online and decision.tracking.session == 1
    assert not decision.tracking.awaiting_birth
    # Afterwards the old unit's report (older boot epoch) is stale as usual.
    later = decide(decision.tracking, report(boot_epoch=3, seq=500), now=NOW)
    assert later.stale is Stale.REPORT


def test_a_report_carries_workload_states_and_a_birth_the_outboxs_drops() -> None:
    from protocols import WorkloadStatus

    seen = Tracking(session=5, online=True, last_report_epoch=3, last_report_seq=7)
    workloads = [WorkloadStatus(name="web", state="rolled_back", restarts=2, last_exit_code=1)]
    decision = decide(seen, report(seq=8, phase="rolled_back", workloads=workloads), now=NOW)
    assert decision.tracking.report_phase == "rolled_back"
    assert decision.tracking.workloads == [
        {"name": "web", "state": "rolled_back", "restarts": 2, "last_exit_code": 1,
         "last_exit_at": None}
    ]  # fmt: skip
    later = decide(decision.tracking, report(seq=9), now=NOW)  # lists none: last known kept
    assert later.tracking.workloads == decision.tracking.workloads
    born = decide(later.tracking, birth(session=6, seq=10, events_dropped=40), now=NOW)
    assert born.tracking.events_dropped == 40


def test_workload_states_merge_by_name_and_removed_ones_leave() -> None:
    """A supervisor event lists only the workload that changed: the others stay as known
    (the table was once replaced by that one entry); a ``removed`` one leaves it."""
    from protocols import WorkloadStatus

    seen = Tracking(session=5, online=True, last_report_epoch=3, last_report_seq=7)
    outcome = [
        WorkloadStatus(name="db", state="healthy"),
        WorkloadStatus(name="web", state="healthy"),
    ]
    first = decide(seen, report(seq=8, workloads=outcome), now=NOW).tracking
    crashed = [WorkloadStatus(name="web", state="starting", restarts=1, last_exit_code=3)]
    second = decide(first, report(seq=9, workloads=crashed), now=NOW).tracking
    assert second.workloads is not None
    assert [(w["name"], w["state"], w["restarts"]) for w in second.workloads] == [
        ("db", "healthy", 0),
        ("web", "starting", 1),
    ]
    gone = [WorkloadStatus(name="db", state="removed")]
    third = decide(second, report(seq=10, workloads=gone), now=NOW).tracking
    assert [w["name"] for w in third.workloads or []] == ["web"]

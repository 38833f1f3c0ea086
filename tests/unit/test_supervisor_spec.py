"""The workload specification: manifest fields, the desired entry's part, the merge, and
manifests signed before the new ``run`` fields existed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from edge_agent.plan import workload_specs
from edge_agent.supervisor.spec import (
    AliveFor,
    EntryOptions,
    HttpGet,
    Limits,
    WorkloadSpecError,
    dependency_order,
    merge,
    parse_entry,
)
from firmware_bundles import canonical
from firmware_bundles.errors import FormatError
from firmware_bundles.model import (
    RUN_FIELDS_ADDED,
    AliveCheck,
    Backoff,
    HttpCheck,
    Manifest,
    RunLimits,
    RunSpec,
    decode_signed,
    encode_envelope,
)
from firmware_bundles.trust import verify_manifest
from tests.unit.test_bundles_support import NOW, Fleet, make_manifest

A, B = "aa" * 32, "bb" * 32


def entry(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "bundle": A, **fields}


@pytest.mark.parametrize(
    ("workloads", "error"),
    [
        pytest.param(
            [entry("a", restart_policy="x")],
            r"workloads\[0\]\.restart_policy: unknown field",
            id="unknown-field",
        ),
        pytest.param(
            [entry("a", restart={"tries": 3})],
            r"restart\.tries: unknown field",
            id="unknown-restart-field",
        ),
        pytest.param(
            [entry("a", restart={"policy": "sometimes"})], "restart.policy must be", id="bad-policy"
        ),
        pytest.param(
            [entry("a", restart={"attempts": -1})],
            "attempts must be a whole number",
            id="negative-attempts",
        ),
        pytest.param(
            [entry("a", limits={"memory_bytes": 0})], "memory_bytes must be", id="zero-limit"
        ),
        pytest.param(
            [entry("a", limits={"swap": 1})], r"limits\.swap: unknown field", id="unknown-limit"
        ),
        pytest.param([entry("a", env={"DRIFTLESS_CONFIG": "x"})], "reserved", id="reserved-env"),
        pytest.param([entry("a", env={"1X": "x"})], "not a variable name", id="bad-env-name"),
        pytest.param([entry("a", env={"X": 1})], "must be a string", id="env-not-string"),
        pytest.param(
            [entry("a", depends_on=["b"])],
            "depends_on 'b', which is not listed",
            id="depends-on-unknown",
        ),
        pytest.param([entry("a", depends_on=["a"])], "depends_on itself", id="depends-on-itself"),
        pytest.param(
            [
                entry("a", depends_on=["b"]),
                {**entry("b", depends_on=["c"]), "bundle": B},
                entry("c", depends_on=["a"]),
            ],
            "cycle: a -> b -> c -> a",
            id="cycle-in-depends-on",
        ),
        pytest.param(
            [entry("a", depends_on="b")], "depends_on must be a list", id="depends-on-not-list"
        ),
    ],
)
def test_desired_entries_are_validated_with_clear_errors(
    workloads: list[dict[str, Any]], error: str
) -> None:
    with pytest.raises(WorkloadSpecError, match=error):
        workload_specs({"workloads": workloads})


def test_entry_options_are_comparable_and_config_is_canonical() -> None:
    one = parse_entry(0, entry("a", config={"b": 1, "a": [1, 2]}, env={"Z": "1", "A": "2"}))
    two = parse_entry(0, entry("a", config={"a": [1, 2], "b": 1}, env={"A": "2", "Z": "1"}))
    assert one == two and hash(one) == hash(two)
    assert one.config == b'{"a":[1,2],"b":1}'
    assert parse_entry(0, entry("a", config={"b": 2})) != one


def test_dependency_order_puts_dependencies_first_and_ignores_those_in_place() -> None:
    deps = {"web": ("db", "cache"), "db": (), "cache": ("db",), "worker": ("db",)}
    assert dependency_order(["web", "worker", "cache", "db"], deps) == [
        "db",
        "cache",
        "web",
        "worker",
    ]
    assert dependency_order(["web"], deps) == ["web"]


RUN = RunSpec(
    command=["bin/web", "--port", "8080"],
    env={"MODE": "eco", "LEVEL": "1"},
    checks=[HttpCheck(port=8080, path="/health", interval_ms=200), AliveCheck(for_ms=500)],
    min_healthy_ms=1500,
    backoff=Backoff(attempts=4, delay_ms=200, max_delay_ms=5000),
    stop_signal="SIGINT",
    reload_signal="SIGHUP",
    limits=RunLimits(memory_bytes=256 << 20, open_files=1024),
    update="start-then-stop",
)


def test_merge_takes_the_manifest_defaults_and_the_entry_overrides() -> None:
    options = parse_entry(
        0,
        entry(
            "web",
            env={"MODE": "turbo"},
            restart={"policy": "always", "attempts": 2},
            limits={"memory_bytes": 128 << 20, "cpu_seconds": 60},
            config={"k": 1},
        ),
    )
    run = merge("web", "2.0.0", RUN, options)
    assert run.env == (("LEVEL", "1"), ("MODE", "turbo"))
    assert (run.restart.mode, run.restart.attempts, run.restart.delay_s) == ("always", 2, 0.2)
    assert run.limits == Limits(memory_bytes=128 << 20, cpu_seconds=60, open_files=1024)
    assert run.health.checks == (HttpGet(8080, "/health", interval_s=0.2), AliveFor(0.5))
    assert run.health.min_healthy_s == 1.5
    assert (run.stop_signal, run.reload_signal, run.update) == (2, 1, "start-then-stop")
    assert run.config == b'{"k":1}'


@pytest.mark.parametrize(
    ("update", "handover_s", "deadline_s"),
    [
        ("start-then-stop", 10, 10.0),  # both run until the new one is healthy: bounded
        ("start-then-stop", 0, 60.0),  # 0: no bound of its own
        ("start-then-stop", 600, 60.0),  # the health deadline is the shorter
        ("stop-then-start", 10, 60.0),  # no hand-over: the timeout does not apply
    ],
)
def test_a_hand_over_is_bounded_by_its_timeout(
    update: str, handover_s: int, deadline_s: float
) -> None:
    spec = msgspec.structs.replace(
        RUN, update=update, handover_timeout_s=handover_s, health_deadline_s=60
    )
    assert merge("web", "1", spec, EntryOptions()).health.deadline_s == deadline_s


def test_the_entry_may_lower_a_limit_but_not_raise_it() -> None:
    options = EntryOptions(limits=Limits(memory_bytes=512 << 20))
    with pytest.raises(WorkloadSpecError, match="above the manifest's ceiling"):
        merge("web", "1", RUN, options)


def test_the_old_health_field_is_a_command_check() -> None:
    from firmware_bundles.model import HealthCheck

    run = merge(
        "a", "1", RunSpec(command=["x"], health=HealthCheck(command=["probe"])), EntryOptions()
    )
    assert [type(c).__name__ for c in run.health.checks] == ["RunCommand"]


def run_tree(**run: Any) -> bytes:
    tree = canonical.check(canonical.encode(make_manifest()))
    tree["run"].update(run)
    return canonical.encode(tree)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        pytest.param(
            {
                "checks": [
                    {
                        "type": "http",
                        "port": 70000,
                        "path": "/",
                        "interval_ms": 1000,
                        "timeout_ms": 500,
                        "failures": 3,
                    }
                ]
            },
            "port",
            id="health-port-out-of-range",
        ),
        pytest.param({"checks": [{"type": "tcp", "port": 1}]}, "type", id="unknown-check-type"),
        pytest.param({"stop_timeout_s": -1}, "stop_timeout_s", id="negative-grace"),
        pytest.param({"stop_signal": "SIGSEGV"}, "stop_signal", id="unknown-stop-signal"),
        pytest.param({"reload_signal": "SIGKILL"}, "reload_signal", id="kill-is-no-reload"),
        pytest.param({"update": "blue-green"}, "update", id="unknown-update-strategy"),
        pytest.param({"restart": "sometimes"}, "restart", id="unknown-restart-mode"),
        pytest.param(
            {"backoff": {"attempts": 1}}, "spell out every field", id="backoff-must-be-whole"
        ),
        pytest.param(
            {
                "limits": {
                    "memory_bytes": 0,
                    "cpu_seconds": None,
                    "open_files": None,
                    "cgroup_memory_bytes": None,
                    "cgroup_cpu_millicores": None,
                }
            },
            "memory_bytes",
            id="zero-memory",
        ),
        pytest.param({"min_healthy_ms": 1.5}, "not an integer", id="float-time"),
    ],
)
def test_manifest_run_fields_are_strict(change: dict[str, Any], error: str) -> None:
    with pytest.raises(FormatError, match=error):
        decode_signed(run_tree(**change), Manifest)


def old_layout(manifest: Manifest) -> bytes:
    """Canonical bytes as a signer before the supervising runtime wrote them."""
    tree = canonical.check(canonical.encode(manifest))
    for name in RUN_FIELDS_ADDED:
        del tree["run"][name]
    return canonical.encode(tree)


def test_a_manifest_signed_before_the_new_fields_still_verifies_with_defaults() -> None:
    fleet = Fleet()
    signed = old_layout(make_manifest())
    envelope = encode_envelope(signed, [k.sign(signed) for k in fleet.release_keys])
    manifest = verify_manifest(envelope, fleet.trusted(), NOW)
    assert manifest.run is not None
    assert manifest.run.backoff == Backoff() and manifest.run.checks == []
    assert manifest.run.update == "stop-then-start"
    run = merge("thermostat", manifest.version, manifest.run, EntryOptions())
    assert run.argv == ("bin/thermostat", "--port", "8081")


def test_the_documented_old_layout_vector_decodes() -> None:
    old = (
        b'{"_type":"manifest","created":1767225600,"expires":1798761600,"kind":"app",'
        b'"name":"hello","payload":{"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca'
        b'495991b7852b855","size":0},"run":{"command":["bin/hello"],"env":{},"health":null,'
        b'"health_deadline_s":60,"restart":"on-failure","stop_timeout_s":10,"working_dir":"."},'
        b'"security_version":1,"spec_version":1,"targets":{"architectures":["any"],'
        b'"min_agent_version":"0"},"version":"1.0.0"}'
    )
    assert decode_signed(old, Manifest).run == RunSpec(command=["bin/hello"])


def test_only_the_named_new_fields_may_be_absent() -> None:
    tree = canonical.check(old_layout(make_manifest()))
    del tree["run"]["stop_timeout_s"]  # a field that existed before: still required
    with pytest.raises(FormatError, match="spell out every field"):
        decode_signed(canonical.encode(tree), Manifest)
    partial = canonical.check(canonical.encode(make_manifest()))
    del partial["run"]["backoff"]["jitter_pct"]  # inside a new field: spelled out in full
    with pytest.raises(FormatError, match="spell out every field"):
        decode_signed(canonical.encode(partial), Manifest)

"""Connectivity and fault profiles as data, and the pure schedules they produce.

A :class:`Profile` says how long applies take and how often they fail, when a
device's network goes away (``flaky``: each device on its own; ``storm``: all
together), how slow its link is (``slow``) and, with ``workloads``, that the
devices supervise their workloads as agents do, with simulated processes that
take a while to start, crash and fail health checks (per version, so a "bad
release" can be simulated). Built-ins: ``stable``, ``flaky``, ``storm``,
``slow``, ``workloads``; users write their own as a small TOML or JSON file
(see ``docs/simulator.md``), optionally starting from a built-in with
``base = "…"``.

Rules:
- Pure: nothing here does I/O except :func:`load_profile_file`, which reads one
  file. Every value is validated when a profile is built; a bad file raises
  :class:`ProfileError` naming the file and the field (``$.flaky.mean_online_s``).
- Deterministic: every random draw comes from :func:`device_rng` (run seed +
  device id + purpose), so a seed replays the same schedule for each device
  whatever process or order it runs in.
- Times in a schedule are seconds since the run's start (its *epoch*); an
  offline :class:`Window` is ``[start_s, end_s)``: the network is gone in it.
- ``flaky``: a device stays online for an exponential time (mean
  ``mean_online_s``), then offline for an exponential time (mean
  ``mean_offline_s``, capped at ``max_offline_s``), and again.
- ``storm``: every device drops at each storm time and its network returns at
  ``offline_s`` plus a per-device uniform draw in ``[0, reconnect_window_s]``.
- ``workloads``: a process starts after ``start_s`` + U(0, ``start_jitter_s``)
  or fails to start with probability ``start_failure_rate``; a started run
  crashes (exit ``crash_exit_code``) after an exponential time of mean
  ``mean_time_to_crash_s`` (0: never); with probability
  ``health_failure_rate`` a run's probes (HTTP and command checks) all fail.
  ``versions`` overrides any of these for a bundle version (``"2.0.0"``) or
  one workload's version (``"web@2.0.0"``, which wins); see
  :meth:`WorkloadsSpec.behaviour`.
- ``slow`` is a user-space model of a throttled link (:class:`Shaper`): each
  message in each direction waits for the link to be free, for its bytes at
  ``bandwidth_bytes_per_s``, then ``latency_s``. It is not kernel traffic
  shaping: TCP itself runs at loopback speed; only the device's view is delayed.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

PROFILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_PROFILE_FILE_BYTES = 64 * 1024
MAX_STORM_TIMES = 1000

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]


class ProfileError(ValueError):
    """A profile (file, name or values) is not usable; the message says where and why."""


def device_rng(seed: int, device_id: str, purpose: str) -> random.Random:
    """Pure: an rng that depends only on the run's seed, the device and what it is for."""
    return random.Random(f"{seed}/{device_id}/{purpose}")


# ---------------------------------------------------------------- the data


class ApplySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The simulated runtime: each apply takes ``time_s`` + U(0, ``jitter_s``), fails with
    probability ``failure_rate``."""

    time_s: NonNegative = 0.05
    jitter_s: NonNegative = 0.05
    failure_rate: Probability = 0.0


class FlakySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Independent offline windows per device, exponential online and offline times."""

    mean_online_s: Positive = 30.0
    mean_offline_s: Positive = 3.0
    max_offline_s: Positive = 60.0


class StormSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every device drops at once at each of ``at_s`` (then every ``every_s`` after the
    last one, if ``every_s`` > 0) and comes back within the reconnect window."""

    at_s: tuple[NonNegative, ...] = (10.0,)
    every_s: NonNegative = 0.0
    offline_s: NonNegative = 3.0
    reconnect_window_s: NonNegative = 1.0

    def __post_init__(self) -> None:
        if not self.at_s:
            raise ValueError("storm.at_s needs at least one time")
        if len(self.at_s) > MAX_STORM_TIMES:
            raise ValueError(f"storm.at_s lists more than {MAX_STORM_TIMES} times")


class SlowSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A throttled link, per device and direction; ``bandwidth_bytes_per_s = 0``: no cap."""

    latency_s: NonNegative = 0.2
    bandwidth_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 2000


VERSION_KEY_PATTERN = (
    r"^([a-z0-9][a-z0-9._-]{0,63}@)?[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"  # [workload@]version
)
ExitCode = Annotated[int, msgspec.Meta(ge=-64, le=255)]
"""As the supervisor sees it: negative for the signal that ended the process."""


class ProcessBehaviour(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How one simulated workload version's processes behave (all draws per run)."""

    start_s: NonNegative = 0.2
    start_jitter_s: NonNegative = 0.1
    start_failure_rate: Probability = 0.0
    mean_time_to_crash_s: NonNegative = 0.0
    """Mean of the exponential run time before a crash; 0: runs until stopped."""
    crash_exit_code: ExitCode = 1
    health_failure_rate: Probability = 0.0
    """The chance that a run's probes all fail (a run that never turns healthy)."""
    probe_s: NonNegative = 0.01
    """How long a simulated probe takes to answer."""


BEHAVIOUR_FIELDS = ProcessBehaviour.__struct_fields__


class BehaviourOverride(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A version's differences from the profile's :class:`ProcessBehaviour`; None keeps it."""

    start_s: NonNegative | None = None
    start_jitter_s: NonNegative | None = None
    start_failure_rate: Probability | None = None
    mean_time_to_crash_s: NonNegative | None = None
    crash_exit_code: ExitCode | None = None
    health_failure_rate: Probability | None = None
    probe_s: NonNegative | None = None


class WorkloadsSpec(ProcessBehaviour, frozen=True, forbid_unknown_fields=True):
    """Devices supervise their workloads with simulated processes (``simulator.processes``):
    the behaviour fields of :class:`ProcessBehaviour`, per-version overrides, the core's wait."""

    versions: dict[
        Annotated[str, msgspec.Meta(pattern=VERSION_KEY_PATTERN)], BehaviourOverride
    ] = {}
    health_timeout_s: Positive = 60.0
    """The agent core's wait for a rollout's workloads to turn healthy (``AgentCore``)."""

    def behaviour(self, workload: str, version: str) -> ProcessBehaviour:
        """Pure: the profile's behaviour with ``workload@version``'s or else ``version``'s
        override applied."""
        base = ProcessBehaviour(**{f: getattr(self, f) for f in BEHAVIOUR_FIELDS})
        over = self.versions.get(f"{workload}@{version}") or self.versions.get(version)
        if over is None:
            return base
        changes = {k: v for k, v in msgspec.structs.asdict(over).items() if v is not None}
        return msgspec.structs.replace(base, **changes)


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a simulated fleet's devices and network do. Sections left out are off."""

    name: Annotated[str, msgspec.Meta(pattern=PROFILE_NAME_PATTERN)]
    description: Annotated[str, msgspec.Meta(max_length=500)] = ""
    apply: ApplySpec = ApplySpec()
    flaky: FlakySpec | None = None
    storm: StormSpec | None = None
    slow: SlowSpec | None = None
    workloads: WorkloadsSpec | None = None

    @property
    def has_offline_windows(self) -> bool:
        return self.flaky is not None or self.storm is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; loading it back gives an equal profile."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return {k: v for k, v in out.items() if v is not None}


BUILTIN: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="stable",
            description="Every device online all the time; quick applies that never fail.",
            apply=ApplySpec(time_s=0.05, jitter_s=0.05, failure_rate=0.0),
        ),
        Profile(
            name="flaky",
            description=(
                "Each device drops on its own: online ~30 s, offline ~3 s on average "
                "(exponential), slower applies, 1% of applies fail."
            ),
            apply=ApplySpec(time_s=0.2, jitter_s=0.3, failure_rate=0.01),
            flaky=FlakySpec(mean_online_s=30.0, mean_offline_s=3.0, max_offline_s=60.0),
        ),
        Profile(
            name="storm",
            description=(
                "All devices drop together 10 s into the run and every 30 s after, "
                "stay away 3 s and return within 1 s."
            ),
            apply=ApplySpec(time_s=0.05, jitter_s=0.05, failure_rate=0.0),
            storm=StormSpec(at_s=(10.0,), every_s=30.0, offline_s=3.0, reconnect_window_s=1.0),
        ),
        Profile(
            name="slow",
            description=(
                "Throttled links: +200 ms per message each way and 2,000 bytes/s each way "
                "(a user-space model, not kernel shaping)."
            ),
            apply=ApplySpec(time_s=0.2, jitter_s=0.2, failure_rate=0.0),
            slow=SlowSpec(latency_s=0.2, bandwidth_bytes_per_s=2000),
        ),
        Profile(
            name="workloads",
            description=(
                "Stable network; devices supervise their workloads with simulated processes: "
                "starts take 0.2-0.3 s, 0.5% fail to start, a run crashes after ~1 h on "
                "average, 1% of runs never pass their health checks."
            ),
            apply=ApplySpec(time_s=0.05, jitter_s=0.05, failure_rate=0.0),
            workloads=WorkloadsSpec(
                start_s=0.2,
                start_jitter_s=0.1,
                start_failure_rate=0.005,
                mean_time_to_crash_s=3600.0,
                health_failure_rate=0.01,
            ),
        ),
    )
}


# ---------------------------------------------------------------- loading


def profile_from_dict(data: object, *, source: str = "profile") -> Profile:
    """Pure: build and validate a profile from parsed TOML/JSON; raises ProfileError.

    ``base = "NAME"`` starts from that built-in; each section given replaces the
    base's keys one by one (``[flaky] mean_offline_s = 10`` keeps the other flaky keys).
    """
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a table/object at the top level")
    merged: dict[str, Any] = dict(data)
    base_name = merged.pop("base", None)
    if base_name is not None:
        if not isinstance(base_name, str) or base_name not in BUILTIN:
            raise ProfileError(
                f"{source}: base {base_name!r} is not a built-in profile "
                f"(one of {', '.join(BUILTIN)})"
            )
        base = BUILTIN[base_name].as_dict()
        for key, value in merged.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        merged = base
    try:
        return msgspec.convert(merged, Profile)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"{source}: {exc}") from None


def load_profile_file(path: Path) -> Profile:
    """Read a ``.toml`` or ``.json`` profile; raises ProfileError (never OSError)."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ProfileError(f"{path}: a profile file must end in .toml or .json")
    try:
        size = path.stat().st_size
        if size > MAX_PROFILE_FILE_BYTES:
            raise ProfileError(f"{path}: {size} bytes; a profile is at most 64 KiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    try:
        data: object = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    return profile_from_dict(data, source=str(path))


def load_profile(name_or_path: str) -> Profile:
    """A built-in by name, else a profile file; raises ProfileError saying which it tried."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() in (".toml", ".json") or path.exists():
        return load_profile_file(path)
    raise ProfileError(
        f"unknown profile {name_or_path!r}: not a built-in ({', '.join(BUILTIN)}) "
        "and not a .toml or .json file"
    )


# ---------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Window:
    """The device's network is gone during ``[start_s, end_s)``, seconds since the epoch."""

    start_s: float
    end_s: float


def flaky_windows(spec: FlakySpec, rng: random.Random) -> Iterator[Window]:
    """Pure (given the rng): an endless series of non-overlapping offline windows."""
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / spec.mean_online_s)
        offline = min(rng.expovariate(1.0 / spec.mean_offline_s), spec.max_offline_s)
        yield Window(t, t + offline)
        t += offline


def storm_times(spec: StormSpec) -> Iterator[float]:
    """Pure: the storm times, ascending; endless when ``every_s`` > 0."""
    times = sorted(set(spec.at_s))
    yield from times
    if spec.every_s > 0:
        yield from itertools.count(times[-1] + spec.every_s, spec.every_s)


def storm_offline_s(spec: StormSpec, seed: int, device_id: str, index: int) -> float:
    """Pure: how long this device's network stays away in storm ``index`` (0-based, in
    :func:`storm_times` order): ``offline_s`` plus its own draw in the reconnect window."""
    spread = spec.reconnect_window_s
    jitter = device_rng(seed, device_id, f"storm/{index}").uniform(0.0, spread) if spread else 0
    return spec.offline_s + jitter


def storm_windows(spec: StormSpec, seed: int, device_id: str) -> Iterator[Window]:
    """Pure: this device's window for each storm; the return is drawn per storm and device."""
    for index, at in enumerate(storm_times(spec)):
        yield Window(at, at + storm_offline_s(spec, seed, device_id, index))


def offline_windows(profile: Profile, seed: int, device_id: str) -> Iterator[Window]:
    """Pure: the device's flaky and storm windows merged by start (they may overlap)."""
    streams: list[Iterator[Window]] = []
    if profile.flaky is not None:
        streams.append(flaky_windows(profile.flaky, device_rng(seed, device_id, "flaky")))
    if profile.storm is not None:
        streams.append(storm_windows(profile.storm, seed, device_id))
    return heapq.merge(*streams, key=lambda w: w.start_s)


# ---------------------------------------------------------------- the slow link


def publish_wire_bytes(topic: str, payload_bytes: int, qos: int) -> int:
    """Pure: the size of an MQTT 5 PUBLISH with no properties (an estimate to the byte)."""
    body = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + payload_bytes
    length_bytes = 1 if body < 128 else 2 if body < 16_384 else 3 if body < 2_097_152 else 4
    return 1 + length_bytes + body


ACK_WIRE_BYTES = 4  # PUBACK / SUBACK / CONNACK without properties, near enough
CONNECT_WIRE_BYTES = 64  # CONNECT with a client id and a Will of ~100 bytes: a round figure


class Shaper:
    """One direction of a throttled link: a serial pipe with a rate and a delay.

    A message handed over at ``t`` waits until the pipe is free, occupies it for
    ``size / bandwidth`` seconds, then arrives ``latency_s`` later. Pure; times
    are whatever clock the caller uses.
    """

    def __init__(self, spec: SlowSpec) -> None:
        self.latency_s = spec.latency_s
        self.bandwidth = spec.bandwidth_bytes_per_s
        self.busy_until = float("-inf")

    def deliver_at(self, sent_at: float, size: int) -> float:
        start = max(sent_at, self.busy_until)
        done = start + (size / self.bandwidth if self.bandwidth else 0.0)
        self.busy_until = done
        return done + self.latency_s

"""A deployment's rollout policy (pure): the ``rollout`` member of a spec, checked once.

:func:`parse_policy` turns the JSON object (or None: every default) into a frozen
:class:`Policy`; :meth:`Policy.as_json` gives it back in canonical form (every default
written out, absent options left out), and ``parse_policy(p.as_json()) == p``.

Rules:
- Anything that cannot be planned raises :class:`PolicyError` (a ``ValueError``) whose
  message starts with the field's path (``rollout.canary.percent: ...``), so the API
  can answer 422 with it and the planner never meets a bad policy. Unknown keys are an
  error at every level (a typo must not silently mean "no limit"); a key whose value is
  null counts as absent.
- ``strategy``: ``all-at-once`` (default), ``canary`` or ``waves``. ``canary`` is for the
  canary strategy only (default ``{count: 1}``), ``waves`` for the waves strategy only
  (needed there): a member another strategy would ignore is an error.
- Sizes: a count is a whole number >= 1; a percent is > 0 and <= 100 (``{percent: 5}``
  in ``canary``, ``"5%"`` in ``waves``) and takes ceil(percent * targets / 100),
  at least 1 device.
- Times: ``*_s`` fields are seconds (numbers, not booleans); ``pause_s`` and
  ``soak.seconds`` may be 0, the deadlines must be > 0. ``start_at`` and ``activate_at``
  are ISO 8601 with a time zone (``2026-12-07T02:00:00Z``) and become epoch seconds.
  ``activate_at`` needs ``prestage: true``.
- ``max_in_flight`` absent: no limit. ``rate`` absent: no limit; ``growth_factor`` >= 1
  (1: no growth) and > 1 needs ``growth_after`` >= 1.
- ``failure_threshold``: exactly one of ``count`` (>= 1) or ``percent`` (default 20);
  ``min_reported`` >= 0 (default 1); ``action`` ``abort`` (default) or ``pause``.
- ``quorum`` needs both ``percent`` and ``within_s``.
- ``window`` names a maintenance window: ``^[a-z0-9][a-z0-9-]{0,62}$``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

__all__ = [
    "ACTIONS",
    "STRATEGIES",
    "WINDOW_NAME_PATTERN",
    "FailureThreshold",
    "Policy",
    "PolicyError",
    "Quorum",
    "Rate",
    "Size",
    "Soak",
    "parse_policy",
]

Strategy = Literal["all-at-once", "canary", "waves"]
Action = Literal["abort", "pause"]
STRATEGIES: tuple[Strategy, ...] = ("all-at-once", "canary", "waves")
ACTIONS: tuple[Action, ...] = ("abort", "pause")
WINDOW_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_WINDOW_NAME = re.compile(WINDOW_NAME_PATTERN)
_ROOT = "rollout"


class PolicyError(ValueError):
    """A rollout policy that cannot be planned; the message names the field and why."""


@dataclass(frozen=True, slots=True)
class Size:
    """A number of devices: a ``count``, or a ``percent`` of the whole target set."""

    count: int | None = None
    percent: float | None = None

    def of(self, total: int) -> int:
        """Pure: how many of ``total`` devices (at least 1, at most ``total``)."""
        if self.count is not None:
            wanted = self.count
        else:
            wanted = math.ceil((self.percent or 0.0) * total / 100 - 1e-9)
        return max(1, min(wanted, total)) if total else 0

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count} if self.count is not None else {"percent": self.percent}

    def as_entry(self) -> int | str:
        """A ``waves`` list entry: the count, or ``"P%"``."""
        return self.count if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True, slots=True)
class Rate:
    """Hand-outs per minute, multiplied by ``growth_factor`` after every
    ``growth_after`` devices succeeded (0: never)."""

    per_minute: float
    growth_factor: float = 1.0
    growth_after: int = 0

    def now(self, succeeded: int, cap: float = 1e9) -> float:
        """Pure: the rate after ``succeeded`` successes (growth stops at ``cap``)."""
        rate = self.per_minute
        if self.growth_after and self.growth_factor > 1:
            for _ in range(succeeded // self.growth_after):
                rate *= self.growth_factor
                if rate >= cap:
                    return cap
        return rate


RATE_WINDOW_S = 60.0


def rate_slots(
    rate: Rate | None, *, succeeded: int, handed_out_at: Iterable[float], now: float
) -> tuple[float, float | None]:
    """Pure: how many more hand-outs ``rate`` allows at ``now`` after the earlier ones
    (``math.inf``: no rate), and when the next slot frees after those (epoch seconds).
    At most ``floor(rate)`` in any 60 s; below one per minute, one per ``60 / rate`` s.
    The one rule for rollouts and jobs alike."""
    if rate is None:
        return math.inf, None
    per_minute = rate.now(succeeded)
    if per_minute >= 1:
        window_s, capacity = RATE_WINDOW_S, math.floor(per_minute)
    else:
        window_s, capacity = RATE_WINDOW_S / per_minute, 1
    recent = sorted(t for t in handed_out_at if t > now - window_s)
    left = capacity - len(recent)
    # After ``left`` more hand-outs now, the window is full until its oldest expires.
    oldest = recent[len(recent) - capacity] if left <= 0 else (recent[:1] or [now])[0]
    return left, oldest + window_s


@dataclass(frozen=True, slots=True)
class Soak:
    """Healthy for ``seconds`` and ``reports`` healthy reports after the switch."""

    seconds: float = 0.0
    reports: int = 0

    @property
    def none(self) -> bool:
        """No soak: a device succeeds when it reports the generation applied."""
        return self.seconds == 0 and self.reports == 0


@dataclass(frozen=True, slots=True)
class FailureThreshold:
    """Failed (failed + timed_out) devices that stop the rollout, once ``min_reported``
    devices reported (succeeded + failed + timed_out)."""

    count: int | None = None
    percent: float | None = 20.0
    min_reported: int = 1
    action: Action = "abort"

    def crossed(self, failed: int, reported: int) -> bool:
        """Pure: whether ``failed`` of ``reported`` crosses the threshold."""
        if reported == 0 or reported < self.min_reported:
            return False
        if self.count is not None:
            return failed >= self.count
        return failed * 100 >= (self.percent or 0.0) * reported

    def describe(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True, slots=True)
class Quorum:
    """Of a wave's handed-out devices that are not unknown, ``percent`` must reach an
    outcome within ``within_s`` of the wave's start."""

    percent: float
    within_s: float


@dataclass(frozen=True, slots=True)
class Policy:
    """A checked rollout policy (see the module rules); times are epoch seconds."""

    strategy: Strategy = "all-at-once"
    canary: Size | None = None
    waves: tuple[Size, ...] = ()
    pause_s: float | None = None
    max_in_flight: int | None = None
    rate: Rate | None = None
    soak: Soak = field(default_factory=Soak)
    failure_threshold: FailureThreshold = field(default_factory=FailureThreshold)
    quorum: Quorum | None = None
    apply_deadline_s: float = 600.0
    progress_deadline_s: float = 1800.0
    on_progress_deadline: Action = "pause"
    prestage: bool = False
    activate_at: float | None = None
    start_at: float | None = None
    window: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Pure: the canonical JSON form (defaults written out, absent options left out)."""
        out: dict[str, Any] = {"strategy": self.strategy}
        if self.canary is not None:
            out["canary"] = self.canary.as_json()
        if self.waves:
            out["waves"] = [w.as_entry() for w in self.waves]
        if self.pause_s is not None:
            out["pause_s"] = self.pause_s
        if self.max_in_flight is not None:
            out["max_in_flight"] = self.max_in_flight
        if self.rate is not None:
            out["rate"] = {
                "per_minute": self.rate.per_minute,
                "growth_factor": self.rate.growth_factor,
                "growth_after": self.rate.growth_after,
            }
        out["soak"] = {"seconds": self.soak.seconds, "reports": self.soak.reports}
        threshold = self.failure_threshold
        out["failure_threshold"] = {
            **({"count": threshold.count} if threshold.count is not None else {}),
            **({"percent": threshold.percent} if threshold.count is None else {}),
            "min_reported": threshold.min_reported,
            "action": threshold.action,
        }
        if self.quorum is not None:
            out["quorum"] = {"percent": self.quorum.percent, "within_s": self.quorum.within_s}
        out["apply_deadline_s"] = self.apply_deadline_s
        out["progress_deadline_s"] = self.progress_deadline_s
        out["on_progress_deadline"] = self.on_progress_deadline
        out["prestage"] = self.prestage
        for name in ("activate_at", "start_at"):
            at = getattr(self, name)
            if at is not None:
                out[name] = iso(at)
        if self.window is not None:
            out["window"] = self.window
        return out


def iso(at: float) -> str:
    """An epoch time as ISO 8601 UTC with ``Z`` (a formatter, not a clock)."""
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


# --- parsing ---------------------------------------------------------------------


class _Object:
    """One JSON object being read: values by key, and the keys nobody asked for."""

    def __init__(self, raw: object, where: str, known: tuple[str, ...]) -> None:
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{where}: must be an object, not {_show(raw)}")
        self.where = where
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise PolicyError(
                f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})"
            )
        self.values = {str(k): v for k, v in raw.items() if v is not None}

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def has(self, key: str) -> bool:
        return key in self.values

    def number(self, key: str, default: float | None = None, *, low: float = 0.0,
               low_open: bool = False, high: float | None = None) -> float | None:  # fmt: skip
        """A number (not a bool) >= ``low`` (> with ``low_open``) and <= ``high``."""
        if key not in self.values:
            return default
        value = self.values[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(f"{self.path(key)}: must be a number, not {_show(value)}")
        number = float(value)
        if not math.isfinite(number) or number < low or (low_open and number == low):
            raise PolicyError(f"{self.path(key)}: must be {'>' if low_open else '>='} "
                              f"{low:g}, not {value!r}")  # fmt: skip
        if high is not None and number > high:
            raise PolicyError(f"{self.path(key)}: must be <= {high:g}, not {value!r}")
        return number

    def count(self, key: str, default: int | None = None, *, low: int = 0) -> int | None:
        """A whole number >= ``low``."""
        if key not in self.values:
            return default
        value = self.values[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"{self.path(key)}: must be a whole number, not {_show(value)}")
        if value < low:
            raise PolicyError(f"{self.path(key)}: must be >= {low}, not {value}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.values.get(key, default)
        if value not in choices:
            raise PolicyError(
                f"{self.path(key)}: must be one of {', '.join(choices)}, not {_show(value)}"
            )
        return cast(str, value)

    def time(self, key: str) -> float | None:
        """An ISO 8601 time with a zone, as epoch seconds."""
        if key not in self.values:
            return None
        value = self.values[key]
        if not isinstance(value, str):
            raise PolicyError(f"{self.path(key)}: must be an ISO 8601 time, not {_show(value)}")
        try:
            at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise PolicyError(
                f"{self.path(key)}: {value!r} is not an ISO 8601 time (2026-12-07T02:00:00Z)"
            ) from None
        if at.tzinfo is None:
            raise PolicyError(f"{self.path(key)}: {value!r} needs a time zone (Z or +hh:mm)")
        return at.timestamp()

    def object(self, key: str, known: tuple[str, ...]) -> _Object | None:
        if key not in self.values:
            return None
        return _Object(self.values[key], self.path(key), known)


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    return type(value).__name__


_KEYS = (
    "strategy", "canary", "pause_s", "waves", "max_in_flight", "rate", "soak",
    "failure_threshold", "quorum", "apply_deadline_s", "progress_deadline_s",
    "on_progress_deadline", "prestage", "activate_at", "start_at", "window",
)  # fmt: skip


def parse_policy(raw: Mapping[str, Any] | None) -> Policy:
    """Pure: the checked policy of a spec's ``rollout`` member (None: every default).

    Raises PolicyError naming the field (see the module rules).
    """
    top = _Object({} if raw is None else raw, _ROOT, _KEYS)
    strategy = cast(Strategy, top.choice("strategy", "all-at-once", STRATEGIES))
    canary = _canary(top, strategy)
    waves = _waves(top, strategy)
    prestage = top.values.get("prestage", False)
    if not isinstance(prestage, bool):
        raise PolicyError(f"{top.path('prestage')}: must be true or false, not {_show(prestage)}")
    activate_at = top.time("activate_at")
    if activate_at is not None and not prestage:
        raise PolicyError(f"{top.path('activate_at')}: needs prestage: true")
    window = top.values.get("window")
    if window is not None and (not isinstance(window, str) or not _WINDOW_NAME.fullmatch(window)):
        raise PolicyError(f"{top.path('window')}: {_show(window)} must match {WINDOW_NAME_PATTERN}")
    return Policy(
        strategy=strategy,
        canary=canary,
        waves=waves,
        pause_s=top.number("pause_s"),
        max_in_flight=top.count("max_in_flight", low=1),
        rate=_rate(top),
        soak=_soak(top),
        failure_threshold=_threshold(top),
        quorum=_quorum(top),
        apply_deadline_s=cast(float, top.number("apply_deadline_s", 600.0, low_open=True)),
        progress_deadline_s=cast(float, top.number("progress_deadline_s", 1800.0, low_open=True)),
        on_progress_deadline=cast(Action, top.choice("on_progress_deadline", "pause", ACTIONS)),
        prestage=prestage,
        activate_at=activate_at,
        start_at=top.time("start_at"),
        window=window,
    )


def _canary(top: _Object, strategy: Strategy) -> Size | None:
    if strategy != "canary":
        if top.has("canary"):
            raise PolicyError(f"{top.path('canary')}: only with strategy canary")
        return None
    found = top.object("canary", ("count", "percent"))
    if found is None:
        return Size(count=1)
    if found.has("count") == found.has("percent"):
        raise PolicyError(f"{found.where}: needs exactly one of count or percent")
    if found.has("count"):
        return Size(count=found.count("count", low=1))
    return Size(percent=found.number("percent", low_open=True, high=100.0))


def _waves(top: _Object, strategy: Strategy) -> tuple[Size, ...]:
    where = top.path("waves")
    if strategy != "waves":
        if top.has("waves"):
            raise PolicyError(f"{where}: only with strategy waves")
        return ()
    entries = top.values.get("waves")
    if not isinstance(entries, list) or not entries:
        raise PolicyError(f"{where}: strategy waves needs a list of counts or 'P%' entries")
    return tuple(_wave(entry, f"{where}[{i}]") for i, entry in enumerate(entries))


def _wave(entry: object, where: str) -> Size:
    if isinstance(entry, int) and not isinstance(entry, bool):
        if entry < 1:
            raise PolicyError(f"{where}: a count must be >= 1, not {entry}")
        return Size(count=entry)
    if isinstance(entry, str) and entry.strip().endswith("%"):
        try:
            percent = float(entry.strip()[:-1])
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:  # also false for nan
            raise PolicyError(f"{where}: {entry!r} must be a percent > 0 and <= 100")
        return Size(percent=percent)
    raise PolicyError(f"{where}: {_show(entry)} is not a count or a 'P%' text")


def _rate(top: _Object) -> Rate | None:
    found = top.object("rate", ("per_minute", "growth_factor", "growth_after"))
    if found is None:
        return None
    if not found.has("per_minute"):
        raise PolicyError(f"{found.path('per_minute')}: needed")
    factor = cast(float, found.number("growth_factor", 1.0, low=1.0))
    after = cast(int, found.count("growth_after", 0))
    if factor > 1 and after < 1:
        raise PolicyError(f"{found.path('growth_after')}: needed (>= 1) with a growth_factor")
    return Rate(
        per_minute=cast(float, found.number("per_minute", low_open=True)),
        growth_factor=factor,
        growth_after=after,
    )


def _soak(top: _Object) -> Soak:
    found = top.object("soak", ("seconds", "reports"))
    if found is None:
        return Soak()
    return Soak(
        seconds=cast(float, found.number("seconds", 0.0)),
        reports=cast(int, found.count("reports", 0)),
    )


def _threshold(top: _Object) -> FailureThreshold:
    found = top.object("failure_threshold", ("count", "percent", "min_reported", "action"))
    if found is None:
        return FailureThreshold()
    if found.has("count") and found.has("percent"):
        raise PolicyError(f"{found.where}: count or percent, not both")
    return FailureThreshold(
        count=found.count("count", low=1),
        percent=None if found.has("count") else found.number(
            "percent", 20.0, low_open=True, high=100.0),
        min_reported=cast(int, found.count("min_reported", 1)),
        action=cast(Action, found.choice("action", "abort", ACTIONS)),
    )  # fmt: skip


def _quorum(top: _Object) -> Quorum | None:
    found = top.object("quorum", ("percent", "within_s"))
    if found is None:
        return None
    for key in ("percent", "within_s"):
        if not found.has(key):
            raise PolicyError(f"{found.path(key)}: needed")
    return Quorum(
        percent=cast(float, found.number("percent", low_open=True, high=100.0)),
        within_s=cast(float, found.number("within_s", low_open=True)),
    )

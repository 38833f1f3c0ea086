"""The restart policy: after an exit, restart (after how long) or give up.

Pure: no I/O, no clock (``now`` and the random ``jitter`` are inputs). Rules
(``docs/runtime.md``, "Restart policy"):

- ``never`` never restarts; ``on-failure`` restarts only after a failure (an
  exit code other than 0, a signal, or an exit it cannot know: an adopted
  process); ``always`` restarts after any exit.
- At most ``attempts`` restarts within ``interval_s``: the exit that would
  be restart number ``attempts + 1`` in that window gives up, and the
  workload is ``failed`` (it stays stopped until a newer generation changes
  it; it never blocks another generation).
- The n-th exit in the window waits ``delay_s * 2**(n-1)``, at most
  ``max_delay_s``, spread by ``jitter`` either way (``jitter_draw`` in
  [0, 1): 0.5 is the middle), and never less than the device's floor
  (about a second: a fault that passes by itself does not use up the
  attempts in a burst, as systemd's 100 ms default does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.supervisor.spec import RestartPolicy

DEFAULT_FLOOR_S = 1.0


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No restart: ``failed`` says whether the workload is failed (else it finished)."""

    reason: str
    failed: bool


def exits_in_window(exits: Sequence[float], now: float, interval_s: float) -> list[float]:
    """Pure: the exit times within the policy's window ending at ``now``, oldest first."""
    return [at for at in exits if now - at < interval_s]


def next_restart(
    policy: RestartPolicy,
    exits: Sequence[float],
    now: float,
    jitter_draw: float,
    *,
    exit_code: int | None,
    floor_s: float = DEFAULT_FLOOR_S,
) -> float | GiveUp:
    """Pure: the delay before the next start, or why not.

    ``exits`` are this workload's exit times, this one included; ``exit_code``
    is None when it cannot be known, negative for a signal.
    """
    failure = exit_code != 0
    if policy.mode == "never":
        return GiveUp(f"exited ({_code(exit_code)}); restart policy never", failed=failure)
    if policy.mode == "on-failure" and not failure:
        return GiveUp("exited 0; restart policy on-failure", failed=False)
    count = len(exits_in_window(exits, now, policy.interval_s))
    if count > policy.attempts:
        return GiveUp(
            f"exited ({_code(exit_code)}) {count} times within {policy.interval_s:g} s; "
            f"the policy allows {policy.attempts} restarts",
            failed=True,
        )
    delay: float = min(policy.max_delay_s, policy.delay_s * 2.0 ** max(0, count - 1))
    spread = delay * (1 + policy.jitter * (2 * jitter_draw - 1))
    return max(floor_s, spread)


def _code(exit_code: int | None) -> str:
    if exit_code is None:
        return "code unknown"
    return f"signal {-exit_code}" if exit_code < 0 else f"code {exit_code}"

"""The broker cut-off's planner (pure): whom to ask now, what to send, what an answer says.

Nothing here does I/O or reads a clock: the driver (:mod:`.driver`) passes the
pending devices it read, when each was last asked and ``now``, and carries out
the plan.

Rules:
- Neither the CRL (checked at handshakes) nor an ACL reload ends a session that is
  already open, so the hub asks Mosquitto 2's dynamic security plugin: for each
  device, ``createClient`` then ``deleteClient`` of its username (the certificate's
  name). Deleting a client kicks every connection of that username (MQTT 5 reason
  "Administrative action", no Will); the pair leaves the plugin's state as it was,
  whether or not the client existed before. The plugin's own access rules never
  apply: it knows no clients afterwards, and its default is to defer to the ACL file.
- The broker answers on ``$CONTROL/dynamic-security/v1/response``; a device counts
  as cut off when the ``deleteClient`` carrying its correlation data succeeded.
  The confirmation is recorded (``device.cut_off_at``) and a device waiting for it
  is asked again after a while, also after every reconnect of the hub, so a hub
  restart or a lost answer only delays the cut-off.
- When to ask (:func:`plan`): a pending device is asked when it was never asked on
  this connection, or was last asked at least ``pause_s`` ago. The pause starts at
  ``first_pause_s`` and doubles, up to ``max_pause_s``, each time a device has to be
  asked again (its earlier ask went unanswered: a broker without the plugin, a lost
  answer), so an unconfirmable cut-off costs a message every few minutes, not every
  few seconds; once nothing is pending it is back to ``first_pause_s``. Looking
  early (woken by a change) with nobody due changes nothing. The controller looks
  again after the pause while anything is pending, otherwise only when woken.
- Only ``hub:`` identities may publish on the command topic (the ACL file).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hub.broker_config import DYNSEC_RESPONSE_TOPIC, DYNSEC_TOPIC

__all__ = [
    "DYNSEC_RESPONSE_TOPIC",
    "DYNSEC_TOPIC",
    "Answer",
    "Plan",
    "commands",
    "plan",
    "read_answer",
]

_PREFIX = "driftless-cutoff:"


@dataclass(frozen=True)
class Plan:
    """What the controller does now: ask the broker about ``ask`` (in this order), carry
    ``pause_s`` forward, and look again after ``wait_s`` (None: only when woken)."""

    ask: tuple[str, ...]
    pause_s: float
    wait_s: float | None


def plan(
    pending: Sequence[str],
    asked: Mapping[str, float],
    *,
    now: float,
    pause_s: float,
    first_pause_s: float,
    max_pause_s: float,
) -> Plan:
    """Pure: which ``pending`` devices to ask now, given when each was last ``asked``
    (seconds, the same clock as ``now``) and the current pause (see the module rules)."""
    ask = tuple(d for d in pending if now - asked.get(d, -math.inf) >= pause_s)
    if not pending:
        pause_s = first_pause_s
    elif any(d in asked for d in ask):  # asked before and still unconfirmed: back off
        pause_s = min(pause_s * 2, max_pause_s)
    return Plan(ask=ask, pause_s=pause_s, wait_s=pause_s if pending else None)


def commands(device_ids: Sequence[str]) -> bytes:
    """Pure: one command message cutting off every device in ``device_ids``."""
    out: list[dict[str, str]] = []
    for device_id in device_ids:
        out.append({"command": "createClient", "username": device_id})
        out.append(
            {
                "command": "deleteClient",
                "username": device_id,
                "correlationData": _PREFIX + device_id,
            }
        )
    return json.dumps({"commands": out}).encode()


@dataclass(frozen=True)
class Answer:
    """What one response message says: devices cut off, and failures by device."""

    cut_off: list[str]
    failed: dict[str, str]


def read_answer(payload: bytes) -> Answer:
    """Pure: the cut-offs a response confirms or refuses; anything not ours is ignored.

    Raises ValueError when the payload is not a dynamic security response.
    """
    try:
        document = json.loads(payload)
        responses = document["responses"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a dynamic security response: {exc}") from None
    cut_off: list[str] = []
    failed: dict[str, str] = {}
    for response in responses if isinstance(responses, list) else []:
        if not isinstance(response, dict) or response.get("command") != "deleteClient":
            continue
        correlation = response.get("correlationData")
        if not isinstance(correlation, str) or not correlation.startswith(_PREFIX):
            continue
        device_id = correlation[len(_PREFIX) :]
        error = response.get("error")
        if error:
            failed[device_id] = str(error)[:200]
        else:
            cut_off.append(device_id)
    return Answer(cut_off, failed)

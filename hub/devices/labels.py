"""Label rules (pure; no pydantic, no database): shared by the device model, selectors and
the placement planner.

Keys and values are short, restricted strings: they end up in selectors and JSON-path
queries, so they may not contain quotes, wildcards or spaces.
"""

from __future__ import annotations

LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9_.-]{0,63}$"
MAX_LABELS = 32

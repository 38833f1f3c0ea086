"""Rollout errors (the routes turn them into 404 and 409)."""

from __future__ import annotations


class RolloutNotFound(LookupError):
    """No such rollout (or the deployment has none)."""


class RolloutRefused(ValueError):
    """The rollout's state does not allow the command (409)."""

"""Staged rollouts of deployment changes (``docs/rollouts.md``)."""

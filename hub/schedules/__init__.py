"""Maintenance windows and start times: schedules kept in the database (``docs/rollouts.md``)."""

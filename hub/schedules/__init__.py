"""Maintenance windows: kept in the database, rules in :mod:`.window` (docs/windows.md)."""

"""Driftless: the command line and shared process plumbing (logging)."""

__version__ = "0.1.0"

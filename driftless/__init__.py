"""Driftless's command line (``driftless``): each package contributes its own subcommands."""

from plumbing import __version__

__all__ = ["__version__"]

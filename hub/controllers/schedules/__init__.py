"""The scheduler: maintenance windows' fires, recorded once each (``docs/windows.md``)."""

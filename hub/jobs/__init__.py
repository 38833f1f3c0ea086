"""One-shot jobs queued per device (``docs/jobs.md``)."""

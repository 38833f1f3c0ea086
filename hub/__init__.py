"""The Driftless hub: admin API, device database and the MQTT link to the fleet.

Rules:
- The database is the only source of truth for desired state (architecture rule 1);
  nothing about the fleet lives only in this process's memory.
- Nothing is created at import time: :func:`hub.app.create_app` builds everything
  from a :class:`hub.settings.HubSettings`.
"""

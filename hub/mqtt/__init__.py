"""The hub's MQTT side: one session per broker connection, and the link that assembles them.

Modules:

- ``session``: :class:`~hub.mqtt.session.MqttSession`, the one owner of a broker
  connection (connect and reconnect with jittered backoff, subscriptions and their
  SUBACK check, dispatch to handlers by topic filter, manual acknowledgement after
  the handler committed, publish).
- ``link``: :class:`~hub.mqtt.link.BrokerLink`, everything the hub does on one
  broker: its session with ingest, certificate renewal, the broker cut-off and
  delivery registered on it, and the chunk server's own session.

The handlers themselves live with the feature they serve: ``hub/devices/ingest.py``
and ``hub/devices/delivery.py``, ``hub/enrollment/renewal.py``,
``hub/bundles/chunks.py``, ``hub/controllers/cutoff/``.
"""

"""Alembic migrations of the hub's database (``hub.db.migrate``; ``driftless hub migrate``).

Rules:
- Every change to a table is a new revision in ``versions/``, written with plain
  SQLAlchemy types: a revision never imports the hub's models, which move and
  change while revisions stay as they were.
- ``render_as_batch``: SQLite alters a table by copying it, and Alembic's batch
  mode does that; the same revision runs on PostgreSQL.
- A test upgrades an empty database to head and compares it with the models'
  metadata, so a model change without a revision fails the suite; another
  upgrades a database made by the code before migrations existed, rows intact.
"""

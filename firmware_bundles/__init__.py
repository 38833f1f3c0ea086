"""Signed bundles and the fleet's chain of trust.

Layers, each importing only those above it (as in python-tuf's ngclient):

- ``errors``, ``limits``: the exception tree (bad data vs local trouble) and every limit.
- ``atomic``: atomic, durable file replacement (standard library only); the agent
  and the hub replace their files with it too.
- ``canonical``, ``model``: the exact bytes that are signed, and the typed formats.
- ``keys``: Ed25519 keys and private key files.
- ``trust``: pure decisions (thresholds, root rotation, expiry, rollback); time is a parameter.
- ``archive``, ``extract``: the bundle file and its payload, streamed in constant memory.
- ``keydir``, ``cli``: the operator's key directory and command-line front end.

Rule: this package imports msgspec and cryptography, never pydantic, SQLModel or
FastAPI, because every edge agent imports it. See ``docs/bundles.md``.
"""

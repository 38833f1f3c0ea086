"""The hub's desired-state signer: the keys of the fleet root's ``hub`` role.

Rules:
- Keys are loaded once, at start; an encrypted key file takes its passphrase
  from ``DRIFTLESS_HUB_KEY_PASSPHRASE``. A key that cannot be loaded stops the start.
- With a fleet root configured, the keys must be authorised for its ``hub``
  role and together meet the role's threshold; otherwise the start fails,
  because every device holding that root would refuse every document.
- Without keys, documents go out unsigned and the hub says so at start:
  devices holding a root refuse them (only ``--insecure-unsigned`` agents apply them).
- Signing is over the exact bytes of the encoded ``Desired`` message
  (:func:`protocols.signed.seal`); it runs in the publisher's worker thread,
  not on the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from firmware_bundles.errors import LocalError
from firmware_bundles.keys import SigningKey, load_private_key
from firmware_bundles.model import RootMetadata
from protocols.signed import seal

PASSPHRASE_ENV = "DRIFTLESS_HUB_KEY_PASSPHRASE"


class DocumentSigner:
    """Seals desired documents with every configured hub key."""

    __slots__ = ("keys",)

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ValueError("a signer needs at least one key")
        if len({key.keyid for key in keys}) != len(keys):
            raise ValueError("the same hub key is configured twice")
        self.keys = tuple(keys)

    @classmethod
    def load(cls, paths: Sequence[Path]) -> DocumentSigner:
        """Load each key file; raises ValueError with the file and the reason."""
        passphrase = os.environ.get(PASSPHRASE_ENV)
        keys = []
        for path in paths:
            try:
                keys.append(load_private_key(path, passphrase.encode() if passphrase else None))
            except LocalError as exc:
                raise ValueError(f"hub signing key: {exc}") from None
        return cls(keys)

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(key.keyid for key in self.keys)

    def check_against(self, root: RootMetadata) -> None:
        """Raise ValueError unless these keys meet ``root``'s hub threshold."""
        role = root.roles.get("hub")
        if role is None:
            raise ValueError(
                f"the fleet root (version {root.version}) authorises no hub keys: add one with "
                "'driftless keys add --role hub' and give the hub the new root"
            )
        authorised = [keyid for keyid in self.keyids if keyid in role.keyids]
        if len(authorised) < role.threshold:
            unknown = [keyid[:16] for keyid in self.keyids if keyid not in role.keyids]
            raise ValueError(
                f"hub signing keys meet {len(authorised)} of the root's hub threshold "
                f"{role.threshold} (root version {root.version}; keys not authorised: "
                f"{', '.join(unknown) or 'none'}): devices would refuse every document"
            )

    def seal(self, message: bytes) -> bytes:
        """Pure: ``message`` signed by every key (raises ProtocolError when too large)."""
        return seal(message, self.keys)

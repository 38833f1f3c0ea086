"""Domain errors of the bundle store.

Rules:
- The store and the intake raise these; only ``hub/bundles/routes.py``
  turns them into HTTP statuses.
- Blame is in the type: :class:`BundleRejected`, :class:`BundleTooLarge`,
  :class:`BundleNotFound` and :class:`BundleInUse` are the caller's;
  :class:`NoFleetRoot` and :class:`BundleFileMissing` are the hub's own
  configuration or storage, and the caller can only retry later.
- Messages are one line.
"""

from __future__ import annotations

from collections.abc import Sequence

from hub.errors import HubError


class BundleStoreError(HubError):
    """Root of the bundle store's errors."""


class BundleNotFound(BundleStoreError):
    """No bundle with this SHA-256 is stored."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"bundle {sha256} is not stored")
        self.sha256 = sha256


class BundleInUse(BundleStoreError):
    """The bundle is referenced by at least one device's desired state."""

    def __init__(self, sha256: str, count: int, sample: Sequence[str]) -> None:
        shown = ", ".join(sample)
        more = f", and {count - len(sample)} more" if count > len(sample) else ""
        super().__init__(
            f"bundle {sha256} is referenced by the desired state of {count} device(s) "
            f"({shown}{more}); change their desired state first"
        )
        self.sha256 = sha256
        self.count = count
        self.sample = list(sample)


class BundleInDeployment(BundleStoreError):
    """The bundle is named by a deployment's workloads (devices placed later would need it)."""

    def __init__(self, sha256: str, deployments: Sequence[str]) -> None:
        super().__init__(
            f"bundle {sha256} is named by deployment(s) {', '.join(deployments)}; "
            "change or delete them first"
        )
        self.sha256 = sha256
        self.deployments = list(deployments)


class BundleTooLarge(BundleStoreError):
    """An upload longer than ``max_bundle_bytes``."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"bundle upload exceeds the {limit_bytes}-byte limit (max_bundle_bytes)")
        self.limit_bytes = limit_bytes


class BundleRejected(BundleStoreError):
    """An uploaded file that failed verification against the fleet root (bad data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoFleetRoot(BundleStoreError):
    """The hub has no usable fleet root, so it cannot verify (and will not accept) bundles."""


class BundleFileMissing(BundleStoreError):
    """A stored bundle's row exists but its file does not (lost storage); upload it again."""

    def __init__(self, sha256: str) -> None:
        super().__init__(
            f"bundle {sha256} is recorded but its file is missing from the store; "
            "upload the same bundle again to restore it"
        )
        self.sha256 = sha256

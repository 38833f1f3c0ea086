"""The operator's key directory: root metadata versions and the root private keys.

Layout of ``DIR``::

    DIR/root.json           the newest root envelope (what devices are provisioned with)
    DIR/<N>.root.json       every root version N, kept so an old device can walk the chain
    DIR/keys/               mode 0700
    DIR/keys/root-<id>.pem  root private keys (mode 0600), <id> = first 16 hex of the key id

Rules:
- A new root version is built here, signed by the current root keys (and, on
  rotation, by the new ones too), then checked with the very rules a device
  applies (:meth:`TrustedRoot.update`) before anything is written. A root that
  a device would refuse never reaches the disk.
- ``<N>.root.json`` is created once and never rewritten; ``root.json`` is
  replaced atomically after it.
- Root keys are picked by key id: only keys the current root authorises for
  the root role sign, so keys rotated out are never used again.
- Release and hub keys live wherever the operator says (``out``), never here.
"""

from __future__ import annotations

from pathlib import Path

from firmware_bundles.atomic import atomic_write_bytes
from firmware_bundles.errors import KeyFileError, LocalError
from firmware_bundles.keys import SigningKey, load_private_key, sign_document, write_private_key
from firmware_bundles.model import RoleInfo, RoleName, RootMetadata
from firmware_bundles.trust import TrustedRoot

ROOT_FILE = "root.json"
KEYS_DIR = "keys"


def versioned_root_file(version: int) -> str:
    """The file name of root version ``version`` in a key directory."""
    return f"{version}.root.json"


def load_trusted_root(directory: Path) -> TrustedRoot:
    """The current root of a key directory, checked for its own root signatures."""
    path = Path(directory) / ROOT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LocalError(f"{path} does not exist; run 'keys init-root' first") from None
    return TrustedRoot.from_bytes(data)


def _new_root_keys(
    directory: Path, count: int, passphrase: bytes | None
) -> list[tuple[SigningKey, Path]]:
    keys_dir = Path(directory) / KEYS_DIR
    keys_dir.mkdir(mode=0o700, exist_ok=True)
    created: list[tuple[SigningKey, Path]] = []
    try:
        for _ in range(count):
            key = SigningKey.generate()
            path = keys_dir / f"root-{key.keyid[:16]}.pem"
            write_private_key(path, key, passphrase)
            created.append((key, path))
    except BaseException:
        _remove([path for _, path in created])
        raise
    return created


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _current_root_keys(
    directory: Path, root: RootMetadata, passphrase: bytes | None
) -> list[SigningKey]:
    wanted = set(root.roles["root"].keyids)
    found: list[SigningKey] = []
    for path in sorted((Path(directory) / KEYS_DIR).glob("root-*.pem")):
        if not any(keyid.startswith(path.stem.removeprefix("root-")) for keyid in wanted):
            continue
        key = load_private_key(path, passphrase)
        if key.keyid in wanted:
            found.append(key)
    threshold = root.roles["root"].threshold
    if len(found) < threshold:
        raise KeyFileError(
            f"found {len(found)} of the {threshold} root private keys needed to sign "
            f"in {Path(directory) / KEYS_DIR}"
        )
    return found


def _check_threshold(threshold: int, count: int) -> None:
    if not 1 <= threshold <= count:
        raise ValueError(f"threshold {threshold} must be between 1 and the key count {count}")


def _publish(directory: Path, trusted: TrustedRoot, envelope: bytes, now: int) -> RootMetadata:
    trusted.update(envelope, now, 0)  # exactly what a device will check, with no allowance
    root = trusted.root
    versioned = Path(directory) / versioned_root_file(root.version)
    if versioned.exists():
        raise LocalError(f"{versioned} already exists; refusing to rewrite a published root")
    atomic_write_bytes(versioned, envelope)
    atomic_write_bytes(Path(directory) / ROOT_FILE, envelope)
    return root


def init_root(
    directory: Path,
    *,
    threshold: int,
    count: int,
    now: int,
    expires: int,
    passphrase: bytes | None = None,
) -> RootMetadata:
    """Create root keys and root version 1 in ``directory``; refuses an existing root."""
    directory = Path(directory)
    _check_threshold(threshold, count)
    if expires <= now:
        raise ValueError("a new root must expire in the future")
    if (directory / ROOT_FILE).exists():
        raise LocalError(f"{directory / ROOT_FILE} already exists; refusing to replace a root")
    directory.mkdir(parents=True, exist_ok=True)
    keys = [key for key, _ in _new_root_keys(directory, count, passphrase)]
    root = RootMetadata(
        version=1,
        expires=expires,
        keys={key.keyid: key.key_info() for key in keys},
        roles={"root": RoleInfo(keyids=sorted(key.keyid for key in keys), threshold=threshold)},
    )
    envelope = sign_document(root, keys)
    TrustedRoot.from_bytes(envelope)  # the same check a provisioned device makes
    atomic_write_bytes(directory / versioned_root_file(1), envelope)
    atomic_write_bytes(directory / ROOT_FILE, envelope)
    return root


def add_key(
    directory: Path,
    *,
    role: RoleName,
    out: Path,
    now: int,
    expires: int,
    passphrase: bytes | None = None,
    root_passphrase: bytes | None = None,
    threshold: int | None = None,
) -> tuple[SigningKey, RootMetadata]:
    """Create a key at ``out`` and authorise it for ``role`` in a new root version.

    The role is created with threshold 1 if the root has none yet; ``threshold``
    sets it explicitly. Returns the new key and the new root.
    """
    if role == "root":
        raise ValueError("root keys change only by rotation ('keys rotate-root')")
    directory = Path(directory)
    trusted = load_trusted_root(directory)
    current = trusted.root
    signers = _current_root_keys(directory, current, root_passphrase)
    key = SigningKey.generate()
    write_private_key(Path(out), key, passphrase)
    existing = current.roles.get(role)
    keyids = sorted({*(existing.keyids if existing else []), key.keyid})
    new_threshold = threshold or (existing.threshold if existing else 1)
    _check_threshold(new_threshold, len(keyids))
    root = RootMetadata(
        version=current.version + 1,
        expires=expires,
        keys={**current.keys, key.keyid: key.key_info()},
        roles={**current.roles, role: RoleInfo(keyids=keyids, threshold=new_threshold)},
    )
    try:
        published = _publish(directory, trusted, sign_document(root, signers), now)
    except BaseException:
        _remove([Path(out)])
        raise
    return key, published


def rotate_root(
    directory: Path,
    *,
    now: int,
    expires: int,
    root_passphrase: bytes | None = None,
    new_passphrase: bytes | None = None,
    threshold: int | None = None,
    count: int | None = None,
) -> RootMetadata:
    """Replace the root keys: a new root version signed by the old and the new root keys.

    ``count`` and ``threshold`` default to the current root role's. Old root
    key files stay in ``keys/`` (move them offline); they no longer sign.
    """
    directory = Path(directory)
    trusted = load_trusted_root(directory)
    current = trusted.root
    old_role = current.roles["root"]
    count = count or len(old_role.keyids)
    threshold = threshold or min(old_role.threshold, count)
    _check_threshold(threshold, count)
    old_signers = _current_root_keys(directory, current, root_passphrase)
    created = _new_root_keys(directory, count, new_passphrase)
    new_keys = [key for key, _ in created]
    still_used = {
        keyid for name, info in current.roles.items() if name != "root" for keyid in info.keyids
    }
    keys = {keyid: info for keyid, info in current.keys.items() if keyid in still_used}
    keys.update({key.keyid: key.key_info() for key in new_keys})
    root = RootMetadata(
        version=current.version + 1,
        expires=expires,
        keys=keys,
        roles={
            **current.roles,
            "root": RoleInfo(keyids=sorted(key.keyid for key in new_keys), threshold=threshold),
        },
    )
    try:
        return _publish(directory, trusted, sign_document(root, [*old_signers, *new_keys]), now)
    except BaseException:
        _remove([path for _, path in created])
        raise

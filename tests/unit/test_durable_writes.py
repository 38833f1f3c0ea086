"""Every atomic writer is also durable: write, fsync the file, rename, fsync the directory.

A crash test cannot see a missing fsync (the page cache survives a killed
process; only a power cut loses it), so these tests record the order of the
operations instead. ``DiskLog`` wraps ``os.fsync``, ``os.replace`` and
``os.rename`` and notes each call by inode, so the file that ends up under the
target's name is recognised whatever temporary name it had. An fsync also
notes the file's size at that moment: a file fsynced before all of its bytes
were written (say, before the buffer was flushed) does not count.

Two defences per writer, each a test:
- the data is fsynced before the rename puts it in place (for a directory:
  everything in it), else a power cut can leave the new name on an empty or
  torn file;
- the directory is fsynced after the rename, else a power cut can forget the
  rename (the old file, or none, comes back).

Files created once and never replaced (private keys) need the same two fsyncs,
without the rename: the file's, then its directory's.

The broker's CRL and ACL are atomic but deliberately not durable (see
:func:`hub.broker_config.replace_file`): only the rename is checked there.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.bundles import BundleCache
from edge_agent.core import AgentState, HistoryEntry
from edge_agent.runtime import ConfigFileApplier
from edge_agent.store import StateStore
from firmware_bundles import archive, keydir
from firmware_bundles.extract import extract
from firmware_bundles.keys import SigningKey, write_private_key
from firmware_bundles.model import RunSpec
from hub.broker_config import replace_file
from hub.bundles.files import BundleFiles
from protocols import Desired
from tests.unit.test_bundles_support import DAY, NOW, Fleet, entry, tar_gz

Inode = tuple[int, int]


def inode_of(st: os.stat_result) -> Inode:
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class Op:
    kind: str  # "fsync" (a file), "fsync-dir", "rename"
    inode: Inode
    size: int = 0  # for "fsync": the file's size at that moment
    target: str = ""  # for "rename": the new name (absolute)


class DiskLog:
    """The fsyncs and renames made while it is installed, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ops: list[Op] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd: Any) -> None:
            st = os.fstat(fd if isinstance(fd, int) else fd.fileno())
            kind = "fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync"
            self.ops.append(Op(kind, inode_of(st), size=st.st_size))
            real_fsync(fd)

        def renamer(real: Callable[..., None]) -> Callable[..., None]:
            def rename(src: Any, dst: Any, **kwargs: Any) -> None:
                moved = inode_of(os.lstat(src))
                real(src, dst, **kwargs)
                self.ops.append(Op("rename", moved, target=os.path.abspath(dst)))

            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))

    def rename_into(self, target: Path) -> int:
        """Index of the last rename onto ``target``; fails the test if there was none."""
        renames = [
            i
            for i, op in enumerate(self.ops)
            if op.kind == "rename" and op.target == os.path.abspath(target)
        ]
        assert renames, f"{target.name} was never renamed into place: {self.ops}"
        return renames[-1]


def tree(path: Path) -> Iterator[Path]:
    """``path`` and, for a directory, everything beneath it; symlinks have no fd to fsync."""
    if not path.is_symlink():
        yield path
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.rglob("*")):
            if not child.is_symlink():
                yield child


def assert_fsynced_before_rename(log: DiskLog, target: Path) -> None:
    at = log.rename_into(target)
    synced = {op.inode: op.size for op in log.ops[:at] if op.kind in ("fsync", "fsync-dir")}
    for path in tree(target):
        st = os.lstat(path)
        name = path.relative_to(target.parent)
        assert inode_of(st) in synced, f"{name} was not fsynced before the rename"
        if stat.S_ISREG(st.st_mode):
            assert synced[inode_of(st)] == st.st_size, (
                f"{name} was fsynced with {synced[inode_of(st)]} of its {st.st_size} bytes"
            )


def assert_directory_fsynced_after_rename(log: DiskLog, target: Path) -> None:
    at = log.rename_into(target)
    directory = inode_of(os.stat(target.parent))
    assert any(op.kind == "fsync-dir" and op.inode == directory for op in log.ops[at + 1 :]), (
        f"{target.parent.name}/ was not fsynced after {target.name} was renamed into it"
    )


# --- the writers: each calls ``record()`` just before the write under test and returns
# --- the names it replaced


def agent_state(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    store = StateStore(tmp_path / "agent")
    store.save(AgentState(applied_generation=1))
    record()
    store.save(AgentState(3, 4, "boom", 99, 7, (HistoryEntry(3, True, 1.5),)))
    return [store.path]


def agent_config(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    applier = ConfigFileApplier(tmp_path / "agent")
    record()
    applier.apply(Desired(device_id="d", generation=2, config={"k": [1]}, issued_at=5.0))
    return [applier.path]


def agent_bundle_cache(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    cache = BundleCache(tmp_path / "agent", max_bytes=1 << 20)
    cache.prepare()
    sha256 = "ab" * 32
    cache.partial_path(sha256).write_bytes(os.urandom(5000))  # what the fetcher left
    record()
    return [cache.commit(sha256)]


def keydir_root(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    directory = tmp_path / "keys"
    record()
    keydir.init_root(directory, threshold=1, count=1, now=NOW, expires=NOW + 365 * DAY)
    return [directory / keydir.versioned_root_file(1), directory / keydir.ROOT_FILE]


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "thermostat").write_bytes(b"#!/bin/sh\nexec sleep 1000\n" + os.urandom(70_000))
    return src


def _build(tmp_path: Path) -> Path:
    out = tmp_path / "release" / "thermostat.bundle"
    out.parent.mkdir()
    archive.build(
        _source(tmp_path),
        out=out,
        name="thermostat",
        version="1.4.2",
        security_version=3,
        kind="app",
        architectures=["aarch64"],
        created=NOW - DAY,
        expires=NOW + 30 * DAY,
        run=RunSpec(command=["bin/thermostat"]),
    )
    return out


def bundle_build(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    record()
    return [_build(tmp_path)]


def bundle_sign(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    out = _build(tmp_path)
    record()
    archive.sign(out, Fleet().release_keys[0])
    return [out]


def bundle_extract(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    payload = tar_gz(
        (entry("bin", tarfile.DIRTYPE, mode=0o755), None),
        (entry("bin/thermostat", mode=0o755), b"#!/bin/sh\necho hi\n"),
        (entry("etc/deep/config.json"), b"{}" * 5000),
        (entry("current", tarfile.SYMTYPE, linkname="bin/thermostat"), None),
    )
    target = tmp_path / "installs" / "thermostat-1.4.2"
    target.parent.mkdir()
    record()
    extract(io.BytesIO(payload), target)
    return [target]


def hub_bundle_file(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    files = BundleFiles(tmp_path / "bundles")
    files.prepare(now=0.0, stale_after_s=60.0)
    record()
    upload = files.begin_upload(max_bytes=1 << 20)
    upload.write(os.urandom(40_000))
    upload.write(os.urandom(40_000))
    sha256 = upload.finish()
    files.place(upload, sha256)
    return [files.path(sha256)]


Writer = Callable[[Path, Callable[[], DiskLog]], list[Path]]

WRITERS = [
    pytest.param(agent_state, id="agent-state.json"),
    pytest.param(agent_config, id="agent-config.json"),
    pytest.param(agent_bundle_cache, id="agent-bundle-cache-commit"),
    pytest.param(keydir_root, id="keydir-root.json"),
    pytest.param(bundle_build, id="bundle-build"),
    pytest.param(bundle_sign, id="bundle-sign"),
    pytest.param(bundle_extract, id="bundle-extract-directory"),
    pytest.param(hub_bundle_file, id="hub-bundle-place"),
]


def run(
    writer: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[DiskLog, list[Path]]:
    logs: list[DiskLog] = []

    def start() -> DiskLog:
        logs.append(DiskLog(monkeypatch))
        return logs[0]

    targets = writer(tmp_path, start)
    monkeypatch.undo()
    assert len(logs) == 1
    return logs[0], targets


@pytest.mark.parametrize("writer", WRITERS)
def test_a_replacement_is_written_and_fsynced_before_it_is_renamed_into_place(
    writer: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, targets = run(writer, tmp_path, monkeypatch)
    for target in targets:
        assert_fsynced_before_rename(log, target)


@pytest.mark.parametrize("writer", WRITERS)
def test_the_directory_is_fsynced_after_the_rename(
    writer: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, targets = run(writer, tmp_path, monkeypatch)
    for target in targets:
        assert_directory_fsynced_after_rename(log, target)


# --- files created once: private keys


def assert_created_durably(log: DiskLog, path: Path) -> None:
    st = os.stat(path)
    synced = [
        i
        for i, op in enumerate(log.ops)
        if op.kind == "fsync" and op.inode == inode_of(st) and op.size == st.st_size
    ]
    assert synced, f"{path.name} was not fsynced with all of its {st.st_size} bytes"
    directory = inode_of(os.stat(path.parent))
    assert any(op.kind == "fsync-dir" and op.inode == directory for op in log.ops[synced[0] :]), (
        f"{path.parent.name}/ was not fsynced after {path.name} was created in it"
    )


def private_key(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    path = tmp_path / "keys" / "release.pem"
    path.parent.mkdir()
    record()
    write_private_key(path, SigningKey.generate(), b"correct horse")
    return [path]


def keydir_root_keys(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    directory = tmp_path / "keydir"
    record()
    keydir.init_root(directory, threshold=2, count=2, now=NOW, expires=NOW + 365 * DAY)
    return sorted((directory / keydir.KEYS_DIR).glob("root-*.pem"))


def keydir_added_key(tmp_path: Path, record: Callable[[], DiskLog]) -> list[Path]:
    directory, out = tmp_path / "keydir", tmp_path / "operator" / "release.pem"
    keydir.init_root(directory, threshold=1, count=1, now=NOW, expires=NOW + 365 * DAY)
    out.parent.mkdir()
    record()
    keydir.add_key(directory, role="release", out=out, now=NOW, expires=NOW + 365 * DAY)
    return [out]


@pytest.mark.parametrize(
    "writer",
    [
        pytest.param(private_key, id="private-key"),
        pytest.param(keydir_root_keys, id="keydir-root-keys"),
        pytest.param(keydir_added_key, id="keydir-add-key-out"),
    ],
)
def test_a_new_key_file_and_then_its_directory_are_fsynced(
    writer: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, paths = run(writer, tmp_path, monkeypatch)
    assert paths
    for path in paths:
        assert_created_durably(log, path)


# --- atomic, not durable: the files the broker re-reads on SIGHUP


def test_a_broker_file_is_replaced_by_a_rename_never_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crl = tmp_path / "crl.pem"
    replace_file(crl, b"old CRL")
    log = DiskLog(monkeypatch)
    replace_file(crl, b"new CRL")
    monkeypatch.undo()
    log.rename_into(crl)
    assert crl.read_bytes() == b"new CRL"
    assert stat.S_IMODE(crl.stat().st_mode) == 0o644  # Mosquitto may run as another user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crl.pem"]


def test_two_writers_of_a_broker_file_never_share_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two decommissions in the API's thread pool each publish the CRL: the second
    writes while the first is between its write and its rename."""
    crl = tmp_path / "crl.pem"
    real_replace = os.replace
    interleaved: list[bytes] = []

    def replace(src: Any, dst: Any) -> None:
        if not interleaved:
            interleaved.append(b"second")
            replace_file(crl, b"second")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    replace_file(crl, b"first")  # before: FileNotFoundError, the second took its temporary
    monkeypatch.undo()
    assert crl.read_bytes() == b"first"  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crl.pem"]

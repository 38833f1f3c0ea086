"""The bundle store's pieces on their own: settings, files on disk, crash paths, the CLI flags."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from driftless import cli
from hub.bundles import store
from hub.bundles.errors import BundleTooLarge
from hub.bundles.files import MAX_BUNDLE_FILE_BYTES, BundleFiles
from hub.settings import HubSettings
from tests.unit.hub_bundles_support import BundleHub, bundle_hub, sha256_of, upload

BROKER = "mqtt://127.0.0.1:1883"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[BundleHub, TestClient]]:
    with bundle_hub(tmp_path) as pair:
        yield pair


# --- settings ------------------------------------------------------------------------------


def test_bundles_dir_defaults_to_beside_the_sqlite_file(tmp_path: Path) -> None:
    settings = HubSettings(broker_url=BROKER, db_url=f"sqlite:///{tmp_path}/state/hub.db")
    assert settings.bundle_directory() == tmp_path / "state" / "bundles"
    explicit = HubSettings(broker_url=BROKER, db_url="sqlite:///hub.db", bundles_dir=tmp_path / "b")
    assert explicit.bundle_directory() == tmp_path / "b"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"db_url": "postgresql://h/db"}, "bundles_dir must be set", id="postgres"),
        pytest.param({"db_url": "sqlite://"}, "bundles_dir must be set", id="sqlite-memory"),
        pytest.param({"max_bundle_bytes": 0}, "must be positive", id="zero-limit"),
        pytest.param(
            {"max_bundle_bytes": MAX_BUNDLE_FILE_BYTES + 1}, "largest bundle", id="over-format"
        ),
        pytest.param({"bundle_clock_skew_s": -1}, "bundle_clock_skew_s", id="negative-skew"),
        pytest.param({"bundle_io_chunk_bytes": 0}, "must be positive", id="zero-chunk"),
    ],
)
def test_bad_bundle_settings_are_refused(fields: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"broker_url": BROKER, "db_url": "sqlite:///hub.db", **fields}
    with pytest.raises(ValueError, match=message):
        HubSettings(**values)


def test_serve_flags_reach_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[HubSettings] = []

    def fake_serve(settings: HubSettings) -> int:
        captured.append(settings)
        return 0

    monkeypatch.setattr("hub.serve.serve", fake_serve)
    argv = ["hub", "serve", "--db", f"sqlite:///{tmp_path}/hub.db"]
    assert cli.main([*argv, "--bundles-dir", "/srv/b", "--trust-root", "/etc/root.json"]) == 0
    assert captured[-1].bundles_dir == Path("/srv/b")
    assert captured[-1].trust_root_path == Path("/etc/root.json")
    monkeypatch.setenv("DRIFTLESS_TRUST_ROOT", "/env/root.json")
    assert cli.main(argv) == 0
    assert captured[-1].bundles_dir is None
    assert captured[-1].bundle_directory() == tmp_path / "bundles"
    assert captured[-1].trust_root_path == Path("/env/root.json")


# --- files on disk ---------------------------------------------------------------------------


def test_upload_refuses_past_its_limit_before_writing(tmp_path: Path) -> None:
    files = BundleFiles(tmp_path)
    upload_ = files.begin_upload(max_bytes=10)
    upload_.write(b"12345678")
    with pytest.raises(BundleTooLarge):
        upload_.write(b"abc")
    assert upload_.size == 8
    upload_.finish()
    assert upload_.path.read_bytes() == b"12345678"
    upload_.discard()
    upload_.discard()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_place_names_the_file_by_its_hash(tmp_path: Path) -> None:
    files = BundleFiles(tmp_path)
    upload_ = files.begin_upload(max_bytes=100)
    upload_.write(b"bundle bytes")
    sha = upload_.finish()
    files.place(upload_, sha)
    upload_.discard()  # a placed upload is not removed
    assert [p.name for p in tmp_path.iterdir()] == [f"{sha}.bundle"]
    assert sha256_of(tmp_path / f"{sha}.bundle") == sha
    assert oct((tmp_path / f"{sha}.bundle").stat().st_mode & 0o777) == "0o600"


def test_path_refuses_anything_but_a_sha256(tmp_path: Path) -> None:
    files = BundleFiles(tmp_path)
    for bad in ("../../etc/passwd", "AB" * 32, "ab" * 31, ""):
        with pytest.raises(ValueError):
            files.path(bad)


def test_prepare_sweeps_only_stale_temporary_files(tmp_path: Path) -> None:
    files = BundleFiles(tmp_path / "bundles")
    files.prepare(now=time.time(), stale_after_s=3600)
    directory = files.directory
    stale = directory / ".upload-old.tmp"
    fresh = directory / ".upload-new.tmp"
    kept = directory / f"{'ab' * 32}.bundle"
    for path in (stale, fresh, kept):
        path.write_bytes(b"x")
    now = time.time()
    os.utime(stale, (now - 7200, now - 7200))
    assert files.prepare(now=now, stale_after_s=3600) == 1
    assert sorted(p.name for p in directory.iterdir()) == sorted([fresh.name, kept.name])


# --- crash paths of the store ------------------------------------------------------------


def test_failed_delete_commit_puts_the_file_back(
    env: tuple[BundleHub, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, client = env
    sha = upload(client, hub.bundle()).json()["sha256"]
    files = hub.app.state.context.bundle_files

    def broken_commit(self: Session) -> None:
        raise OSError("disk full")

    with Session(hub.app.state.context.engine, expire_on_commit=False) as session:
        monkeypatch.setattr(Session, "commit", broken_commit)
        with pytest.raises(OSError, match="disk full"):
            store.delete_bundle(session, sha256=sha, files=files)
        monkeypatch.undo()
    assert hub.leftovers() == [f"{sha}.bundle"]
    assert client.get(f"bundles/{sha}").status_code == 200
    assert client.get(f"bundles/{sha}/file").status_code == 200


def test_failed_add_commit_removes_the_placed_file(
    env: tuple[BundleHub, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, client = env
    path = hub.bundle()

    def broken_commit(self: Session) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Session, "commit", broken_commit)
    with pytest.raises(OSError, match="disk full"):
        upload(client, path)
    monkeypatch.undo()
    assert hub.leftovers() == []
    assert client.get("bundles").json()["total"] == 0

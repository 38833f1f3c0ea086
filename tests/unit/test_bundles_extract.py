"""Hostile payload archives: each is refused and leaves no trace outside a temporary area."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from firmware_bundles.errors import (
    ArchiveLimitError,
    FormatError,
    UnsafeArchiveError,
)
from firmware_bundles.extract import extract
from firmware_bundles.limits import Limits
from tests.unit.test_bundles_support import entry, tar_gz

MiB = 1024 * 1024


class Site:
    """An install directory beside an 'outside' directory an attacker would like to write."""

    def __init__(self, root: Path) -> None:
        self.installs = root / "installs"
        self.outside = root / "outside"
        self.installs.mkdir()
        self.outside.mkdir()
        (self.outside / "passwd").write_text("root:x:0:0\n")
        self.target = self.installs / "thermostat-1.4.2"

    def snapshot(self) -> dict[str, bytes]:
        tree: dict[str, bytes] = {}
        for path in sorted(self.installs.parent.rglob("*")):
            rel = str(path.relative_to(self.installs.parent))
            tree[rel] = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        return tree

    def refuse(self, payload: bytes, error: type[Exception], match: str, **limits: int) -> None:
        before = self.snapshot()
        with pytest.raises(error, match=match):
            extract(io.BytesIO(payload), self.target, limits=Limits(**limits))
        assert not self.target.exists() and not self.target.is_symlink()
        assert list(self.installs.iterdir()) == [], "temporary directory left behind"
        assert self.snapshot() == before


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_well_formed_payload_is_extracted(site: Site) -> None:
    payload = tar_gz(
        (entry("bin", tarfile.DIRTYPE, mode=0o755), None),
        (entry("bin/thermostat", mode=0o755), b"#!/bin/sh\necho hi\n"),
        (entry("etc/config.json"), b"{}"),
        (entry("current", tarfile.SYMTYPE, linkname="bin/thermostat"), None),
    )
    stats = extract(io.BytesIO(payload), site.target)
    assert (site.target / "bin/thermostat").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((site.target / "bin/thermostat").stat().st_mode) == 0o755
    assert stat.S_IMODE((site.target / "etc/config.json").stat().st_mode) == 0o644
    assert os.readlink(site.target / "current") == "bin/thermostat"
    assert stats.files == 2 and stats.symlinks == 1 and stats.bytes_written == 20
    assert sorted(p.name for p in site.installs.iterdir()) == ["thermostat-1.4.2"]


def test_leading_dot_slash_names_are_accepted(site: Site) -> None:
    payload = tar_gz((entry(".", tarfile.DIRTYPE), None), (entry("./app.py"), b"print()"))
    extract(io.BytesIO(payload), site.target)
    assert (site.target / "app.py").read_bytes() == b"print()"


def test_setuid_and_world_writable_bits_are_dropped(site: Site) -> None:
    payload = tar_gz((entry("suid", mode=0o4777), b"x"), (entry("sgid", mode=0o2666), b"y"))
    extract(io.BytesIO(payload), site.target)
    assert stat.S_IMODE((site.target / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((site.target / "sgid").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../outside/passwd", id="dotdot-leading"),
        pytest.param("bin/../../outside/passwd", id="dotdot-inner"),
        pytest.param("bin/..", id="dotdot-trailing"),
    ],
)
def test_entry_with_dotdot_is_refused(site: Site, name: str) -> None:
    site.refuse(tar_gz((entry(name), b"owned\n")), UnsafeArchiveError, "'..' component")


def test_entry_with_absolute_path_is_refused(site: Site) -> None:
    evil = str(site.outside / "passwd")
    site.refuse(tar_gz((entry(evil), b"owned\n")), UnsafeArchiveError, "absolute path")


def test_symlink_pointing_to_an_absolute_path_is_refused(site: Site) -> None:
    payload = tar_gz((entry("escape", tarfile.SYMTYPE, linkname=str(site.outside)), None))
    site.refuse(payload, UnsafeArchiveError, "points to absolute path")


def test_symlink_pointing_up_and_out_is_refused(site: Site) -> None:
    payload = tar_gz((entry("escape", tarfile.SYMTYPE, linkname="../../outside"), None))
    site.refuse(payload, UnsafeArchiveError, "'..' component")


def test_symlink_chain_through_dot_then_dotdot_is_refused(site: Site) -> None:
    # 'here -> .' is harmless alone; 'up -> here/..' would resolve to the parent.
    payload = tar_gz(
        (entry("here", tarfile.SYMTYPE, linkname="."), None),
        (entry("up", tarfile.SYMTYPE, linkname="here/.."), None),
    )
    site.refuse(payload, UnsafeArchiveError, "'..' component")


def test_write_through_a_symlinked_directory_is_refused(site: Site) -> None:
    payload = tar_gz(
        (entry("sub", tarfile.DIRTYPE), None),
        (entry("link", tarfile.SYMTYPE, linkname="sub"), None),
        (entry("link/file"), b"through the link"),
    )
    site.refuse(payload, UnsafeArchiveError, "beneath symlink 'link'")


def test_file_replacing_an_earlier_symlink_is_refused(site: Site) -> None:
    # Writing 'config' after 'config -> x' would follow the link; names appear once.
    payload = tar_gz(
        (entry("config", tarfile.SYMTYPE, linkname="data/config"), None),
        (entry("config"), b"through the link"),
    )
    site.refuse(payload, UnsafeArchiveError, "more than once")


def test_entry_beneath_a_regular_file_is_refused(site: Site) -> None:
    payload = tar_gz((entry("app"), b"binary"), (entry("app/plugin"), b"x"))
    site.refuse(payload, UnsafeArchiveError, "beneath file 'app'")


def test_hard_link_is_refused(site: Site) -> None:
    payload = tar_gz(
        (entry("a"), b"data"),
        (entry("b", tarfile.LNKTYPE, linkname="a"), None),
    )
    site.refuse(payload, UnsafeArchiveError, "hard link")


def test_hard_link_to_a_file_outside_is_refused(site: Site) -> None:
    link = entry("shadow", tarfile.LNKTYPE, linkname=str(site.outside / "passwd"))
    site.refuse(tar_gz((link, None)), UnsafeArchiveError, "hard link")


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(tarfile.CHRTYPE, id="character-device"),
        pytest.param(tarfile.BLKTYPE, id="block-device"),
        pytest.param(tarfile.FIFOTYPE, id="fifo"),
    ],
)
def test_device_files_and_fifos_are_refused(site: Site, kind: bytes) -> None:
    device = entry("dev/sda", kind)
    device.devmajor, device.devminor = 8, 0
    site.refuse(tar_gz((device, None)), UnsafeArchiveError, "device file or FIFO")


def test_decompression_bomb_is_stopped_while_streaming(site: Site) -> None:
    # 64 MiB of zeros compress to ~64 KiB; the 8 MiB content limit stops it mid-file.
    raw = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w|") as archive,
    ):
        info = entry("zeros")
        info.size = 64 * MiB
        archive.addfile(info, io.BytesIO(bytes(64 * MiB)))
    payload = raw.getvalue()
    assert len(payload) < 100 * 1024
    site.refuse(payload, ArchiveLimitError, "content limit", max_extract_bytes=8 * MiB)


def test_bomb_of_many_small_files_is_stopped(site: Site) -> None:
    payload = tar_gz(*[(entry(f"f{index}"), b"") for index in range(50)])
    site.refuse(payload, ArchiveLimitError, "more than 20 entries", max_extract_files=20)


def test_bomb_hidden_after_the_end_of_the_tar_stream_is_stopped(site: Site) -> None:
    # A tiny valid tar, then megabytes of zeros inside the gzip stream that tar never reads.
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        archive.addfile(entry("ok"), io.BytesIO(b""))
    payload = gzip.compress(tar.getvalue() + bytes(16 * MiB))
    site.refuse(payload, ArchiveLimitError, "decompressed tar stream", max_tar_stream_bytes=MiB)


def test_huge_pax_header_is_refused_before_it_is_read(site: Site) -> None:
    info = entry("file")
    info.pax_headers = {"comment": "x" * (256 * 1024)}
    site.refuse(tar_gz((info, b"data")), ArchiveLimitError, "extended tar header")


def test_payload_that_is_not_gzip_is_refused(site: Site) -> None:
    site.refuse(b"PK\x03\x04 a zip file", FormatError, "not a valid tar.gz")


def test_truncated_gzip_is_refused(site: Site) -> None:
    payload = tar_gz((entry("file"), os.urandom(64 * 1024)))
    site.refuse(payload[: len(payload) // 2], FormatError, "not a valid tar.gz")


def test_existing_target_is_left_alone(site: Site) -> None:
    site.target.mkdir()
    (site.target / "old").write_text("running version")
    with pytest.raises(FileExistsError):
        extract(io.BytesIO(tar_gz((entry("new"), b"x"))), site.target)
    assert [p.name for p in site.target.iterdir()] == ["old"]
    assert sorted(p.name for p in site.installs.iterdir()) == ["thermostat-1.4.2"]


def test_failure_after_some_files_were_written_leaves_nothing(site: Site) -> None:
    payload = tar_gz(
        (entry("bin/app", mode=0o755), b"ok"),
        (entry("lib/libc.so"), b"ok"),
        (entry("../outside/passwd"), b"owned\n"),
    )
    site.refuse(payload, UnsafeArchiveError, "'..' component")

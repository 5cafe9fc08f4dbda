"""DirectDisk: block files that bypass the page cache, and its fallback.

The mount tests read and re-read through the disk cache; these pin what only
the storage layer shows: exact bytes for lengths that are not whole pages,
private file modes, caches written by plain diskcache, and the fallback where
the file system refuses O_DIRECT.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

from xnatfs import directdisk
from xnatfs.directdisk import BlockValue, DirectDisk


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[diskcache.Cache]:
    with diskcache.Cache(str(tmp_path / "cache"), disk=DirectDisk) as c:
        yield c


def block_files(cache: diskcache.Cache) -> list[Path]:
    return [p for p in Path(cache.directory).rglob("*.val")]


@pytest.mark.parametrize("length", [1, 4095, 4096, 4097, 4 * 1024 * 1024 - 7,
                                    4 * 1024 * 1024])
def test_a_block_comes_back_byte_for_byte(cache: diskcache.Cache, length: int) -> None:
    data = bytearray(os.urandom(length))
    cache.set("k", BlockValue(data), read=True)
    assert cache.get("k") == bytes(data)
    (path,) = block_files(cache)
    assert path.stat().st_size == length  # the page padding was cut off
    assert isinstance(cache.disk, DirectDisk) and cache.disk.direct  # ext4 takes O_DIRECT


def test_block_files_are_private(cache: diskcache.Cache) -> None:
    cache.set("k", BlockValue(b"x" * 10_000), read=True)
    (path,) = block_files(cache)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_blocks_written_by_plain_diskcache_are_read(tmp_path: Path) -> None:
    """A cache from before DirectDisk (buffered files) stays valid."""
    data = os.urandom(3 * 4096 + 5)
    with diskcache.Cache(str(tmp_path / "cache")) as old:
        old.set("k", data)
    with diskcache.Cache(str(tmp_path / "cache"), disk=DirectDisk) as new:
        assert new.get("k") == data


def test_other_values_are_stored_as_diskcache_does(cache: diskcache.Cache) -> None:
    cache.set("small", b"abc")
    cache.set("object", {"a": 1})
    assert cache.get("small") == b"abc" and cache.get("object") == {"a": 1}


def test_a_file_system_refusing_o_direct_gets_buffered_io(cache: diskcache.Cache,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refuse_direct(path: str, flags: int, *args: int) -> int:
        if flags & directdisk._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    data = os.urandom(10_000)
    cache.set("k", BlockValue(data), read=True)
    assert not cache.disk.direct
    assert cache.get("k") == data
    (path,) = block_files(cache)  # the refused attempt left nothing behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_other_errors_are_not_mistaken_for_a_refusal(cache: diskcache.Cache,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path: str, flags: int, *args: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "open", disk_full)
    with pytest.raises(OSError) as raised:
        cache.set("k", BlockValue(b"x" * 10_000), read=True)
    assert raised.value.errno == errno.ENOSPC
    assert cache.disk.direct


def test_a_write_that_fails_leaves_no_partial_block(cache: diskcache.Cache,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError):
        cache.set("k", BlockValue(b"x" * 10_000), read=True)
    assert block_files(cache) == []


def test_a_direct_read_refused_falls_back_to_buffered(cache: diskcache.Cache,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10_000)
    cache.set("k", BlockValue(data), read=True)

    def refuse(fd: int, buffers: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "readv", refuse)
    assert cache.get("k") == data
    assert not cache.disk.direct

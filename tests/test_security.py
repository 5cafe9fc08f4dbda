"""File modes and log levels of docs/security.md that hold whatever the umask
(tests/mount/test_security.py checks a real mount's files as a whole): each
of these files was 0644 under the usual umask 022 before."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest
import trio

from xnatfs.blockcache import BlockCache
from xnatfs.cli import _setup_logging
from xnatfs.results import write_batch
from xnatfs.spoolfiles import UploadRecord, write_record


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_block_index_of_an_existing_cache_is_made_private(tmp_path: Path,
                                                              usual_umask: None) -> None:
    """A cache an earlier version made (index 0644, with its -wal and -shm):
    opened by the mount, all three are 0600, and stay so when SQLite makes
    the -wal and -shm again."""
    directory = tmp_path / "blocks"
    old = diskcache.Cache(str(directory))
    old.set("key", b"value")
    index = [directory / name for name in ("cache.db", "cache.db-wal", "cache.db-shm")]
    assert [mode(path) for path in index] == [0o644] * 3
    old.close()

    async def open_and_write() -> None:
        async with trio.open_nursery() as nursery:
            blocks = BlockCache(None, directory, size_limit=1 << 20, nursery=nursery)  # type: ignore[arg-type]
            assert [mode(path) for path in index] == [0o600] * 3
            blocks.close()  # SQLite removes the -wal and -shm with the last connection
            blocks = BlockCache(None, directory, size_limit=1 << 20, nursery=nursery)  # type: ignore[arg-type]
            await trio.to_thread.run_sync(blocks.disk.set, "other", b"value")
            assert [mode(path) for path in index] == [0o600] * 3
            blocks.close()

    trio.run(open_and_write)


def test_an_upload_record_and_a_batch_zip_are_private(tmp_path: Path, usual_umask: None) -> None:
    """The record names the file (and its details may name subjects); the batch
    holds the results themselves."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    write_record(spool, UploadRecord(id="u1", project="P", relpath="P/NP001_notes.txt"))
    assert mode(spool / "meta.json") == 0o600
    member = tmp_path / "result.txt"
    member.write_text("result\n")
    write_batch(spool / "batch.zip", [("result.txt", member)])
    assert mode(spool / "batch.zip") == 0o600


def test_info_logs_what_the_mount_did_not_every_url(tmp_path: Path) -> None:
    """httpx names every URL it requests at INFO (file names, prearchive labels):
    the client's own DEBUG line names the path, so httpx's is left out."""
    log = tmp_path / "mount.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        _setup_logging("INFO", log)
        logging.getLogger("httpx").info("HTTP Request: GET /data/prearchive/projects/P/1/NP001")
        logging.getLogger("xnatfs.mount").info("mounted")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved
    text = log.read_text()
    assert "mounted" in text and "NP001" not in text

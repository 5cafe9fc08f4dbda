"""Cached blocks are trusted across a remount only once their file passed its
digest check whole (issue 24, defect 2; README, "How it reads").

A server that once sent wrong bytes for a file (its listed MD5 says otherwise)
and is then repaired: the blocks a partial read cached meanwhile are not served
by the next mount, which fetches and checks them again; files read whole and
checked are served from the disk cache with no request at all.
"""

from __future__ import annotations

import os
import random

import pytest

from xnatfs.blockcache import DEFAULT_BLOCK_SIZE
from xnatfs.testing.harness import TestServer

from .test_remote_files import FILES, blob_of, data_requests, put_files, read_all

BS = DEFAULT_BLOCK_SIZE
SIZE = 10 * BS + 77  # without Range, a stream paused ahead of a header read stays partial
GOOD = random.Random(242).randbytes(SIZE)
SURE = random.Random(243).randbytes(BS + 5)


def pread(path: os.PathLike[str], size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("server_range", [True, False], ids=["range", "norange"])
def test_blocks_of_a_file_never_checked_whole_are_fetched_again_after_a_remount(
        started_fresh_server: TestServer, mount_factory, server_range: bool) -> None:  # noqa: ANN001
    server = started_fresh_server
    put_files(server, {"doubt.bin": GOOD, "sure.bin": SURE})
    bad = bytearray(GOOD)
    bad[10:410] = bytes(400)  # same size, wrong MD5: in the first block
    blob_of(server, "doubt.bin").write_bytes(bad)
    server.set_knobs(range=server_range)
    mount = mount_factory(server, "--range", "auto")
    files = mount.path / FILES
    # A header read: the mount cannot know yet (the digest needs the whole file).
    assert pread(files / "doubt.bin", 4096, 0) == bad[:4096]
    assert read_all(files / "sure.bin") == SURE  # checked whole: trusted from now on

    blob_of(server, "doubt.bin").write_bytes(GOOD)  # the server is repaired
    mount.remount()
    mark = server.log_mark()
    assert pread(files / "doubt.bin", 4096, 0) == GOOD[:4096]
    assert read_all(files / "doubt.bin") == GOOD  # not ESTALE: the server is right now
    assert read_all(files / "sure.bin") == SURE
    fetched = {e["path"].rsplit("/", 1)[-1] for e in data_requests(server, mark)}
    assert fetched == {"doubt.bin"}, fetched

    mount.remount()  # checked whole now: served from the disk cache alone
    mark = server.log_mark()
    assert read_all(files / "doubt.bin") == GOOD
    assert data_requests(server, mark) == []

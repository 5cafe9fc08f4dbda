"""BlockCache with a real client against the test server: what a read costs.

The mount tests show reads through the kernel; these count what the cache
itself does (disk lookups, downloads), which no mount-level view shows.
"""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from xnatfs.blockcache import downloads as blockcache  # PAUSED_DOWNLOAD_LIMIT lives there
from xnatfs.blockcache import (DEFAULT_BLOCK_SIZE, BlockCache, FileIdentity, prepare_shared,
                               sharedtier)
from xnatfs.blockcache.shared import SharedCache
from xnatfs.errors import Stale
from xnatfs.client import ClientSettings, XnatClient
from xnatfs.credentials import Credentials, SessionCache
from xnatfs.testing.harness import TestServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_copy) -> Iterator[TestServer]:  # noqa: ANN001
    with TestServer(demo_copy(tmp_path_factory.mktemp("blockcache") / "data"),
                    dataset="demo") as srv:
        yield srv


def connect(server: TestServer, tmp_path: Path) -> XnatClient:
    return XnatClient(Credentials(server.url, "admin", "admin"),
                      settings=ClientSettings(deadline=30.0),
                      session_cache=SessionCache(tmp_path / "sessions.json"))


async def two_files(client: XnatClient) -> tuple[FileIdentity, FileIdentity]:
    (experiment, *_) = await client.list_experiments("NEURO_PUB", "NP001")
    files = [f for f in await client.list_scan_files(experiment.id) if f.digest]
    first, second = files[0], files[1]
    return (FileIdentity(first.uri, first.size, first.digest),
            FileIdentity(second.uri, second.size, second.digest))


async def test_a_file_never_cached_costs_no_disk_lookup(server: TestServer,
                                                        tmp_path: Path) -> None:
    cache_dir = tmp_path / "blocks"
    async with connect(server, tmp_path) as client:
        cached, never = await two_files(client)
        async with trio.open_nursery() as nursery:
            blocks = BlockCache(client, cache_dir, size_limit=1 << 30, nursery=nursery)
            await blocks.indexed.wait()
            whole = await blocks.read(cached, 0, cached.size)
            assert len(whole) == cached.size
            assert blocks.stats.disk_lookups == 0  # an empty cache: nothing to look up
            nursery.cancel_scope.cancel()  # block writes are shielded: they finish
        blocks.close()

        async with trio.open_nursery() as nursery:
            blocks = BlockCache(client, cache_dir, size_limit=1 << 30, nursery=nursery)
            await blocks.indexed.wait()
            assert await blocks.read(cached, 0, cached.size) == whole
            assert blocks.stats.fetch_requests == 0 and blocks.stats.disk_hits > 0
            lookups = blocks.stats.disk_lookups
            assert len(await blocks.read(never, 0, 4096)) == min(4096, never.size)
            assert blocks.stats.disk_lookups == lookups  # straight to the server
            assert blocks.stats.fetch_requests == 1
            nursery.cancel_scope.cancel()
        blocks.close()


async def test_first_bytes_says_whether_the_download_failed(server: TestServer,
                                                            tmp_path: Path) -> None:
    """Opening a DICOM file fetches the next ones of its folder once its first bytes
    are in; when its download failed instead, theirs would fail too (16 warnings
    per open against a dead server), so they are not asked for."""
    async with connect(server, tmp_path) as client:
        good, bad = await two_files(client)
        async with trio.open_nursery() as nursery:
            blocks = BlockCache(client, tmp_path / "blocks", size_limit=1 << 30, nursery=nursery)
            await blocks.indexed.wait()
            await blocks.prefetch_whole(good, speculative=False)
            assert await blocks.first_bytes(good)
            server.set_knobs(fail_rate=1.0)
            try:
                await blocks.prefetch_whole(bad, speculative=False)
                assert not await blocks.first_bytes(bad)
            finally:
                server.set_knobs(fail_rate=0.0)
            nursery.cancel_scope.cancel()
        blocks.close()


BLOCK = 64 * 1024
BIG = random.Random(7).randbytes(40 * BLOCK + 123)


async def big_file(server: TestServer, client: XnatClient) -> FileIdentity:
    """A 40-block file in P/S/E/resources/R (Range off, as real XNAT)."""
    server.set_knobs(range=False)
    with httpx.Client(base_url=server.url, auth=("admin", "admin"), trust_env=False) as c:
        assert c.put("/data/projects/P").status_code in (200, 201)
        assert c.put("/data/projects/P/subjects/S").status_code in (200, 201)
        base = "/data/projects/P/subjects/S/experiments/E"
        assert c.put(f"{base}?xsiType=xnat:mrSessionData").status_code in (200, 201)
        r = c.put(f"{base}/resources/R/files/big.bin?overwrite=true", content=BIG)
        assert r.status_code == 200, r.text
    (experiment,) = await client.list_experiments("P", "S")
    (remote,) = [f for f in await client.list_experiment_files(experiment.id)
                 if f.uri.endswith("/big.bin")]
    return FileIdentity(remote.uri, remote.size, remote.digest)


@asynccontextmanager
async def header_read(server: TestServer, tmp_path: Path, shared: Path | None = None
                      ) -> AsyncIterator[tuple[BlockCache, FileIdentity]]:
    """A cache with memory for 8 blocks (a whole-file stream may run 2 blocks
    past its reader) that has read the first 4 KiB of the big file."""
    async with connect(server, tmp_path) as client:
        ident = await big_file(server, client)
        async with trio.open_nursery() as nursery:
            blocks = BlockCache(client, tmp_path / "blocks", size_limit=1 << 30,
                                nursery=nursery, block_size=BLOCK, memory_bytes=8 * BLOCK,
                                shared_dir=shared)
            await blocks.indexed.wait()
            assert await blocks.read(ident, 0, 4096) == BIG[:4096]
            yield blocks, ident
            nursery.cancel_scope.cancel()
        blocks.close()


async def test_a_whole_file_stream_keeps_pace_with_its_reader(server: TestServer,
                                                              tmp_path: Path) -> None:
    """Without Range one stream carries the file; it pauses short of pushing
    unread blocks out of memory, so every block is read from memory, never
    from disk, and the file is downloaded once."""
    async with header_read(server, tmp_path) as (blocks, ident):
        state = blocks.files[ident.key]
        (stream,) = state.downloads
        await trio.sleep(0.5)  # unpaced, the 2.5 MiB would all have arrived by now
        assert stream.position <= 4096 + blocks.max_ahead + BLOCK
        assert state.downloads == [stream]  # paused, not stopped
        data = bytearray(BIG[:4096])
        while len(data) < len(BIG):
            data += await blocks.read(ident, len(data), 3 * BLOCK // 2)
        assert data == BIG
        assert blocks.stats.fetch_requests == 1
        assert blocks.stats.disk_lookups == 0 and blocks.stats.digest_checks == 1


async def test_a_stream_paused_too_long_stops_and_a_later_read_restarts_it(
        server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blockcache, "PAUSED_DOWNLOAD_LIMIT", 0.5)
    async with header_read(server, tmp_path) as (blocks, ident):
        state = blocks.files[ident.key]
        with trio.fail_after(10):
            while state.downloads:
                await trio.sleep(0.05)
        assert await blocks.read(ident, len(BIG) - 5000, 5000) == BIG[-5000:]
        assert blocks.stats.fetch_requests == 2


# ------------------------------------------------------------ the shared tier
async def test_a_hung_shared_tier_costs_one_bound_then_reads_go_to_xnat(
        server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster file system that stops answering: the read waits its bound
    once, then XNAT serves it; the tier is left alone for a while after."""
    monkeypatch.setattr(sharedtier, "SHARED_IO_TIMEOUT", 0.5)
    release = threading.Event()
    calls = []

    def hang(self: SharedCache, *args: object) -> bytes:
        calls.append(args)
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(SharedCache, "read_or_claim", hang)
    monkeypatch.setattr(SharedCache, "touch", hang)
    try:
        async with connect(server, tmp_path) as client:
            first, second = await two_files(client)
            async with trio.open_nursery() as nursery:
                blocks = BlockCache(client, tmp_path / "blocks", size_limit=1 << 30,
                                    nursery=nursery, shared_dir=tmp_path / "shared")
                await blocks.indexed.wait()
                with trio.fail_after(5):
                    assert len(await blocks.read(first, 0, first.size)) == first.size
                    assert len(await blocks.read(second, 0, second.size)) == second.size
                assert len(calls) == 1  # the second file did not try the hung tier
                assert blocks.stats.shared_outages == 1 and blocks.stats.fetch_requests == 2
                nursery.cancel_scope.cancel()
            blocks.close()
    finally:
        release.set()


async def test_blocks_from_the_shared_tier_are_digest_checked_and_dropped_when_wrong(
        server: TestServer, tmp_path: Path) -> None:
    """A block whose own hash is right but whose bytes are not the file's (a node
    that published wrong bytes): the file's MD5 check catches it, and the
    file's blocks leave the shared tier so no node reads them again."""
    shared_dir = tmp_path / "shared"
    async with connect(server, tmp_path) as client:
        ident, _ = await two_files(client)
        assert ident.size <= DEFAULT_BLOCK_SIZE  # one block
        tier = SharedCache(shared_dir, DEFAULT_BLOCK_SIZE)
        tier.prepare()
        good = await client_bytes(server, ident)
        tier.publish(ident.key, 0, bytes(b ^ 0xFF for b in good))
        async with trio.open_nursery() as nursery:
            blocks = BlockCache(client, tmp_path / "blocks", size_limit=1 << 30,
                                nursery=nursery, shared_dir=shared_dir)
            await blocks.indexed.wait()
            with pytest.raises(Stale):
                await blocks.read(ident, 0, ident.size)
            assert blocks.stats.fetch_requests == 0 and blocks.stats.digest_failures == 1
            with trio.fail_after(5):  # dropped from the tier in the background
                while tier.entry(ident.key, 0).exists():
                    await trio.sleep(0.05)
            assert await blocks.read(ident, 0, ident.size) == good  # from XNAT, checked
            assert blocks.stats.fetch_requests == 1
            nursery.cancel_scope.cancel()
        blocks.close()


async def client_bytes(server: TestServer, ident: FileIdentity) -> bytes:
    async with httpx.AsyncClient(base_url=server.url, auth=("admin", "admin"),
                                 trust_env=False) as http:
        answer = await http.get(ident.uri)
        answer.raise_for_status()
        return answer.content


async def test_a_read_waits_for_a_read_ahead_that_began_while_it_asked_the_disk(
        server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a shared tier, a read-ahead looks blocks up in the background and marks
    them loading. A read that asked the disk for the same block meanwhile must wait
    for it, not start a second lookup over it: the two overwrote each other's
    marker, and the loser's cleanup failed (KeyError: every read of the file then
    failed or hung; four mounts of S10 in contrib/bench.py all died of it)."""
    shared = tmp_path / "shared"
    await prepare_shared(shared, BLOCK)
    async with connect(server, tmp_path) as client:
        ident = await big_file(server, client)
        async with trio.open_nursery() as nursery:
            blocks = BlockCache(client, tmp_path / "blocks", size_limit=1 << 30,
                                nursery=nursery, block_size=BLOCK, shared_dir=shared)
            await blocks.indexed.wait()
            raced: list[int] = []

            async def has_block(state, index: int) -> bool:  # noqa: ANN001
                if not raced:  # a read-ahead of this block starts while the disk is asked
                    raced.append(index)
                    await blocks._get_ahead(state, index)
                await trio.sleep(0)
                return False

            monkeypatch.setattr(blocks, "_has_block", has_block)
            monkeypatch.setattr(blocks, "_never_on_disk", lambda state: False)
            with trio.fail_after(20):
                assert await blocks.read(ident, 0, 3 * BLOCK) == BIG[:3 * BLOCK]
            assert raced == [0]
            assert blocks.stats.fetch_requests == 1  # one download carried the blocks
            nursery.cancel_scope.cancel()
        blocks.close()


async def test_a_whole_file_stream_claims_blocks_ahead_of_it_and_releases_them_when_it_stops(
        server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Range another node cannot fetch one block: it would download the
    whole file from byte 0. So a stream claims the blocks ahead of it, not just
    the one it is in, and other nodes (whose kernel readahead runs past the
    stream's pacing) wait for them (S10 in contrib/bench.py: four NIfTI
    downloads for four mounts before, one now). A stream that stops releases
    the claims it will not fill."""
    monkeypatch.setattr(sharedtier, "CLAIM_AHEAD", 8 * BLOCK)
    monkeypatch.setattr(blockcache, "PAUSED_DOWNLOAD_LIMIT", 1.0)
    shared = tmp_path / "shared"
    await prepare_shared(shared, BLOCK)
    folder = SharedCache(shared, BLOCK)

    def claimed(key: str) -> set[int]:
        return {int(p.name.split(".")[0]) for p in folder.folder(key).glob("*.claim")}

    async with header_read(server, tmp_path, shared) as (blocks, ident):
        state = blocks.files[ident.key]
        (stream,) = state.downloads
        with trio.fail_after(10):  # paced: the stream stops 2 blocks past its reader
            while max(claimed(ident.key), default=-1) < 8:
                await trio.sleep(0.05)
        assert stream.position < 4 * BLOCK  # claimed far past where it is
        with trio.fail_after(10):
            while state.downloads or claimed(ident.key):
                await trio.sleep(0.05)


async def test_a_claim_released_while_it_is_still_being_written_is_not_left_behind(
        server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims are written in worker threads, in the background. A stream that
    stops before they are on disk releases them: the release must come after
    the claim, or the claim stays and other nodes wait for it until it goes
    stale (seen on a loaded CI machine)."""
    monkeypatch.setattr(sharedtier, "CLAIM_AHEAD", 8 * BLOCK)
    monkeypatch.setattr(blockcache, "PAUSED_DOWNLOAD_LIMIT", 0.2)
    claims_may_go_on = threading.Event()
    write_claim = SharedCache.claim
    claims = {"asked": 0, "written": 0}

    def slow_claim(self: SharedCache, key: str, index: int) -> bool:
        claims["asked"] += 1
        claims_may_go_on.wait(10)
        try:
            return write_claim(self, key, index)
        finally:
            claims["written"] += 1

    monkeypatch.setattr(SharedCache, "claim", slow_claim)
    shared = tmp_path / "shared"
    await prepare_shared(shared, BLOCK)
    folder = SharedCache(shared, BLOCK)
    async with header_read(server, tmp_path, shared) as (blocks, ident):
        state = blocks.files[ident.key]
        with trio.fail_after(10):  # the stream stopped; its claims are not on disk yet
            while state.downloads:
                await trio.sleep(0.05)
        assert claims["asked"] > 0 and claims["written"] == 0
        claims_may_go_on.set()
        with trio.fail_after(10):
            while (claims["written"] < claims["asked"]
                   or list(folder.folder(ident.key).glob("*.claim"))):
                await trio.sleep(0.05)

"""BlockCache with a real client against the test server: what a read costs.

The mount tests show reads through the kernel; these count what the cache
itself does (disk lookups, downloads), which no mount-level view shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from xnatfs.blockcache import BlockCache, FileIdentity
from xnatfs.client import ClientSettings, XnatClient
from xnatfs.credentials import Credentials, SessionCache
from xnatfs.testing.harness import TestServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    with TestServer(tmp_path_factory.mktemp("blockcache") / "data", dataset="demo") as srv:
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

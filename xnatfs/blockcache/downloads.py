"""Downloads into the block cache: ranged blocks fetched in parallel, or one
streaming download per file where the server ignores Range; their pacing,
and what a download tells about the file (its size, its ``Last-Modified``).

Fetching streams bytes into *pending* blocks, and a reader is woken as soon
as the bytes it asked for have arrived, not when the whole block has: a
header read of a 2 GB file on a server without Range support returns after
the first chunk. Pending blocks get their buffer with their first byte, so
a reader waiting far ahead of a download costs no memory.

Where the server honours Range, missing blocks are fetched by independent
ranged GETs in parallel (the reader's read-ahead window, in
:mod:`.cache`, asks for them). Where it does not (real XNAT 1.8),
every download carries the file from its first byte, so a download fills
*every* missing block it passes, in order, to the end of the file: however
many readers there are and wherever they start, each byte crosses the
network about once. A reader needing a block that a running download has
already passed (it was evicted) starts another download, which stops where
the others are. Such a stream runs on ahead of its readers by at most a
quarter of the memory cache, then pauses (TCP holds the rest at the server)
until a reader comes closer: the blocks ahead are read from memory, not
pushed out unread and read back from disk. It stops, rather than starve
other downloads, when it is past every byte asked for while they wait for
one of the ``max_parallel`` slots (a header peek at many big files), or when
it has been paused for ``PAUSED_DOWNLOAD_LIMIT`` seconds (the file was put
down).

A file replaced on the server under an unchanged listing (same size) is
caught by ``Last-Modified``: every download of a file must carry the first
one's, or the file's blocks are dropped (:mod:`.integrity`), so a reader
never gets new bytes after old ones.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import trio

from ..client import ByteStream, XnatClient
from ..client.settings import operation_deadline
from ..errors import Stale, Unreachable, XnatError
from .blocks import CacheStatistics, Download, FileState, PendingBlock
from .integrity import DigestCheck

log = logging.getLogger("xnatfs.blockcache")  # one logger for the package, as before the split

# A whole-file stream paused this long ahead of its readers stops; while paused,
# it looks this often whether other downloads wait for its slot.
PAUSED_DOWNLOAD_LIMIT = 30.0
PAUSED_DOWNLOAD_POLL = 0.25


@contextlib.contextmanager
def _counted(state: FileState, stream: ByteStream) -> Iterator[None]:
    """Count what ``stream`` receives among the file's bytes received."""
    state.streams.append(stream)
    try:
        yield
    finally:
        state.streams.remove(stream)
        state.received += stream.received


class Downloads(DigestCheck):
    """The methods of :class:`~xnatfs.blockcache.BlockCache` that download;
    state as for :class:`~.disk.DiskTier`."""

    client: XnatClient
    max_ahead: int  # how far a whole-file stream may run ahead of the furthest byte asked for
    fetch_limiter: trio.CapacityLimiter       # max_parallel downloads at a time
    background_limiter: trio.CapacityLimiter  # of which speculative ones hold at most half
    _range_supported: bool | None      # None: not known before the first answer
    _range_learning: trio.Event | None  # set once the first download has its answer

    def _learned_range(self, supported: bool | None) -> None:
        """The first download's answer came (or it failed: ``None``, the next one asks)."""
        if self._range_supported is None and supported is not None:
            self._range_supported = supported
            log.info("server %s HTTP Range", "honours" if supported else "ignores")
        event, self._range_learning = self._range_learning, None
        if event is not None:
            event.set()

    def _open_block(self, state: FileState, index: int) -> PendingBlock:
        pending = state.pending.get(index)
        if pending is None:
            pending = state.pending[index] = PendingBlock(self._block_length(state.ident, index))
        return pending

    async def _fetch(self, state: FileState, index: int, *, speculative: bool = False) -> None:
        """Make block ``index`` pending and make sure a download will fill it.
        ``speculative``: nobody waits for it yet (it gets fewer download slots)."""
        while self._range_supported is None and self._range_learning is not None:
            await self._range_learning.wait()
        if state.dropped or index in state.pending or (state.ident.key, index) in self.memory:
            return
        pending = self._open_block(state, index)
        if not state.fetched:
            self._unmark_verified_soon(state)
        state.fetched = True
        start = index * self.block_size
        # The download's first request is bounded by the operation that asked for
        # the block (none for a read-ahead in the background): see open_stream.
        until = operation_deadline()
        if self._range_supported is None:
            # The first download asks for this block's range: its answer says
            # whether Range works, with no probe round trip before the data.
            self._range_learning = trio.Event()
            self.nursery.start_soon(functools.partial(
                self._download, state, start, start + pending.length, None, learns_range=True,
                speculative=speculative, until=until))
            return
        if self._range_supported:
            stop = start + pending.length
            self.nursery.start_soon(functools.partial(
                self._download, state, start, stop, None, speculative=speculative,
                until=until))
            return
        # No Range: every download starts at byte 0 and fills each missing block it
        # passes. One that has not passed this block yet will fill it.
        if any(d.position <= start and d.stop > start for d in state.downloads):
            return
        if state.downloads:  # all are past it: fill the gap behind them
            furthest = max(d.position for d in state.downloads)
            stop = min(-(-furthest // self.block_size) * self.block_size, state.ident.size)
            stop = max(stop, start + pending.length)
        else:
            stop = state.ident.size
        download = Download(0, stop)
        state.downloads.append(download)
        self.nursery.start_soon(functools.partial(
            self._download, state, 0, stop, download, speculative=speculative, until=until))

    async def _download(self, state: FileState, start: int, stop: int,
                        download: Download | None, *, learns_range: bool = False,
                        speculative: bool = False, until: float = math.inf) -> None:
        """Download bytes ``[start, stop)`` into pending blocks. ``download`` is set for
        whole-file streams, which also open the missing blocks they pass.
        ``learns_range``: this is the first download, and its answer tells whether
        the server honours Range. ``until``: the deadline of the operation that
        started it, which its first request keeps."""
        ident = state.ident
        position = start
        try:
            background = self.background_limiter if speculative else contextlib.nullcontext()
            async with background, self.fetch_limiter, _InFlight(self.stats):
                if state.dropped:
                    return
                self.stats.fetch_requests += 1
                # The client resumes broken downloads itself, within its bounds.
                async with self.client.open_stream(ident.uri, start, stop,
                                                   give_up_by=until) as chunks:
                    if learns_range:
                        learns_range = False
                        self._learned_range(chunks.ranged)
                        if chunks.ranged is False:
                            # The whole file is coming anyway: let this download
                            # fill every block it passes, as downloads do without Range.
                            chunks.end = stop = ident.size
                            download = Download(start, stop)
                            state.downloads.append(download)
                    if chunks.size is not None and chunks.size != ident.size:
                        raise Stale(f"the server has {chunks.size} bytes, the listing said "
                                    f"{ident.size}", path=ident.uri)
                    if not await self._same_version(state, chunks.version):
                        return
                    # Read to the end (the stream stops at ``stop``), so that a
                    # complete answer's connection goes back to the pool.
                    with _counted(state, chunks):
                        async for chunk in chunks:
                            position = await self._distribute(state, position, chunk, download)
                            if state.dropped:
                                break
                            if download is not None and (download.halted
                                                         or self._should_yield(state, position)):
                                log.info("stopping the download of %s ahead of its readers, at "
                                         "byte %d: other downloads wait, or nobody read on",
                                         ident.uri, position)
                                self._fail_blocks(state, position, stop,
                                                  Unreachable("download paused", path=ident.uri),
                                                  download)
                                return
                if position < stop and not state.dropped:
                    raise Unreachable(f"body ended at byte {position} of {stop}", path=ident.uri)
        except XnatError as exc:
            log.warning("download of %s failed: %s", ident.uri, exc)
            self._fail_blocks(state, position, stop, exc, download)
        except Exception as exc:  # a bug: fail the readers, keep the mount alive
            log.exception("download of %s failed", ident.uri)
            self._fail_blocks(state, position, stop, exc, download)
        finally:
            if learns_range:  # failed before the answer: the next fetch asks again
                self._learned_range(None)
            if download is not None:
                state.downloads.remove(download)
                self._release_claims_ahead(state, position)

    async def _same_version(self, state: FileState, version: str | None) -> bool:
        """Whether a download's answer is of the file the cached blocks came from.

        Within the metadata TTL the listing's size and digest cannot tell a file
        replaced on the server (same size) from the old one, and a reader that
        got old bytes would get new ones after them. Every download of a file
        must carry the first one's ``Last-Modified``; otherwise its blocks are
        dropped (readers get ESTALE) and it is fetched anew.
        """
        if version is None or state.version in (None, version):
            state.version = state.version or version
            return True
        log.warning("%s was replaced on the server (Last-Modified %s, now %s); dropping "
                    "its cached blocks", state.ident.uri, state.version, version)
        await self._drop_state(state, bad=bool(state.ident.digest),
                               why=f"{state.ident.uri}: replaced on the server while read")
        return False

    def _should_yield(self, state: FileState, position: int) -> bool:
        """Whether a whole-file stream should give its slot to downloads waiting for
        one: it has passed every byte asked for, so it only fills the cache ahead
        (a later read past it starts another stream; without Range, from byte 0)."""
        return position >= state.wanted and self._downloads_wait_for_a_slot()

    def _downloads_wait_for_a_slot(self) -> bool:
        return self.fetch_limiter.statistics().tasks_waiting > 0

    async def _keep_pace(self, state: FileState, position: int) -> bool:
        """Pause a whole-file stream that is ``max_ahead`` past the furthest byte
        asked for, or past the digest check (blocks it has not hashed yet must
        not leave memory either), until they move on. False: stop it instead
        (other downloads wait for a slot, or nothing moved for
        ``PAUSED_DOWNLOAD_LIMIT`` s)."""
        give_up_at = trio.current_time() + PAUSED_DOWNLOAD_LIMIT
        while position >= self._pace_mark(state) + self.max_ahead and not state.dropped:
            if self._downloads_wait_for_a_slot() or trio.current_time() >= give_up_at:
                return False
            with trio.move_on_after(PAUSED_DOWNLOAD_POLL):
                await state.progress.wait()
        return True

    def _pace_mark(self, state: FileState) -> int:
        """Where a whole-file stream's allowance ahead is counted from."""
        if state.hashing:
            return min(state.wanted, state.hash_next * self.block_size)
        return state.wanted

    def _fail_blocks(self, state: FileState, position: int, stop: int, error: BaseException,
                     download: Download | None) -> None:
        """Fail the pending blocks in ``[position, stop)`` that no other download will fill."""
        first, last = position // self.block_size, -(-stop // self.block_size)
        failed = []
        for index in sorted(i for i in state.pending if first <= i < last):
            pending = state.pending[index]
            at = index * self.block_size + pending.filled
            if any(d is not download and d.position <= at and d.stop > at
                   for d in state.downloads):
                continue
            del state.pending[index]
            pending.fail(error)
            failed.append(index)
        self._release_claims_soon(state, failed)

    async def _distribute(self, state: FileState, position: int, chunk: bytes,
                          download: Download | None) -> int:
        """Feed ``chunk`` (file bytes from ``position``) into pending blocks."""
        state.arrived_at = trio.current_time()
        view = memoryview(chunk)
        while view:
            index, within = divmod(position, self.block_size)
            length = self._block_length(state.ident, index)
            take = min(len(view), length - within)
            pending = state.pending.get(index)
            if pending is None and download is not None and within == 0:
                # A whole-file stream entering a block: wait for its readers if it
                # is far ahead of them, then fill it unless it is cached.
                if not await self._keep_pace(state, position):
                    download.halted = True
                    return position
                # A reader may have opened it while the stream was paused.
                if await self._has_block(state, index):
                    pending = state.pending.get(index)
                else:
                    pending = self._open_block(state, index)
            if download is not None and within == 0:
                # Other nodes wait for this stream's blocks rather than start a
                # whole-file download of their own (a reader here may have opened
                # the block first: claim from the stream's position all the same).
                self._claim_soon(state, index)
            if pending is not None:
                pending.feed_at(within, view[:take])
                if pending.complete and state.pending.get(index) is pending:
                    # Downloads wait while the disk is behind: blocks queued for
                    # it are held in memory.
                    await self._store_slots.acquire()
                    if state.pending.get(index) is pending:
                        self._complete(state, index, pending)
                    else:
                        self._store_slots.release()
            position += take
            view = view[take:]
            if download is not None:
                download.position = position
        return position

    def _complete(self, state: FileState, index: int, pending: PendingBlock) -> None:
        """Move a full block to memory and queue it for the disk (holding a store slot)."""
        del state.pending[index]
        if state.dropped:
            self._store_slots.release()
            return
        data = pending.buffer if pending.buffer is not None else bytearray()
        self.memory[(state.ident.key, index)] = data
        self.stats.fetched_blocks += 1
        self.nursery.start_soon(self._store, state, index, data)
        self._publish_soon(state, index, data)
        self._start_digest(state)


class _InFlight:
    """Counts a download that holds a fetch slot (``downloads_running``, the status file)."""

    def __init__(self, stats: CacheStatistics) -> None:
        self.stats = stats

    async def __aenter__(self) -> None:
        self.stats.downloads_running += 1

    async def __aexit__(self, *exc_info: object) -> None:
        self.stats.downloads_running -= 1

"""Lazy, block-cached file contents: fetched once, shared by all readers, kept on disk.

A file is cut into fixed-size blocks keyed by the file's identity (URI, size
and digest), so a file changed on the server never hits stale blocks. A block
is looked for in memory (a small LRU of hot blocks), then on disk
(diskcache, always called from a worker thread), and only then fetched. An
index of the files with blocks on disk, read once at start, lets a file never
cached go straight to the server: a cold open costs no disk lookup.

Fetching streams bytes into *pending* blocks, and a reader is woken as soon
as the bytes it asked for have arrived, not when the whole block has: a
header read of a 2 GB file on a server without Range support returns after
the first chunk. Pending blocks get their buffer with their first byte, so
a reader waiting far ahead of a download costs no memory.

Where the server honours Range, missing blocks are fetched by independent
ranged GETs in parallel, and sequential readers trigger a read-ahead window
that doubles up to ``max_window`` bytes. Where it does not (real XNAT 1.8),
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

Integrity: when a whole file has passed through and the listing gave an MD5
digest, the blocks are hashed in order (from memory or disk). A read that
returns the end of a file, and after that any read, waits for that check
when every block is cached or on its way, so a whole-file reader (``cp``,
``cat``, ``nibabel``) gets ``Stale`` (ESTALE) instead of bad bytes, whatever
the order the kernel's readahead requests arrive in. (Bytes of a file read
only in part cannot be checked: XNAT has no digest per block.) A mismatch
drops every block of the file, in memory and on disk, and tells the
listeners (the FUSE layer drops the kernel's pages); after it, no byte of
that version of the file is served until a complete fetch of it passes the
check. A file replaced on the server under an unchanged listing (same size)
is caught by ``Last-Modified``: every download of a file must carry the
first one's, or the file's blocks are dropped the same way, so a reader
never gets new bytes after old ones.

Blocks are written to disk in the background, shielded from cancellation
(blocks read before an unmount are on disk when the process exits), at most
16 at a time: a download waits while the disk is behind. They bypass the page
cache (``directdisk``): the kernel already holds the file's pages once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import diskcache
import trio
from cachetools import LRUCache

from .client import ByteStream, XnatClient
from .directdisk import BlockValue, DirectDisk
from .errors import Stale, Unreachable, XnatError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024
# How far a read may land after (or before) where the previous one ended and still
# count as sequential: skips forward, and the kernel's parallel readahead
# requests arriving a little out of order.
SEQUENTIAL_AHEAD = 16 * 1024 * 1024
SEQUENTIAL_BEHIND = 8 * 1024 * 1024
# Blocks read from the disk cache into memory ahead of a sequential reader.
DISK_READ_AHEAD_BLOCKS = 4
# A whole-file stream paused this long ahead of its readers stops; while paused,
# it looks this often whether other downloads wait for its slot.
PAUSED_DOWNLOAD_LIMIT = 30.0
PAUSED_DOWNLOAD_POLL = 0.25

Block = bytes | bytearray


@dataclass(frozen=True)
class FileIdentity:
    """What a block belongs to: a changed size or digest is a different file."""

    uri: str
    size: int
    digest: str | None

    @functools.cached_property
    def key(self) -> str:  # computed once: every read of every block asks for it
        raw = f"{self.uri}\0{self.size}\0{self.digest or ''}".encode()
        return hashlib.sha256(raw).hexdigest()[:40]


class PendingBlock:
    """A block being downloaded; readers wait for the prefix they need."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.buffer: bytearray | None = None  # allocated with the first byte
        self.filled = 0
        self.error: BaseException | None = None
        self._waiters: list[tuple[int, trio.Event]] = []

    @property
    def complete(self) -> bool:
        return self.filled >= self.length

    def feed_at(self, within: int, data: memoryview) -> None:
        """Bytes that belong at offset ``within``; only what extends the filled prefix counts."""
        end = within + len(data)
        if within > self.filled or end <= self.filled:
            return
        if self.buffer is None:
            self.buffer = bytearray(self.length)
        self.buffer[self.filled:end] = data[self.filled - within:]
        self.filled = end
        ready = [w for w in self._waiters if w[0] <= end]
        if ready:
            self._waiters = [w for w in self._waiters if w[0] > end]
            for _, event in ready:
                event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        for _, event in self._waiters:
            event.set()
        self._waiters = []

    async def wait_for(self, end: int) -> None:
        """Return once ``buffer[:end]`` is filled; raise if the download failed first."""
        while self.filled < end:
            if self.error is not None:
                raise self.error
            event = trio.Event()
            self._waiters.append((end, event))
            await event.wait()

    def view(self, lo: int, hi: int) -> memoryview:
        assert self.buffer is not None and hi <= self.filled
        return memoryview(self.buffer)[lo:hi]


@dataclass(eq=False)
class Download:
    """A running whole-file download (servers without Range): where it is, where it stops."""

    position: int
    stop: int
    halted: bool = False  # it should stop: paused too long, or its slot is wanted


@dataclass(eq=False)
class FileState:
    """Per-file bookkeeping while a file is being read."""

    ident: FileIdentity
    nblocks: int
    pending: dict[int, PendingBlock] = field(default_factory=dict)
    on_disk: set[int] = field(default_factory=set)
    loading: dict[int, trio.Event] = field(default_factory=dict)  # disk reads under way
    downloads: list[Download] = field(default_factory=list)       # whole-file streams
    wanted: int = 0             # furthest byte asked for (by readers or a prefetch)
    progress: trio.Event = field(default_factory=trio.Event)  # set when wanted or hash_next grow
    fetched: bool = False       # a block was downloaded, not just found in a cache
    end_served: bool = False    # a read asked for the end of the file
    dropped: bool = False       # its blocks were dropped: the state is dead
    next_read: int = -1         # where a sequential reader would read next
    window: int = 0             # current read-ahead, bytes
    ahead_until: int = 0        # blocks below this index are already on their way
    census: trio.Event | None = None  # set once on_disk lists what the disk had
    hasher: object = None
    hash_next: int = 0          # next block index to feed into the digest check
    hashing: bool = False
    hash_done: trio.Event = field(default_factory=trio.Event)
    verified: bool | None = None  # digest matched / did not / not known yet
    version: str | None = None  # Last-Modified of its first download: every later one must match
    received: int = 0           # bytes received by its finished downloads
    streams: list[ByteStream] = field(default_factory=list)  # its downloads under way


@dataclass
class CacheStatistics:
    memory_hits: int = 0
    disk_hits: int = 0
    disk_lookups: int = 0
    fetched_blocks: int = 0
    fetch_requests: int = 0
    digest_checks: int = 0
    digest_failures: int = 0


@contextlib.contextmanager
def _counted(state: FileState, stream: ByteStream) -> Iterator[None]:
    """Count what ``stream`` receives among the file's bytes received."""
    state.streams.append(stream)
    try:
        yield
    finally:
        state.streams.remove(stream)
        state.received += stream.received


def _want(state: FileState, end: int) -> None:
    """Note that bytes up to ``end`` are asked for; wake the streams paused short of them."""
    if end > state.wanted:
        state.wanted = end
        _progressed(state)


def _progressed(state: FileState) -> None:
    state.progress.set()
    state.progress = trio.Event()


class BlockCache:
    """Blocks of remote files, in memory, on disk and in flight."""

    def __init__(self, client: XnatClient, directory: Path, *, size_limit: int,
                 nursery: trio.Nursery, block_size: int = DEFAULT_BLOCK_SIZE,
                 memory_bytes: int = 64 * 1024 * 1024, range_mode: str = "auto",
                 max_parallel: int = 8, max_window: int = 32 * 1024 * 1024) -> None:
        self.client = client
        self.block_size = block_size
        self.range_mode = range_mode
        self.max_window = max_window
        # How far a whole-file stream may run ahead of the furthest byte asked for:
        # a quarter of the memory, so that the least recently used blocks are
        # always ones the readers passed (at half, a block just fetched could
        # push out one fetched earlier and not read yet).
        self.max_ahead = max(block_size, memory_bytes // 4)
        self.nursery = nursery
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.disk = diskcache.Cache(str(directory), size_limit=size_limit,
                                    eviction_policy="least-recently-stored",
                                    disk=DirectDisk)
        self.memory: LRUCache[tuple[str, int], Block] = LRUCache(maxsize=memory_bytes,
                                                                 getsizeof=len)
        self.files: LRUCache[str, FileState] = LRUCache(maxsize=4096)
        self.disk_limiter = trio.CapacityLimiter(4)
        self.lookup_limiter = trio.CapacityLimiter(2)
        self.fetch_limiter = trio.CapacityLimiter(max_parallel)
        # Speculative fetches (the next files of a series) hold at most half of
        # the slots, so a file just opened never queues behind them.
        self.background_limiter = trio.CapacityLimiter(max(1, max_parallel // 2))
        self._store_slots = trio.Semaphore(16)  # blocks downloaded but not yet on disk
        self.stats = CacheStatistics()
        self._range_supported: bool | None = None if range_mode == "auto" else (
            range_mode == "on")
        # Set while the first download (which learns whether Range works) waits
        # for its answer; other fetches wait for it.
        self._range_learning: trio.Event | None = None
        self._drop_listeners: list[Callable[[FileIdentity], None]] = []
        self._suspect: set[str] = set()  # keys of files whose last digest check failed
        # Keys of the files with blocks on disk, read once at start (blocks stored
        # meanwhile are added as they land), so that a file never cached costs no
        # disk lookup before its download. Trusted only once the read succeeded.
        self._files_on_disk: set[str] = set()
        self._index_complete = False
        self.indexed = trio.Event()  # set once the index is read (or could not be)
        nursery.start_soon(self._index_disk)

    def close(self) -> None:
        self.disk.close()

    async def _index_disk(self) -> None:
        def file_keys() -> set[str]:
            return {key.split(":", 1)[0] for key in self.disk.iterkeys()}

        try:
            keys = await trio.to_thread.run_sync(file_keys, limiter=self.lookup_limiter)
        except Exception as exc:  # without the index, every miss is looked up on disk
            log.warning("cannot index the disk cache: %s", exc)
        else:
            self._files_on_disk |= keys
            self._index_complete = True
        finally:
            self.indexed.set()

    def _never_on_disk(self, state: FileState) -> bool:
        """Whether the disk cache surely has no block of this file."""
        return self._index_complete and state.ident.key not in self._files_on_disk

    def add_drop_listener(self, listener: Callable[[FileIdentity], None]) -> None:
        """Call ``listener(ident)`` whenever the blocks of a file are dropped as
        wrong (failed the digest check, or the file was replaced)."""
        self._drop_listeners.append(listener)

    # ------------------------------------------------------------- reading
    def _state(self, ident: FileIdentity) -> FileState:
        state = self.files.get(ident.key)
        if state is None or state.ident != ident:
            nblocks = max(1, -(-ident.size // self.block_size))
            state = FileState(ident, nblocks)
            self.files[ident.key] = state
        return state

    async def read(self, ident: FileIdentity, offset: int, size: int) -> Block | memoryview:
        """``size`` bytes at ``offset`` (fewer only at end of file).

        Raises:
            Stale: the file's bytes did not match its digest (they are dropped).
            Unreachable, ServerError...: the download failed.
        """
        end = min(offset + size, ident.size)
        if offset >= end:
            return b""
        state = self._state(ident)
        _want(state, end)
        if end == ident.size:
            state.end_served = True
        first, last = offset // self.block_size, (end - 1) // self.block_size
        # Put every block on its way before waiting for any of them.
        sources = [await self._locate(state, index) for index in range(first, last + 1)]
        if ident.key in self._suspect:
            # This version of the file failed its digest: no byte of it is served
            # before the whole file has been fetched again and checked.
            _want(state, ident.size)
            for index in range(state.nblocks):
                await self._locate(state, index)
            state.end_served = state.fetched = True  # the check must run
        await self._read_ahead(state, offset, end)
        parts: list[Block | memoryview] = []
        for index, source in zip(range(first, last + 1), sources, strict=True):
            block_start = index * self.block_size
            lo = max(offset, block_start) - block_start
            hi = min(end, block_start + self._block_length(ident, index)) - block_start
            if isinstance(source, PendingBlock):
                await source.wait_for(hi)
                parts.append(source.view(lo, hi))
            else:
                parts.append(memoryview(source)[lo:hi])
        # Once the end of the file has been asked for, any read may be the one that
        # completes it (the kernel's readahead requests arrive in any order).
        if state.end_served:
            await self._verified(state)
        if ident.key in self._suspect and state.verified is not True:
            raise Stale(f"{ident.uri}: failed its digest check and could not be checked again")
        if state.dropped:
            raise Stale(f"{ident.uri}: the file's blocks were dropped while it was read")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def received(self, ident: FileIdentity) -> int:
        """Bytes of the file downloaded so far: whether a slow read is still moving."""
        state = self.files.get(ident.key)
        if state is None or state.ident != ident:
            return 0
        return state.received + sum(stream.received for stream in state.streams)

    def _block_length(self, ident: FileIdentity, index: int) -> int:
        return min(self.block_size, ident.size - index * self.block_size)

    def _disk_key(self, state: FileState, index: int) -> str:
        return f"{state.ident.key}:{index}"

    async def _locate(self, state: FileState, index: int) -> Block | PendingBlock:
        """Block ``index`` from memory or disk, or the pending block a download will fill."""
        key = (state.ident.key, index)
        while True:
            if state.dropped:
                raise Stale(f"{state.ident.uri}: the file's blocks were dropped")
            data = self.memory.get(key)
            if data is not None:
                self.stats.memory_hits += 1
                return data
            pending = state.pending.get(index)
            if pending is not None:
                return pending
            loading = state.loading.get(index)
            if loading is not None:  # another reader is reading it from disk
                await loading.wait()
                continue
            # The census (one worker call per file) says which blocks the disk
            # has; blocks stored since are added as they land. A block known
            # to be missing is not looked up again before each read.
            if not self._never_on_disk(state) and await self._has_block(state, index):
                if key in self.memory or index in state.pending or index in state.loading:
                    continue  # it arrived while the census ran
                data = await self._load_from_disk(state, index)
                if data is not None:
                    return data
            if key not in self.memory and index not in state.pending:
                await self._fetch(state, index)

    async def _load_from_disk(self, state: FileState, index: int,
                              claimed: trio.Event | None = None) -> Block | None:
        """Block ``index`` from disk into memory (None if it is not there); the
        caller checked it is neither in memory nor pending nor being loaded, or
        ``claimed`` it by putting that event in ``state.loading``."""
        event = claimed if claimed is not None else trio.Event()
        state.loading[index] = event
        try:
            data = await self._disk_get(state, index)
        finally:
            del state.loading[index]
            event.set()
        if data is not None:
            self.stats.disk_hits += 1
            self.memory[(state.ident.key, index)] = data
        return data

    async def _disk_get(self, state: FileState, index: int) -> bytes | None:
        key = self._disk_key(state, index)
        self.stats.disk_lookups += 1
        try:
            data = await trio.to_thread.run_sync(self.disk.get, key, None,
                                                 limiter=self.disk_limiter)
        except Exception as exc:  # a broken disk cache is a miss, not a failed read
            log.warning("cannot read cached block %s: %s", key, exc)
            data = None
        if data is not None and len(data) != self._block_length(state.ident, index):
            log.warning("cached block %s has the wrong length; fetching it again", key)
            data = None
        if data is None:
            state.on_disk.discard(index)
            return None
        state.on_disk.add(index)
        return data

    async def _has_block(self, state: FileState, index: int) -> bool:
        if (index in state.pending or (state.ident.key, index) in self.memory
                or index in state.on_disk):
            return True
        await self._take_census(state)
        return index in state.on_disk

    async def _take_census(self, state: FileState) -> None:
        """Learn which blocks of a file are on disk, once per file, in one worker
        call that does not queue behind block writes (a read-ahead asking block
        by block waited for the disk cache's writes on every block)."""
        if state.census is not None:
            await state.census.wait()
            return
        state.census = trio.Event()
        if self._never_on_disk(state):
            state.census.set()
            return
        keys = [self._disk_key(state, i) for i in range(state.nblocks)]

        def present() -> list[int]:
            return [i for i, key in enumerate(keys) if key in self.disk]

        try:
            state.on_disk.update(await trio.to_thread.run_sync(
                present, limiter=self.lookup_limiter))
        except Exception as exc:  # a broken disk cache is a miss
            log.warning("cannot look up the cached blocks of %s: %s", state.ident.uri, exc)
        finally:
            state.census.set()

    # ---------------------------------------------------------- read-ahead
    async def _read_ahead(self, state: FileState, offset: int, end: int) -> None:
        """Grow the read-ahead window of sequential readers (Range only: without it,
        the whole-file download runs ahead of every reader anyway)."""
        sequential = (state.next_read >= 0
                      and -SEQUENTIAL_BEHIND <= offset - state.next_read <= SEQUENTIAL_AHEAD)
        state.next_read = max(state.next_read, end) if sequential else end
        if not sequential:
            state.window = 0
            state.ahead_until = 0
            return
        self._preload_from_disk(state, end)
        # Unknown means nothing was fetched yet (all came from the cache): no probe for that.
        if self._range_supported is not True:
            return
        state.window = min(max(state.window * 2, self.block_size), self.max_window)
        first = max(state.ahead_until, end // self.block_size)
        last = min((end + state.window - 1) // self.block_size, state.nblocks - 1)
        for index in range(first, last + 1):
            if not await self._has_block(state, index):
                await self._fetch(state, index)
        state.ahead_until = max(state.ahead_until, last + 1)

    def _preload_from_disk(self, state: FileState, end: int) -> None:
        """Sequential reading of a cached file: read the next blocks from disk into
        memory ahead of the reader, so that disk latency overlaps its reads."""
        key = state.ident.key
        first = -(-end // self.block_size)
        for index in range(first, min(first + DISK_READ_AHEAD_BLOCKS, state.nblocks)):
            if ((key, index) in self.memory or index in state.pending
                    or index in state.loading):
                continue
            # Only where the block is known to be on disk, or the file has been
            # served from the cache alone so far: cold files are not looked up.
            if index in state.on_disk or not (state.fetched or self._never_on_disk(state)):
                claimed = state.loading[index] = trio.Event()  # before the task runs
                self.nursery.start_soon(self._preload_block, state, index, claimed)

    async def _preload_block(self, state: FileState, index: int, claimed: trio.Event) -> None:
        try:  # _load_from_disk releases the claim whatever happens
            await self._load_from_disk(state, index, claimed)
        except Exception:  # a failed preload is only a missed chance
            log.exception("preloading block %d of %s failed", index, state.ident.uri)

    async def prefetch_whole(self, ident: FileIdentity, *, speculative: bool = True) -> None:
        """Fetch a small file completely in the background: a file just opened
        (``speculative=False``) or one expected to be read next (series read-ahead)."""
        if ident.size == 0:
            return
        state = self._state(ident)
        _want(state, ident.size)
        for index in range(state.nblocks):
            if not await self._has_block(state, index):
                await self._fetch(state, index, speculative=speculative)

    async def first_bytes(self, ident: FileIdentity) -> bool:
        """Return once the first byte of a file has arrived (True), its download
        failed (False), or no download of its first block is under way (True: it
        is cached, or was never asked for)."""
        state = self.files.get(ident.key)
        pending = state.pending.get(0) if state is not None and state.ident == ident else None
        if pending is not None:
            try:
                await pending.wait_for(min(1, pending.length))
            except Exception:  # a failed download reports to its readers
                return False
        return True

    # -------------------------------------------------------------- fetching
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
        state.fetched = True
        start = index * self.block_size
        if self._range_supported is None:
            # The first download asks for this block's range: its answer says
            # whether Range works, with no probe round trip before the data.
            self._range_learning = trio.Event()
            self.nursery.start_soon(functools.partial(
                self._download, state, start, start + pending.length, None, learns_range=True,
                speculative=speculative))
            return
        if self._range_supported:
            stop = start + pending.length
            self.nursery.start_soon(functools.partial(
                self._download, state, start, stop, None, speculative=speculative))
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
            self._download, state, 0, stop, download, speculative=speculative))

    async def _download(self, state: FileState, start: int, stop: int,
                        download: Download | None, *, learns_range: bool = False,
                        speculative: bool = False) -> None:
        """Download bytes ``[start, stop)`` into pending blocks. ``download`` is set for
        whole-file streams, which also open the missing blocks they pass.
        ``learns_range``: this is the first download, and its answer tells whether
        the server honours Range."""
        ident = state.ident
        position = start
        try:
            background = self.background_limiter if speculative else contextlib.nullcontext()
            async with background, self.fetch_limiter:
                if state.dropped:
                    return
                self.stats.fetch_requests += 1
                # The client resumes broken downloads itself, within its bounds.
                async with self.client.open_stream(ident.uri, start, stop) as chunks:
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
        for index in sorted(i for i in state.pending if first <= i < last):
            pending = state.pending[index]
            at = index * self.block_size + pending.filled
            if any(d is not download and d.position <= at and d.stop > at
                   for d in state.downloads):
                continue
            del state.pending[index]
            pending.fail(error)

    async def _distribute(self, state: FileState, position: int, chunk: bytes,
                          download: Download | None) -> int:
        """Feed ``chunk`` (file bytes from ``position``) into pending blocks."""
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
        self._start_digest(state)

    async def _store(self, state: FileState, index: int, data: Block) -> None:
        """Write a block to disk; shielded, so an unmount waits for it."""
        key = self._disk_key(state, index)

        def store() -> None:
            if state.dropped:
                return
            self.disk.set(key, BlockValue(data), read=True)
            if state.dropped:  # dropped while we wrote: do not leave it behind
                self.disk.delete(key)

        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(store, limiter=self.disk_limiter)
            except Exception as exc:  # a full or broken disk cache only costs a refetch
                log.warning("cannot cache block %s: %s", key, exc)
                return
            finally:
                self._store_slots.release()
        if not state.dropped:
            state.on_disk.add(index)
            self._files_on_disk.add(state.ident.key)

    # ----------------------------------------------------------- integrity
    def _start_digest(self, state: FileState) -> bool:
        """Resume the digest check in the background unless it runs or is settled."""
        if (not state.ident.digest or state.hashing or state.verified is not None
                or state.dropped):
            return False
        state.hashing = True
        state.hash_done = trio.Event()
        self.nursery.start_soon(self._check_digest, state)
        return True

    async def _check_digest(self, state: FileState) -> None:
        """Hash the blocks in order as they become available; compare at the end.

        Stops (to be resumed by the next completed block) at a block that is
        neither in memory, nor on its way, nor on disk.
        """
        done = state.hash_done
        try:
            if state.hasher is None:
                state.hasher = hashlib.md5()
            while state.hash_next < state.nblocks:
                if state.dropped:
                    return
                index = state.hash_next
                data = self.memory.get((state.ident.key, index))
                if data is None:
                    pending = state.pending.get(index)
                    if pending is not None:
                        try:
                            await pending.wait_for(pending.length)
                        except Exception:
                            return  # its download failed; resumed when it is fetched again
                        # Full, though perhaps not yet moved to memory (that waits
                        # for a disk slot): hash its buffer.
                        data = pending.buffer
                    else:
                        loading = state.loading.get(index)
                        if loading is not None:
                            await loading.wait()
                            continue
                        # Not looked up where the census says it is not on disk
                        # (not fetched yet: a paused stream).
                        data = (await self._disk_get(state, index)
                                if await self._has_block(state, index) else None)
                        if data is None:
                            if ((state.ident.key, index) in self.memory
                                    or index in state.pending):
                                continue  # it arrived while we looked
                            return
                    assert data is not None
                await trio.to_thread.run_sync(state.hasher.update, data)  # type: ignore[attr-defined]
                state.hash_next += 1
                _progressed(state)
            self.stats.digest_checks += 1
            actual = state.hasher.hexdigest()  # type: ignore[attr-defined]
            state.verified = actual == state.ident.digest
            if state.verified:
                self._suspect.discard(state.ident.key)
            else:
                self.stats.digest_failures += 1
                log.error("digest mismatch for %s: listed %s, received %s; dropping its blocks",
                          state.ident.uri, state.ident.digest, actual)
                await self._drop_state(state, bad=True,
                                       why=f"{state.ident.uri}: data did not match its digest")
        finally:
            state.hashing = False
            done.set()

    def _check_can_finish(self, state: FileState) -> bool:
        """Whether every block not yet hashed is cached or on its way."""
        key = state.ident.key
        return all((key, i) in self.memory or i in state.pending or i in state.on_disk
                   for i in range(state.hash_next, state.nblocks))

    async def _verified(self, state: FileState) -> None:
        """Before the end of a file is returned: wait for its digest check when this
        session downloaded some of it and the check can finish; raise if it failed."""
        while (state.ident.digest and state.verified is None and state.fetched
               and not state.dropped and (state.hashing or self._check_can_finish(state))):
            before = state.hash_next
            if not state.hashing:
                self._start_digest(state)
            await state.hash_done.wait()
            if state.hash_next == before and not state.hashing:
                break  # no progress (a block went missing): leave it unchecked
        if state.verified is False:
            raise Stale(f"{state.ident.uri}: data did not match its digest")

    async def drop(self, ident: FileIdentity) -> None:
        """Forget every block of a file, in memory and on disk."""
        state = self.files.get(ident.key)
        if state is None:
            state = FileState(ident, max(1, -(-ident.size // self.block_size)))
        await self._drop_state(state, bad=False)

    async def _drop_state(self, state: FileState, *, bad: bool, why: str | None = None) -> None:
        """Forget a file's blocks. ``why``: they may be wrong (failed the digest
        check, or the file was replaced), which readers and listeners are told;
        ``bad``: no byte of this identity is served again before a whole fetch
        of it passes the digest check."""
        ident = state.ident
        if self.files.get(ident.key) is state:
            del self.files[ident.key]
        state.dropped = True
        if bad:
            state.verified = False
            self._suspect.add(ident.key)
        error = Stale(why or f"{ident.uri}: dropped from the cache")
        for pending in state.pending.values():
            pending.fail(error)
        state.pending.clear()
        for i in range(state.nblocks):
            self.memory.pop((ident.key, i), None)
        for listener in self._drop_listeners if why else []:
            try:
                listener(ident)
            except Exception:
                log.exception("drop listener failed for %s", ident.uri)

        def delete_all() -> None:
            for i in range(state.nblocks):
                self.disk.delete(f"{ident.key}:{i}")

        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(delete_all, limiter=self.disk_limiter)
            except Exception:
                log.exception("cannot delete the cached blocks of %s", ident.uri)
        state.on_disk.clear()

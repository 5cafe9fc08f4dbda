"""The block cache's façade, :class:`BlockCache`, and the read path.

A read looks for each block in memory (a small LRU of hot blocks), then on
disk (:mod:`.disk`), and only then puts it on its way (:mod:`.downloads`);
it slices what it returns out of the blocks, and waits for the digest check
(:mod:`.integrity`) before it returns the end of a file. Sequential readers
grow a read-ahead window that doubles up to ``max_window`` bytes (Range
only: without it, the whole-file download runs ahead of every reader
anyway), and a cached file is read from disk ahead of them.

The read path stays in this one module, on purpose: ``read``, ``_locate``
and ``_read_ahead`` run for every FUSE read, and each of them reaches the
other layers only through methods of the same object (the layers are
classes it inherits), so a read costs no forwarding call and no attribute
chain more than before the split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import diskcache
import trio
from cachetools import LRUCache

from ..client import XnatClient
from ..directdisk import DirectDisk
from ..errors import Stale
from .blocks import Block, CacheStatistics, FileIdentity, FileState, PendingBlock, want
from .downloads import Downloads
from .shared import SharedCache

log = logging.getLogger("xnatfs.blockcache")

DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024
# How far a read may land after (or before) where the previous one ended and still
# count as sequential: skips forward, and the kernel's parallel readahead
# requests arriving a little out of order.
SEQUENTIAL_AHEAD = 16 * 1024 * 1024
SEQUENTIAL_BEHIND = 8 * 1024 * 1024


SETTLE_POLL = 0.05  # s between looks while settle() waits for background work
SETTLE_BOUND = 10.0  # s: the most settle() waits


class BlockCache(Downloads):
    """Blocks of remote files, in memory, on disk and in flight."""

    def __init__(self, client: XnatClient, directory: Path, *, size_limit: int,
                 nursery: trio.Nursery, block_size: int = DEFAULT_BLOCK_SIZE,
                 memory_bytes: int = 64 * 1024 * 1024, range_mode: str = "auto",
                 max_parallel: int = 8, max_window: int = 32 * 1024 * 1024,
                 shared_dir: Path | None = None, shared_max: int | None = None) -> None:
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
        private_index(directory)
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
        # Files whose blocks passed the digest check (a marker on disk), and
        # files with blocks from an earlier mount never checked whole: not served.
        self._verified_on_disk: set[str] = set()
        self._doubted: set[str] = set()
        # The shared tier (--shared-cache), consulted after the disk, before XNAT.
        self.shared = SharedCache(shared_dir, block_size) if shared_dir is not None else None
        self.shared_max = shared_max
        self.shared_limiter = trio.CapacityLimiter(4)
        self.publish_limiter = trio.CapacityLimiter(2)
        self._shared_down_until = float("-inf")
        self._shared_publishing = 0
        self._shared_calls = 0
        self._shared_since_trim = 0
        self._shared_trimming = False
        self._shared_touched = LRUCache(maxsize=65536)
        self.indexed = trio.Event()  # set once the index is read (or could not be)
        nursery.start_soon(self._index_disk)

    def close(self) -> None:
        self.disk.close()

    async def settle(self) -> None:
        """Wait for the work that finished reads leave in the background: blocks
        downloaded whole but not yet stored (a reader may have had their bytes
        already), the digest checks of files whose blocks are all here (their
        markers let later mounts trust the blocks), and publications, claims and
        releases in the shared tier. Not for downloads still under way. For a
        process about to end (``xnatfs prefetch``, an unmount); at most
        ``SETTLE_BOUND`` seconds."""
        with trio.move_on_after(SETTLE_BOUND):
            while self._work_left_behind():
                await trio.sleep(SETTLE_POLL)

    def _work_left_behind(self) -> bool:
        if self._shared_publishing or self._shared_calls:
            return True
        for state in self.files.values():
            if state.dropped:
                continue
            complete = [pending.complete for pending in state.pending.values()]
            if any(complete) or (state.hashing and all(complete)):
                return True
        return False

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

    async def read(self, ident: FileIdentity, offset: int, size: int, *,
                   checked_first: bool = False) -> Block | memoryview:
        """``size`` bytes at ``offset`` (fewer only at end of file).

        ``checked_first``: no byte of a file with a digest is returned before the
        whole file has passed its digest check (a snapshot mount's small files),
        so that a read of part of it cannot return bytes of another version.

        Raises:
            Stale: the file's bytes did not match its digest (they are dropped).
            Unreachable, ServerError...: the download failed.
        """
        end = min(offset + size, ident.size)
        if offset >= end:
            return b""
        state = self._state(ident)
        want(state, end)
        if end == ident.size:
            state.end_served = True
        first, last = offset // self.block_size, (end - 1) // self.block_size
        # Put every block on its way before waiting for any of them.
        sources = [await self._locate(state, index) for index in range(first, last + 1)]
        check_first = ident.key in self._suspect or (
            checked_first and bool(ident.digest) and state.verified is not True)
        if check_first:
            # This version of the file failed its digest (or must be checked before
            # it is served): no byte of it is served before the whole file has
            # been fetched (again) and checked.
            want(state, ident.size)
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
                if index in state.from_shared:
                    self.stats.bytes_from_shared += hi - lo
                else:
                    self.stats.bytes_from_cache += hi - lo
                parts.append(memoryview(source)[lo:hi])
        # Once the end of the file has been asked for, any read may be the one that
        # completes it (the kernel's readahead requests arrive in any order).
        if state.end_served:
            await self._verified(state)
        if (check_first or ident.key in self._suspect) and state.verified is not True:
            raise Stale(f"{ident.uri}: could not be checked against its digest")
        if state.dropped:
            raise Stale(f"{ident.uri}: the file's blocks were dropped while it was read")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def cached_bytes(self, ident: FileIdentity) -> int:
        """Bytes of the file the disk cache holds, in whole blocks, without reading
        them (one census): what ``xnatfs prefetch`` skips as already cached."""
        await self.indexed.wait()
        state = self._state(ident)
        await self._take_census(state)
        return sum(self._block_length(ident, index) for index in state.on_disk)

    def received(self, ident: FileIdentity) -> int:
        """Bytes of the file downloaded so far: whether a slow read is still moving."""
        state = self.files.get(ident.key)
        if state is None or state.ident != ident:
            return 0
        return state.received + sum(stream.received for stream in state.streams)

    def last_arrival(self, ident: FileIdentity) -> float:
        """When bytes of the file last arrived from a download (trio time; -inf:
        never, in this mount): whether a read past its bound still moves."""
        state = self.files.get(ident.key)
        if state is None or state.ident != ident:
            return float("-inf")
        moving = [s.moved_at for s in state.streams if s.moved_at is not None]
        return max([state.arrived_at, *moving])

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
            # A read-ahead may have started on it while the disk was asked (_get_ahead
            # marks it loading): wait for that one rather than race it.
            if (key not in self.memory and index not in state.pending
                    and index not in state.loading):
                await self._obtain(state, index)

    async def _obtain(self, state: FileState, index: int, *, speculative: bool = False,
                      claimed: trio.Event | None = None) -> None:
        """A block neither in memory nor on disk: from the shared tier if it has it,
        else put on its way from XNAT. ``claimed``: the caller already put this
        event in ``state.loading`` (a read-ahead started in the background)."""
        if self.shared is None:
            await self._fetch(state, index, speculative=speculative)
            return
        if claimed is None and index in state.loading:  # a disk read or lookup of it runs
            await state.loading[index].wait()
            return
        event = claimed if claimed is not None else trio.Event()
        state.loading[index] = event  # other readers of this block wait for us
        try:
            data = await self._from_shared(state, index)
            key = (state.ident.key, index)
            if key in self.memory or index in state.pending or state.dropped:
                return
            if data is None:
                await self._fetch(state, index, speculative=speculative)
                return
            # Like a downloaded block: in memory, stored on the local disk, and
            # part of the file's digest check (another node's bytes are checked too).
            self.memory[key] = data
            state.from_shared.add(index)
            self._unmark_verified_soon(state)
            state.fetched = True
            await self._store_slots.acquire()
            self.nursery.start_soon(self._store, state, index, data)
            self._start_digest(state)
        finally:
            if state.loading.get(index) is event:
                del state.loading[index]
            event.set()

    async def _obtain_in_background(self, state: FileState, index: int, speculative: bool,
                                    claimed: trio.Event) -> None:
        try:  # _obtain releases the claim whatever happens
            await self._obtain(state, index, speculative=speculative, claimed=claimed)
        except Exception:  # a failed read-ahead is only a missed chance
            log.exception("reading block %d of %s ahead failed", index, state.ident.uri)

    async def _get_ahead(self, state: FileState, index: int, *, speculative: bool = False) -> None:
        """Put a block nobody waits for yet on its way: with a shared tier, looked
        up in the background (a claim there may take seconds)."""
        if self.shared is None:
            await self._fetch(state, index, speculative=speculative)
        elif index not in state.loading and index not in state.pending:
            claimed = state.loading[index] = trio.Event()
            self.nursery.start_soon(self._obtain_in_background, state, index, speculative,
                                    claimed)

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
                await self._get_ahead(state, index)
        state.ahead_until = max(state.ahead_until, last + 1)

    async def prefetch_whole(self, ident: FileIdentity, *, speculative: bool = True) -> None:
        """Fetch a small file completely in the background: a file just opened
        (``speculative=False``) or one expected to be read next (series read-ahead)."""
        if ident.size == 0:
            return
        state = self._state(ident)
        want(state, ident.size)
        for index in range(state.nblocks):
            if not await self._has_block(state, index):
                await self._get_ahead(state, index, speculative=speculative)

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

    async def drop(self, ident: FileIdentity) -> None:
        """Forget every block of a file, in memory and on disk."""
        state = self.files.get(ident.key)
        if state is None:
            state = FileState(ident, max(1, -(-ident.size // self.block_size)))
        await self._drop_state(state, bad=False)


INDEX_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")


def private_index(directory: Path) -> None:
    """Make diskcache's SQLite index (file URIs and digests) 0600, as the block
    files are: sqlite creates it, and later its -wal and -shm (which take the
    database's mode), through the umask, and a cache made by an earlier version
    has it 0644. Its folder is 0700 already; this is the second lock."""
    for name in INDEX_FILES:
        try:
            os.chmod(directory / name, 0o600)
        except FileNotFoundError:
            pass

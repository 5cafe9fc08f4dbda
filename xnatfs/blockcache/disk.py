"""The disk tier of the block cache: block files, the index read at mount time,
the census of a file's blocks, and the disk read-ahead of cached files.

Blocks live in a ``diskcache.Cache`` (which evicts the least recently stored
past ``size_limit``), always called from a worker thread. An index of the
files with blocks on disk, read once at start, lets a file never cached go
straight to the server: a cold open costs no disk lookup. For a file that
has blocks there, one census (one worker call per file) says which.

Blocks are written to disk in the background, shielded from cancellation
(blocks read before an unmount are on disk when the process exits), at most
16 at a time: a download waits while the disk is behind. They bypass the page
cache (``directdisk``): the kernel already holds the file's pages once.
"""

from __future__ import annotations

import logging

import diskcache
import trio
from cachetools import LRUCache

from ..directdisk import BlockValue
from .blocks import Block, CacheStatistics, FileIdentity, FileState

log = logging.getLogger("xnatfs.blockcache")  # one logger for the package, as before the split

# Blocks read from the disk cache into memory ahead of a sequential reader.
DISK_READ_AHEAD_BLOCKS = 4
# The key suffix of a file's marker, "<file key>:ok": its blocks on disk passed
# the file's digest check (see "How it reads" in the README).
VERIFIED = "ok"


class DiskTier:
    """The methods of :class:`~xnatfs.blockcache.BlockCache` that reach the disk.

    Adds methods, never state: ``BlockCache.__init__`` sets the attributes
    declared here, which every layer above shares.
    """

    block_size: int
    nursery: trio.Nursery
    disk: diskcache.Cache
    memory: LRUCache[tuple[str, int], Block]  # the hot blocks, by (file key, index)
    disk_limiter: trio.CapacityLimiter
    lookup_limiter: trio.CapacityLimiter  # the index and censuses: not behind block writes
    _store_slots: trio.Semaphore          # blocks downloaded but not yet on disk
    stats: CacheStatistics
    _files_on_disk: set[str]  # the index: keys of the files with blocks on disk
    _index_complete: bool     # the index was read: a file not in it has no block there
    _verified_on_disk: set[str]  # keys of the files whose blocks passed the digest check
    _doubted: set[str]  # files with blocks from an earlier mount, never checked whole
    indexed: trio.Event  # set once the index is read (or could not be)

    def _block_length(self, ident: FileIdentity, index: int) -> int:
        return min(self.block_size, ident.size - index * self.block_size)

    def _disk_key(self, state: FileState, index: int) -> str:
        return f"{state.ident.key}:{index}"

    async def _index_disk(self) -> None:
        def file_keys() -> tuple[set[str], set[str]]:
            files: set[str] = set()
            verified: set[str] = set()
            for key in self.disk.iterkeys():
                file_key, _, suffix = key.partition(":")
                (verified if suffix == VERIFIED else files).add(file_key)
            return files, verified

        try:
            keys, verified = await trio.to_thread.run_sync(file_keys,
                                                           limiter=self.lookup_limiter)
        except Exception as exc:  # without the index, every miss is looked up on disk
            log.warning("cannot index the disk cache: %s", exc)
        else:
            # Blocks stored by an earlier mount of a file it never checked whole:
            # nothing vouches for them (the server may have sent wrong bytes).
            # (Files stored by this mount meanwhile are in _files_on_disk already.)
            self._doubted |= keys - verified - self._files_on_disk
            self._files_on_disk |= keys
            self._verified_on_disk |= verified
            self._index_complete = True
        finally:
            self.indexed.set()

    async def _drop_doubted(self, state: FileState) -> bool:
        """Before the census of a file whose blocks on disk an earlier mount
        stored and never checked against the file's digest: delete them, so that
        they are fetched (and checked) again rather than served. True if so."""
        key = state.ident.key
        if key not in self._doubted:
            return False
        self._doubted.discard(key)
        if not state.ident.digest:
            return False  # nothing to check them against: trusted as before
        # Not those this mount stored already (they are this mount's own).
        keys = [self._disk_key(state, i) for i in range(state.nblocks)
                if i not in state.on_disk]

        def delete() -> None:
            for block_key in keys:
                self.disk.delete(block_key)

        log.info("%s: cached blocks never checked against the file's digest; fetching "
                 "them again", state.ident.uri)
        try:
            await trio.to_thread.run_sync(delete, limiter=self.disk_limiter)
        except Exception as exc:  # left on disk, but not served: the census skips them
            log.warning("cannot delete the unchecked blocks of %s: %s", state.ident.uri, exc)
        self._files_on_disk.discard(key)
        return True

    def _mark_verified_soon(self, state: FileState) -> None:
        """The file passed its digest check: say so on disk (its blocks are
        trusted by later mounts), shielded like a block's store."""
        self._verified_on_disk.add(state.ident.key)
        self.nursery.start_soon(self._set_marker, state, True)

    def _unmark_verified_soon(self, state: FileState) -> None:
        """Blocks of the file are being downloaded anew: until the file is
        checked whole again, later mounts must not trust them."""
        if state.ident.key in self._verified_on_disk:
            self._verified_on_disk.discard(state.ident.key)
            self.nursery.start_soon(self._set_marker, state, False)

    async def _set_marker(self, state: FileState, verified: bool) -> None:
        marker = f"{state.ident.key}:{VERIFIED}"

        def write() -> None:
            if verified and not state.dropped:
                self.disk.set(marker, b"1")
            else:
                self.disk.delete(marker)

        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(write, limiter=self.disk_limiter)
            except Exception as exc:  # without it, the blocks are only fetched again
                log.warning("cannot record the digest check of %s: %s", state.ident.uri, exc)

    def _never_on_disk(self, state: FileState) -> bool:
        """Whether the disk cache surely has no block of this file."""
        return self._index_complete and state.ident.key not in self._files_on_disk

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
        if self._never_on_disk(state) or await self._drop_doubted(state):
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

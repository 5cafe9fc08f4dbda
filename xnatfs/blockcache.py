"""Lazy, block-cached file contents: fetched once, shared by all readers, kept on disk.

A file is cut into fixed-size blocks keyed by the file's identity (URI, size
and digest), so a file changed on the server never hits stale blocks. A block
is looked for in memory (a small LRU of hot blocks), then on disk
(diskcache, always called from a worker thread), and only then fetched.

Fetching streams bytes into *pending* blocks, and a reader is woken as soon
as the bytes it asked for have arrived, not when the whole block has: a
header read of a 2 GB file on a server without Range support returns after
the first chunk. Where the server honours Range, missing blocks are fetched
by independent ranged GETs in parallel, and sequential readers trigger a
read-ahead window that doubles up to ``max_window`` bytes. Where it does not
(real XNAT 1.8), one streaming GET per file fills the blocks in order.

When a whole file has passed through and the listing gave an MD5 digest, the
bytes are checked in block order; a mismatch drops every block of the file
and fails the read with :class:`~xnatfs.errors.Stale`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import diskcache
import trio
from cachetools import LRUCache

from .client import XnatClient
from .errors import Stale, Unreachable, XnatError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileIdentity:
    """What a block belongs to: a changed size or digest is a different file."""

    uri: str
    size: int
    digest: str | None

    @property
    def key(self) -> str:
        raw = f"{self.uri}\0{self.size}\0{self.digest or ''}".encode()
        return hashlib.sha256(raw).hexdigest()[:40]


class PendingBlock:
    """A block being downloaded; readers wait for the prefix they need."""

    def __init__(self, length: int) -> None:
        self.buffer = bytearray(length)
        self.filled = 0
        self.error: BaseException | None = None
        self._waiters: list[tuple[int, trio.Event]] = []

    def feed(self, data: memoryview) -> None:
        self.buffer[self.filled:self.filled + len(data)] = data
        self.filled += len(data)
        ready = [w for w in self._waiters if w[0] <= self.filled]
        self._waiters = [w for w in self._waiters if w[0] > self.filled]
        for _, event in ready:
            event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        for _, event in self._waiters:
            event.set()
        self._waiters = []

    async def wait_for(self, end: int) -> None:
        """Return once ``buffer[:end]`` is filled; raise if the download failed."""
        while self.filled < end:
            if self.error is not None:
                raise self.error
            event = trio.Event()
            self._waiters.append((end, event))
            await event.wait()
        if self.error is not None and self.filled < end:
            raise self.error


@dataclass
class FileState:
    """Per-file bookkeeping while a file is being read."""

    ident: FileIdentity
    nblocks: int
    pending: dict[int, PendingBlock] = field(default_factory=dict)
    on_disk: set[int] = field(default_factory=set)
    stream_running: bool = False
    next_read: int = -1         # where a sequential reader would read next
    window: int = 0             # current read-ahead, bytes
    hash_next: int = 0          # next block index to feed into the digest check
    hasher: object = None
    hashing: bool = False


@dataclass
class CacheStatistics:
    memory_hits: int = 0
    disk_hits: int = 0
    fetched_blocks: int = 0
    fetch_requests: int = 0
    digest_checks: int = 0
    digest_failures: int = 0


class BlockCache:
    """Blocks of remote files, in memory, on disk and in flight."""

    def __init__(self, client: XnatClient, directory: Path, *, size_limit: int,
                 nursery: trio.Nursery, block_size: int = DEFAULT_BLOCK_SIZE,
                 memory_bytes: int = 96 * 1024 * 1024, range_mode: str = "auto",
                 max_parallel: int = 8, max_window: int = 64 * 1024 * 1024) -> None:
        self.client = client
        self.block_size = block_size
        self.range_mode = range_mode
        self.max_window = max_window
        self.nursery = nursery
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.disk = diskcache.Cache(str(directory), size_limit=size_limit,
                                    eviction_policy="least-recently-stored")
        self.memory: LRUCache[tuple[str, int], bytes] = LRUCache(maxsize=memory_bytes,
                                                                 getsizeof=len)
        self.files: LRUCache[str, FileState] = LRUCache(maxsize=4096)
        self.disk_limiter = trio.CapacityLimiter(4)
        self.fetch_limiter = trio.CapacityLimiter(max_parallel)
        self.stats = CacheStatistics()
        self._range_supported: bool | None = None if range_mode == "auto" else (
            range_mode == "on")

    def close(self) -> None:
        self.disk.close()

    # ------------------------------------------------------------- reading
    def _state(self, ident: FileIdentity) -> FileState:
        state = self.files.get(ident.key)
        if state is None or state.ident != ident:
            nblocks = max(1, -(-ident.size // self.block_size))
            state = FileState(ident, nblocks)
            self.files[ident.key] = state
        return state

    async def read(self, ident: FileIdentity, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer only at end of file)."""
        end = min(offset + size, ident.size)
        if offset >= end:
            return b""
        state = self._state(ident)
        await self._note_access(state, offset, end)
        first, last = offset // self.block_size, (end - 1) // self.block_size
        parts = []
        for index in range(first, last + 1):
            block_start = index * self.block_size
            lo = max(offset, block_start) - block_start
            hi = min(end, block_start + self._block_length(ident, index)) - block_start
            parts.append(await self._block_slice(state, index, lo, hi))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _block_length(self, ident: FileIdentity, index: int) -> int:
        return min(self.block_size, ident.size - index * self.block_size)

    async def _block_slice(self, state: FileState, index: int, lo: int, hi: int) -> bytes:
        key = (state.ident.key, index)
        data = self.memory.get(key)
        if data is not None:
            self.stats.memory_hits += 1
            return data[lo:hi]
        pending = state.pending.get(index)
        if pending is None:
            data = await self._from_disk(state, index)
            if data is not None:
                return data[lo:hi]
            pending = state.pending.get(index)
            if pending is None:
                await self._start_fetch(state, index)
                pending = state.pending.get(index)
            if pending is None:  # completed while we were starting it
                return await self._block_slice(state, index, lo, hi)
        await pending.wait_for(hi)
        return bytes(pending.buffer[lo:hi])

    async def _from_disk(self, state: FileState, index: int) -> bytes | None:
        key = f"{state.ident.key}:{index}"
        data = await trio.to_thread.run_sync(self.disk.get, key, None,
                                             limiter=self.disk_limiter)
        if data is None:
            state.on_disk.discard(index)
            return None
        self.stats.disk_hits += 1
        state.on_disk.add(index)
        self.memory[(state.ident.key, index)] = data
        return data

    async def _has_block(self, state: FileState, index: int) -> bool:
        if index in state.pending or (state.ident.key, index) in self.memory:
            return True
        if index in state.on_disk:
            return True
        key = f"{state.ident.key}:{index}"
        present = await trio.to_thread.run_sync(self.disk.__contains__, key,
                                                limiter=self.disk_limiter)
        if present:
            state.on_disk.add(index)
        return present

    # ---------------------------------------------------------- read-ahead
    async def _note_access(self, state: FileState, offset: int, end: int) -> None:
        """Grow the read-ahead window for sequential readers (range mode only)."""
        sequential = offset == state.next_read or (
            state.next_read >= 0 and 0 <= offset - state.next_read <= 16 * 1024 * 1024)
        state.next_read = end
        if not await self._use_range(state.ident):
            return
        if not sequential:
            state.window = 0
            return
        state.window = min(max(state.window * 2, self.block_size), self.max_window)
        first = end // self.block_size
        last = min((end + state.window - 1) // self.block_size, state.nblocks - 1)
        for index in range(first, last + 1):
            if not await self._has_block(state, index):
                await self._start_fetch(state, index)

    async def prefetch_whole(self, ident: FileIdentity) -> None:
        """Fetch a small file completely in the background (series read-ahead)."""
        state = self._state(ident)
        if state.stream_running or state.pending:
            return
        missing = [i for i in range(state.nblocks) if not await self._has_block(state, i)]
        if missing:
            self._open_blocks(state, missing[0], state.nblocks)
            self.nursery.start_soon(self._stream, state, missing[0], state.nblocks)

    # -------------------------------------------------------------- fetching
    async def _use_range(self, ident: FileIdentity) -> bool:
        if self._range_supported is None:
            self._range_supported = await self.client.probe_range_support(ident.uri)
            log.info("server %s HTTP Range", "honours" if self._range_supported else "ignores")
        return self._range_supported

    async def _start_fetch(self, state: FileState, index: int) -> None:
        """Make ``index`` pending and start whatever download will fill it."""
        if index in state.pending:
            return
        if await self._use_range(state.ident):
            self._open_blocks(state, index, index + 1)
            self.nursery.start_soon(self._stream, state, index, index + 1)
            return
        # No Range: one stream fills the file in order. If it is running it
        # will reach this block; otherwise start one from this block on.
        if state.stream_running:
            self._open_blocks(state, index, index + 1)
            return
        self._open_blocks(state, index, state.nblocks)
        self.nursery.start_soon(self._stream, state, index, state.nblocks)

    def _open_blocks(self, state: FileState, first: int, last: int) -> None:
        for i in range(first, last):
            if i not in state.pending and (state.ident.key, i) not in self.memory:
                state.pending[i] = PendingBlock(self._block_length(state.ident, i))

    async def _stream(self, state: FileState, first: int, last: int) -> None:
        """Download blocks ``[first, last)`` into their pending buffers, resuming on drops."""
        ident = state.ident
        whole_file = last - first > 1
        if whole_file:
            state.stream_running = True
        start = first * self.block_size
        stop = min(last * self.block_size, ident.size)
        position = start
        try:
            async with self.fetch_limiter:
                self.stats.fetch_requests += 1
                # The client resumes broken downloads itself, within its bounds.
                async with self.client.open_stream(ident.uri, position, stop) as chunks:
                    async for chunk in chunks:
                        position = await self._distribute(state, position, chunk)
                        if position >= stop:
                            break
                if position < stop:
                    raise Unreachable(f"{ident.uri}: body ended at {position} of {stop}")
        except XnatError as exc:
            log.warning("download of %s failed: %s", ident.uri, exc)
            for i in range(position // self.block_size, last):
                pending = state.pending.pop(i, None)
                if pending is not None:
                    pending.fail(exc)
        finally:
            if whole_file:
                state.stream_running = False

    async def _distribute(self, state: FileState, position: int, chunk: bytes) -> int:
        """Feed ``chunk`` (file bytes from ``position``) into pending blocks."""
        view = memoryview(chunk)
        while view:
            index, within = divmod(position, self.block_size)
            length = self._block_length(state.ident, index)
            take = min(len(view), length - within)
            pending = state.pending.get(index)
            if pending is None:
                # Already complete (another download got there first): skip its bytes.
                position += take
                view = view[take:]
                continue
            if pending.filled == within:
                pending.feed(view[:take])
            position += take
            view = view[take:]
            if pending.filled == length:
                await self._complete(state, index, pending)
        return position

    async def _complete(self, state: FileState, index: int, pending: PendingBlock) -> None:
        data = bytes(pending.buffer)
        key = state.ident.key
        self.memory[(key, index)] = data
        del state.pending[index]
        self.stats.fetched_blocks += 1
        self.nursery.start_soon(self._store, state, index, data)
        if state.ident.digest and index == state.hash_next and not state.hashing:
            self.nursery.start_soon(self._advance_digest, state)

    async def _store(self, state: FileState, index: int, data: bytes) -> None:
        await trio.to_thread.run_sync(self.disk.set, f"{state.ident.key}:{index}", data,
                                      limiter=self.disk_limiter)
        state.on_disk.add(index)

    # ----------------------------------------------------------- integrity
    async def _advance_digest(self, state: FileState) -> None:
        """Hash consecutive completed blocks; check the digest at the end of the file."""
        state.hashing = True
        try:
            if state.hasher is None:
                state.hasher = hashlib.md5()
            while state.hash_next < state.nblocks:
                data = self.memory.get((state.ident.key, state.hash_next))
                if data is None:
                    return  # evicted or not yet here; the next completion resumes us
                await trio.to_thread.run_sync(state.hasher.update, data)  # type: ignore[attr-defined]
                state.hash_next += 1
            self.stats.digest_checks += 1
            actual = state.hasher.hexdigest()  # type: ignore[attr-defined]
            if actual != state.ident.digest:
                self.stats.digest_failures += 1
                log.error("digest mismatch for %s: listed %s, received %s; dropping its blocks",
                          state.ident.uri, state.ident.digest, actual)
                await self.drop(state.ident)
        finally:
            state.hashing = False

    async def drop(self, ident: FileIdentity) -> None:
        """Forget every block of a file, in memory and on disk."""
        state = self.files.pop(ident.key, None)
        nblocks = state.nblocks if state else max(1, -(-ident.size // self.block_size))
        error = Stale(f"{ident.uri}: data did not match its digest")
        if state is not None:
            for pending in state.pending.values():
                pending.fail(error)
        for i in range(nblocks):
            self.memory.pop((ident.key, i), None)

        def delete_all() -> None:
            for i in range(nblocks):
                self.disk.delete(f"{ident.key}:{i}")

        await trio.to_thread.run_sync(delete_all, limiter=self.disk_limiter)


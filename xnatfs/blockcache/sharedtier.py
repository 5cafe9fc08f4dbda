"""The block cache's use of the shared tier (:mod:`.shared`): looked up after the
local disk and before a download from XNAT, filled after a download.

Every call to the shared file system runs in a worker thread under a
limiter, bounded by ``SHARED_IO_TIMEOUT``: a cluster file system that hangs
costs a read that long once, after which the tier is left alone for
``SHARED_RETRY_AFTER`` seconds (logged once) and reads go to XNAT. Blocks
are published in the background, never holding up a read; when
``shared_max`` is set, the mount trims the tier in a worker thread after
every ``shared_max / 16`` bytes it published.

Only files this mount's listing shows are looked up: the key comes from the
identity the listing made with the mount's own credentials.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from cachetools import LRUCache

from .blocks import Block, FileIdentity, FileState
from .disk import DiskTier
from .shared import Lookup, SharedCache, prune

log = logging.getLogger("xnatfs.blockcache")

SHARED_IO_TIMEOUT = 10.0   # one call to the shared file system; then it counts as hung
SHARED_RETRY_AFTER = 60.0  # how long a hung or failing tier is left alone
CLAIM_WAIT = 5.0           # how long a block another node claimed is waited for
CLAIM_POLL = 0.075         # how often its published name is looked for meanwhile
PUBLISH_QUEUE = 16         # blocks waiting to be published at most (they hold memory)
# A whole-file stream (no Range) claims this far past the block it enters. It runs
# only max_ahead (16 MiB) past its own reader, and another node's kernel readahead
# (16 MiB) past its reader: claiming just the block entered let that readahead find
# the next blocks unclaimed and start a second whole-file download (S10, Range off).
CLAIM_AHEAD = 32 * 1024 * 1024

T = TypeVar("T")


class SharedTier(DiskTier):
    """The methods of :class:`~xnatfs.blockcache.BlockCache` that reach the shared
    tier; state as for :class:`~.disk.DiskTier`."""

    shared: SharedCache | None
    shared_max: int | None
    shared_limiter: trio.CapacityLimiter   # lookups and claims
    publish_limiter: trio.CapacityLimiter  # publishing: never takes the lookups' threads
    _shared_down_until: float
    _shared_publishing: int
    _shared_calls: int                     # claims and releases under way
    _shared_since_trim: int
    _shared_trimming: bool
    _shared_touched: LRUCache[str, bool]   # files whose folder this session touched
    _suspect: set[str]

    async def _shared_call(self, fn: Callable[..., T], *args: Any,
                           limiter: trio.CapacityLimiter | None = None) -> T | None:
        """``fn(*args)`` in a worker thread; None when the tier failed or hung."""
        if trio.current_time() < self._shared_down_until:
            return None
        with trio.move_on_after(SHARED_IO_TIMEOUT):
            try:
                return await trio.to_thread.run_sync(
                    fn, *args, limiter=limiter or self.shared_limiter, abandon_on_cancel=True)
            except OSError as exc:
                self._shared_unusable(f"failed: {exc}")
                return None
        self._shared_unusable(f"did not answer within {SHARED_IO_TIMEOUT:g} s")
        return None

    def _shared_unusable(self, why: str) -> None:
        self.stats.shared_outages += 1
        if trio.current_time() >= self._shared_down_until:  # log once per outage
            log.warning("shared cache %s %s; reading from XNAT for %g s",
                        self.shared.root if self.shared else "", why, SHARED_RETRY_AFTER)
        self._shared_down_until = trio.current_time() + SHARED_RETRY_AFTER

    async def _from_shared(self, state: FileState, index: int) -> Block | None:
        """Block ``index`` from the shared tier, waiting a bounded time for one
        another node claimed; None: download it (this mount holds its claim, or
        waiting was in vain, or the tier is unusable)."""
        shared = self.shared
        key = state.ident.key
        if shared is None or key in self._suspect or index in state.shared_claims:
            return None
        if key not in self._shared_touched:
            self._shared_touched[key] = True
            await self._shared_call(shared.touch, key)
        length = self._block_length(state.ident, index)
        give_up_at = trio.current_time() + CLAIM_WAIT
        while not state.dropped:
            found = await self._shared_call(shared.read_or_claim, key, index, length)
            if found is None:
                return None
            if isinstance(found, bytes):
                return found
            if found is Lookup.CLAIMED:
                state.shared_claims.add(index)
                return None
            if found is Lookup.BAD:
                self.stats.shared_bad += 1
                log.warning("shared cache: block %d of %s was damaged; removed, fetching it "
                            "again", index, state.ident.uri)
                continue
            if trio.current_time() >= give_up_at:  # BUSY for too long
                log.info("shared cache: block %d of %s still claimed after %g s; downloading "
                         "it", index, state.ident.uri, CLAIM_WAIT)
                return None
            await trio.sleep(CLAIM_POLL)
            if index in state.pending or (key, index) in self.memory:
                return None  # a download of this mount got to it meanwhile
        return None

    def _claim_soon(self, state: FileState, index: int) -> None:
        """A running download entered block ``index``: tell other nodes, so that
        they wait for it rather than download it too."""
        if self.shared is None:
            return
        last = min(index + max(CLAIM_AHEAD // self.block_size, 1), state.nblocks - 1)
        for ahead in range(index, last + 1):
            if (ahead in state.shared_claims or ahead in state.from_shared
                    or (state.ident.key, ahead) in self.memory):
                continue
            state.shared_claims.add(ahead)
            written = state.claiming[ahead] = trio.Event()
            self.nursery.start_soon(self._claim, state, ahead, written)

    async def _claim(self, state: FileState, index: int, written: trio.Event) -> None:
        assert self.shared is not None
        self._shared_calls += 1
        try:
            await self._shared_call(self.shared.claim, state.ident.key, index)
        finally:
            self._shared_calls -= 1
            # A claim of this block released and made again meanwhile has its own event.
            if state.claiming.get(index) is written:
                del state.claiming[index]
            written.set()

    async def _claim_written(self, state: FileState, index: int) -> None:
        """Wait until a claim started in the background is on disk: a release or
        publication that removed it first would leave it behind, and other
        nodes would wait for it until it went stale."""
        claiming = state.claiming.get(index)
        if claiming is not None:
            await claiming.wait()

    def _release_claims_ahead(self, state: FileState, position: int) -> None:
        """A whole-file stream ended at ``position``: release the claims it made ahead
        of it that no block of ours (pending or downloaded) and no other stream of
        this mount will honour, so that other nodes need not wait for them."""
        if self.shared is None or not state.shared_claims:
            return
        first = -(-position // self.block_size)
        self._release_claims_soon(state, [
            index for index in state.shared_claims
            if index >= first and index not in state.pending
            and (state.ident.key, index) not in self.memory
            and not any(d.position <= index * self.block_size < d.stop
                        for d in state.downloads)])

    def _release_claims_soon(self, state: FileState, indices: list[int]) -> None:
        """The downloads of these blocks failed: let other nodes fetch them."""
        held = [index for index in indices if index in state.shared_claims]
        if self.shared is None or not held:
            return
        state.shared_claims.difference_update(held)
        for index in held:
            self.nursery.start_soon(self._release, state, index)

    async def _release(self, state: FileState, index: int) -> None:
        assert self.shared is not None
        self._shared_calls += 1
        try:
            await self._claim_written(state, index)
            await self._shared_call(self.shared.release, state.ident.key, index)
        finally:
            self._shared_calls -= 1

    def _publish_soon(self, state: FileState, index: int, data: Block) -> None:
        """Put a block downloaded from XNAT in the shared tier, in the background."""
        if (self.shared is None or state.ident.key in self._suspect
                or index in state.from_shared):
            return
        if self._shared_publishing >= PUBLISH_QUEUE:  # the tier is behind: skip, hold no memory
            self._release_claims_soon(state, [index])
            return
        self._shared_publishing += 1
        self.nursery.start_soon(self._publish, state, index, data)

    async def _publish(self, state: FileState, index: int, data: Block) -> None:
        assert self.shared is not None
        try:
            if state.dropped:
                return
            await self._claim_written(state, index)
            done = await self._shared_call(self.shared.publish, state.ident.key, index, data,
                                           limiter=self.publish_limiter)
        finally:
            self._shared_publishing -= 1
            state.shared_claims.discard(index)
        if done is None:
            return
        self.stats.shared_published += 1
        self._shared_since_trim += len(data)
        if self._trim_due() and not self._shared_trimming:
            self._shared_trimming = True
            self.nursery.start_soon(self._trim_shared)

    @property
    def publications_in_flight(self) -> int:
        """Blocks being written to the shared tier now (a status counter)."""
        return self._shared_publishing

    def _trim_due(self) -> bool:
        """Whether this mount published a sixteenth of ``shared_max`` since it last trimmed."""
        return (self.shared_max is not None
                and self._shared_since_trim >= max(self.shared_max // 16, self.block_size))

    async def _trim_shared(self) -> None:
        """Bound the tier at ``shared_max`` (any mount may; pruners do not clash),
        again while blocks published during a trim make another one due."""
        assert self.shared is not None and self.shared_max is not None
        try:
            while self._trim_due():
                self._shared_since_trim = 0
                report = await trio.to_thread.run_sync(
                    prune, self.shared.root, self.shared_max, abandon_on_cancel=True)
                log.info("shared cache trimmed: %d bytes kept, %d removed",
                         report.kept_bytes, report.removed_bytes)
        except OSError as exc:
            log.warning("cannot trim the shared cache: %s", exc)
        finally:
            self._shared_trimming = False

    def _drop_shared_soon(self, ident: FileIdentity) -> None:
        """The file's bytes failed its digest check: no node should read them again."""
        if self.shared is not None:
            self.nursery.start_soon(self._shared_call, self.shared.drop_file, ident.key)


async def prepare_shared(root: Path, block_size: int) -> None:
    """Create the tier's layout folders at mount time, in a worker thread, bounded.

    Raises:
        OSError: the folder cannot be made or did not answer (the mount fails).
    """
    shared = SharedCache(root, block_size)
    with trio.move_on_after(SHARED_IO_TIMEOUT):
        await trio.to_thread.run_sync(shared.prepare, abandon_on_cancel=True)
        return
    raise OSError(errno.ETIMEDOUT, f"the shared cache did not answer within "
                                   f"{SHARED_IO_TIMEOUT:g} s", str(root))

"""The digest check of whole files, and dropping a file's blocks when they are wrong.

When a whole file has passed through and the listing gave an MD5 digest, the
blocks are hashed in order (from memory or disk). A read that returns the end
of a file, and after that any read, waits for that check when every block is
cached or on its way, so a whole-file reader (``cp``, ``cat``, ``nibabel``)
gets ``Stale`` (ESTALE) instead of bad bytes, whatever the order the kernel's
readahead requests arrive in. (Bytes of a file read only in part cannot be
checked: XNAT has no digest per block.) A mismatch drops every block of the
file, in memory and on disk, and tells the listeners (the FUSE layer drops
the kernel's pages); after it, no byte of that version of the file is served
until a complete fetch of it passes the check. The downloads drop a file the
same way when it was replaced on the server (:mod:`.downloads`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import trio
from cachetools import LRUCache

from ..errors import Stale
from .blocks import FileIdentity, FileState, progressed
from .disk import VERIFIED
from .sharedtier import SharedTier

log = logging.getLogger("xnatfs.blockcache")  # one logger for the package, as before the split


class DigestCheck(SharedTier):
    """The methods of :class:`~xnatfs.blockcache.BlockCache` that check and drop
    files; state as for :class:`~.disk.DiskTier`."""

    files: LRUCache[str, FileState]  # the files being read, by key
    _drop_listeners: list[Callable[[FileIdentity], None]]
    _suspect: set[str]  # keys of files whose last digest check failed

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
                progressed(state)
            self.stats.digest_checks += 1
            actual = state.hasher.hexdigest()  # type: ignore[attr-defined]
            state.verified = actual == state.ident.digest
            if state.verified:
                self._suspect.discard(state.ident.key)
                self._mark_verified_soon(state)
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
            self._drop_shared_soon(ident)
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

        self._verified_on_disk.discard(ident.key)

        def delete_all() -> None:
            for i in range(state.nblocks):
                self.disk.delete(f"{ident.key}:{i}")
            self.disk.delete(f"{ident.key}:{VERIFIED}")

        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(delete_all, limiter=self.disk_limiter)
            except Exception:
                log.exception("cannot delete the cached blocks of %s", ident.uri)
        state.on_disk.clear()

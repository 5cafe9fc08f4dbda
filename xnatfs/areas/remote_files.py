"""Reading files XNAT lists (archive and prearchive alike) through the block cache.

Not an area of its own: the archive and the prearchive open their files
here. What it keeps is what the kernel's page cache needs to stay right:

* each open handle reads the version of the file it was opened on (URI, size,
  digest), and fails with ESTALE once that version is dropped as wrong;
* the kernel may keep a file's pages from one open to the next only while it
  holds those of the very same version (same size and mtime, so it cannot
  tell versions apart itself);
* opening one small file of a folder (a DICOM series) starts fetching the
  next ones.
"""

from __future__ import annotations

import logging

import trio

from ..blockcache import BlockCache, FileIdentity
from ..deadlines import Deadlines, operation_until
from ..errors import NotFound, Stale, Unreachable, XnatError
from ..tree import Node, Tree
from .base import Handle, Kernel

log = logging.getLogger(__name__)

# The kernel reads a page again right after its read failed (readahead, then
# ->read_folio, in mm/filemap.c), and one system call may span several reads
# (the readahead requests of a big pread, the folio it waits for at another
# offset): within this many seconds, the same handle's reads fail as the last
# one just did, instead of waiting again for a server that did not answer,
# which took a call past its bound (issue 24, defect 1).
REPEAT_WINDOW = 0.5
# Files in one folder fetched ahead when one of them is opened (a DICOM series).
SERIES_READ_AHEAD = 16
SMALL_FILE = 8 * 1024 * 1024


def identity(node: Node) -> FileIdentity:
    assert node.file is not None
    return FileIdentity(node.file.uri, node.file.size, node.file.digest)


class RemoteFileHandle(Handle):
    """A listed file opened for reading."""

    def __init__(self, node: Node, reads: RemoteFiles, ident: FileIdentity,
                 keep_cache: bool, checked_first: bool = False) -> None:
        super().__init__(node)
        self.reads = reads
        self.ident = ident
        self.keep_cache = keep_cache
        self.checked_first = checked_first  # no byte before the whole file passed its digest
        self.stale = False  # opened on bytes since dropped as wrong
        self._failed: tuple[int, float, Unreachable | None] | None = None  # offset, when, what

    async def read(self, offset: int, size: int) -> bytes:
        failed = self._failed
        if failed is not None and trio.current_time() - failed[1] < REPEAT_WINDOW:
            if failed[2] is None:
                raise trio.TooSlowError
            raise Unreachable(failed[2].message, status=failed[2].status, path=failed[2].path)
        try:
            return await self.reads.read(self, offset, size)
        except Unreachable as exc:
            self._failed = (offset, trio.current_time(), exc)
            raise
        except trio.TooSlowError:
            self._failed = (offset, trio.current_time(), None)
            raise

    async def release(self) -> None:
        self.reads.open_handles.discard(self)


class RemoteFiles:
    """Open handles on listed files, and the page-cache rules above."""

    def __init__(self, tree: Tree, blocks: BlockCache, kernel: Kernel, deadlines: Deadlines,
                 nursery: trio.Nursery) -> None:
        self.tree = tree
        self.blocks = blocks
        self.kernel = kernel
        self.deadlines = deadlines
        self.nursery = nursery
        self.open_handles: set[RemoteFileHandle] = set()
        # The version of each inode whose pages the kernel may hold (see open).
        self._page_identity: dict[int, FileIdentity] = {}
        blocks.add_drop_listener(self._blocks_dropped)
        tree.add_forget_listener(self._forgotten)

    def open(self, node: Node, *, cacheable: bool = True,
             checked_first: bool = False) -> RemoteFileHandle:
        """``cacheable``: whether the file's content is final for its identity
        (archive files are; prearchive ones may still change under one);
        ``checked_first``: serve no byte before the whole file passed its digest
        check (a snapshot mount's small files)."""
        if node.size <= SMALL_FILE:
            self._read_ahead_series(node)
        ident = identity(node)
        # Archive files are immutable for a given identity, so the kernel may keep
        # their pages, unless it holds those of another version (same size and
        # mtime, so it cannot tell) or of one dropped as bad.
        keep_cache = cacheable and self._page_identity.get(node.inode) == ident
        self._page_identity[node.inode] = ident
        handle = RemoteFileHandle(node, self, ident, keep_cache, checked_first)
        self.open_handles.add(handle)
        return handle

    async def cached_bytes(self, node: Node) -> int:
        """Bytes of ``node``'s file on the local disk cache (``user.xnatfs.cached``)."""
        return await self.blocks.cached_bytes(identity(node))

    async def read(self, handle: RemoteFileHandle, offset: int, size: int) -> bytes:
        ident = handle.ident
        if handle.stale:
            raise Stale(f"{ident.uri} was dropped as wrong since it was opened; open it again")
        if self._page_identity.get(handle.node.inode, ident) != ident:
            # Opened before the file changed: its pages would mix with the new version's.
            raise Stale(f"{ident.uri} changed since it was opened")
        try:
            return await self._read_while_moving(ident, offset, size, handle.checked_first)
        except NotFound as exc:  # deleted on the server since it was opened
            raise Stale(exc.message, path=ident.uri) from None

    async def _read_while_moving(self, ident: FileIdentity, off: int, size: int,
                                 checked_first: bool = False) -> bytes:
        """A read ends ``op_timeout`` after it began, or, while its file's bytes
        keep arriving, ``quiet_timeout`` after the last of them: without Range
        (real XNAT), a first read far into a big file waits for one download to
        get there from byte 0, which takes longer than any fixed bound on a slow
        link. Its deadline is the operation's (``operation_until``): the
        downloads it starts make no attempt it could not wait for."""
        deadlines = self.deadlines
        deadline = trio.current_time() + deadlines.op_timeout
        while True:
            with trio.move_on_at(deadline) as scope, deadlines.cancelled_at_unmount(scope), \
                    operation_until(deadline):
                return await self.blocks.read(  # type: ignore[return-value]
                    ident, off, size, checked_first=checked_first)
            moving_until = self.blocks.last_arrival(ident) + deadlines.quiet_timeout
            if deadlines.unmounting or moving_until <= trio.current_time():
                raise trio.TooSlowError
            deadline = moving_until

    def _forgotten(self, inode: int) -> None:
        self._page_identity.pop(inode, None)  # the kernel dropped the pages too

    def _blocks_dropped(self, ident: FileIdentity) -> None:
        """A file failed its digest check or was replaced on the server: the kernel
        must not serve its pages again."""
        for inode, cached in list(self._page_identity.items()):
            if cached == ident:
                del self._page_identity[inode]  # the next open drops the pages...
                self.nursery.start_soon(self.kernel.drop_pages, inode)  # ...and so does this
        # Handles that may have read the dropped bytes read nothing more: the next
        # bytes could be another version's (the kernel retries a failed readahead).
        for handle in self.open_handles:
            if handle.ident == ident:
                handle.stale = True

    # ------------------------------------------------------------ read-ahead
    def _read_ahead_series(self, node: Node) -> None:
        """Opening one file of a folder of small files starts fetching the next ones."""
        if node.file is None:
            return
        siblings = [identity(sibling) for sibling in self._siblings_after(node)
                    if sibling.size <= SMALL_FILE]
        self.nursery.start_soon(self._prefetch_series, identity(node), siblings)

    def _siblings_after(self, node: Node) -> list[Node]:
        """Files following ``node`` in its folder, as last listed."""
        files = [n for n in self.tree.last_entries(node.parent) if n.file is not None]
        try:
            start = files.index(node) + 1
        except ValueError:
            return []
        return files[start:start + SERIES_READ_AHEAD]

    async def _prefetch_series(self, opened: FileIdentity, siblings: list[FileIdentity]) -> None:
        """The opened file first: the next files are asked for once its first bytes
        are in, so that the server does not serve them ahead of it."""
        await self._prefetch_quietly(opened, False)  # returns once the download is on its way
        if not await self.blocks.first_bytes(opened):
            return  # the server is failing: 16 more downloads would only fail too
        for sibling in siblings:
            self.nursery.start_soon(self._prefetch_quietly, sibling, True)

    async def _prefetch_quietly(self, ident: FileIdentity, speculative: bool) -> None:
        try:
            await self.blocks.prefetch_whole(ident, speculative=speculative)
        except XnatError as exc:
            log.debug("read-ahead of %s failed: %s", ident.uri, exc)

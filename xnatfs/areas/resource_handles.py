"""Open files of resources: a file being written (:class:`WriteHandle`), and a
file XNAT has opened to write without truncating it (:class:`ReplaceHandle`:
vim, ``truncate``), which becomes a replacement once cut to size 0."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..callers import interrupted, killed_by, signal_name
from ..errors import NotPermitted
from ..spoolfiles import Upload
from ..tree import Node
from .base import Handle
from .resource_paths import shown_path

if TYPE_CHECKING:
    from .resources import ResourceArea

log = logging.getLogger(__name__)


class WriteHandle(Handle):
    """A file being written into a resource (``writer``: the process that opened
    it to write), or one read back from its local copy."""

    direct_io = True

    def __init__(self, node: Node, area: ResourceArea, upload: Upload,
                 writer: int | None) -> None:
        super().__init__(node)
        self.area = area
        self.upload = upload
        self.writes = area._writes()
        self.writer = writer
        upload.open_handles += 1
        if writer is not None:
            upload.writers += 1

    async def read(self, offset: int, size: int) -> bytes:
        return await self.writes.read(self.upload, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        # (confirmed and dropped while open: ResultWrites asks the area's _rewritten)
        return await self.writes.write(self.upload, offset, data)

    async def flush(self) -> None:
        """close() of the writer returns once XNAT lists the file (with
        --write-behind, once it is queued); a writer killed mid-write sends nothing."""
        writer = self.writer
        if writer is None:
            return
        signal = killed_by(writer)
        if signal is not None:
            await self.writes.abandon(self.upload, f"the program writing it was killed "
                                                   f"({signal_name(signal)})")
            return
        self.area.flushed_by[self.upload.record.id] = self
        await self.area.finish(self.node, self.upload, closing=True,
                               caller_stopped=lambda: interrupted(writer))

    async def fsync(self, datasync: bool) -> None:
        if self.writer is not None:
            await self.area.finish(self.node, self.upload, closing=False)
        else:
            await self.writes.outcome(self.upload)

    async def release(self) -> None:
        if self.area.flushed_by.get(self.upload.record.id) is self:
            del self.area.flushed_by[self.upload.record.id]
        self.upload.open_handles -= 1
        if self.writer is not None:
            self.writer = None
            self.upload.writers -= 1
        await self.writes.release(self.upload)


class ReplaceHandle(Handle):
    """A file XNAT has, opened to write without O_TRUNC (--allow-overwrite).
    vim saves so, and ``truncate -s 0``: they cut the file to nothing
    (ftruncate 0) before writing, which makes it a replacement, from then on
    written and sent as :class:`WriteHandle` writes one. A write before that
    would change XNAT's file in place, which is refused."""

    direct_io = True

    def __init__(self, node: Node, area: ResourceArea, writer: int) -> None:
        super().__init__(node)
        self.area = area
        self.writer: int | None = writer
        self.inner: WriteHandle | None = None
        area.replacing[node.inode] = area.replacing.get(node.inode, 0) + 1

    def _replacement(self) -> WriteHandle | None:
        if self.inner is None and self.node.upload is not None and self.writer is not None:
            self.inner = WriteHandle(self.node, self.area, self.node.upload, self.writer)
        return self.inner

    def _refuse(self) -> NotPermitted:
        log.warning("refused to change %s in place, which XNAT has: it can be replaced "
                    "whole (opened with O_TRUNC, or cut to size 0 first)", shown_path(self.node))
        return NotPermitted(f"{self.node.name} is in XNAT: it can be replaced whole, not "
                            "changed in place")

    async def read(self, offset: int, size: int) -> bytes:
        inner = self._replacement()
        if inner is None:
            raise self._refuse()
        return await inner.read(offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        inner = self._replacement()
        if inner is None:
            raise self._refuse()
        return await inner.write(offset, data)

    async def flush(self) -> None:
        if (inner := self._replacement()) is not None:
            await inner.flush()

    async def fsync(self, datasync: bool) -> None:
        if (inner := self._replacement()) is not None:
            await inner.fsync(datasync)

    async def release(self) -> None:
        left = self.area.replacing.get(self.node.inode, 0) - 1
        if left > 0:
            self.area.replacing[self.node.inode] = left
        else:
            self.area.replacing.pop(self.node.inode, None)
        self.writer = None
        if self.inner is not None:
            await self.inner.release()

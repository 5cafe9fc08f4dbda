"""pyfuse3 ``Operations``: unpack the request, delegate, map errors, build attributes.

Nothing here speaks HTTP or knows XNAT's URL shapes; the tree answers
questions about names and metadata, the block cache about bytes. Every
handler runs under a deadline so that no system call outlives it, even with
the server down.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from .blockcache import BlockCache, FileIdentity
from .errors import XnatError, errno_for
from .tree import Node, Tree

log = logging.getLogger(__name__)

T = TypeVar("T")

# Files in one folder fetched ahead when one of them is opened (a DICOM series).
SERIES_READ_AHEAD = 16
SMALL_FILE = 8 * 1024 * 1024


def fuse_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn XnatErrors into errnos, bound the time, and log real bugs with their traceback."""

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any) -> T:
        try:
            with trio.fail_after(self.op_timeout):
                return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except XnatError as exc:
            log.debug("%s%r: %s", handler.__name__, args, exc)
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except trio.TooSlowError:
            log.warning("%s%r took longer than %ss", handler.__name__, args, self.op_timeout)
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except Exception:
            log.exception("bug in %s%r", handler.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def read_only(*_args: Any, **_kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    """The FUSE face of a :class:`Tree` and a :class:`BlockCache`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, blocks: BlockCache, *, nursery: trio.Nursery,
                 op_timeout: float = 120.0) -> None:
        super().__init__()
        self.tree = tree
        self.blocks = blocks
        self.nursery = nursery
        self.op_timeout = op_timeout
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._open_files: dict[int, Node] = {}
        self._next_fh = 1

    # ------------------------------------------------------------ attributes
    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = self.tree.metadata_ttl
        attr.attr_timeout = self.tree.metadata_ttl
        if node.is_dir:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = node.size
        attr.st_blksize = 128 * 1024
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self.attributes(self.tree.node(inode))

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        return self.attributes(node)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Nodes stay for the life of the mount (see tree.py); nothing to release.
        return None

    # ----------------------------------------------------------- directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.tree.node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = await self.tree.children(fh)
        for index in range(start_id, len(entries)):
            node = entries[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(node.name),
                                         self.attributes(node), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # ----------------------------------------------------------------- files
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        self._open_files[fh] = node
        if node.size <= SMALL_FILE:
            self._read_ahead_series(node)
        # Archive files are immutable for a given digest, so the page cache may keep them.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _read_ahead_series(self, node: Node) -> None:
        """Opening one file of a folder of small files starts fetching the next ones."""
        for sibling in [node, *self.tree.siblings_after(node, SERIES_READ_AHEAD)]:
            if sibling.file is not None and sibling.size <= SMALL_FILE:
                self.nursery.start_soon(self._prefetch_quietly, self.identity(sibling))

    async def _prefetch_quietly(self, ident: FileIdentity) -> None:
        try:
            await self.blocks.prefetch_whole(ident)
        except XnatError as exc:
            log.debug("read-ahead of %s failed: %s", ident.uri, exc)

    @staticmethod
    def identity(node: Node) -> FileIdentity:
        assert node.file is not None
        return FileIdentity(node.file.uri, node.file.size, node.file.digest)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._open_files[fh]
        return await self.blocks.read(self.identity(node), off, size)

    async def release(self, fh: int) -> None:
        self._open_files.pop(fh, None)

    # ---------------------------------------------------------------- xattrs
    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        value = node.xattrs.get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [name.encode() for name in self.tree.node(inode).xattrs]

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 128 * 1024
        data.f_namemax = 255
        return data

    # --------------------------------------------------- archive is read-only
    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = read_only
    create = write = setxattr = removexattr = read_only


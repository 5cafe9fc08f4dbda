"""pyfuse3 ``Operations``: unpack the request, find the area, delegate, map errors.

Nothing here knows what a project, an upload or a prearchive session is: the
tree finds names, and each node's area (``xnatfs/areas``) says what an
operation means for it. Name operations (create, mkdir, unlink, rmdir,
rename, links) go to the area of the folder they change, as in the Linux
VFS; the others to the area of the node. Areas raise
:mod:`xnatfs.errors`; :func:`fuse_errors` turns them into errnos, in one
place. Every handler runs under a deadline so that no system call outlives
it, even with the server down.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from .areas import MountAreas
from .areas.base import Handle, Writer
from .deadlines import Deadlines, operation_until
from .errors import BadRequest, Exists, InvalidArgument, IsADirectory, NotADirectory, XnatError
from .errors import errno_for
from .naming import NAME_MAX
from .tree import Node, Tree

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

RENAME_EXCHANGE = 2  # <linux/fs.h>; RENAME_NOREPLACE (1) the kernel checks itself


def fuse_errors(handler: Callable[Concatenate[Operations, P], Awaitable[T]]
                ) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, T]]:
    """Turn XnatErrors into errnos, bound the time, and log real bugs with their traceback.

    Handlers that wait for an upload get ``upload_timeout``; ``read`` bounds its
    own waits (``op_timeout`` without progress); all others get ``op_timeout``.
    """
    slow = handler.__name__ in ("write", "flush", "fsync", "fsyncdir", "rename", "release")
    bounded_inside = handler.__name__ == "read"

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: P.args, **kwargs: P.kwargs) -> T:
        deadlines = self.deadlines
        try:
            if bounded_inside:  # one cancel scope per read, the hot path: its own
                return await handler(self, *args, **kwargs)
            timeout = deadlines.upload_timeout if slow else deadlines.op_timeout
            with trio.fail_after(timeout) as scope, deadlines.cancelled_at_unmount(scope), \
                    operation_until(scope.deadline):
                return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except XnatError as exc:
            log.debug("%s%s: %s", handler.__name__, _loggable(handler.__name__, args), exc)
            raise self.failed(errno_for(exc), handler.__name__) from None
        except trio.TooSlowError:
            if deadlines.unmounting:
                raise self.failed(errno.EINTR, handler.__name__) from None
            log.warning("%s%s ran out of time", handler.__name__, _loggable(handler.__name__, args))
            raise self.failed(errno.ETIMEDOUT, handler.__name__) from None
        except Exception:
            log.exception("bug in %s%s", handler.__name__, _loggable(handler.__name__, args))
            raise self.failed(errno.EIO, handler.__name__) from None

    return wrapper


def _loggable(handler: str, args: tuple[Any, ...]) -> str:
    """A handler's arguments for the log; the data of a write only by its length
    (it may be a patient's DICOM, and megabytes of it)."""
    shown = [f"<{len(arg)} bytes>" if handler == "write" and isinstance(
        arg, (bytes, bytearray, memoryview)) else repr(arg) for arg in args]
    return f"({', '.join(shown)})"


class Operations(pyfuse3.Operations):
    """The FUSE face of the mount's areas."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, deadlines: Deadlines, *, nursery: trio.Nursery) -> None:
        super().__init__()
        self.tree = tree
        self.deadlines = deadlines
        self.nursery = nursery
        self.areas: MountAreas | None = None  # set by the mount, once the areas are made
        self.initialized = trio.Event()  # set once the kernel has sent INIT
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, Handle] = {}
        # Open directories: their inode, and the entries of the pass being read.
        self._open_dirs: dict[int, tuple[int, list[Node]]] = {}
        self._next_fh = 1
        # Operations failed for an XNAT error, a timeout or a bug, by errno name
        # (the status file).
        self.failures: Counter[str] = Counter()

    def failed(self, code: int, operation: str) -> pyfuse3.FUSEError:
        """The FUSE error for ``code``, counted among the failed operations unless
        it is a name that does not exist: shells and tools look up names that may
        not be there all the time (``.git``, ``__pycache__``), which is no failure."""
        if not (operation == "lookup" and code == errno.ENOENT):
            self.failures[errno.errorcode.get(code, str(code))] += 1
        return pyfuse3.FUSEError(code)

    def cancel_requests(self) -> None:
        """Unmounting: every request still waiting is answered now (EINTR)."""
        self.deadlines.cancel_all()

    def init(self) -> None:
        """The kernel's INIT arrived; our reply goes out as soon as this returns."""
        self.initialized.set()

    def _area(self, node: Node) -> Any:
        return self.tree.area_of(node)

    # ------------------------------------------------------ telling the kernel
    def forget_entry(self, parent_inode: int, name: str, inode: int = 0) -> None:
        """Tell the kernel a name changed (asynchronously: we are inside a request).

        ``inode`` is the entry's inode when it was deleted, else 0.
        """
        try:
            pyfuse3.invalidate_entry_async(parent_inode, os.fsencode(name), deleted=inode,
                                           ignore_enoent=True)
        except Exception:  # noqa: BLE001 - best effort; the entry timeout catches up
            log.debug("could not invalidate %r", name, exc_info=True)

    async def drop_pages(self, inode: int) -> None:
        # In a worker thread: the kernel waits for pages locked by reads that
        # this (trio) thread has to answer.
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False,
                                          abandon_on_cancel=True)
        except OSError as exc:
            log.debug("could not invalidate inode %d: %s", inode, exc)

    # ------------------------------------------------------------ attributes
    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        area = self._area(node)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout, attr.attr_timeout = area.timeouts(node)
        writable = area.writable(node)
        if node.kind.is_dir:
            attr.st_mode = stat.S_IFDIR | (0o755 if writable else 0o555)
            attr.st_nlink = 2
            attr.st_size = 0
        elif node.kind.is_link:
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            attr.st_size = area.size(node)
        else:
            attr.st_mode = stat.S_IFREG | (0o644 if writable else 0o444)
            attr.st_nlink = 1
            attr.st_size = area.size(node)
        attr.st_blksize = 128 * 1024
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        node = self.tree.node(inode)
        await self._area(node).refresh(node)
        return self.attributes(node)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.tree.node(inode)
        await self._area(node).setattr(
            node, size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        return self.attributes(node)

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self.tree.lookup(parent_inode, os.fsdecode(name)))

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """``node``'s attributes for a reply that hands it to the kernel."""
        attr = self.attributes(node)
        self.tree.remember(node)
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Not under fuse_errors: a forget has no reply to carry an errno, and any
        # exception escaping a handler ends pyfuse3.main(), the whole mount.
        try:
            for inode, count in inode_list:
                self.tree.forget(inode, count)
        except Exception:
            log.exception("bug in forget(%r)", inode_list)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        link: bytes = self._area(node).readlink(node)
        return link

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Size and free space of the local disk that holds upload copies (``df``,
        and the file managers that check free space before a copy)."""
        assert self.areas is not None
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 128 * 1024
        data.f_namemax = NAME_MAX
        disk = await self.areas.local_space()
        data.f_blocks = disk.f_blocks * disk.f_frsize // data.f_frsize
        data.f_bfree = disk.f_bfree * disk.f_frsize // data.f_frsize
        data.f_bavail = disk.f_bavail * disk.f_frsize // data.f_frsize
        return data

    # ----------------------------------------------------------- directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self.tree.node(inode).is_dir:
            raise NotADirectory(f"inode {inode}")
        fh = self._new_fh()
        self._open_dirs[fh] = (inode, [])
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries from one listing per pass: a big folder takes several calls,
        each resuming at an offset, and a listing refreshed in between (its
        time was up, the folder changed) would skip or repeat entries."""
        inode, entries = self._open_dirs[fh]
        if start_id == 0:  # a new pass (opendir, or rewinddir): list afresh
            entries = await self.tree.children(inode)
            self._open_dirs[fh] = (inode, entries)
        for index in range(start_id, len(entries)):
            node = entries[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(node.name),
                                         self.attributes(node), index + 1):
                return
            self.tree.remember(node)  # readdirplus: each entry sent counts as a lookup

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """``sync FOLDER`` (and fsync of any folder): every file of the mount sent
        behind its close (--write-behind) is in XNAT, or this fails as it did.
        (A bare ``sync``/``syncfs`` never reaches a FUSE file system here.)"""
        assert self.areas is not None
        await self.areas.sync()

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    # ----------------------------------------------------------------- files
    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _opened(self, handle: Handle) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=handle.direct_io, keep_cache=handle.keep_cache)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        if node.is_dir:
            raise IsADirectory(node.name)
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        handle = await self._area(node).open(node, writing=writing,
                                             truncate=bool(flags & os.O_TRUNC),
                                             writer=Writer(ctx.pid))
        return self._opened(handle)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._handles[fh].read(off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._handles[fh].write(off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if handle is not None:
            await handle.flush()

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if handle is not None:
            await handle.fsync(datasync)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            await handle.release()

    # ------------------------------------------------------ names in a folder
    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        parent = self.tree.node(parent_inode)
        node, handle = await self._area(parent).create(parent, os.fsdecode(name), Writer(ctx.pid))
        self.tree.forget_negative(parent_inode)
        return self._opened(handle), self._entry(node)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.tree.node(parent_inode)
        if await self.tree.existing_child(parent_inode, os.fsdecode(name)) is not None:
            raise Exists(os.fsdecode(name))
        node = await self._area(parent).mkdir(parent, os.fsdecode(name))
        self.tree.forget_negative(parent_inode)
        return self._entry(node)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        parent = self.tree.node(parent_inode)
        await self._area(parent).unlink(parent, node)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        parent = self.tree.node(parent_inode)
        await self._area(parent).rmdir(parent, node)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & RENAME_EXCHANGE:
            raise InvalidArgument("exchanging names is not supported")
        node = await self.tree.lookup(parent_inode_old, os.fsdecode(name_old))
        old_parent = self.tree.node(parent_inode_old)
        new_parent = self.tree.node(parent_inode_new)
        try:
            await self._area(old_parent).rename(node, new_parent, os.fsdecode(name_new))
        except BadRequest as exc:
            # mv reads rename(2)'s EINVAL as "cannot move a directory to a
            # subdirectory of itself" and says only that.
            log.info("rename of %s refused: %s", node.name, exc)
            raise pyfuse3.FUSEError(errno.EPERM) from None

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._refuse_special(parent_inode)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._refuse_special(new_parent_inode)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._refuse_special(parent_inode)

    def _refuse_special(self, parent_inode: int) -> pyfuse3.EntryAttributes:
        parent = self.tree.node(parent_inode)
        self._area(parent).refuse_special(parent)
        raise AssertionError(f"{type(self._area(parent)).__name__} accepted a special file")

    # ---------------------------------------------------------------- xattrs
    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        value: bytes = await self._area(node).getxattr(node, os.fsdecode(name))
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.tree.node(inode)
        return [os.fsencode(key) for key in await self._area(node).listxattr(node)]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        node = self.tree.node(inode)
        await self._area(node).setxattr(node, os.fsdecode(name), value)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.tree.node(inode)
        await self._area(node).removexattr(node, os.fsdecode(name))

"""pyfuse3 ``Operations``: unpack the request, delegate, map errors, build attributes.

Nothing here speaks HTTP or knows XNAT's URL shapes; the tree answers
questions about names and metadata, the block cache about bytes. Every
handler runs under a deadline so that no system call outlives it, even with
the server down.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import pyfuse3
import trio

from .blockcache import BlockCache, FileIdentity
from .callers import interrupted, killed_by, signal_name
from .errors import BadRequest, NotFound, Stale, XnatError, errno_for
from .naming import NAME_MAX, label_from_name, require_label
from .tree import Kind, Node, Tree
from .imports import State as UploadState
from .imports import Upload, UploadManager, check_folder_name, labels_from_path

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

# Files in one folder fetched ahead when one of them is opened (a DICOM series).
SERIES_READ_AHEAD = 16
SMALL_FILE = 8 * 1024 * 1024
RENAME_EXCHANGE = 2  # <linux/fs.h>; RENAME_NOREPLACE (1) the kernel checks itself
UPLOAD_ENTRY_TTL = 1.0  # seconds the kernel may keep an entry of the upload area


def fuse_errors(handler: Callable[Concatenate[Operations, P], Awaitable[T]]
                ) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, T]]:
    """Turn XnatErrors into errnos, bound the time, and log real bugs with their traceback.

    Handlers that wait for an upload get ``upload_timeout``; ``read`` bounds its
    own waits (``op_timeout`` without progress); all others get ``op_timeout``.
    """
    slow = handler.__name__ in ("write", "flush", "fsync", "rename", "release")
    bounded_inside = handler.__name__ == "read"

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            if bounded_inside:  # one cancel scope per read, the hot path: its own
                return await handler(self, *args, **kwargs)
            with trio.fail_after(self.upload_timeout if slow else self.op_timeout) as scope, \
                    self._cancelled_at_unmount(scope):
                return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except XnatError as exc:
            log.debug("%s%s: %s", handler.__name__, _loggable(handler.__name__, args), exc)
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except trio.TooSlowError:
            if self.unmounting:
                raise pyfuse3.FUSEError(errno.EINTR) from None
            log.warning("%s%s ran out of time", handler.__name__, _loggable(handler.__name__, args))
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except Exception:
            log.exception("bug in %s%s", handler.__name__, _loggable(handler.__name__, args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _loggable(handler: str, args: tuple[Any, ...]) -> str:
    """A handler's arguments for the log; the data of a write only by its length
    (it may be a patient's DICOM, and megabytes of it)."""
    shown = [f"<{len(arg)} bytes>" if handler == "write" and isinstance(
        arg, (bytes, bytearray, memoryview)) else repr(arg) for arg in args]
    return f"({', '.join(shown)})"


OWN_XATTRS = ("user.xnat.", "user.xnatfs.")  # what the mount tells; never stored


class Operations(pyfuse3.Operations):
    """The FUSE face of a :class:`Tree` and a :class:`BlockCache`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, blocks: BlockCache, uploads: UploadManager, *,
                 nursery: trio.Nursery, op_timeout: float = 120.0,
                 upload_timeout: float = 3600.0) -> None:
        super().__init__()
        self.tree = tree
        self.blocks = blocks
        self.uploads = uploads
        self.upload_timeout = upload_timeout
        self._generated: dict[int, bytes] = {}
        self.initialized = trio.Event()  # set once the kernel has sent INIT
        self.nursery = nursery
        self.op_timeout = op_timeout
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._open_files: dict[int, Node] = {}
        self._running: set[trio.CancelScope] = set()  # the requests being answered
        self.unmounting = False
        # Handles that may write an upload, with the process that opened them.
        self._upload_writers: dict[int, int] = {}
        self._stale_handles: set[int] = set()  # opened on bytes since dropped as wrong
        # Open directories: their inode, and the entries of the pass being read.
        self._open_dirs: dict[int, tuple[int, list[Node]]] = {}
        self._next_fh = 1
        # Each open archive file reads the version of the file it was opened on...
        self._open_identity: dict[int, FileIdentity] = {}
        # ...and the kernel may hold pages of one version per inode (see open).
        self._page_identity: dict[int, FileIdentity] = {}
        blocks.add_drop_listener(self._blocks_dropped)

    def cancel_requests(self) -> None:
        """Unmounting: answer every request still waiting (for a server that does
        not answer, say) with an error now. The unmount waits for them, and the
        process with it; an upload a close waits for goes on, and is waited for."""
        self.unmounting = True
        for scope in self._running:
            scope.cancel()

    @contextlib.contextmanager
    def _cancelled_at_unmount(self, scope: trio.CancelScope) -> Iterator[None]:
        """The scope of a request being answered, for :meth:`cancel_requests`."""
        self._running.add(scope)
        try:
            yield
        finally:
            self._running.discard(scope)

    def init(self) -> None:
        """The kernel's INIT arrived; our reply goes out as soon as this returns."""
        self.initialized.set()

    # ------------------------------------------------------------ attributes
    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = self.tree.metadata_ttl
        attr.attr_timeout = self.tree.metadata_ttl
        if node.kind in (Kind.STATUS_FILE, Kind.INFO_FILE):
            # Generated here and changing at any time: a size the kernel kept
            # would cut `tail` and `wc -c` short (they go by st_size).
            attr.attr_timeout = 0
        elif node.kind in (Kind.UPLOAD_FILE, Kind.UPLOAD_DIR):
            # Local, so cheap to ask again; `xnatfs uploads discard|retry` change
            # them from outside the mount.
            attr.entry_timeout = attr.attr_timeout = UPLOAD_ENTRY_TTL
        # Directories where file operations mean something: uploads, archiving
        # into a (new) subject, moving and removing prearchive sessions.
        writable = node.writable or bool(node.prearchive_uri) or node.kind in (
            Kind.PROJECT, Kind.SUBJECT, Kind.PENDING_SUBJECT, Kind.PREARCHIVE_PROJECT,
            Kind.PREARCHIVE_TIMESTAMP)
        if node.kind in (Kind.INFO_FILE, Kind.FILE, Kind.STATUS_FILE):
            writable = False
        if node.is_dir:
            attr.st_mode = stat.S_IFDIR | (0o755 if writable else 0o555)
            attr.st_nlink = 2
            attr.st_size = 0
        elif node.kind is Kind.SCAN_LINK:
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            attr.st_size = len(node.text)
        else:
            attr.st_mode = stat.S_IFREG | (0o644 if writable else 0o444)
            attr.st_nlink = 1
            attr.st_size = self.file_size(node)
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
        if (node.upload is not None and node.upload.state is UploadState.FAILED
                and not await self._current_upload(node)):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.kind is Kind.INFO_FILE:  # its size is its text's, which changes
            await self.tree.refresh_prearchive_node(node)
        return self.attributes(node)

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        return self._entry(node)

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
                if self.tree.forget(inode, count):
                    self._page_identity.pop(inode, None)  # the kernel dropped the pages too
        except Exception:
            log.exception("bug in forget(%r)", inode_list)

    # ----------------------------------------------------------- directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.tree.node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
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
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    def file_size(self, node: Node) -> int:
        if node.kind is Kind.STATUS_FILE:
            return len(self.tree.status_text(node))
        return node.size

    # ----------------------------------------------------------------- files
    def _new_handle(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._open_files[fh] = node
        return fh

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND)
        if node.kind is Kind.UPLOAD_FILE:
            assert node.upload is not None
            if flags & os.O_TRUNC:
                await self.uploads.truncate(node.upload, 0)
            writer = ctx.pid if writing else None
            return pyfuse3.FileInfo(fh=self._upload_handle(node, writer=writer), direct_io=True)
        if writing:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._new_handle(node)
        if node.kind in (Kind.STATUS_FILE, Kind.INFO_FILE):
            # Generated text: read it fresh, bypassing the page cache.
            if node.kind is Kind.STATUS_FILE:
                await self.uploads.notice_outside_changes()
                content = self.tree.status_text(node)
            else:
                content = node.text = await self.tree.info_text(node)
            self._generated[fh] = content
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if node.size <= SMALL_FILE:
            self._read_ahead_series(node)
        ident = self._open_identity[fh] = self.identity(node)
        # Archive files are immutable for a given identity, so the kernel may keep
        # their pages, unless it holds those of another version (same size and
        # mtime, so it cannot tell) or of one dropped as bad.
        keep_cache = not node.prearchive_uri and self._page_identity.get(inode) == ident
        self._page_identity[inode] = ident
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    def _read_ahead_series(self, node: Node) -> None:
        """Opening one file of a folder of small files starts fetching the next ones."""
        if node.file is None:
            return
        siblings = [self.identity(sibling)
                    for sibling in self.tree.siblings_after(node, SERIES_READ_AHEAD)
                    if sibling.file is not None and sibling.size <= SMALL_FILE]
        self.nursery.start_soon(self._prefetch_series, self.identity(node), siblings)

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

    @staticmethod
    def identity(node: Node) -> FileIdentity:
        assert node.file is not None
        return FileIdentity(node.file.uri, node.file.size, node.file.digest)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._open_files[fh]
        if fh in self._generated:
            return self._generated[fh][off:off + size]
        if node.upload is not None:
            return await self.uploads.read(node.upload, off, size)
        ident = self._open_identity.get(fh) or self.identity(node)
        if fh in self._stale_handles:
            raise Stale(f"{ident.uri} was dropped as wrong since it was opened; open it again")
        if self._page_identity.get(node.inode, ident) != ident:
            # Opened before the file changed: its pages would mix with the new version's.
            raise Stale(f"{ident.uri} changed since it was opened")
        try:
            return await self._read_while_moving(ident, off, size)
        except NotFound as exc:  # deleted on the server since it was opened
            raise Stale(exc.message, path=ident.uri) from None

    async def _read_while_moving(self, ident: FileIdentity, off: int, size: int) -> bytes:
        """A read waits ``op_timeout`` at most while nothing of its file arrives,
        and as long as it keeps arriving: without Range (real XNAT), a first read
        far into a big file waits for one download to get there from byte 0,
        which takes longer than any fixed bound on a slow link."""
        while True:
            before = self.blocks.received(ident)
            with trio.move_on_after(self.op_timeout) as scope, self._cancelled_at_unmount(scope):
                return await self.blocks.read(ident, off, size)  # type: ignore[return-value]
            if self.unmounting or self.blocks.received(ident) == before:
                raise trio.TooSlowError

    def _blocks_dropped(self, ident: FileIdentity) -> None:
        """A file failed its digest check or was replaced on the server: the kernel
        must not serve its pages again."""
        for inode, cached in list(self._page_identity.items()):
            if cached == ident:
                del self._page_identity[inode]  # the next open drops the pages...
                self.nursery.start_soon(self._invalidate_pages, inode)  # ...and so does this
        # Handles that may have read the dropped bytes read nothing more: the next
        # bytes could be another version's (the kernel retries a failed readahead).
        self._stale_handles.update(fh for fh, opened in self._open_identity.items()
                                   if opened == ident)

    async def _invalidate_pages(self, inode: int) -> None:
        # In a worker thread: the kernel waits for pages locked by reads that
        # this (trio) thread has to answer.
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False,
                                          abandon_on_cancel=True)
        except OSError as exc:
            log.debug("could not invalidate inode %d: %s", inode, exc)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._open_files[fh]
        if node.upload is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.uploads.write(node.upload, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """close() of a handle that wrote an upload returns only once XNAT accepted
        it (or failed). Other handles close at once: a file manager peeking at a
        file being copied (thumbnails, indexing) must not send it half written;
        nor does the close of a writer killed mid-copy."""
        node = self._open_files.get(fh)
        if node is None or node.upload is None or fh not in self._upload_writers:
            return
        writer = self._upload_writers[fh]
        signal = killed_by(writer)
        if signal is not None:  # Ctrl-C, kill: cut off, not finished
            try:
                await self.uploads.abandon(node.upload, f"the program writing it was "
                                                        f"killed ({signal_name(signal)})")
            finally:
                self.tree.refresh_upload_node(node)
            return
        await self._finish_upload(node, closing=True, caller_stopped=lambda: interrupted(writer))

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self._open_files.get(fh)
        if node is None or node.upload is None:
            return
        if fh in self._upload_writers:
            await self._finish_upload(node, closing=False)
        else:  # XNAT's answer to what the writers sent, without sending anything
            await self.uploads.outcome(node.upload)

    async def _finish_upload(self, node: Node, *, closing: bool,
                             caller_stopped: Callable[[], bool] | None = None) -> None:
        assert node.upload is not None
        try:
            await self.uploads.finish(node.upload, closing=closing,
                                      caller_stopped=caller_stopped)
        finally:
            self.tree.refresh_upload_node(node)
            if node.upload.record.result:
                self.tree.invalidate_prearchive()

    @fuse_errors
    async def release(self, fh: int) -> None:
        node = self._open_files.pop(fh, None)
        self._generated.pop(fh, None)
        self._open_identity.pop(fh, None)
        self._stale_handles.discard(fh)
        if node is not None and node.upload is not None:
            node.upload.open_handles -= 1
            if fh in self._upload_writers:
                del self._upload_writers[fh]
                node.upload.writers -= 1
            await self.uploads.release(node.upload)

    def _upload_handle(self, node: Node, *, writer: int | None) -> int:
        """``writer``: the process opening it to write, if it does."""
        assert node.upload is not None
        fh = self._new_handle(node)
        node.upload.open_handles += 1
        if writer is not None:
            self._upload_writers[fh] = writer
            node.upload.writers += 1
        return fh

    # ------------------------------------------------------ creating entries
    def _upload_target(self, parent: Node, name: bytes) -> str:
        """The relative path below ``uploads/<PROJECT>/`` of a new entry."""
        if parent.kind is not Kind.UPLOAD_DIR:
            raise pyfuse3.FUSEError(errno.EACCES if parent.kind is Kind.UPLOADS else errno.EROFS)
        decoded = os.fsdecode(name)
        if "/" in decoded or decoded in (".", ".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return f"{parent.relpath}/{decoded}" if parent.relpath else decoded

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        parent = self.tree.node(parent_inode)
        relpath = self._upload_target(parent, name)
        upload = await self.uploads.create(parent.project, relpath)
        node = self.tree.upload_file_node(parent, upload)
        self.tree.forget_negative(parent_inode)
        return (pyfuse3.FileInfo(fh=self._upload_handle(node, writer=ctx.pid), direct_io=True),
                self._entry(node))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.tree.node(parent_inode)
        if await self._existing_child(parent_inode, name) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if parent.kind is Kind.PROJECT:
            # A subject to archive into, local until a session is archived there.
            node = self.tree.add_pending_subject(parent, os.fsdecode(name))
        else:
            relpath = self._upload_target(parent, name)
            check_folder_name(os.fsdecode(name))
            self.tree.upload_folders.add((parent.project, relpath))
            self.tree.upload_folder_mtimes[(parent.project, relpath)] = time.time_ns()
            node = self.tree.upload_dir_node(parent, relpath.rsplit("/", 1)[-1])
        self.tree.forget_negative(parent_inode)
        return self._entry(node)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Times and modes are accepted on uploads (cp -a, rsync); the archive is read-only."""
        node = self.tree.node(inode)
        if not node.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_size and node.upload is not None:
            await self.uploads.truncate(node.upload, attr.st_size)
        if fields.update_mtime and node.upload is not None:
            await self.uploads.set_mtime(node.upload, attr.st_mtime_ns)
            self.tree.refresh_upload_node(node)
        elif fields.update_mtime and node.kind is Kind.UPLOAD_DIR:
            self.tree.set_upload_folder_mtime(node, attr.st_mtime_ns)
        return self.attributes(node)

    # --------------------------------------------------- removing, renaming
    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        if node.kind is Kind.UPLOAD_FILE:
            assert node.upload is not None
            await self.uploads.forget(node.upload)
            return
        if node.prearchive_uri and node.kind is not Kind.PREARCHIVE_SESSION:
            self.tree.hide(node)  # part of `rm -r SESSION`; the rmdir of the session deletes
            return
        raise pyfuse3.FUSEError(errno.EROFS)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        if node.prearchive_uri and await self.tree.children(node.inode):
            # What rm -r leaves is empty: it removed (hid) everything inside
            # first. A bare rmdir (or gio remove) of a full session must not
            # delete it from XNAT.
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        if node.kind is Kind.PREARCHIVE_SESSION:
            await self.tree.client.delete_prearchive(node.prearchive_uri)
            self.tree.show_hidden(node.prearchive_uri)  # nothing left to hide
            timestamp = self.tree.node(parent_inode)
            self.tree.emptied_timestamps.add((timestamp.project, timestamp.folder))
            self.tree.invalidate_prearchive()
            self._forget_entry(parent_inode, name, node.inode)
            return
        if node.kind is Kind.PREARCHIVE_TIMESTAMP:
            if await self.tree.children(node.inode):
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self.tree.emptied_timestamps.discard((node.project, node.folder))
            self._forget_entry(parent_inode, name, node.inode)
            return
        if node.prearchive_uri:
            self.tree.hide(node)
            return
        if node.kind is Kind.UPLOAD_DIR and node.relpath:
            if await self.tree.children(node.inode):
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self.tree.upload_folders.discard((node.project, node.relpath))
            self.tree.upload_folder_mtimes.pop((node.project, node.relpath), None)
            return
        if node.kind is Kind.PENDING_SUBJECT:
            if await self.tree.children(node.inode):  # a session was archived into it
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self.tree.pending_subjects.discard((node.project, node.name))
            return
        raise pyfuse3.FUSEError(errno.EROFS)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        node = await self.tree.lookup(parent_inode_old, os.fsdecode(name_old))
        new_parent = self.tree.node(parent_inode_new)
        try:
            await self._rename(node, parent_inode_new, new_parent, name_new)
        except BadRequest as exc:
            # mv reads rename(2)'s EINVAL as "cannot move a directory to a
            # subdirectory of itself" and says only that.
            log.info("rename of %s refused: %s", node.name, exc)
            raise pyfuse3.FUSEError(errno.EPERM) from None

    async def _rename(self, node: Node, parent_inode_new: int, new_parent: Node,
                      name_new: bytes) -> None:
        # The kernel moves its entry from the old name to the new one itself.
        if node.kind is Kind.UPLOAD_FILE:
            await self._rename_upload(node, new_parent, name_new)
        elif node.kind is Kind.UPLOAD_DIR and node.relpath:
            await self._rename_upload_folder(node, new_parent, name_new)
        elif node.kind is Kind.PREARCHIVE_SESSION:
            await self._rename_prearchive(node, new_parent, name_new)
            # The kernel would point the new name at the prearchive node; the
            # archived session is a different node, found by a fresh lookup.
            self._forget_entry(parent_inode_new, name_new, 0)
        else:
            raise pyfuse3.FUSEError(errno.EROFS)

    async def _rename_upload(self, node: Node, new_parent: Node, name_new: bytes) -> None:
        """Write-to-temporary-then-rename: the entry moves; a litter name becoming a real one
        uploads now."""
        upload = node.upload
        assert upload is not None
        if new_parent.kind is not Kind.UPLOAD_DIR or new_parent.project != node.project:
            self._refuse_moving_uploaded([upload], new_parent)
            raise pyfuse3.FUSEError(errno.EXDEV)  # mv copies it, from its local copy
        old_parent, old_relpath = node.parent, upload.record.relpath
        new_relpath = self._upload_target(new_parent, name_new)
        if upload.busy and labels_from_path(new_relpath) != labels_from_path(old_relpath):
            # Being written or sent with the labels of its folders: they are fixed.
            raise pyfuse3.FUSEError(errno.EBUSY)
        replaced = await self._existing_child(new_parent.inode, name_new)
        await self.uploads.rename(upload, new_relpath)
        self.tree.refresh_upload_node(node)
        node.parent = new_parent.inode
        if upload.dirty and upload.writers == 0:
            # Renamed after close (a temporary made real): finished as a close would
            # be. A refusal fails the rename, which then changes nothing: rsync
            # says so and goes on, and a second run sends the file again.
            try:
                await self._finish_upload(node, closing=True)
            except XnatError:
                await self.uploads.rename(upload, old_relpath)
                self.tree.refresh_upload_node(node)
                node.parent = old_parent
                raise
        if replaced is not None and replaced is not node and replaced.upload is not None:
            await self.uploads.forget(replaced.upload)

    async def _rename_upload_folder(self, node: Node, new_parent: Node, name_new: bytes) -> None:
        """A folder renamed or moved within its project's upload area: "New Folder"
        named ``subject=S05`` after the file manager made it."""
        if new_parent.kind is not Kind.UPLOAD_DIR or new_parent.project != node.project:
            self._refuse_moving_uploaded(self.uploads.below(node.project, node.relpath),
                                         new_parent)
            raise pyfuse3.FUSEError(errno.EXDEV)  # mv copies them, from their local copies
        new_relpath = self._upload_target(new_parent, name_new)
        check_folder_name(os.fsdecode(name_new))
        replaced = await self._existing_child(new_parent.inode, name_new)
        if replaced is not None and replaced is not node:
            if replaced.kind is not Kind.UPLOAD_DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if await self.tree.children(replaced.inode):
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        # From here to the move, no await: no other request sees half of it.
        if any(u.busy for u in self.uploads.below(node.project, node.relpath)):
            # Their labels come from the path; one being sent cannot change them.
            raise pyfuse3.FUSEError(errno.EBUSY)
        if replaced is not None and replaced is not node:
            self.tree.upload_folders.discard((replaced.project, replaced.relpath))
        moved = self.uploads.move_folder(node.project, node.relpath, new_relpath)
        self.tree.move_upload_folder(node, new_parent, new_relpath)
        await self.uploads.save(moved)

    def _refuse_moving_uploaded(self, uploads: list[Upload], new_parent: Node) -> None:
        """Into another project's upload folder, ``mv`` would copy: impossible for
        an upload XNAT has (its local copy is gone), which would leave an empty
        file behind. EPERM at once instead (failed ones, kept, are copied)."""
        sent = [u for u in uploads if u.state is UploadState.DONE]
        if sent and new_parent.kind is Kind.UPLOAD_DIR:
            log.warning("refused to move %s to uploads/%s: XNAT has it already (%s); move "
                        "the session in prearchive/ or the archive instead",
                        sent[0].record.relpath, new_parent.project,
                        ", ".join(sent[0].record.result))
            raise pyfuse3.FUSEError(errno.EPERM)

    async def _rename_prearchive(self, node: Node, new_parent: Node, name_new: bytes) -> None:
        """``mv`` out of the prearchive: into a subject archives, into another project moves.
        Refused (EPERM) when ``rm`` removed part of the session: XNAT would archive
        or move all of it, the removed part too."""
        client = self.tree.client
        if self.tree.show_hidden(node.prearchive_uri):
            log.warning("refused to archive or move %s: files or folders of it were removed "
                        "with rm, but XNAT removes only whole prearchive sessions, so they "
                        "are still there (shown again now); archive it with them, or remove "
                        "the whole session", node.prearchive_uri)
            raise pyfuse3.FUSEError(errno.EPERM)
        if new_parent.kind in (Kind.SUBJECT, Kind.PENDING_SUBJECT):
            subject = new_parent.xattrs.get("user.xnat.label") or label_from_name(new_parent.name)
            new_name = os.fsdecode(name_new)
            session = label_from_name(new_name)
            if new_name != node.name:  # a label of the user's choosing
                require_label(session, "session")
            await client.archive_prearchive(node.prearchive_uri, project=new_parent.project,
                                            subject=subject, session=session)
            self.tree.archived_as[node.prearchive_uri] = (new_parent.project, subject, session)
            self.tree.invalidate_project(new_parent.project)
            if new_parent.kind is Kind.PENDING_SUBJECT:
                # The subject now exists on the server, as a different node.
                self.tree.pending_subjects.discard((new_parent.project, subject))
                self._forget_entry(new_parent.parent, os.fsencode(new_parent.name), 0)
        elif new_parent.kind is Kind.PREARCHIVE_PROJECT:
            await client.move_prearchive(node.prearchive_uri, new_parent.project)
        else:
            # Not EXDEV: mv would copy the session file by file instead, making
            # folders where it cannot put the files.
            log.warning("refused to move %s to %s: a prearchive session is archived into "
                        "a subject folder (mkdir PROJECT/SUBJECT first) or moved into "
                        "prearchive/PROJECT", node.prearchive_uri, new_parent.name)
            raise pyfuse3.FUSEError(errno.EPERM)
        self.tree.invalidate_prearchive()

    async def _existing_child(self, parent_inode: int, name: bytes) -> Node | None:
        try:
            return await self.tree.lookup(parent_inode, os.fsdecode(name))
        except XnatError:
            return None

    def _forget_entry(self, parent_inode: int, name: bytes, inode: int) -> None:
        """Tell the kernel a name changed (asynchronously: we are inside a request).

        ``inode`` is the entry's inode when it was deleted, else 0.
        """
        try:
            pyfuse3.invalidate_entry_async(parent_inode, name, deleted=inode, ignore_enoent=True)
        except Exception:  # noqa: BLE001 - best effort; the entry timeout catches up
            log.debug("could not invalidate %r", name, exc_info=True)

    # ---------------------------------------------------------------- xattrs
    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = os.fsdecode(name)
        node = self.tree.node(inode)
        # Only ours are looked up afresh: ls -l asks every entry for security.*
        # and system.* attributes, which must not wait for the server.
        if key.startswith(OWN_XATTRS):
            await self._refresh_xattrs(node)
        elif node.upload is not None and key in node.upload.user_xattrs:
            return node.upload.user_xattrs[key]
        value = node.xattrs.get(key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.tree.node(inode)
        names = [name.encode() for name in node.xattrs]
        if node.upload is not None:
            names += [name.encode() for name in node.upload.user_xattrs]
        return names

    async def _refresh_xattrs(self, node: Node) -> None:
        """Attributes that change while listed, as they are now: an upload's
        outcome, a prearchive session's status (scripts poll them)."""
        if node.upload is not None:
            await self._current_upload(node)
        elif node.kind in (Kind.PREARCHIVE_SESSION, Kind.INFO_FILE):
            await self.tree.refresh_prearchive_node(node)

    async def _current_upload(self, node: Node) -> bool:
        """An upload entry as its record says now, a failed one after noticing what
        ``xnatfs uploads retry|discard`` did to it; False once it was discarded."""
        assert node.upload is not None
        if node.upload.state is UploadState.FAILED:
            await self.uploads.notice_outside_changes()
            if node.upload.record.id not in self.uploads.uploads:
                return False
        self.tree.refresh_upload_node(node)
        return True

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Size and free space of the local disk that holds upload copies (``df``,
        and the file managers that check free space before a copy)."""
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 128 * 1024
        data.f_namemax = NAME_MAX
        disk = await self.uploads.local_space()
        data.f_blocks = disk.f_blocks * disk.f_frsize // data.f_frsize
        data.f_bfree = disk.f_bfree * disk.f_frsize // data.f_frsize
        data.f_bavail = disk.f_bavail * disk.f_frsize // data.f_frsize
        return data

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        """An upload entry keeps ``user.*`` attributes set on it (``rsync -X``,
        ``cp --preserve=xattr``) for as long as it is listed. Anything else is
        not supported, rather than read-only: ``cp -a``/``cp -p``/``mv`` into
        ``uploads/`` copy a file's ACL (``system.posix_acl_access``) and treat
        ENOTSUP as "nothing to keep", where EROFS fails them."""
        node = self.tree.node(inode)
        key = os.fsdecode(name)
        if node.upload is None or not key.startswith("user.") or key.startswith(OWN_XATTRS):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node.upload.user_xattrs[key] = value

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """``rsync -X`` removes from an entry what its source does not have, our
        upload status too: that is not stored, so removing it does nothing (a
        refusal would fail every run)."""
        node = self.tree.node(inode)
        key = os.fsdecode(name)
        if node.upload is None:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if key.startswith(OWN_XATTRS):
            return
        if node.upload.user_xattrs.pop(key, None) is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        if node.kind is not Kind.SCAN_LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.text

    # ------------------------------------------------- everything else: no
    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._refuse_special(parent_inode)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._refuse_special(new_parent_inode)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._refuse_special(parent_inode)

    def _refuse_special(self, parent_inode: int) -> NoReturn:
        """Links and device files cannot be uploaded (EPERM: "Read-only file
        system" would send the user looking for a mount option)."""
        if self.tree.node(parent_inode).kind is Kind.UPLOAD_DIR:
            raise pyfuse3.FUSEError(errno.EPERM)
        raise pyfuse3.FUSEError(errno.EROFS)


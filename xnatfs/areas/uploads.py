"""The upload area: files dropped into ``uploads/<PROJECT>/`` are sent to XNAT's importer.

This module is the folder: what ``create``, ``write``, ``close``, ``mkdir``,
``rename``, ``rm``, times and extended attributes mean for entries there.
What an upload is and how it is sent is :mod:`xnatfs.imports`'; how it is
kept on local disk until XNAT confirms it, :mod:`xnatfs.spool`'s (the
loss-free spool and its send queue); the status files are generated
(:mod:`xnatfs.areas.generated`).

Rules a user meets here (see the README's Upload section):

* ``close()`` (and ``fsync()``) of a handle that wrote returns once XNAT
  accepted the file, so ``cp`` reports refusals; a close of a writer killed
  mid-copy does not send the cut-off file;
* folders named ``subject=LABEL``/``session=LABEL`` choose the labels, so an
  upload being written or sent cannot move to other such folders (EBUSY);
* write-to-temporary-then-rename (rsync, GNOME) sends at the rename, whose
  refusal changes nothing;
* moving into another project's folder copies (EXDEV), except for what XNAT
  already has (EPERM: its local copy is gone).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from ..callers import interrupted, killed_by, signal_name
from ..errors import (
    Busy,
    CrossDevice,
    Forbidden,
    InvalidArgument,
    NoAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    XnatError,
)
from ..imports import UploadManager, check_folder_name, labels_from_path, relocated
from ..naming import safe_name
from ..spool import Spool
from ..spreadsheets import SHEET_KIND
from ..spoolfiles import State, Upload
from ..tree import Kind, Node, Tree
from .base import OWN_XATTRS, Area, Handle, Kernel, Writer
from .generated import generated_file

log = logging.getLogger(__name__)

UPLOADS_NAME = "uploads"
STATUS_NAME = "UPLOAD_STATUS.txt"
ENTRY_TTL = 1.0  # seconds the kernel may keep an entry of the upload area

UPLOADS = Kind("uploads")
UPLOAD_DIR = Kind("upload_dir")              # uploads/<PROJECT> and folders below it
UPLOAD_FILE = Kind("upload_file", is_dir=False)


class UploadArea(Area):
    """``uploads/`` over an :class:`~xnatfs.imports.UploadManager`."""

    kinds = (UPLOADS, UPLOAD_DIR, UPLOAD_FILE)

    def __init__(self, tree: Tree, kernel: Kernel, manager: UploadManager, *,
                 on_imported: Callable[[], None] = lambda: None,
                 on_sheet_applied: Callable[[str], None] = lambda project: None) -> None:
        super().__init__(tree, kernel)
        self.manager = manager
        self.on_imported = on_imported  # XNAT has a new upload: the prearchive changed
        # A spreadsheet was applied (in part, perhaps) to a project: its subjects changed.
        self.on_sheet_applied = on_sheet_applied
        # Folders made with mkdir, by (project, relpath); local until files arrive.
        self.folders: set[tuple[str, str]] = set()
        # Times set on folders (rsync -a, cp -a), by (project, relpath): kept, or
        # a second rsync would find every folder changed.
        self.folder_mtimes: dict[tuple[str, str], int] = {}
        self.status_file = StatusFile(manager)
        manager.on_finished = self.upload_finished

    # --------------------------------------------------------------- folders
    async def top_entries(self, root: Node) -> list[Node]:
        return [self.tree.child(root, UPLOADS, UPLOADS_NAME, ("uploads",),
                                mtime_ns=self.tree.mount_time_ns)]

    async def children(self, node: Node) -> list[Node]:
        if node.kind is UPLOADS:
            return await self._uploads(node)
        return await self._folder(node)

    async def _uploads(self, node: Node) -> list[Node]:
        projects = await self.tree.cached(("upload-projects",),
                                          self.tree.client.list_upload_projects)
        out = [self.tree.child(node, UPLOAD_DIR, safe_name(p), ("upload-dir", p, ""),
                               project=p, relpath="",
                               mtime_ns=self.folder_mtimes.get((p, ""), self.tree.mount_time_ns))
               for p in projects]
        out.append(self._status_node(node, None))
        return out

    def _status_node(self, parent: Node, project: str | None) -> Node:
        return generated_file(self.tree, parent, STATUS_NAME, ("status", project),
                              self.status_file, project=project or "",
                              mtime_ns=self.tree.mount_time_ns)

    async def _folder(self, node: Node) -> list[Node]:
        await self.manager.notice_outside_changes()
        prefix = f"{node.relpath}/" if node.relpath else ""
        folders = set()
        for project, relpath in self.folders:
            if project == node.project and relpath.startswith(prefix):
                folders.add(relpath[len(prefix):].split("/", 1)[0])
        files = []
        for upload in self.manager.uploads.values():
            rec = upload.record
            if rec.project != node.project or not rec.relpath.startswith(prefix):
                continue
            head, sep, _ = rec.relpath[len(prefix):].partition("/")
            if sep:
                folders.add(head)
            else:
                files.append(upload)
        out = [self._folder_node(node, name) for name in sorted(folders)]
        out += [self._file_node(node, upload)
                for upload in sorted(files, key=lambda u: u.record.relpath)]
        if not node.relpath:
            out.append(self._status_node(node, node.project))
        return out

    def _folder_node(self, parent: Node, name: str) -> Node:
        relpath = f"{parent.relpath}/{name}" if parent.relpath else name
        mtime_ns = self.folder_mtimes.get((parent.project, relpath), self.tree.mount_time_ns)
        return self.tree.child(parent, UPLOAD_DIR, name, ("upload-dir", parent.project, relpath),
                               project=parent.project, relpath=relpath, mtime_ns=mtime_ns)

    def _file_node(self, parent: Node, upload: Upload) -> Node:
        rec = upload.record
        return self.tree.child(parent, UPLOAD_FILE, rec.name, ("upload", rec.id),
                               project=parent.project, relpath=rec.relpath, upload=upload,
                               mtime_ns=_upload_mtime_ns(upload), xattrs=_upload_xattrs(upload))

    def refresh_node(self, node: Node) -> None:
        """An upload entry as its record says now."""
        if node.upload is not None:
            node.xattrs = _upload_xattrs(node.upload)
            node.relpath = node.upload.record.relpath
            node.name = node.upload.record.name
            node.mtime_ns = _upload_mtime_ns(node.upload)

    def upload_finished(self, upload: Upload) -> None:
        """A background (write-behind) upload ended: show its outcome at once."""
        node = self.tree.live(("upload", upload.record.id))
        if node is not None:
            self.refresh_node(node)
        if upload.record.result:
            self.on_imported()

    # ------------------------------------------------------------ attributes
    def writable(self, node: Node) -> bool:
        return node.kind is not UPLOADS

    def timeouts(self, node: Node) -> tuple[float, float]:
        if node.kind is UPLOADS:
            return super().timeouts(node)
        # Local, so cheap to ask again; `xnatfs uploads discard|retry` change
        # them from outside the mount.
        return ENTRY_TTL, ENTRY_TTL

    async def refresh(self, node: Node) -> None:
        if (node.upload is not None and node.upload.state is State.FAILED
                and not await self._current(node)):
            raise NotFound(node.name)

    async def refresh_xattrs(self, node: Node) -> None:
        """An upload's outcome, as it is now (scripts poll it)."""
        if node.upload is not None:
            await self._current(node)

    async def _current(self, node: Node) -> bool:
        """An upload entry as its record says now, a failed one after noticing what
        ``xnatfs uploads retry|discard`` did to it; False once it was discarded."""
        assert node.upload is not None
        if node.upload.state is State.FAILED:
            await self.manager.notice_outside_changes()
            if node.upload.record.id not in self.manager.uploads:
                return False
        self.refresh_node(node)
        return True

    async def setattr(self, node: Node, *, size: int | None, mtime_ns: int | None) -> None:
        """Times and modes are accepted (cp -a, rsync)."""
        if node.kind is UPLOADS:
            return await super().setattr(node, size=size, mtime_ns=mtime_ns)
        if size is not None and node.upload is not None:
            await self.manager.truncate(node.upload, size)
        if mtime_ns is not None and node.upload is not None:
            await self.manager.set_mtime(node.upload, mtime_ns)
            self.refresh_node(node)
        elif mtime_ns is not None and node.kind is UPLOAD_DIR:
            self.folder_mtimes[(node.project, node.relpath)] = node.mtime_ns = mtime_ns

    # ------------------------------------------------- extended attributes
    def user_xattrs(self, node: Node) -> dict[str, bytes]:
        return node.upload.user_xattrs if node.upload is not None else {}

    async def setxattr(self, node: Node, key: str, value: bytes) -> None:
        """An upload entry keeps ``user.*`` attributes set on it (``rsync -X``,
        ``cp --preserve=xattr``) for as long as it is listed."""
        if node.upload is None or not key.startswith("user.") or key.startswith(OWN_XATTRS):
            raise NotSupported(key)
        node.upload.user_xattrs[key] = value

    async def removexattr(self, node: Node, key: str) -> None:
        """``rsync -X`` removes from an entry what its source does not have, our
        upload status too: that is not stored, so removing it does nothing (a
        refusal would fail every run)."""
        if node.upload is None:
            raise NotSupported(key)
        if key.startswith(OWN_XATTRS):
            return
        if node.upload.user_xattrs.pop(key, None) is None:
            raise NoAttribute(key)

    # ------------------------------------------------------------ open files
    async def open(self, node: Node, *, writing: bool, truncate: bool, writer: Writer) -> Handle:
        if node.upload is None:
            return await super().open(node, writing=writing, truncate=truncate, writer=writer)
        if truncate:
            await self.manager.truncate(node.upload, 0)
        return UploadHandle(node, self, writer.pid if writing else None)

    async def finish(self, node: Node, *, closing: bool,
                     caller_stopped: Callable[[], bool] | None = None) -> None:
        """Send ``node``'s upload now (or wait for XNAT's answer to it)."""
        assert node.upload is not None
        try:
            await self.manager.finish(node.upload, closing=closing, caller_stopped=caller_stopped)
        finally:
            self.refresh_node(node)
            if node.upload.record.kind == SHEET_KIND:
                self.on_sheet_applied(node.project)
            elif node.upload.record.result:
                self.on_imported()

    async def local_space(self) -> os.statvfs_result:
        return await self.manager.local_space()

    # ----------------------------------------------- names in our folders
    def _target(self, parent: Node, name: str) -> str:
        """The relative path below ``uploads/<PROJECT>/`` of a new entry."""
        if parent.kind is UPLOADS:
            raise Forbidden(f"uploads go into a project's folder, not {UPLOADS_NAME}/ itself")
        if "/" in name or name in (".", ".."):
            raise InvalidArgument(f"{name!r} is no file name")
        return f"{parent.relpath}/{name}" if parent.relpath else name

    async def create(self, parent: Node, name: str, writer: Writer) -> tuple[Node, Handle]:
        upload = await self.manager.create(parent.project, self._target(parent, name))
        node = self._file_node(parent, upload)
        return node, UploadHandle(node, self, writer.pid)

    async def mkdir(self, parent: Node, name: str) -> Node:
        relpath = self._target(parent, name)
        check_folder_name(name)
        self.folders.add((parent.project, relpath))
        self.folder_mtimes[(parent.project, relpath)] = time.time_ns()
        return self._folder_node(parent, relpath.rsplit("/", 1)[-1])

    async def unlink(self, parent: Node, node: Node) -> None:
        if node.upload is None:
            return await super().unlink(parent, node)
        await self.manager.forget(node.upload)

    async def rmdir(self, parent: Node, node: Node) -> None:
        if node.kind is not UPLOAD_DIR or not node.relpath:
            return await super().rmdir(parent, node)
        if await self.tree.children(node.inode):
            raise NotEmpty(node.name)
        self.folders.discard((node.project, node.relpath))
        self.folder_mtimes.pop((node.project, node.relpath), None)

    def refuse_special(self, parent: Node) -> None:
        """Links and device files cannot be uploaded (EPERM: "Read-only file
        system" would send the user looking for a mount option)."""
        if parent.kind is UPLOAD_DIR:
            raise NotPermitted("links and device files cannot be uploaded")
        super().refuse_special(parent)

    async def rename(self, node: Node, new_parent: Node, new_name: str) -> None:
        # The kernel moves its entry from the old name to the new one itself.
        if node.kind is UPLOAD_FILE:
            await self._rename_file(node, new_parent, new_name)
        elif node.kind is UPLOAD_DIR and node.relpath:
            await self._rename_folder(node, new_parent, new_name)
        else:
            await super().rename(node, new_parent, new_name)

    async def _rename_file(self, node: Node, new_parent: Node, new_name: str) -> None:
        """Write-to-temporary-then-rename: the entry moves; a litter name becoming a
        real one uploads now."""
        upload = node.upload
        assert upload is not None
        if new_parent.kind is not UPLOAD_DIR or new_parent.project != node.project:
            _refuse_moving_uploaded([upload], new_parent)
            raise CrossDevice("mv copies it, from its local copy")
        old_parent, old_relpath = node.parent, upload.record.relpath
        new_relpath = self._target(new_parent, new_name)
        if upload.busy and labels_from_path(new_relpath) != labels_from_path(old_relpath):
            raise Busy("being written or sent with the labels of its folders: they are fixed")
        replaced = await self.tree.existing_child(new_parent.inode, new_name)
        await self.manager.rename(upload, new_relpath)
        self.refresh_node(node)
        node.parent = new_parent.inode
        if upload.dirty and upload.writers == 0:
            # Renamed after close (a temporary made real): finished as a close would
            # be. A refusal fails the rename, which then changes nothing: rsync
            # says so and goes on, and a second run sends the file again.
            try:
                await self.finish(node, closing=True)
            except XnatError:
                await self.manager.rename(upload, old_relpath)
                self.refresh_node(node)
                node.parent = old_parent
                raise
        if replaced is not None and replaced is not node and replaced.upload is not None:
            await self.manager.forget(replaced.upload)

    async def _rename_folder(self, node: Node, new_parent: Node, new_name: str) -> None:
        """A folder renamed or moved within its project's upload area: "New Folder"
        named ``subject=S05`` after the file manager made it."""
        if new_parent.kind is not UPLOAD_DIR or new_parent.project != node.project:
            _refuse_moving_uploaded(self.manager.below(node.project, node.relpath), new_parent)
            raise CrossDevice("mv copies them, from their local copies")
        new_relpath = self._target(new_parent, new_name)
        check_folder_name(new_name)
        replaced = await self.tree.existing_child(new_parent.inode, new_name)
        if replaced is not None and replaced is not node:
            if replaced.kind is not UPLOAD_DIR:
                raise NotADirectory(new_name)
            if await self.tree.children(replaced.inode):
                raise NotEmpty(new_name)
        # From here to the move, no await: no other request sees half of it.
        if any(u.busy for u in self.manager.below(node.project, node.relpath)):
            # Their labels come from the path; one being sent cannot change them.
            raise Busy("an upload below it is being written or sent")
        if replaced is not None and replaced is not node:
            self.folders.discard((replaced.project, replaced.relpath))
        moved = self.manager.move_folder(node.project, node.relpath, new_relpath)
        self._move_folder_nodes(node, new_parent, new_relpath)
        await self.manager.save(moved)

    def _move_folder_nodes(self, node: Node, new_parent: Node, new_relpath: str) -> None:
        """It and the folders below it keep their inodes, the kernel's entries,
        under their new paths."""
        old_relpath = node.relpath  # the loop below re-keys node itself too

        def moved(relpath: str) -> str | None:
            return relocated(relpath, old_relpath, new_relpath)

        for project, relpath in list(self.folders):
            if project == node.project and (target := moved(relpath)) is not None:
                self.folders.discard((project, relpath))
                self.folders.add((project, target))
        for project, relpath in list(self.folder_mtimes):
            if project == node.project and (target := moved(relpath)) is not None:
                self.folder_mtimes[(project, target)] = self.folder_mtimes.pop((project, relpath))
        for live in self.tree.live_nodes():
            if live.project != node.project:
                continue
            if live.kind is UPLOAD_FILE:
                self.refresh_node(live)
            elif live.kind is UPLOAD_DIR and (target := moved(live.relpath)) is not None:
                self.tree.rekey(live, ("upload-dir", live.project, target))
                live.relpath = target
        node.name = new_relpath.rsplit("/", 1)[-1]
        node.parent = new_parent.inode
        self.tree.forget_negative(new_parent.inode)


class UploadHandle(Handle):
    """An upload opened to read back, or to write (``writer``: the process that
    opened it so)."""

    direct_io = True

    def __init__(self, node: Node, area: UploadArea, writer: int | None) -> None:
        super().__init__(node)
        assert node.upload is not None
        self.area = area
        self.manager = area.manager
        self.writer = writer
        node.upload.open_handles += 1
        if writer is not None:
            node.upload.writers += 1

    @property
    def upload(self) -> Upload:
        assert self.node.upload is not None
        return self.node.upload

    async def read(self, offset: int, size: int) -> bytes:
        return await self.manager.read(self.upload, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        return await self.manager.write(self.upload, offset, data)

    async def flush(self) -> None:
        """close() of a handle that wrote returns only once XNAT accepted the
        upload (or failed). Other handles close at once: a file manager peeking
        at a file being copied (thumbnails, indexing) must not send it half
        written; nor does the close of a writer killed mid-copy."""
        writer = self.writer
        if writer is None:
            return
        signal = killed_by(writer)
        if signal is not None:  # Ctrl-C, kill: cut off, not finished
            try:
                await self.manager.abandon(self.upload, f"the program writing it was "
                                                        f"killed ({signal_name(signal)})")
            finally:
                self.area.refresh_node(self.node)
            return
        await self.area.finish(self.node, closing=True,
                               caller_stopped=lambda: interrupted(writer))

    async def fsync(self, datasync: bool) -> None:
        if self.writer is not None:
            await self.area.finish(self.node, closing=False)
        else:  # XNAT's answer to what the writers sent, without sending anything
            await self.manager.outcome(self.upload)

    async def release(self) -> None:
        self.upload.open_handles -= 1
        if self.writer is not None:
            self.writer = None
            self.upload.writers -= 1
        await self.manager.release(self.upload)


class StatusFile:
    """``UPLOAD_STATUS.txt``: what happened to each upload (of a project, in its
    folder), and to each file written into a resource (``spools``: every spool
    of the mount)."""

    def __init__(self, manager: UploadManager) -> None:
        self.spools: list[Spool] = [manager]

    def size(self, node: Node) -> int:
        return len(self._text(node))

    async def refresh(self, node: Node) -> None:
        pass

    async def content(self, node: Node) -> bytes:
        for spool in self.spools:
            await spool.notice_outside_changes()
        return self._text(node)

    def _text(self, node: Node) -> bytes:
        return "".join(spool.status_text(node.project or None)
                       for spool in self.spools).encode()


def _refuse_moving_uploaded(uploads: list[Upload], new_parent: Node) -> None:
    """Into another project's upload folder, ``mv`` would copy: impossible for an
    upload XNAT has (its local copy is gone), which would leave an empty file
    behind. EPERM at once instead (failed ones, kept, are copied)."""
    sent = [u for u in uploads if u.state is State.DONE]
    if sent and new_parent.kind is UPLOAD_DIR:
        log.warning("refused to move %s to uploads/%s: XNAT has it already (%s); move "
                    "the session in prearchive/ or the archive instead",
                    sent[0].record.relpath, new_parent.project, ", ".join(sent[0].record.result))
        raise NotPermitted("XNAT has it already")


def _upload_xattrs(upload: Upload) -> dict[str, str]:
    rec = upload.record
    return {f"user.xnatfs.upload.{k}": v for k, v in (
        ("state", rec.state), ("kind", rec.kind), ("message", rec.message),
        ("result", " ".join(rec.result))) if v}


def _upload_mtime_ns(upload: Upload) -> int:
    """The time set on the entry (``cp -a``, ``rsync``: a second rsync then skips
    what it already sent), else when it was made."""
    rec = upload.record
    return rec.mtime_ns if rec.mtime_ns is not None else int(rec.created * 1e9)

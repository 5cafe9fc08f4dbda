"""The prearchive as a folder: ``prearchive/<PROJECT>/<TIMESTAMP>/<SESSION>/``.

Sessions are listed from XNAT's prearchive listing, which changes under us,
so it lives ``prearchive_ttl`` seconds only; below a session, its scans'
DICOM files as in the archive, and a generated ``prearchive-info.json``.

What file operations mean here:

* ``mv SESSION PROJECT/SUBJECT/[LABEL]`` archives it, ``mv SESSION
  prearchive/OTHER`` moves it to another project's prearchive;
* XNAT removes whole sessions only: ``rm`` of anything inside one (what ``rm
  -r SESSION`` does first) only hides it, and the ``rmdir`` of the session,
  once it shows nothing, deletes it. A bare ``rmdir`` of a session that
  still shows files is ENOTEMPTY, so an ``rmdir`` sweep loses nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging

import trio

from .. import client as xc
from ..errors import NotEmpty, NotFound, NotPermitted, XnatError
from ..naming import label_from_name, require_label, safe_name, scan_folder_name
from ..tree import Kind, Node, Tree, time_ns, xnat_xattrs
from . import archive
from .archive import ArchiveArea, file_entries, files_folder, resources_folder
from .base import Area, Handle, Kernel, Writer
from .generated import generated_file
from .remote_files import RemoteFiles

log = logging.getLogger(__name__)

PREARCHIVE_NAME = "prearchive"
INFO_NAME = "prearchive-info.json"

PREARCHIVE = Kind("prearchive")
PROJECT = Kind("prearchive_project")
TIMESTAMP = Kind("prearchive_timestamp")
SESSION = Kind("prearchive_session")
SCANS = Kind("prearchive_scans")
SCAN = Kind("prearchive_scan")
RESOURCES = Kind("prearchive_resources")
RESOURCE = Kind("prearchive_resource")
FOLDER = Kind("prearchive_folder")
FILE = Kind("prearchive_file", is_dir=False)

# What the folders of a session become once mv archived it (see _follow_archived).
ARCHIVED_KIND = {SESSION: archive.SESSION, SCANS: archive.SCANS, SCAN: archive.SCAN,
                 RESOURCES: archive.RESOURCES, RESOURCE: archive.RESOURCE,
                 FOLDER: archive.FOLDER}


class PrearchiveArea(Area):
    """XNAT's prearchive, and archiving, moving and deleting its sessions."""

    kinds = (PREARCHIVE, PROJECT, TIMESTAMP, SESSION, SCANS, SCAN, RESOURCES, RESOURCE,
             FOLDER, FILE)

    def __init__(self, tree: Tree, kernel: Kernel, archive_area: ArchiveArea,
                 files: RemoteFiles | None = None, *, ttl: float | None = None) -> None:
        super().__init__(tree, kernel)
        self.client = tree.client
        self.archive = archive_area
        self.files = files
        self.ttl = max(ttl if ttl is not None else 5.0, 0.5)
        self._fetched_at: float | None = None
        # Entries of sessions that `rm` removed from view (XNAT removes whole
        # sessions only: the rmdir ending `rm -r SESSION` deletes it), with the
        # URI of their session.
        self.hidden: dict[int, str] = {}
        # Timestamp folders whose last session the mount deleted: XNAT has no
        # such folder any more, but `rm -r` still removes it, so it stays (empty)
        # until then, as a folder would.
        self.emptied_timestamps: set[tuple[str, str]] = set()
        # Sessions archived with mv, by URI: (project, subject label, session
        # label). The kernel points the new name at the old folder until its
        # entry is renewed (asynchronously): meanwhile that folder shows what
        # was archived.
        self.archived_as: dict[str, tuple[str, str, str]] = {}
        self.info_file = InfoFile(self)

    # ------------------------------------------------------------- listings
    async def sessions(self) -> list[xc.PrearchiveSession]:
        """The prearchive listing; it changes under us, so it lives ``ttl`` only."""
        fetched = self._fetched_at
        if fetched is None or trio.current_time() - fetched > self.ttl:
            self.invalidate()
            self._fetched_at = trio.current_time()
        return await self.tree.cached(("prearchive",), self.client.list_prearchive)

    def invalidate(self) -> None:
        """Forget the prearchive listing and every session's scans and files."""
        self.tree.invalidate_where(lambda key: isinstance(key, tuple) and bool(key) and key[0]
                                   in ("prearchive", "pre-scans", "pre-files"))
        self._fetched_at = None

    async def session_of(self, node: Node) -> xc.PrearchiveSession | None:
        return next((s for s in await self.sessions() if s.uri == node.prearchive_uri), None)

    async def _scans_of(self, uri: str) -> list[xc.Scan]:
        return await self.tree.cached(("pre-scans", uri),
                                      lambda: self.client.list_prearchive_scans(uri))

    async def _files_of(self, uri: str, scan_id: str) -> list[xc.RemoteFile]:
        return await self.tree.cached(("pre-files", uri, scan_id),
                                      lambda: self.client.list_prearchive_files(uri, scan_id))

    # --------------------------------------------------------------- folders
    async def top_entries(self, root: Node) -> list[Node]:
        return [self.tree.child(root, PREARCHIVE, PREARCHIVE_NAME, ("prearchive",),
                                mtime_ns=self.tree.mount_time_ns)]

    async def children(self, node: Node) -> list[Node]:
        if node.prearchive_uri in self.archived_as:
            await self._follow_archived(node)
            if node.kind not in self.kinds:
                return await self.archive.children(node)
        lister = {PREARCHIVE: self._prearchive, PROJECT: self._project,
                  TIMESTAMP: self._timestamp, SESSION: self._session, SCANS: self._scans,
                  SCAN: self._scan, RESOURCES: self._resources, RESOURCE: self._resource,
                  FOLDER: self._folder}[node.kind]
        return await lister(node)

    def shown(self, entries: list[Node]) -> list[Node]:
        if self.hidden:  # removed with rm, at any depth
            return [e for e in entries if e.inode not in self.hidden]
        return entries

    async def _prearchive(self, node: Node) -> list[Node]:
        # Projects one may upload to are listed even when empty, so that a session
        # can be moved there with mv.
        writable = await self.tree.cached(("upload-projects",), self.client.list_upload_projects)
        projects = sorted({s.project for s in await self.sessions()} | set(writable))
        return [self.tree.child(node, PROJECT, safe_name(p), ("pre-project", p), project=p,
                                mtime_ns=self.tree.mount_time_ns) for p in projects]

    async def _project(self, node: Node) -> list[Node]:
        stamps = sorted({s.timestamp for s in await self.sessions() if s.project == node.project}
                        | {ts for p, ts in self.emptied_timestamps if p == node.project})
        return [self.tree.child(node, TIMESTAMP, safe_name(ts), ("pre-ts", node.project, ts),
                                project=node.project, folder=ts,
                                mtime_ns=time_ns(_prearchive_time(ts), self.tree.mount_time_ns))
                for ts in stamps]

    async def _timestamp(self, node: Node) -> list[Node]:
        return [self.tree.child(node, SESSION, safe_name(s.folder_name), ("pre-session", s.uri),
                                project=s.project, prearchive_uri=s.uri,
                                mtime_ns=time_ns(s.lastmod, self.tree.mount_time_ns),
                                xattrs=_prearchive_xattrs(s))
                for s in await self.sessions()
                if s.project == node.project and s.timestamp == node.folder]

    async def _session(self, node: Node) -> list[Node]:
        common = dict(project=node.project, prearchive_uri=node.prearchive_uri,
                      mtime_ns=node.mtime_ns)
        return [self.tree.child(node, SCANS, "scans", ("pre-scans", node.prearchive_uri),
                                **common),
                generated_file(self.tree, node, INFO_NAME, ("pre-info", node.prearchive_uri),
                               self.info_file, xattrs=node.xattrs,
                               text=await self.info_text(node), **common)]

    async def _scans(self, node: Node) -> list[Node]:
        return [self.tree.child(node, SCAN, scan_folder_name(scan.id, scan.type or ""),
                                ("pre-scan", node.prearchive_uri, scan.id), project=node.project,
                                scan_id=scan.id, prearchive_uri=node.prearchive_uri,
                                mtime_ns=node.mtime_ns,
                                xattrs=xnat_xattrs(id=scan.id, xsi_type=scan.xsi_type,
                                                   series_description=scan.series_description))
                for scan in await self._scans_of(node.prearchive_uri)]

    async def _scan(self, node: Node) -> list[Node]:
        return [resources_folder(self.tree, node, RESOURCES)]

    async def _resources(self, node: Node) -> list[Node]:
        return [self.tree.child(node, RESOURCE, "DICOM",
                                ("pre-resource", node.prearchive_uri, node.scan_id),
                                project=node.project, scan_id=node.scan_id,
                                resource_label="DICOM", prearchive_uri=node.prearchive_uri,
                                mtime_ns=node.mtime_ns)]

    async def _resource(self, node: Node) -> list[Node]:
        return [files_folder(self.tree, node, FOLDER)]

    async def _folder(self, node: Node) -> list[Node]:
        assert node.scan_id is not None
        files = await self._files_of(node.prearchive_uri, node.scan_id)
        return file_entries(self.tree, node, files, folder_kind=FOLDER, file_kind=FILE)

    async def _follow_archived(self, node: Node) -> None:
        """A folder of a session that mv archived becomes the archived session's
        own: the kernel renews its entries asynchronously, and until it does,
        the new name (and whatever it held below) points at these folders."""
        project, subject_label, session_label = self.archived_as[node.prearchive_uri]
        subject = await self.archive.subject_labelled(project, subject_label)
        if subject is None:
            return
        experiments = await self.archive.subject_experiments(project, subject.id)
        session = next((e for e in experiments if e.label == session_label), None)
        if session is None:
            return
        node.project, node.subject_id, node.experiment_id = project, subject.id, session.id
        node.prearchive_uri = ""
        node.kind = ARCHIVED_KIND.get(node.kind, node.kind)

    # ------------------------------------------------------------ attributes
    def writable(self, node: Node) -> bool:
        """Folders where mv, rm and rmdir mean something."""
        return node.kind is not FILE and (bool(node.prearchive_uri)
                                          or node.kind in (PROJECT, TIMESTAMP))

    async def refresh_xattrs(self, node: Node) -> None:
        """A session's status, as it is now (scripts poll ``user.xnat.status``)."""
        if node.kind is SESSION:
            await self.refresh_node(node)

    async def refresh_node(self, node: Node) -> None:
        """Bring a session's (or its info file's) attributes, and the info file's
        text, up to date with the prearchive listing, which lives ``ttl`` only; a
        session gone from it keeps what it last had."""
        try:
            session = await self.session_of(node)
        except XnatError as exc:  # the server is down: what it said last
            log.debug("prearchive attributes of %s not refreshed: %s", node.prearchive_uri, exc)
            return
        if session is not None:
            node.xattrs = _prearchive_xattrs(session)
            node.mtime_ns = time_ns(session.lastmod, node.mtime_ns)
            if node.generator is not None:
                node.text = _info_json(session)

    async def info_text(self, node: Node) -> bytes:
        """A session's ``prearchive-info.json``, from the prearchive listing (so
        its size is known when the folder is listed)."""
        session = await self.session_of(node)
        if session is None:
            raise NotFound(node.prearchive_uri)
        return _info_json(session)

    async def open(self, node: Node, *, writing: bool, truncate: bool, writer: Writer) -> Handle:
        if writing or node.file is None or self.files is None:
            return await super().open(node, writing=writing, truncate=truncate, writer=writer)
        return self.files.open(node, cacheable=False)

    # ------------------------------------------------- removing and moving
    async def unlink(self, parent: Node, node: Node) -> None:
        if node.prearchive_uri and node.kind is not SESSION:
            self._hide(node)  # part of `rm -r SESSION`; the rmdir of the session deletes
            return
        await super().unlink(parent, node)

    async def rmdir(self, parent: Node, node: Node) -> None:
        if node.prearchive_uri and await self.tree.children(node.inode):
            # What rm -r leaves is empty: it removed (hid) everything inside
            # first. A bare rmdir (or gio remove) of a full session must not
            # delete it from XNAT.
            raise NotEmpty(node.name)
        if node.kind is SESSION:
            await self.client.delete_prearchive(node.prearchive_uri)
            self.show_hidden(node.prearchive_uri)  # nothing left to hide
            self.emptied_timestamps.add((parent.project, parent.folder))
            self.invalidate()
            self.kernel.forget_entry(parent.inode, node.name, node.inode)
        elif node.kind is TIMESTAMP:
            if await self.tree.children(node.inode):
                raise NotEmpty(node.name)
            self.emptied_timestamps.discard((node.project, node.folder))
            self.kernel.forget_entry(parent.inode, node.name, node.inode)
        elif node.prearchive_uri:
            self._hide(node)
        else:
            await super().rmdir(parent, node)

    def _hide(self, node: Node) -> None:
        self.hidden[node.inode] = node.prearchive_uri

    def show_hidden(self, session_uri: str) -> int:
        """Show again what `rm` hid in a session; how many entries."""
        inodes = [inode for inode, uri in self.hidden.items() if uri == session_uri]
        for inode in inodes:
            del self.hidden[inode]
        if inodes:
            self.tree.forget_negative()  # their names were looked up in vain meanwhile
        return len(inodes)

    async def rename(self, node: Node, new_parent: Node, new_name: str) -> None:
        """``mv`` out of the prearchive: into a subject archives, into another project
        moves. Refused (EPERM) when ``rm`` removed part of the session: XNAT would
        archive or move all of it, the removed part too."""
        if node.kind is not SESSION:
            return await super().rename(node, new_parent, new_name)
        if self.show_hidden(node.prearchive_uri):
            raise _refusal(
                f"refused to archive or move {node.prearchive_uri}: files or folders of it "
                "were removed with rm, but XNAT removes only whole prearchive sessions, so "
                "they are still there (shown again now); archive it with them, or remove the "
                "whole session", path=node.prearchive_uri)
        subject = self.archive.subject_to_archive_into(new_parent)
        if subject is not None:
            await self._archive(node, new_parent, subject, new_name)
        elif new_parent.kind is PROJECT:
            await self.client.move_prearchive(node.prearchive_uri, new_parent.project)
        else:
            # Not EXDEV: mv would copy the session file by file instead, making
            # folders where it cannot put the files.
            raise _refusal(
                f"refused to move {node.prearchive_uri} to {new_parent.name}: a prearchive "
                "session is archived into a subject folder (mkdir PROJECT/SUBJECT first) or "
                "moved into prearchive/PROJECT", path=node.prearchive_uri)
        self.invalidate()
        # The kernel would point the new name at the prearchive node; the
        # archived session is a different node, found by a fresh lookup.
        self.kernel.forget_entry(new_parent.inode, new_name)

    async def _archive(self, node: Node, subject_folder: Node, subject: str,
                       new_name: str) -> None:
        session = label_from_name(new_name)
        if new_name != node.name:  # a label of the user's choosing
            require_label(session, "session")
        await self.client.archive_prearchive(node.prearchive_uri, project=subject_folder.project,
                                             subject=subject, session=session)
        self.archived_as[node.prearchive_uri] = (subject_folder.project, subject, session)
        self.archive.subject_archived_into(subject_folder, subject)


class InfoFile:
    """``prearchive-info.json``: the session's row of the prearchive listing."""

    def __init__(self, area: PrearchiveArea) -> None:
        self.area = area

    def size(self, node: Node) -> int:
        return len(node.text)

    async def refresh(self, node: Node) -> None:
        await self.area.refresh_node(node)

    async def content(self, node: Node) -> bytes:
        node.text = await self.area.info_text(node)
        return node.text


def _refusal(message: str, path: str) -> NotPermitted:
    """A refused mv, said in the log too: mv itself says only "Operation not permitted"."""
    log.warning("%s", message)
    return NotPermitted(message, path=path)


def _prearchive_time(timestamp: str) -> str:
    """``20211229_101128996`` as ``2021-12-29 10:11:28.996``."""
    try:
        parsed = dt.datetime.strptime(timestamp, "%Y%m%d_%H%M%S%f")
    except ValueError:
        return ""
    return parsed.strftime("%Y-%m-%d %H:%M:%S.%f")


def _info_json(s: xc.PrearchiveSession) -> bytes:
    return (json.dumps(dataclasses.asdict(s), indent=2) + "\n").encode()


def _prearchive_xattrs(s: xc.PrearchiveSession) -> dict[str, str]:
    return xnat_xattrs(uri=s.uri, status=s.status, label=s.name, subject=s.subject,
                       uploaded=s.uploaded, lastmod=s.lastmod, scan_date=s.scan_date, tag=s.tag,
                       autoarchive=s.autoarchive, project=s.project, timestamp=s.timestamp)

"""The XNAT hierarchy as nodes with inodes, built lazily from cached listings.

Layout (the one XNAT's zip downloads use)::

    /<PROJECT>/<SUBJECT>/<SESSION>/scans/<ID>-<type>/resources/<LABEL>/files/<path>
    /<PROJECT>/<SUBJECT>/<SESSION>/resources/<LABEL>/files/<path>
    /uploads, /prearchive                                    (reserved)

Metadata comes only from listings, never from per-file requests: a session's
scans and resources come from one item request, and every file of its scans
and of its own resources from one ``files?all=true`` request, so a whole
session costs two; a walk over a project lists its experiments once. Listings
are cached for ``metadata_ttl`` seconds; a listing wanted by many callers at
once is fetched once; names that do not exist are remembered for
``negative_ttl`` seconds.

A node lives while the kernel holds it (its FUSE lookup count is above zero)
or a listing still being served refers to it; after the kernel forgets it, it
is dropped and made again from the listings when next wanted, so a walk over
a whole archive leaves nothing behind. Its inode number is a hash of its key
(what it is in XNAT), so an entry keeps its number when it is made again, and
across remounts, with nothing kept per entry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import trio
from cachetools import TTLCache

from . import client as xc
from .errors import NotFound, XnatError
from .naming import NAME_MAX, label_from_name, require_label, safe_name, scan_folder_name
from .imports import Upload, UploadManager, relocated

log = logging.getLogger(__name__)

ROOT_INODE = 1
UPLOADS_NAME = "uploads"
PREARCHIVE_NAME = "prearchive"


class Kind(enum.Enum):
    ROOT = "root"
    PROJECT = "project"
    SUBJECT = "subject"
    SESSION = "session"
    SCANS = "scans"
    SCAN = "scan"
    ASSESSORS = "assessors"            # a session's assessors/, when it has any
    ASSESSOR = "assessor"
    RESOURCES = "resources"
    RESOURCE = "resource"
    FOLDER = "folder"          # files/ and any directory below it
    FILE = "file"
    UPLOADS = "uploads"
    UPLOAD_DIR = "upload_dir"          # uploads/<PROJECT> and folders below it
    UPLOAD_FILE = "upload_file"
    STATUS_FILE = "status_file"        # UPLOAD_STATUS.txt, generated
    PREARCHIVE = "prearchive"
    PREARCHIVE_PROJECT = "prearchive_project"
    PREARCHIVE_TIMESTAMP = "prearchive_timestamp"
    PREARCHIVE_SESSION = "prearchive_session"
    INFO_FILE = "info_file"            # prearchive-info.json, generated
    PENDING_SUBJECT = "pending_subject"  # made by mkdir, to archive into; local only
    SCAN_LINK = "scan_link"            # scans/<SCAN_ID>, unlisted: a symlink to the scan's folder


@dataclass
class Node:
    """One file or directory. ``key`` says what it is in XNAT and keeps its inode stable."""

    inode: int
    kind: Kind
    name: str
    parent: int
    key: Hashable
    mtime_ns: int = 0
    project: str = ""
    subject_id: str = ""
    experiment_id: str = ""
    scan_id: str | None = None
    assessor_id: str | None = None         # below assessors/<label>/
    resource_label: str = ""
    folder: str = ""                       # path of a FOLDER inside its resource ("" = files/)
    file: xc.RemoteFile | None = None      # for FILE nodes
    xattrs: dict[str, str] = field(default_factory=dict)
    prearchive_uri: str = ""               # set on everything below a prearchive session
    upload: Upload | None = None           # for UPLOAD_FILE nodes
    relpath: str = ""                      # below uploads/<PROJECT>/ for upload nodes
    text: bytes = b""                      # an INFO_FILE's content when last listed,
                                           # a SCAN_LINK's target

    @property
    def is_dir(self) -> bool:
        return self.kind not in FILE_KINDS

    @property
    def size(self) -> int:
        if self.file is not None:
            return self.file.size
        if self.upload is not None:
            return self.upload.record.size
        if self.kind is Kind.INFO_FILE:
            return len(self.text)
        return 0

    @property
    def writable(self) -> bool:
        """Whether the user may create or change things here (the upload area)."""
        return self.kind in (Kind.UPLOAD_DIR, Kind.UPLOAD_FILE)


FILE_KINDS = frozenset({Kind.FILE, Kind.UPLOAD_FILE, Kind.STATUS_FILE, Kind.INFO_FILE,
                        Kind.SCAN_LINK})
STATUS_NAME = "UPLOAD_STATUS.txt"
INFO_NAME = "prearchive-info.json"


FileGroups = dict[tuple[Hashable, str], list[xc.RemoteFile]]
"""Files by (owner, resource label); the owner is a scan ID, None for the session
itself, or ``("assessor", ID)`` (see :func:`_owner`)."""


class Tree:
    """Inodes, names and the metadata cache over an :class:`~xnatfs.client.XnatClient`."""

    def __init__(self, client: xc.XnatClient, *, metadata_ttl: float = 60.0,
                 negative_ttl: float = 5.0, max_listings: int = 20_000,
                 uploads: UploadManager | None = None,
                 prearchive_ttl: float | None = None) -> None:
        self.client = client
        self.uploads = uploads
        # Upload folders made with mkdir, by (project, relpath); local until files arrive.
        self.upload_folders: set[tuple[str, str]] = set()
        # Times set on upload folders (rsync -a, cp -a), by (project, relpath): kept,
        # or a second rsync would find every folder changed.
        self.upload_folder_mtimes: dict[tuple[str, str], int] = {}
        self.pending_subjects: set[tuple[str, str]] = set()
        # Entries of prearchive sessions that `rm` removed from view (XNAT removes
        # whole sessions only: the rmdir ending `rm -r SESSION` deletes it), with
        # the URI of their session.
        self.hidden: dict[int, str] = {}
        # Prearchive timestamp folders whose last session the mount deleted: XNAT
        # has no such folder any more, but `rm -r` still removes it, so it stays
        # (empty) until then, as a folder would.
        self.emptied_timestamps: set[tuple[str, str]] = set()
        # Prearchive sessions archived with mv, by URI: (project, subject label,
        # session label). The kernel points the new name at the old folder until
        # its entry is renewed (asynchronously): meanwhile that folder shows what
        # was archived.
        self.archived_as: dict[str, tuple[str, str, str]] = {}
        self.prearchive_ttl = max(prearchive_ttl if prearchive_ttl is not None else 5.0, 0.5)
        self.metadata_ttl = max(metadata_ttl, 1.0)
        # Every live node; the kernel's (and the root) are also held in _held.
        self._nodes: weakref.WeakValueDictionary[int, Node] = weakref.WeakValueDictionary()
        self._held: dict[int, Node] = {}
        self._lookups: dict[int, int] = {}  # the kernel's lookup count of each held node
        # Keys whose hashed number was taken by a live node of another key (next to never).
        self._displaced: dict[Hashable, int] = {}
        self._listings: TTLCache[Hashable, Any] = TTLCache(
            maxsize=max_listings, ttl=self.metadata_ttl, timer=trio.current_time)
        self._negative: TTLCache[tuple[int, str], bool] = TTLCache(
            maxsize=100_000, ttl=max(negative_ttl, 0.5), timer=trio.current_time)
        self._inflight: dict[Hashable, trio.Event] = {}
        self._inflight_errors: dict[Hashable, Exception] = {}
        self._entries: dict[int, list[Node]] = {}  # last listing of each directory
        # What a big directory's entries were made from, to reuse them while it stays the same.
        self._made_from: dict[int, tuple[object, ...]] = {}
        # The subject whose experiments were last listed on their own, by project.
        self._last_subject_listed: TTLCache[str, str] = TTLCache(
            maxsize=1000, ttl=self.metadata_ttl, timer=trio.current_time)
        self._prearchive_fetched_at: float | None = None
        self.mount_time_ns = int(dt.datetime.now().timestamp() * 1e9)
        root = Node(ROOT_INODE, Kind.ROOT, "", ROOT_INODE, ("root",),
                    mtime_ns=self.mount_time_ns)
        self._nodes[ROOT_INODE] = self._held[ROOT_INODE] = root

    # ------------------------------------------------------------------ nodes
    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"inode {inode} is unknown") from None

    def _slot(self, key: Hashable) -> tuple[int, Node | None]:
        """``key``'s inode number (its hash, unless a live node of another key has
        it) and its live node, if any."""
        inode = self._displaced.get(key) or _hashed_inode(key)
        start = inode
        while (node := self._nodes.get(inode)) is not None and node.key != key:
            inode = inode + 1 if inode < _LAST_INODE else _FIRST_INODE
        if inode != start or key in self._displaced:
            self._displaced[key] = inode
        return inode, node

    def _child(self, parent: Node, kind: Kind, name: str, key: Hashable, **fields: Any) -> Node:
        """The node for ``key``: refreshed if it is alive, made (again) if not."""
        inode, node = self._slot(key)
        if node is not None:
            node.name = name
            for attr, value in fields.items():
                setattr(node, attr, value)
            return node
        node = Node(inode, kind, name, parent.inode, key, **fields)
        self._nodes[inode] = node
        return node

    def remember(self, node: Node) -> None:
        """The kernel was handed ``node`` (a lookup, a readdirplus entry, a create):
        keep it until the kernel forgets it as often.

        Counted before the reply is sent: a reply the kernel never gets (the
        caller was interrupted) leaves the node held for the life of the mount,
        since pyfuse3 does not say so; that costs memory, never an answer.
        """
        self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1
        self._held[node.inode] = node

    def forget(self, inode: int, count: int) -> bool:
        """The kernel dropped ``count`` references; True if it holds none now,
        so the node may go (the root stays)."""
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return False
        self._lookups.pop(inode, None)
        if inode != ROOT_INODE:
            self._held.pop(inode, None)
            self._entries.pop(inode, None)
            self._made_from.pop(inode, None)
        return True

    def _entries_made_from(self, node: Node, sources: tuple[object, ...]) -> list[Node] | None:
        """``node``'s entries as last made, if they were made from these same listings.

        A lookup lists the directory again; in a folder of thousands of files
        (or a project of thousands of subjects) making every node again would
        cost milliseconds per lookup. A listing still cached is the very same
        object; a refreshed one is a new object, compared by value.
        """
        made_from = self._made_from.get(node.inode)
        if made_from is None or len(made_from) != len(sources) or not all(
                old is new or old == new for old, new in zip(made_from, sources, strict=True)):
            self._made_from[node.inode] = sources
            return None
        return self._entries.get(node.inode)

    # --------------------------------------------------------------- listings
    async def cached(self, key: Hashable, fetch: Callable[[], Awaitable[Any]]) -> Any:
        """A listing from the cache, or fetched once however many callers want it.

        The callers waiting for a fetch share its failure, but not its
        cancellation (the fetching call ran out of time, or its FUSE request was
        interrupted): then the next waiter fetches in its turn.
        """
        while True:
            try:
                return self._listings[key]
            except KeyError:
                pass
            event = self._inflight.get(key)
            if event is None:
                break
            await event.wait()
            error = self._inflight_errors.get(key)
            if error is not None:
                raise error
        event = self._inflight[key] = trio.Event()
        self._inflight_errors.pop(key, None)
        try:
            value = await fetch()
        except Exception as exc:
            self._inflight_errors[key] = exc
            raise
        else:
            self._listings[key] = value
            self._inflight_errors.pop(key, None)
            return value
        finally:
            del self._inflight[key]
            event.set()

    def invalidate(self, key: Hashable) -> None:
        self._listings.pop(key, None)

    async def session_files(self, experiment_id: str) -> FileGroups:
        """The files of every resource of a session, its scans' and its own, from
        one listing (``files?all=true``), so that a whole session costs two
        requests with its item. Skipped when the item names no resource."""
        return await self.cached(("session-files", experiment_id),
                                 lambda: self._load_session_files(experiment_id))

    async def _load_session_files(self, experiment_id: str) -> FileGroups:
        detail = await self.session_detail(experiment_id)
        groups: FileGroups = {}
        scan_files_expected = False
        for scan in detail.scans:
            for resource in scan.resources:
                groups[(scan.id, resource.label)] = []
                scan_files_expected |= resource.file_count != 0
        for resource in detail.resources:
            groups[(None, resource.label)] = []
        for assessor in detail.assessors:
            for resource in assessor.resources:
                groups[(_owner(None, assessor.id), resource.label)] = []
        if not groups:
            return groups
        files = await self.client.list_experiment_files(experiment_id)
        if scan_files_expected and not any(f.scan_id is not None for f in files):
            # A server that ignores ``all=true`` lists only the session's own
            # files; the scans then take their own listing.
            files += await self.client.list_scan_files(experiment_id)
        for f in files:
            groups.setdefault((_owner(f.scan_id, f.assessor_id), f.resource_label), []).append(f)
        return groups

    async def session_detail(self, experiment_id: str) -> xc.ExperimentDetail:
        return await self.cached(("session", experiment_id),
                                 lambda: self.client.get_experiment(experiment_id))

    # ---------------------------------------------------------------- children
    async def children(self, inode: int) -> list[Node]:
        """A directory's entries, in a stable order."""
        node = self.node(inode)
        if node.prearchive_uri in self.archived_as:
            await self._follow_archived(node)
        loader = getattr(self, f"_children_of_{node.kind.value}")
        entries: list[Node] = _unique_names(await loader(node))
        self._entries[inode] = entries  # all of them: a listing reused must show the hidden again
        if self.hidden:  # removed with rm from a prearchive session, at any depth
            return [e for e in entries if e.inode not in self.hidden]
        return entries

    async def lookup(self, parent_inode: int, name: str) -> Node:
        parent = self.node(parent_inode)
        if (parent_inode, name) in self._negative:
            raise NotFound(name)
        for child in await self.children(parent_inode):
            if child.name == name:
                return child
        hidden = await self._hidden_child(parent, name)
        if hidden is not None:
            return hidden
        self._negative[(parent_inode, name)] = True
        raise NotFound(name)

    async def _hidden_child(self, parent: Node, name: str) -> Node | None:
        """Names that resolve without being listed: a bare ``<SCAN_ID>``."""
        if parent.kind is Kind.SCANS:
            scan_id = label_from_name(name)
            for child in await self.children(parent.inode):
                if child.scan_id == scan_id:
                    # A symlink: a directory of its own would make every folder
                    # below it a second name of the listed one's (the kernel then
                    # moves a shell's working directory to the bare name), and
                    # the listed folder itself cannot have two names.
                    return self._child(
                        parent, Kind.SCAN_LINK, name, ("scan-link", child.key),
                        scan_id=child.scan_id, mtime_ns=child.mtime_ns,
                        text=os.fsencode(child.name))
        return None

    async def _children_of_root(self, node: Node) -> list[Node]:
        projects = await self.cached(("projects",), self.client.list_projects)
        out = [self._child(node, Kind.PROJECT, safe_name(p.id), ("project", p.id),
                           project=p.id, mtime_ns=self.mount_time_ns,
                           xattrs=_xattrs(id=p.id, label=p.id, name=p.name,
                                          uri=f"/data/projects/{p.id}",
                                          xsi_type="xnat:projectData"))
               for p in projects if p.id not in (UPLOADS_NAME, PREARCHIVE_NAME)]
        out.append(self._child(node, Kind.UPLOADS, UPLOADS_NAME, ("uploads",),
                               mtime_ns=self.mount_time_ns))
        out.append(self._child(node, Kind.PREARCHIVE, PREARCHIVE_NAME, ("prearchive",),
                               mtime_ns=self.mount_time_ns))
        return out

    async def _children_of_project(self, node: Node) -> list[Node]:
        subjects = await self._subjects(node.project)
        pending_labels = tuple(sorted(label for project, label in self.pending_subjects
                                      if project == node.project))
        if (same := self._entries_made_from(node, (subjects, pending_labels))) is not None:
            return same
        labels = {s.label for s in subjects}
        pending = [self._child(node, Kind.PENDING_SUBJECT, safe_name(label),
                               ("pending-subject", node.project, label), project=node.project,
                               mtime_ns=self.mount_time_ns)
                   for label in pending_labels if label not in labels]
        return pending + [self._child(node, Kind.SUBJECT, safe_name(s.label),
                            ("subject", node.project, s.id), project=node.project, subject_id=s.id,
                            mtime_ns=_time_ns(s.insert_date, self.mount_time_ns),
                            xattrs=_xattrs(id=s.id, label=s.label, project=node.project,
                                           uri=f"/data/projects/{node.project}/subjects/{s.id}",
                                           xsi_type="xnat:subjectData"))
                for s in subjects]

    async def _subjects(self, project: str) -> list[xc.Subject]:
        return await self.cached(("subjects", project),
                                 lambda: self.client.list_subjects(project))

    async def _subject_labelled(self, project: str, label: str) -> xc.Subject | None:
        return next((s for s in await self._subjects(project) if s.label == label), None)

    async def subject_experiments(self, project: str, subject_id: str) -> list[xc.Experiment]:
        """A subject's experiments. The first subject opened in a project costs its
        own listing; once a second one is opened (someone is walking the project,
        as ``find`` or ``ls -R`` do), one listing of the whole project serves every
        subject, so that a walk costs one request per project, not per subject."""
        whole_project = ("experiments", project)
        walking = self._last_subject_listed.get(project, subject_id) != subject_id
        if walking or whole_project in self._listings or whole_project in self._inflight:
            experiments = await self.cached(
                whole_project, lambda: self.client.list_experiments(project))
            # Rows without their subject (a server that drops the column) cannot
            # be shared out; the subject's own listing is then the only answer.
            if all(e.subject_id is not None for e in experiments):
                return [e for e in experiments if e.subject_id == subject_id]
        self._last_subject_listed[project] = subject_id
        return await self.cached(("experiments", project, subject_id),
                                 lambda: self.client.list_experiments(project, subject_id))

    async def _children_of_subject(self, node: Node) -> list[Node]:
        experiments = await self.subject_experiments(node.project, node.subject_id)
        return [self._child(node, Kind.SESSION, safe_name(e.label),
                            ("session", node.project, e.id), project=node.project,
                            subject_id=node.subject_id,
                            experiment_id=e.id,
                            mtime_ns=_time_ns(e.insert_date, self.mount_time_ns),
                            xattrs=_xattrs(id=e.id, label=e.label, project=node.project,
                                           uri=f"/data/experiments/{e.id}", xsi_type=e.xsi_type,
                                           date=e.date))
                for e in experiments]

    async def _children_of_session(self, node: Node) -> list[Node]:
        common = dict(project=node.project, subject_id=node.subject_id,
                      experiment_id=node.experiment_id, mtime_ns=node.mtime_ns)
        out = [self._child(node, Kind.SCANS, "scans",
                           ("scans", node.project, node.experiment_id), **common),
               self._child(node, Kind.RESOURCES, "resources",
                           ("resources", node.project, node.experiment_id, None), **common)]
        try:
            assessed = bool((await self.session_detail(node.experiment_id)).assessors)
        except XnatError as exc:  # scans/ and resources/ say so when entered
            log.debug("assessors of %s unknown: %s", node.experiment_id, exc)
            assessed = False
        if assessed:
            out.append(self._child(node, Kind.ASSESSORS, "assessors",
                                   ("assessors", node.project, node.experiment_id), **common))
        return out

    async def _children_of_assessors(self, node: Node) -> list[Node]:
        detail = await self.session_detail(node.experiment_id)
        return [self._child(node, Kind.ASSESSOR, safe_name(a.label),
                            ("assessor", node.project, node.experiment_id, a.id),
                            project=node.project, subject_id=node.subject_id,
                            experiment_id=node.experiment_id, assessor_id=a.id,
                            mtime_ns=node.mtime_ns,
                            xattrs=_xattrs(id=a.id, label=a.label, xsi_type=a.xsi_type,
                                           uri=f"/data/experiments/{node.experiment_id}"
                                               f"/assessors/{a.id}"))
                for a in detail.assessors]

    async def _children_of_assessor(self, node: Node) -> list[Node]:
        return [self._child(node, Kind.RESOURCES, "resources",
                            ("resources", node.project, node.experiment_id,
                             _owner(None, node.assessor_id)),
                            project=node.project, subject_id=node.subject_id,
                            experiment_id=node.experiment_id, assessor_id=node.assessor_id,
                            mtime_ns=node.mtime_ns)]

    async def _children_of_scans(self, node: Node) -> list[Node]:
        if node.prearchive_uri:
            scans = await self.prearchive_scans(node.prearchive_uri)
            return [self._child(node, Kind.SCAN, scan_folder_name(scan.id, scan.type or ""),
                                ("pre-scan", node.prearchive_uri, scan.id), project=node.project,
                                scan_id=scan.id, prearchive_uri=node.prearchive_uri,
                                mtime_ns=node.mtime_ns,
                                xattrs=_xattrs(id=scan.id, xsi_type=scan.xsi_type,
                                               series_description=scan.series_description))
                    for scan in scans]
        detail = await self.session_detail(node.experiment_id)
        out = []
        for scan in detail.scans:
            out.append(self._child(
                node, Kind.SCAN, scan_folder_name(scan.id, scan.type or ""),
                ("scan", node.project, node.experiment_id, scan.id), project=node.project,
                subject_id=node.subject_id, experiment_id=node.experiment_id, scan_id=scan.id,
                mtime_ns=node.mtime_ns,
                xattrs=_xattrs(id=scan.id, label=scan.id, type=scan.type,
                               series_description=scan.series_description,
                               quality=scan.quality, xsi_type=scan.xsi_type,
                               uri=f"/data/experiments/{node.experiment_id}/scans/{scan.id}")))
        return out

    async def _children_of_scan(self, node: Node) -> list[Node]:
        return [self._child(node, Kind.RESOURCES, "resources",
                            ("resources", node.project, node.experiment_id, node.scan_id,
                             node.prearchive_uri), prearchive_uri=node.prearchive_uri,
                            project=node.project, subject_id=node.subject_id,
                            experiment_id=node.experiment_id, scan_id=node.scan_id,
                            mtime_ns=node.mtime_ns)]

    async def _children_of_resources(self, node: Node) -> list[Node]:
        if node.prearchive_uri:
            return [self._child(node, Kind.RESOURCE, "DICOM",
                                ("pre-resource", node.prearchive_uri, node.scan_id),
                                project=node.project, scan_id=node.scan_id,
                                resource_label="DICOM", prearchive_uri=node.prearchive_uri,
                                mtime_ns=node.mtime_ns)]
        detail = await self.session_detail(node.experiment_id)
        if node.assessor_id is not None:
            assessor = next((a for a in detail.assessors if a.id == node.assessor_id), None)
            resources = assessor.resources if assessor is not None else ()
            base = f"/data/experiments/{node.experiment_id}/assessors/{node.assessor_id}/out"
        elif node.scan_id is None:
            resources = detail.resources
            base = f"/data/experiments/{node.experiment_id}"
        else:
            scan = next((s for s in detail.scans if s.id == node.scan_id), None)
            resources = scan.resources if scan is not None else ()
            base = f"/data/experiments/{node.experiment_id}/scans/{node.scan_id}"
        owner = _owner(node.scan_id, node.assessor_id)
        return [self._child(node, Kind.RESOURCE, safe_name(r.label),
                            ("resource", node.project, node.experiment_id, owner, r.label),
                            project=node.project, subject_id=node.subject_id,
                            experiment_id=node.experiment_id, scan_id=node.scan_id,
                            assessor_id=node.assessor_id,
                            resource_label=r.label, mtime_ns=node.mtime_ns,
                            xattrs=_xattrs(id=r.id, label=r.label, format=r.format,
                                           uri=f"{base}/resources/{r.id}",
                                           xsi_type="xnat:resourceCatalog"))
                for r in resources]

    async def _children_of_resource(self, node: Node) -> list[Node]:
        return [self._child(node, Kind.FOLDER, "files",
                            ("folder", node.project, node.experiment_id or node.prearchive_uri,
                             _owner(node.scan_id, node.assessor_id), node.resource_label, ""),
                            prearchive_uri=node.prearchive_uri,
                            project=node.project, subject_id=node.subject_id,
                            experiment_id=node.experiment_id, scan_id=node.scan_id,
                            assessor_id=node.assessor_id,
                            resource_label=node.resource_label, folder="",
                            mtime_ns=node.mtime_ns)]

    async def _children_of_folder(self, node: Node) -> list[Node]:
        if node.prearchive_uri:
            assert node.scan_id is not None
            files = await self.prearchive_files(node.prearchive_uri, node.scan_id)
        else:
            groups = await self.session_files(node.experiment_id)
            files = groups.get((_owner(node.scan_id, node.assessor_id), node.resource_label), [])
        if (same := self._entries_made_from(node, (files, node.mtime_ns))) is not None:
            return same
        prefix = f"{node.folder}/" if node.folder else ""
        session = node.experiment_id or node.prearchive_uri
        owner = _owner(node.scan_id, node.assessor_id)
        common = dict(project=node.project, subject_id=node.subject_id,
                      experiment_id=node.experiment_id, scan_id=node.scan_id,
                      assessor_id=node.assessor_id,
                      resource_label=node.resource_label, mtime_ns=node.mtime_ns,
                      prearchive_uri=node.prearchive_uri)
        out: list[Node] = []
        seen_dirs: set[str] = set()
        for f in sorted(files, key=lambda f: f.path):
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix):]
            head, sep, _tail = rest.partition("/")
            if sep:
                if head not in seen_dirs:
                    seen_dirs.add(head)
                    out.append(self._child(
                        node, Kind.FOLDER, safe_name(head),
                        ("folder", node.project, session, owner, node.resource_label,
                         prefix + head), folder=prefix + head, **common))
                continue
            out.append(self._child(
                node, Kind.FILE, safe_name(rest),
                ("file", node.project, session, owner, node.resource_label, f.path),
                file=f, xattrs=_xattrs(label=f.path.rsplit("/", 1)[-1], uri=f.uri,
                                       digest=f.digest or "", size=str(f.size),
                                       resource=f.resource_label, resource_id=f.resource_id,
                                       xsi_type="xnat:fileData"),
                **common))
        return out

    # ---------------------------------------------------------------- uploads
    async def _children_of_uploads(self, node: Node) -> list[Node]:
        projects = await self.cached(("upload-projects",), self.client.list_upload_projects)
        out = [self._child(node, Kind.UPLOAD_DIR, safe_name(p), ("upload-dir", p, ""),
                           project=p, relpath="",
                           mtime_ns=self.upload_folder_mtimes.get((p, ""), self.mount_time_ns))
               for p in projects]
        out.append(self._status_node(node, None))
        return out

    def _status_node(self, parent: Node, project: str | None) -> Node:
        return self._child(parent, Kind.STATUS_FILE, STATUS_NAME, ("status", project),
                           project=project or "", mtime_ns=self.mount_time_ns)

    async def _children_of_upload_dir(self, node: Node) -> list[Node]:
        if self.uploads is not None:
            await self.uploads.notice_outside_changes()
        out: list[Node] = []
        prefix = f"{node.relpath}/" if node.relpath else ""
        folders = set()
        for project, relpath in self.upload_folders:
            if project == node.project and relpath.startswith(prefix):
                folders.add(relpath[len(prefix):].split("/", 1)[0])
        files = []
        for upload in (self.uploads.uploads.values() if self.uploads else []):
            rec = upload.record
            if rec.project != node.project or not rec.relpath.startswith(prefix):
                continue
            head, sep, _ = rec.relpath[len(prefix):].partition("/")
            if sep:
                folders.add(head)
            else:
                files.append(upload)
        for name in sorted(folders):
            out.append(self.upload_dir_node(node, name))
        for upload in sorted(files, key=lambda u: u.record.relpath):
            out.append(self.upload_file_node(node, upload))
        if not node.relpath:
            out.append(self._status_node(node, node.project))
        return out

    def upload_dir_node(self, parent: Node, name: str) -> Node:
        relpath = f"{parent.relpath}/{name}" if parent.relpath else name
        mtime_ns = self.upload_folder_mtimes.get((parent.project, relpath), self.mount_time_ns)
        return self._child(parent, Kind.UPLOAD_DIR, name, ("upload-dir", parent.project, relpath),
                           project=parent.project, relpath=relpath, mtime_ns=mtime_ns)

    def set_upload_folder_mtime(self, node: Node, mtime_ns: int) -> None:
        self.upload_folder_mtimes[(node.project, node.relpath)] = node.mtime_ns = mtime_ns

    def upload_file_node(self, parent: Node, upload: Upload) -> Node:
        rec = upload.record
        return self._child(parent, Kind.UPLOAD_FILE, rec.name, ("upload", rec.id),
                           project=parent.project, relpath=rec.relpath, upload=upload,
                           mtime_ns=_upload_mtime_ns(upload), xattrs=_upload_xattrs(upload))

    def move_upload_folder(self, node: Node, new_parent: Node, new_relpath: str) -> None:
        """A folder in ``uploads/`` renamed or moved (a file manager's "New Folder"
        named afterwards): it and the folders below it keep their inodes, the
        kernel's entries, under their new paths."""
        old_relpath = node.relpath  # the loop below re-keys node itself too

        def moved(relpath: str) -> str | None:
            return relocated(relpath, old_relpath, new_relpath)

        for project, relpath in list(self.upload_folders):
            if project == node.project and (target := moved(relpath)) is not None:
                self.upload_folders.discard((project, relpath))
                self.upload_folders.add((project, target))
        for project, relpath in list(self.upload_folder_mtimes):
            if project == node.project and (target := moved(relpath)) is not None:
                self.upload_folder_mtimes[(project, target)] = self.upload_folder_mtimes.pop(
                    (project, relpath))
        for live in list(self._nodes.values()):
            if live.project != node.project:
                continue
            if live.kind is Kind.UPLOAD_FILE:
                self.refresh_upload_node(live)
            elif live.kind is Kind.UPLOAD_DIR and (target := moved(live.relpath)) is not None:
                # Re-keyed in place: _slot finds the new key on this same number.
                self._displaced.pop(live.key, None)
                live.key = ("upload-dir", live.project, target)
                self._displaced[live.key] = live.inode
                live.relpath = target
        node.name = new_relpath.rsplit("/", 1)[-1]
        node.parent = new_parent.inode
        self.forget_negative(new_parent.inode)

    def upload_finished(self, upload: Upload) -> None:
        """A background (write-behind) upload ended: show its outcome at once."""
        _, node = self._slot(("upload", upload.record.id))
        if node is not None:
            self.refresh_upload_node(node)
        if upload.record.result:
            self.invalidate_prearchive()

    def refresh_upload_node(self, node: Node) -> None:
        if node.upload is not None:
            node.xattrs = _upload_xattrs(node.upload)
            node.relpath = node.upload.record.relpath
            node.name = node.upload.record.name
            node.mtime_ns = _upload_mtime_ns(node.upload)

    def status_text(self, node: Node) -> bytes:
        if self.uploads is None:
            return b""
        return self.uploads.status_text(node.project or None).encode()

    # ------------------------------------------------------------- prearchive
    async def prearchive_sessions(self) -> list[xc.PrearchiveSession]:
        """The prearchive listing; it changes under us, so it lives ``prearchive_ttl`` only."""
        fetched = self._prearchive_fetched_at
        if fetched is None or trio.current_time() - fetched > self.prearchive_ttl:
            self.invalidate_prearchive()
            self._prearchive_fetched_at = trio.current_time()
        return await self.cached(("prearchive",), self.client.list_prearchive)

    def invalidate_prearchive(self) -> None:
        """Forget the prearchive listing and every session's scans and files."""
        for key in list(self._listings.keys()):
            if isinstance(key, tuple) and key and key[0] in ("prearchive", "pre-scans",
                                                              "pre-files"):
                self._listings.pop(key, None)
        self._prearchive_fetched_at = None
        self._negative.clear()

    async def _children_of_prearchive(self, node: Node) -> list[Node]:
        # Projects one may upload to are listed even when empty, so that a session
        # can be moved there with mv.
        writable = await self.cached(("upload-projects",), self.client.list_upload_projects)
        projects = sorted({s.project for s in await self.prearchive_sessions()} | set(writable))
        return [self._child(node, Kind.PREARCHIVE_PROJECT, safe_name(p), ("pre-project", p),
                            project=p, mtime_ns=self.mount_time_ns) for p in projects]

    async def _children_of_prearchive_project(self, node: Node) -> list[Node]:
        stamps = sorted({s.timestamp for s in await self.prearchive_sessions()
                         if s.project == node.project}
                        | {ts for p, ts in self.emptied_timestamps if p == node.project})
        return [self._child(node, Kind.PREARCHIVE_TIMESTAMP, safe_name(ts),
                            ("pre-ts", node.project, ts), project=node.project, folder=ts,
                            mtime_ns=_time_ns(_prearchive_time(ts), self.mount_time_ns))
                for ts in stamps]

    async def _children_of_prearchive_timestamp(self, node: Node) -> list[Node]:
        return [self._child(node, Kind.PREARCHIVE_SESSION, safe_name(s.folder_name),
                            ("pre-session", s.uri), project=s.project, prearchive_uri=s.uri,
                            mtime_ns=_time_ns(s.lastmod, self.mount_time_ns),
                            xattrs=_prearchive_xattrs(s))
                for s in await self.prearchive_sessions()
                if s.project == node.project and s.timestamp == node.folder]

    async def _children_of_prearchive_session(self, node: Node) -> list[Node]:
        common = dict(project=node.project, prearchive_uri=node.prearchive_uri,
                      mtime_ns=node.mtime_ns)
        return [self._child(node, Kind.SCANS, "scans", ("pre-scans", node.prearchive_uri),
                            **common),
                self._child(node, Kind.INFO_FILE, INFO_NAME, ("pre-info", node.prearchive_uri),
                            xattrs=node.xattrs, text=await self.info_text(node), **common)]

    async def refresh_prearchive_node(self, node: Node) -> None:
        """Bring a prearchive session's (or its info file's) attributes, and the
        info file's text, up to date with the prearchive listing, which lives
        ``prearchive_ttl`` only; a session gone from it keeps what it last had."""
        try:
            sessions = await self.prearchive_sessions()
        except XnatError as exc:  # the server is down: what it said last
            log.debug("prearchive attributes of %s not refreshed: %s", node.prearchive_uri, exc)
            return
        session = next((s for s in sessions if s.uri == node.prearchive_uri), None)
        if session is not None:
            node.xattrs = _prearchive_xattrs(session)
            node.mtime_ns = _time_ns(session.lastmod, node.mtime_ns)
            if node.kind is Kind.INFO_FILE:
                node.text = _info_json(session)

    async def _follow_archived(self, node: Node) -> None:
        """A folder of a prearchive session that mv archived becomes the archived
        session's own: the kernel renews its entries asynchronously, and until it
        does, the new name (and whatever it held below) points at these folders."""
        project, subject_label, session_label = self.archived_as[node.prearchive_uri]
        subject = await self._subject_labelled(project, subject_label)
        if subject is None:
            return
        experiments = await self.subject_experiments(project, subject.id)
        session = next((e for e in experiments if e.label == session_label), None)
        if session is None:
            return
        node.project, node.subject_id, node.experiment_id = project, subject.id, session.id
        node.prearchive_uri = ""
        if node.kind is Kind.PREARCHIVE_SESSION:
            node.kind = Kind.SESSION

    async def prearchive_scans(self, uri: str) -> list[xc.Scan]:
        return await self.cached(("pre-scans", uri),
                                 lambda: self.client.list_prearchive_scans(uri))

    async def prearchive_files(self, uri: str, scan_id: str) -> list[xc.RemoteFile]:
        return await self.cached(("pre-files", uri, scan_id),
                                 lambda: self.client.list_prearchive_files(uri, scan_id))

    async def info_text(self, node: Node) -> bytes:
        """A prearchive session's ``prearchive-info.json``, from the prearchive
        listing (so its size is known when the folder is listed)."""
        session = next((s for s in await self.prearchive_sessions()
                        if s.uri == node.prearchive_uri), None)
        if session is None:
            raise NotFound(node.prearchive_uri)
        return _info_json(session)

    def forget_negative(self, parent_inode: int) -> None:
        """A name was just created under ``parent_inode``: drop remembered misses there."""
        for key in [k for k in self._negative.keys() if k[0] == parent_inode]:
            self._negative.pop(key, None)

    def invalidate_project(self, project: str) -> None:
        """After archiving into ``project``: its subjects and sessions may have changed."""
        for key in list(self._listings.keys()):
            if isinstance(key, tuple) and len(key) >= 2 and key[0] in (
                    "subjects", "experiments") and key[1] == project:
                self._listings.pop(key, None)
        self._negative.clear()

    def hide(self, node: Node) -> None:
        self.hidden[node.inode] = node.prearchive_uri

    def show_hidden(self, session_uri: str) -> int:
        """Show again what `rm` hid in a prearchive session; how many entries."""
        inodes = [inode for inode, uri in self.hidden.items() if uri == session_uri]
        for inode in inodes:
            del self.hidden[inode]
        if inodes:
            self._negative.clear()  # their names were looked up in vain meanwhile
        return len(inodes)

    # ---------------------------------------------------------- pending subjects
    async def _children_of_pending_subject(self, node: Node) -> list[Node]:
        """Nothing, until a session is archived into it: the kernel may still hold
        this folder for a moment after (its entry is renewed asynchronously), and
        it must then show what the subject now has."""
        assert isinstance(node.key, tuple)
        label = node.key[2]  # ("pending-subject", project, label)
        if (node.project, label) in self.pending_subjects:
            return []
        made = await self._subject_labelled(node.project, label)
        if made is None:
            return []
        node.subject_id = made.id
        return await self._children_of_subject(node)

    def add_pending_subject(self, parent: Node, name: str) -> Node:
        """``mkdir`` of a subject to archive into (refused unless XNAT would keep its label)."""
        label = require_label(label_from_name(name), "subject")
        self.pending_subjects.add((parent.project, label))
        return self._child(parent, Kind.PENDING_SUBJECT, name,
                           ("pending-subject", parent.project, label),
                           project=parent.project, mtime_ns=self.mount_time_ns)

    def siblings_after(self, node: Node, limit: int) -> list[Node]:
        """Files following ``node`` in its folder, for series-aware read-ahead."""
        files = [n for n in self._entries.get(node.parent, []) if n.kind is Kind.FILE]
        try:
            start = files.index(node) + 1
        except ValueError:
            return []
        return files[start:start + limit]


_FIRST_INODE = ROOT_INODE + 1
_LAST_INODE = (1 << 63) - 1


def _hashed_inode(key: Hashable) -> int:
    """A number for ``key`` in [_FIRST_INODE, _LAST_INODE], the same in every mount
    (keys are tuples of strings and None, whose repr does not vary)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    number = int.from_bytes(digest, "big") & _LAST_INODE
    return number if number >= _FIRST_INODE else number + _FIRST_INODE


def _unique_names(entries: list[Node]) -> list[Node]:
    """Names a server gives twice in one folder (a file ``x`` beside a folder
    ``x/``, two subjects with one label) would leave all but the first
    unreachable: the later ones get a suffix made from what they are
    (``%~`` never comes from a label, whose ``%`` is escaped)."""
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            suffix = "%~" + hashlib.sha256(repr(entry.key).encode()).hexdigest()[:8]
            name = entry.name
            if len((name + suffix).encode("utf-8", "surrogateescape")) > NAME_MAX:
                cut = name.encode("utf-8", "surrogateescape")[:NAME_MAX - len(suffix)]
                name = cut.decode("utf-8", "ignore")
            entry.name = name + suffix
        seen.add(entry.name)
    return entries


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


def _prearchive_time(timestamp: str) -> str:
    """``20211229_101128996`` as ``2021-12-29 10:11:28.996``."""
    try:
        parsed = dt.datetime.strptime(timestamp, "%Y%m%d_%H%M%S%f")
    except ValueError:
        return ""
    return parsed.strftime("%Y-%m-%d %H:%M:%S.%f")


def _owner(scan_id: str | None, assessor_id: str | None) -> Hashable:
    """What holds a resource, in file groups and node keys: a scan (by its ID,
    as before assessors were shown), the session (None), or an assessor."""
    return ("assessor", assessor_id) if assessor_id is not None else scan_id


def _info_json(s: xc.PrearchiveSession) -> bytes:
    """A prearchive session's ``prearchive-info.json``."""
    return (json.dumps(dataclasses.asdict(s), indent=2) + "\n").encode()


def _prearchive_xattrs(s: xc.PrearchiveSession) -> dict[str, str]:
    return _xattrs(uri=s.uri, status=s.status, label=s.name, subject=s.subject,
                   uploaded=s.uploaded, lastmod=s.lastmod, scan_date=s.scan_date, tag=s.tag,
                   autoarchive=s.autoarchive, project=s.project, timestamp=s.timestamp)


def _xattrs(**values: str | None) -> dict[str, str]:
    """Extended attributes under ``user.xnat.*``, skipping empty values."""
    return {f"user.xnat.{k}": v for k, v in values.items() if v}


def _time_ns(stamp: str | None, default: int) -> int:
    """XNAT's ``2023-09-27 17:31:21.352`` (or a bare date) as nanoseconds."""
    if not stamp:
        return default
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return int(dt.datetime.strptime(stamp, fmt).timestamp() * 1e9)
        except ValueError:
            continue
    return default

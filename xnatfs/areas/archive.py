"""The archive: projects, subjects, sessions, scans and assessors.

Layout (the one XNAT's zip downloads use)::

    /<PROJECT>/<SUBJECT>/<SESSION>/scans/<ID>-<type>/resources/<LABEL>/files/<path>
    /<PROJECT>/<SUBJECT>/<SESSION>/resources/<LABEL>/files/<path>
    /<PROJECT>/<SUBJECT>/<SESSION>/assessors/<LABEL>/resources/<LABEL>/files/<path>
    /<PROJECT>/resources/..., /<PROJECT>/<SUBJECT>/resources/...

The ``resources/`` folders and everything below them are :mod:`.resources`'
(read and written); this area lists down to them. Here only ``mkdir
PROJECT/SUBJECT`` changes anything: it makes a subject to archive a
prearchive session into (local until a session arrives there).

Metadata comes only from listings, never from per-file requests: a session's
scans, resources and assessors come from one item request, and every file of
its scans, its own resources and its assessors' from one ``files?all=true``
request, so a whole session costs two; a walk over a project lists its
experiments once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio
from cachetools import TTLCache

from .. import client as xc
from ..errors import NotEmpty, Unreachable, XnatError
from ..naming import label_from_name, require_label, safe_name, scan_folder_name
from ..tree import Kind, Node, Tree, time_ns, xnat_xattrs
from .base import Area, Kernel
from .remote_files import RemoteFiles
from .tables import RECORDS, ProjectTables

log = logging.getLogger(__name__)

PROJECT = Kind("project")
SUBJECT = Kind("subject")
PENDING_SUBJECT = Kind("pending_subject")  # made by mkdir, to archive into; local only
SESSION = Kind("session")
SCANS = Kind("scans")
SCAN = Kind("scan")
SCAN_LINK = Kind("scan_link", is_dir=False, is_link=True)  # scans/<SCAN_ID>, unlisted
ASSESSORS = Kind("assessors")          # a session's assessors/, when it has any
ASSESSOR = Kind("assessor")
RESOURCES = Kind("resources")
RESOURCE = Kind("resource")
FOLDER = Kind("folder")                # files/ and any directory below it
FILE = Kind("file", is_dir=False)

FileGroups = dict[tuple[Hashable, str], list[xc.RemoteFile]]
"""Files by (owner, resource label); the owner is a scan ID, None for the session
itself, or ``("assessor", ID)`` (see :func:`owner`)."""


class ArchiveArea(Area):
    """Projects down to files, from cached listings."""

    kinds = (PROJECT, SUBJECT, PENDING_SUBJECT, SESSION, SCANS, SCAN, SCAN_LINK, ASSESSORS,
             ASSESSOR)  # resources/ and below: .resources

    def __init__(self, tree: Tree, kernel: Kernel, files: RemoteFiles | None = None) -> None:
        super().__init__(tree, kernel)
        self.client = tree.client
        self.files = files
        self.tables = ProjectTables(tree)  # subjects.csv...; subjects' and sessions' metadata
        # Hooks of the areas that add to these folders (install sets them):
        # files listed in an object's folder (its XML document), and names that
        # resolve there without being listed (accession IDs).
        self.extra_entries: Callable[[Node], list[Node]] = lambda node: []
        self.unlisted_by_id: Callable[[Node, str], Awaitable[Node | None]] | None = None
        self.pending_subjects: set[tuple[str, str]] = set()  # (project, label) made by mkdir
        # The subject whose experiments were last listed on their own, by project.
        self._last_subject_listed: TTLCache[str, str] = TTLCache(
            maxsize=1000, ttl=tree.metadata_ttl, timer=trio.current_time)

    # ------------------------------------------------------------- listings
    async def projects(self) -> list[xc.Project]:
        return await self.tree.cached(("projects",), self.client.list_projects)

    async def subjects(self, project: str) -> list[xc.Subject]:
        return await self.tree.cached(("subjects", project),
                                      lambda: self.client.list_subjects(project))

    async def subject_labelled(self, project: str, label: str) -> xc.Subject | None:
        return next((s for s in await self.subjects(project) if s.label == label), None)

    async def subject_experiments(self, project: str, subject_id: str) -> list[xc.Experiment]:
        """A subject's experiments. The first subject opened in a project costs its
        own listing; once a second one is opened (someone is walking the project,
        as ``find`` or ``ls -R`` do), one listing of the whole project serves every
        subject, so that a walk costs one request per project, not per subject."""
        whole_project = ("experiments", project)
        walking = self._last_subject_listed.get(project, subject_id) != subject_id
        if walking or self.tree.is_cached_or_coming(whole_project):
            experiments = await self.tree.cached(
                whole_project, lambda: self.client.list_experiments(project))
            # Rows without their subject (a server that drops the column) cannot
            # be shared out; the subject's own listing is then the only answer.
            if all(e.subject_id is not None for e in experiments):
                return [e for e in experiments if e.subject_id == subject_id]
        self._last_subject_listed[project] = subject_id
        return await self.tree.cached(("experiments", project, subject_id),
                                      lambda: self.client.list_experiments(project, subject_id))

    async def session_detail(self, experiment_id: str) -> xc.ExperimentDetail:
        return await self.tree.cached(("session", experiment_id),
                                      lambda: self.client.get_experiment(experiment_id))

    async def session_files(self, experiment_id: str) -> FileGroups:
        """The files of every resource of a session, its scans' and its own, from
        one listing (``files?all=true``), so that a whole session costs two
        requests with its item. Skipped when the item names no resource."""
        return await self.tree.cached(("session-files", experiment_id),
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
                groups[(owner(None, assessor.id), resource.label)] = []
        if not groups:
            return groups
        files = await self.client.list_experiment_files(experiment_id)
        if scan_files_expected and not any(f.scan_id is not None for f in files):
            # A server that ignores ``all=true`` lists only the session's own
            # files; the scans then take their own listing.
            files += await self.client.list_scan_files(experiment_id)
        for f in files:
            groups.setdefault((owner(f.scan_id, f.assessor_id), f.resource_label), []).append(f)
        return groups

    def invalidate_project(self, project: str) -> None:
        """After archiving into ``project``, or applying a spreadsheet to it: its
        subjects and sessions, and their records, may have changed."""
        self.tree.invalidate_where(lambda key: isinstance(key, tuple) and len(key) >= 2
                                   and key[0] in ("subjects", "experiments", *RECORDS)
                                   and key[1] == project)

    # --------------------------------------------------------------- folders
    async def top_entries(self, root: Node) -> list[Node]:
        return [self.tree.child(root, PROJECT, safe_name(p.id), ("project", p.id),
                                project=p.id, mtime_ns=self.tree.mount_time_ns,
                                xattrs=xnat_xattrs(id=p.id, label=p.id, name=p.name,
                                                   uri=f"/data/projects/{p.id}",
                                                   xsi_type="xnat:projectData"))
                for p in await self.projects()]

    async def children(self, node: Node) -> list[Node]:
        lister = {PROJECT: self._project, SUBJECT: self._subject,
                  PENDING_SUBJECT: self._pending_subject, SESSION: self._session,
                  ASSESSORS: self._assessors, ASSESSOR: self._assessor, SCANS: self._scans,
                  SCAN: self._scan}[node.kind]
        entries = await lister(node)
        if extras := self.extra_entries(node):
            # A big folder's entries may be the very list last made, extras included.
            listed = {id(entry) for entry in entries}
            extras = [extra for extra in extras if id(extra) not in listed]
        # Extras (the object's document) first: a walk (find -ls) stats them
        # before it goes down into the folders, which lets the document fetch
        # what is below ahead (documents.WalkAhead).
        return extras + entries if extras else entries

    async def _project(self, node: Node) -> list[Node]:
        subjects = await self.subjects(node.project)
        pending_labels = tuple(sorted(label for project, label in self.pending_subjects
                                      if project == node.project))
        if (same := self.tree.entries_made_from(node, (subjects, pending_labels))) is not None:
            return same
        labels = {s.label for s in subjects}
        pending = [self._pending_subject_node(node, label)
                   for label in pending_labels if label not in labels]
        own = self.tree.child(node, RESOURCES, "resources", ("resources", node.project),
                              project=node.project, mtime_ns=node.mtime_ns)
        return [own, *self.tables.files(node)] + pending + [self.tree.child(
            node, SUBJECT, safe_name(s.label), ("subject", node.project, s.id),
            project=node.project, subject_id=s.id,
            mtime_ns=time_ns(s.insert_date, self.tree.mount_time_ns),
            xattrs=xnat_xattrs(id=s.id, label=s.label, project=node.project,
                               uri=f"/data/projects/{node.project}/subjects/{s.id}",
                               xsi_type="xnat:subjectData"))
            for s in subjects]

    def _pending_subject_node(self, parent: Node, label: str) -> Node:
        return self.tree.child(parent, PENDING_SUBJECT, safe_name(label),
                               ("pending-subject", parent.project, label),
                               project=parent.project, mtime_ns=self.tree.mount_time_ns)

    async def _subject(self, node: Node) -> list[Node]:
        experiments = await self.subject_experiments(node.project, node.subject_id)
        own = self.tree.child(node, RESOURCES, "resources",
                              ("resources", node.project, node.subject_id),
                              project=node.project, subject_id=node.subject_id,
                              mtime_ns=node.mtime_ns)
        return [own] + [self.tree.child(
            node, SESSION, safe_name(e.label), ("session", node.project, e.id),
            project=node.project, subject_id=node.subject_id, experiment_id=e.id,
            mtime_ns=time_ns(e.insert_date, self.tree.mount_time_ns),
            xattrs=xnat_xattrs(id=e.id, label=e.label, project=node.project,
                               uri=f"/data/experiments/{e.id}", xsi_type=e.xsi_type,
                               date=e.date))
            for e in experiments]

    async def _pending_subject(self, node: Node) -> list[Node]:
        """Nothing, until a session is archived into it: the kernel may still hold
        this folder for a moment after (its entry is renewed asynchronously), and
        it must then show what the subject now has."""
        assert isinstance(node.key, tuple)
        label = node.key[2]  # ("pending-subject", project, label)
        if (node.project, label) in self.pending_subjects:
            return []
        made = await self.subject_labelled(node.project, label)
        if made is None:
            return []
        node.subject_id = made.id
        return await self._subject(node)

    async def _session(self, node: Node) -> list[Node]:
        common = _inherited(node)
        out = [self.tree.child(node, SCANS, "scans",
                               ("scans", node.project, node.experiment_id), **common),
               self.tree.child(node, RESOURCES, "resources",
                               ("resources", node.project, node.experiment_id, None), **common)]
        try:
            assessed = bool((await self.session_detail(node.experiment_id)).assessors)
        except Unreachable:
            raise  # scans/ and resources/ would ask again, and wait as long again
        except XnatError as exc:  # scans/ and resources/ say so when entered
            log.debug("assessors of %s unknown: %s", node.experiment_id, exc)
            assessed = False
        if assessed:
            out.append(self.tree.child(node, ASSESSORS, "assessors",
                                       ("assessors", node.project, node.experiment_id),
                                       **common))
        return out

    async def _assessors(self, node: Node) -> list[Node]:
        detail = await self.session_detail(node.experiment_id)
        return [self.tree.child(
            node, ASSESSOR, safe_name(a.label),
            ("assessor", node.project, node.experiment_id, a.id),
            **_inherited(node), assessor_id=a.id,
            xattrs=xnat_xattrs(id=a.id, label=a.label, xsi_type=a.xsi_type,
                               uri=f"/data/experiments/{node.experiment_id}/assessors/{a.id}"))
            for a in detail.assessors]

    async def _assessor(self, node: Node) -> list[Node]:
        return [self.tree.child(node, RESOURCES, "resources",
                                ("resources", node.project, node.experiment_id,
                                 owner(None, node.assessor_id)),
                                **_inherited(node), assessor_id=node.assessor_id)]

    async def _scans(self, node: Node) -> list[Node]:
        detail = await self.session_detail(node.experiment_id)
        return [self.tree.child(
            node, SCAN, scan_folder_name(scan.id, scan.type or ""),
            ("scan", node.project, node.experiment_id, scan.id),
            **_inherited(node), scan_id=scan.id,
            xattrs=xnat_xattrs(id=scan.id, label=scan.id, type=scan.type,
                               series_description=scan.series_description,
                               quality=scan.quality, xsi_type=scan.xsi_type,
                               uri=f"/data/experiments/{node.experiment_id}/scans/{scan.id}"))
            for scan in detail.scans]

    async def _scan(self, node: Node) -> list[Node]:
        return [resources_folder(self.tree, node, RESOURCES)]

    async def unlisted_child(self, parent: Node, name: str) -> Node | None:
        """A bare ``scans/<SCAN_ID>`` resolves without being listed (and accession
        IDs, through ``unlisted_by_id``)."""
        if parent.kind is not SCANS:
            return await self.unlisted_by_id(parent, name) if self.unlisted_by_id else None
        scan_id = label_from_name(name)
        for child in await self.tree.children(parent.inode):
            if child.scan_id == scan_id:
                # A symlink: a directory of its own would make every folder
                # below it a second name of the listed one's (the kernel then
                # moves a shell's working directory to the bare name), and
                # the listed folder itself cannot have two names.
                return self.tree.child(
                    parent, SCAN_LINK, name, ("scan-link", child.key),
                    scan_id=child.scan_id, mtime_ns=child.mtime_ns,
                    text=os.fsencode(child.name))
        return None

    async def refresh_xattrs(self, node: Node) -> None:
        """A subject's or session's fields and custom variables join its attributes."""
        if node.kind is SUBJECT:
            await self.tables.subject_xattrs(node)
        elif node.kind is SESSION:
            await self.tables.session_xattrs(node)

    # ------------------------------------------------------------ operations
    def writable(self, node: Node) -> bool:
        """Project and subject folders take a session archived with mv, and a
        project a new subject."""
        return node.kind in (PROJECT, SUBJECT, PENDING_SUBJECT)

    def size(self, node: Node) -> int:
        return len(node.text) if node.kind is SCAN_LINK else node.size

    def readlink(self, node: Node) -> bytes:
        if node.kind is SCAN_LINK:
            return node.text
        return super().readlink(node)

    async def mkdir(self, parent: Node, name: str) -> Node:
        """A subject to archive into, local until a session is archived there
        (refused unless XNAT would keep its label)."""
        if parent.kind is not PROJECT:
            return await super().mkdir(parent, name)
        return self.add_pending_subject(parent, name)

    def add_pending_subject(self, parent: Node, name: str) -> Node:
        label = require_label(label_from_name(name), "subject")
        self.pending_subjects.add((parent.project, label))
        return self.tree.child(parent, PENDING_SUBJECT, name,
                               ("pending-subject", parent.project, label),
                               project=parent.project, mtime_ns=self.tree.mount_time_ns)

    async def rmdir(self, parent: Node, node: Node) -> None:
        if node.kind is not PENDING_SUBJECT:
            return await super().rmdir(parent, node)
        if await self.tree.children(node.inode):  # a session was archived into it
            raise NotEmpty(node.name)
        self.pending_subjects.discard((node.project, node.name))

    def subject_to_archive_into(self, node: Node) -> str | None:
        """The label of the subject folder ``node`` is, if a prearchive session can
        be archived into it (an existing subject, or one made with mkdir)."""
        if node.kind not in (SUBJECT, PENDING_SUBJECT):
            return None
        return node.xattrs.get("user.xnat.label") or label_from_name(node.name)

    def subject_archived_into(self, node: Node, subject: str) -> None:
        """A session was archived into ``node``: it exists on the server now."""
        self.invalidate_project(node.project)
        if node.kind is PENDING_SUBJECT:
            # The subject now exists on the server, as a different node.
            self.pending_subjects.discard((node.project, subject))
            self.kernel.forget_entry(node.parent, node.name)


def owner(scan_id: str | None, assessor_id: str | None) -> Hashable:
    """What holds a resource, in file groups and node keys: a scan (by its ID,
    as before assessors were shown), the session (None), or an assessor."""
    return ("assessor", assessor_id) if assessor_id is not None else scan_id


def holder(node: Node) -> Hashable:
    """What holds the resource ``node`` is in or below, in node keys: as
    :func:`owner` says for sessions (and prearchive sessions), else the subject
    or the project."""
    if node.experiment_id or node.prearchive_uri:
        return owner(node.scan_id, node.assessor_id)
    return ("subject", node.subject_id) if node.subject_id else ("project",)


def _inherited(node: Node) -> dict[str, Any]:
    """What a folder's entries take over from it."""
    return dict(project=node.project, subject_id=node.subject_id,
                experiment_id=node.experiment_id, mtime_ns=node.mtime_ns)


def resources_folder(tree: Tree, scan: Node, resources_kind: Kind) -> Node:
    """A scan's ``resources/`` folder (the archive's and the prearchive's alike)."""
    return tree.child(scan, resources_kind, "resources",
                      ("resources", scan.project, scan.experiment_id, scan.scan_id,
                       scan.prearchive_uri), prearchive_uri=scan.prearchive_uri,
                      **_inherited(scan), scan_id=scan.scan_id)


def files_folder(tree: Tree, resource: Node, folder_kind: Kind) -> Node:
    """A resource's ``files/`` folder (the archive's and the prearchive's alike)."""
    return tree.child(resource, folder_kind, "files",
                      ("folder", resource.project,
                       resource.experiment_id or resource.prearchive_uri,
                       holder(resource), resource.resource_label, ""),
                      prearchive_uri=resource.prearchive_uri, **_inherited(resource),
                      scan_id=resource.scan_id, assessor_id=resource.assessor_id,
                      resource_label=resource.resource_label, folder="")


def file_entries(tree: Tree, node: Node, files: list[xc.RemoteFile], *, folder_kind: Kind,
                 file_kind: Kind) -> list[Node]:
    """The entries of folder ``node`` of a resource, from the resource's files:
    each file whose path is directly in it, and a folder for each first
    component of the deeper paths."""
    if (same := tree.entries_made_from(node, (files, node.mtime_ns))) is not None:
        return same
    prefix = f"{node.folder}/" if node.folder else ""
    session = node.experiment_id or node.prearchive_uri
    held_by = holder(node)
    common = dict(**_inherited(node), scan_id=node.scan_id, assessor_id=node.assessor_id,
                  resource_label=node.resource_label, prearchive_uri=node.prearchive_uri)
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
                out.append(tree.child(
                    node, folder_kind, safe_name(head),
                    ("folder", node.project, session, held_by, node.resource_label,
                     prefix + head), folder=prefix + head, **common))
            continue
        out.append(tree.child(
            node, file_kind, safe_name(rest),
            ("file", node.project, session, held_by, node.resource_label, f.path),
            file=f, xattrs=xnat_xattrs(label=f.path.rsplit("/", 1)[-1], uri=f.uri,
                                       digest=f.digest or "", size=str(f.size),
                                       resource=f.resource_label, resource_id=f.resource_id,
                                       xsi_type="xnat:fileData"),
            **common))
    return out

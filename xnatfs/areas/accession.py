"""Accession IDs as paths: ``MOUNT/XNAT_E00001`` is a symbolic link to the
session's labelled folder, ``NEURO_PUB/NP001/NP001_MR1``.

Names resolve without being listed (:meth:`Area.unlisted_child`), after the
listed ones, so a listed name always wins over an ID:

* at the root, a subject's or an experiment's (session or image assessor) ID,
  into its primary project or, when the user cannot read that one, the first
  project it is shared into that the user can read (under its label there);
* in a project folder a subject's ID, in a subject folder a session's, from
  the listing the folder already has (no request).

Links, not second directories: the kernel cannot give a directory two names.
The targets are the mount's own names of the folders (found in their
listings, so escaped labels and ``%~`` suffixes come out right), never the
server's strings. At the root only names shaped like XNAT's accession IDs
(``<site ID>_S<digits>``, ``<site ID>_E<digits>``; the site ID of letters,
digits and ``_``) are asked about, so a shell's ``.git``, ``.Trash`` or
``autorun.inf`` costs no request.

What an ID at the root costs, beyond the listings its target's folders need
anyway (the project's subjects, the subject's experiments):

* a subject: ``GET /data/subjects/{ID}/projects`` (its projects, primary first);
* a session: its item, ``GET /data/experiments/{ID}?format=json`` (subject,
  project, shares), which the session's folder then uses: nothing more;
* an assessor: its item (its session, ``imageSession_ID``) and the session's.

An ID XNAT will not show (404; 403) is ENOENT, and so is one whose labelled
folder the mount does not show; the answer, either way, is cached as long as
a listing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .. import client as xc
from ..errors import Forbidden, NotFound
from ..tree import ROOT_INODE, Kind, Node, Tree
from .archive import ASSESSOR, ASSESSORS, PROJECT, SESSION, SUBJECT, ArchiveArea
from .base import Area, Kernel

log = logging.getLogger(__name__)

T = TypeVar("T")

ID_LINK = Kind("id_link", is_dir=False, is_link=True)

# XNAT's accession IDs: the site ID, then _S (subjects) or _E (experiments) and
# a number (IdGenerator: siteId + "_S" + zero-padded count).
_ACCESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*_(?P<kind>[SE])[0-9]+")


class AccessionArea(Area):
    """Links named by accession IDs, at the root and in project and subject folders."""

    kinds = (ID_LINK,)

    def __init__(self, tree: Tree, kernel: Kernel, archive: ArchiveArea) -> None:
        super().__init__(tree, kernel)
        self.archive = archive
        self.client = tree.client

    # ------------------------------------------------------------- the links
    def size(self, node: Node) -> int:
        return len(node.text)

    def readlink(self, node: Node) -> bytes:
        return node.text

    def _link(self, parent: Node, name: str, target: list[Node]) -> Node:
        """The link ``name`` in ``parent`` to the folder at the end of ``target``
        (the folders from ``parent`` down to it)."""
        folder = target[-1]
        return self.tree.child(parent, ID_LINK, name, ("id-link", parent.key, name),
                               mtime_ns=folder.mtime_ns,
                               text=os.fsencode("/".join(node.name for node in target)))

    # ---------------------------------------------- in project and subject folders
    async def in_folder(self, parent: Node, name: str) -> Node | None:
        """A subject's ID in its project's folder, a session's in its subject's,
        from that folder's own listing."""
        field = {PROJECT: "subject_id", SUBJECT: "experiment_id"}.get(parent.kind)
        if field is None or not _ACCESSION_ID.fullmatch(name):
            return None
        wanted = SUBJECT if parent.kind is PROJECT else SESSION
        for child in await self.tree.children(parent.inode):
            if child.kind is wanted and getattr(child, field) == name:
                return self._link(parent, name, [child])
        return None

    # -------------------------------------------------------------- at the root
    async def at_root(self, root: Node, name: str) -> Node | None:
        """A subject's or experiment's ID at the root, linked to its labelled folder."""
        shaped = _ACCESSION_ID.fullmatch(name)
        if shaped is None:
            return None
        if shaped.group("kind") == "S":
            path = await self._subject_path(name)
        else:
            path = await self._experiment_path(name)
        return self._link(root, name, path) if path else None

    async def _readable_project(self, project: str) -> Node | None:
        """The project's folder, if the user can read it (it is listed)."""
        for child in await self.tree.children(ROOT_INODE):
            if child.kind is PROJECT and child.project == project:
                return child
        return None

    async def _subject_in(self, project: str, subject_id: str) -> list[Node]:
        """The folders down to the subject in ``project``, if the mount shows it there."""
        folder = await self._readable_project(project)
        if folder is None:
            return []
        for child in await self.tree.children(folder.inode):
            if child.kind is SUBJECT and child.subject_id == subject_id:
                return [folder, child]
        return []

    async def _subject_path(self, subject_id: str) -> list[Node]:
        projects = await self._answer(("subject-projects", subject_id),
                                      lambda: self.client.subject_projects(subject_id))
        for project, _label in projects or []:
            if path := await self._subject_in(project, subject_id):
                return path
        return []

    async def _experiment_path(self, experiment_id: str) -> list[Node]:
        """A session's folder, or an assessor's in its session's ``assessors/``."""
        detail: xc.ExperimentDetail | None = await self._answer(
            ("experiment-of-id", experiment_id),
            lambda: self.archive.session_detail(experiment_id))
        if detail is None:
            return []
        if detail.subject_id is None and detail.session_id is not None:
            session = await self._experiment_path(detail.session_id)
            if not session or session[-1].kind is not SESSION:
                return []
            return session + await self._assessor_below(session[-1], experiment_id)
        if detail.subject_id is None:
            return []  # an experiment of no subject: not shown by the mount
        for project in [detail.project, *(project for project, _ in detail.shares)]:
            subject = await self._subject_in(project, detail.subject_id)
            if not subject:
                continue
            for child in await self.tree.children(subject[-1].inode):
                if child.kind is SESSION and child.experiment_id == experiment_id:
                    return subject + [child]
        return []

    async def _assessor_below(self, session: Node, assessor_id: str) -> list[Node]:
        for assessors in await self.tree.children(session.inode):
            if assessors.kind is ASSESSORS:
                for child in await self.tree.children(assessors.inode):
                    if child.kind is ASSESSOR and child.assessor_id == assessor_id:
                        return [assessors, child]
        return []

    async def _answer(self, key: tuple[str, str], fetch: Callable[[], Awaitable[T]]) -> T | None:
        """What XNAT says of an ID, None when it will not show it (404, 403);
        cached as long as a listing either way, so a shell looking the name up
        again and again sends one request."""
        async def answer() -> T | None:
            try:
                return await fetch()
            except (NotFound, Forbidden) as exc:
                log.debug("accession ID %s not shown: %s", key[1], exc)
                return None

        found: T | None = await self.tree.cached(key, answer)
        return found

"""Each archive object's own XML document: ``project.xml``, ``subject.xml``,
``session.xml``, ``scan.xml``, ``assessor.xml`` in its folder.

The file holds XNAT's ``format=xml`` answer for the object, byte for byte. It
is a generated file (:mod:`.generated`): nothing is fetched to list it, so a
walk that lists names only (``ls``, ``find``) costs no request; ``stat``
fetches the document (its size is its length) and ``open`` serves the same
bytes, both through the metadata cache, so ``stat`` then ``read`` costs one
request, and a walk that stats every file (``ls -l``, ``find -ls``) one per
document. The kernel keeps no size of these files (attribute timeout 0) and
reads them past its page cache, so a size shown is always that of the bytes
a reader gets. XNAT labels cannot contain dots, so these names never collide
with a subject's or a session's.

A walk that stats them would wait for one document after another, one round
trip each. Once documents of two objects have been stat'ed within the
metadata lifetime (``find -ls``, ``ls -l`` of several folders), the stat of
an object's document also fetches its children's documents ahead, a few at
a time (:class:`WalkAhead`), and the listings the walk will need below
(a subject's sessions' items, a session's files): the same requests the
walk makes, but not one after another.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from cachetools import TTLCache

from ..errors import XnatError
from ..tree import Kind, Node, Tree
from .archive import ASSESSOR, PROJECT, SCAN, SESSION, SUBJECT, ArchiveArea
from .generated import generated_file

log = logging.getLogger(__name__)

WALK_AHEAD = 4  # documents fetched at once ahead of a walk


class DocumentFile:
    """The :class:`~.generated.Generator` of one object's document, at ``uri``
    (``/data/...``, the object's own URL)."""

    def __init__(self, tree: Tree, uri: str, ahead: WalkAhead | None = None,
                 children: Callable[[], Awaitable[list[str]]] | None = None) -> None:
        self.tree = tree
        self.uri = uri
        self.ahead = ahead
        self.children = children  # the documents of the object's children, when walked

    def size(self, node: Node) -> int:
        return len(node.text)  # as last fetched; stat refreshes first (timeout 0)

    async def refresh(self, node: Node) -> None:
        if self.ahead is not None:
            self.ahead.stat_seen(self.uri, self.children)
        node.text = await self.body()

    async def content(self, node: Node) -> bytes:
        node.text = await self.body()
        return node.text

    async def body(self) -> bytes:
        return await cached_document(self.tree, self.uri)


async def cached_document(tree: Tree, uri: str) -> bytes:
    """The document at ``uri``, cached like a listing (NotFound: the object is gone)."""
    document: bytes = await tree.cached(("document", uri),
                                        lambda: tree.client.get_document(uri))
    return document


class WalkAhead:
    """Fetches the documents of an object's children when its own is stat'ed in
    a walk (a second object's document stat'ed within the metadata lifetime)."""

    def __init__(self, tree: Tree, nursery: trio.Nursery) -> None:
        self.tree = tree
        self.nursery = nursery
        self.limiter = trio.CapacityLimiter(WALK_AHEAD)
        Children = Callable[[], Awaitable[list[str]]] | None
        # The documents last stat'ed (two tell a walk), with their children.
        self._stated: TTLCache[str, Children] = TTLCache(maxsize=2, ttl=tree.metadata_ttl,
                                                          timer=trio.current_time)
        self._expanded: TTLCache[str, bool] = TTLCache(maxsize=10000, ttl=tree.metadata_ttl,
                                                        timer=trio.current_time)

    def stat_seen(self, uri: str, children: Callable[[], Awaitable[list[str]]] | None) -> None:
        walking = any(seen != uri for seen in self._stated)
        self._stated[uri] = children
        if walking:  # the one that told it too: the walk's top (find -ls's project)
            for seen, its_children in list(self._stated.items()):
                if its_children is not None and seen not in self._expanded:
                    self._expanded[seen] = True
                    self.nursery.start_soon(self._fetch_children, seen, its_children)

    async def _fetch_children(self, uri: str,
                              children: Callable[[], Awaitable[list[str]]]) -> None:
        try:
            uris = await children()
        except XnatError as exc:
            log.debug("the children of %s are unknown: %s", uri, exc)
            return
        async with trio.open_nursery() as nursery:
            for child in uris:
                nursery.start_soon(self._fetch, child)

    def listing(self, fetch: Callable[[str], Awaitable[object]], experiment_id: str) -> None:
        """Also fetch a listing the walk will ask for below (the archive's, cached)."""
        async def fetch_ahead() -> None:
            async with self.limiter:
                try:
                    await fetch(experiment_id)
                except XnatError as exc:
                    log.debug("listing %s ahead failed: %s", experiment_id, exc)
        self.nursery.start_soon(fetch_ahead)

    async def _fetch(self, uri: str) -> None:
        async with self.limiter:
            try:
                await cached_document(self.tree, uri)
            except XnatError as exc:
                log.debug("fetching %s ahead failed: %s", uri, exc)


def document_uri(folder: Node) -> tuple[str, str] | None:
    """The name and URL of the document of the object ``folder`` is, if it is one.
    Sessions and assessors by their accession ID, which every project they are
    shown in shares; subjects under their project, as the mount lists them."""
    kind = folder.kind
    if kind is PROJECT:
        return "project.xml", f"/data/projects/{folder.project}"
    if kind is SUBJECT and folder.subject_id:
        return "subject.xml", f"/data/projects/{folder.project}/subjects/{folder.subject_id}"
    if kind is SESSION:
        return "session.xml", f"/data/experiments/{folder.experiment_id}"
    if kind is SCAN and folder.scan_id is not None:
        return "scan.xml", f"/data/experiments/{folder.experiment_id}/scans/{folder.scan_id}"
    if kind is ASSESSOR and folder.assessor_id is not None:
        return "assessor.xml", f"/data/experiments/{folder.assessor_id}"
    return None


class Documents:
    """Puts each object's document among the entries of its folder (the
    archive area's hook for its listings)."""

    kinds: tuple[Kind, ...] = (PROJECT, SUBJECT, SESSION, SCAN, ASSESSOR)

    def __init__(self, tree: Tree, archive: ArchiveArea | None = None,
                 nursery: trio.Nursery | None = None) -> None:
        self.tree = tree
        self.archive = archive
        self.ahead = WalkAhead(tree, nursery) if nursery is not None else None

    def entries(self, folder: Node) -> list[Node]:
        """``folder``'s document, or nothing (no request: listing it is free)."""
        named = document_uri(folder)
        if named is None:
            return []
        name, uri = named
        generator = DocumentFile(self.tree, uri, self.ahead, self._children_of(folder))
        return [generated_file(self.tree, folder, name, ("document", folder.key),
                               generator, mtime_ns=folder.mtime_ns)]

    def _children_of(self, folder: Node) -> Callable[[], Awaitable[list[str]]] | None:
        """The URLs of the documents of ``folder``'s children, from the listings a
        walk into it makes anyway (None: it has none)."""
        archive = self.archive
        if archive is None or self.ahead is None:
            return None
        project, subject_id, experiment_id = folder.project, folder.subject_id, folder.experiment_id
        if folder.kind is PROJECT:
            async def subjects() -> list[str]:
                return [f"/data/projects/{project}/subjects/{s.id}"
                        for s in await archive.subjects(project)]
            return subjects
        ahead = self.ahead
        if folder.kind is SUBJECT and subject_id:
            async def sessions() -> list[str]:
                experiments = await archive.subject_experiments(project, subject_id)
                for e in experiments:  # what listing each session takes, too
                    ahead.listing(archive.session_detail, e.id)
                return [f"/data/experiments/{e.id}" for e in experiments]
            return sessions
        if folder.kind is SESSION and experiment_id:
            async def scans_and_assessors() -> list[str]:
                ahead.listing(archive.session_files, experiment_id)
                detail = await archive.session_detail(experiment_id)
                return ([f"/data/experiments/{experiment_id}/scans/{scan.id}"
                         for scan in detail.scans]
                        + [f"/data/experiments/{a.id}" for a in detail.assessors])
            return scans_and_assessors
        return None

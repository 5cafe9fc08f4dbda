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
"""

from __future__ import annotations

from ..tree import Kind, Node, Tree
from .archive import ASSESSOR, PROJECT, SCAN, SESSION, SUBJECT
from .generated import generated_file


class DocumentFile:
    """The :class:`~.generated.Generator` of one object's document, at ``uri``
    (``/data/...``, the object's own URL)."""

    def __init__(self, tree: Tree, uri: str) -> None:
        self.tree = tree
        self.uri = uri

    def size(self, node: Node) -> int:
        return len(node.text)  # as last fetched; stat refreshes first (timeout 0)

    async def refresh(self, node: Node) -> None:
        node.text = await self.body()

    async def content(self, node: Node) -> bytes:
        node.text = await self.body()
        return node.text

    async def body(self) -> bytes:
        """The document, cached like a listing (NotFound: the object is gone)."""
        document: bytes = await self.tree.cached(
            ("document", self.uri), lambda: self.tree.client.get_document(self.uri))
        return document


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

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def entries(self, folder: Node) -> list[Node]:
        """``folder``'s document, or nothing (no request: listing it is free)."""
        named = document_uri(folder)
        if named is None:
            return []
        name, uri = named
        return [generated_file(self.tree, folder, name, ("document", folder.key),
                               DocumentFile(self.tree, uri), mtime_ns=folder.mtime_ns)]

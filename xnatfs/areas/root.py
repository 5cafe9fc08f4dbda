"""The mount's root folder: each area's top entries (the projects, ``uploads/``,
``prearchive/``), in the order the areas are given, and the names that resolve
there without being listed (accession IDs, :mod:`.accession`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from ..tree import ROOT, Node, Tree
from .base import Area, Kernel


class RootArea(Area):
    kinds = (ROOT,)

    def __init__(self, tree: Tree, kernel: Kernel, areas: Sequence[Area], *,
                 unlisted: Callable[[Node, str], Awaitable[Node | None]] | None = None
                 ) -> None:
        super().__init__(tree, kernel)
        self.areas = areas
        self.unlisted = unlisted  # names that resolve without being listed (accession IDs)

    async def children(self, node: Node) -> list[Node]:
        entries: list[Node] = []
        for area in self.areas:
            entries += await area.top_entries(node)
        return entries

    async def unlisted_child(self, parent: Node, name: str) -> Node | None:
        return await self.unlisted(parent, name) if self.unlisted is not None else None

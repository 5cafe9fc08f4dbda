"""The mount's root folder: each area's top entries (the projects, ``uploads/``,
``prearchive/``), in the order the areas are given."""

from __future__ import annotations

from collections.abc import Sequence

from ..tree import ROOT, Node, Tree
from .base import Area, Kernel


class RootArea(Area):
    kinds = (ROOT,)

    def __init__(self, tree: Tree, kernel: Kernel, areas: Sequence[Area]) -> None:
        super().__init__(tree, kernel)
        self.areas = areas

    async def children(self, node: Node) -> list[Node]:
        entries: list[Node] = []
        for area in self.areas:
            entries += await area.top_entries(node)
        return entries

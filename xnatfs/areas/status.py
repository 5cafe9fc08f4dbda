"""``.xnatfs-status.json`` in the mount's root: the mount's counters
(:mod:`xnatfs.status`), made afresh at each open, read-only.

Its name has a dot, which no XNAT project ID has (``[A-Za-z0-9_-]+``), so no
project can hide it or be hidden by it; the leading dot keeps it out of
``ls`` and of shell globs (``for p in /mnt/xnat/*``) that walk the projects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..status import STATUS_FILE_NAME, gather, to_json
from ..tree import Node, Tree
from .base import Area, Kernel
from .generated import generated_file


class StatusDocument:
    """The status file's :class:`~.generated.Generator`: the counters as JSON."""

    def __init__(self, counters: Callable[[], dict[str, Any]]) -> None:
        self.counters = counters

    def size(self, node: Node) -> int:
        # The size of what an open now would read: stat and cat agree, and
        # tools that go by st_size (tail, wc -c) read it all.
        return len(self._bytes())

    async def refresh(self, node: Node) -> None:
        pass

    async def content(self, node: Node) -> bytes:
        return self._bytes()

    def _bytes(self) -> bytes:
        return to_json(self.counters())


class StatusArea(Area):
    """Puts the status file in the root; the generated area answers for it."""

    def __init__(self, tree: Tree, kernel: Kernel, counters: Callable[[], dict[str, Any]]
                 ) -> None:
        super().__init__(tree, kernel)
        self.document = StatusDocument(counters)

    async def top_entries(self, root: Node) -> list[Node]:
        return [generated_file(self.tree, root, STATUS_FILE_NAME, ("mount-status",),
                               self.document, mtime_ns=self.tree.mount_time_ns)]


__all__ = ["StatusArea", "StatusDocument", "gather"]

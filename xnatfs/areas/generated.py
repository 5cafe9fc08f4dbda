"""Generated files: text the mount writes itself, such as ``UPLOAD_STATUS.txt``
and a prearchive session's ``prearchive-info.json``.

Another area puts such a file in one of its folders with :func:`generated_file`
and a :class:`Generator` that says what the file holds; this area answers
everything else. Their content changes at any time, so it is made afresh at
each open and read past the page cache, and the kernel keeps no size of
theirs: a size it kept would cut ``tail`` and ``wc -c`` short (they go by
``st_size``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

from ..tree import Kind, Node, Tree
from .base import Area, Handle, Writer

GENERATED = Kind("generated", is_dir=False)


class Generator(Protocol):
    """What a generated file holds."""

    def size(self, node: Node) -> int:
        """Its size now (without waiting: ``ls -l`` asks for it)."""

    async def refresh(self, node: Node) -> None:
        """Bring its size and attributes up to date (NotFound: it is gone)."""

    async def content(self, node: Node) -> bytes:
        """Its content, made now (at open)."""


def generated_file(tree: Tree, parent: Node, name: str, key: Hashable, generator: Generator,
                   **fields: Any) -> Node:
    """The generated file ``name`` in ``parent``."""
    return tree.child(parent, GENERATED, name, key, generator=generator, **fields)


class GeneratedHandle(Handle):
    direct_io = True

    def __init__(self, node: Node, content: bytes) -> None:
        super().__init__(node)
        self.content = content

    async def read(self, offset: int, size: int) -> bytes:
        return self.content[offset:offset + size]


class GeneratedArea(Area):
    """Read-only files whose content is made at open."""

    kinds = (GENERATED,)

    def size(self, node: Node) -> int:
        return int(node.generator.size(node))

    def timeouts(self, node: Node) -> tuple[float, float]:
        return self.tree.metadata_ttl, 0

    async def refresh(self, node: Node) -> None:
        await node.generator.refresh(node)

    async def refresh_xattrs(self, node: Node) -> None:
        await node.generator.refresh(node)

    async def open(self, node: Node, *, writing: bool, truncate: bool, writer: Writer) -> Handle:
        if writing:
            return await super().open(node, writing=writing, truncate=truncate, writer=writer)
        return GeneratedHandle(node, await node.generator.content(node))

"""What every area answers, and the refusals it inherits.

An area is one part of the mount with rules of its own (the archive, the
upload area, the prearchive, the generated files). It owns its kinds of node
and decides what each file operation means for them, like a Linux inode's
operations table: name operations (``create``, ``mkdir``, ``unlink``,
``rmdir``, ``rename``, links) go to the area of the *folder* they change,
the others (``open``, attributes, extended attributes) to the area of the
node itself. Whatever an area does not override is refused here, in one
place, with the errno a user expects: the archive is read-only (EROFS).

Areas know nothing of FUSE: they raise :mod:`xnatfs.errors`, which ``fs.py``
maps to errnos, and tell the kernel about changed names through
:class:`Kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import BadHandle, InvalidArgument, NoAttribute, NotSupported, ReadOnly
from ..tree import Kind, Node, Tree

OWN_XATTRS = ("user.xnat.", "user.xnatfs.")  # what the mount tells; never stored


class Kernel(Protocol):
    """What an area may tell the kernel (``fs.py`` implements it)."""

    def forget_entry(self, parent_inode: int, name: str, inode: int = 0) -> None:
        """The name ``name`` in ``parent_inode`` changed (``inode``: it was
        deleted, and this was its node)."""

    async def drop_pages(self, inode: int) -> None:
        """The kernel must not serve ``inode``'s cached pages again."""


@dataclass(frozen=True)
class Writer:
    """Who opens a file: the process, for the upload area's flush."""

    pid: int


class Handle:
    """An open file. Reads, writes and closes go to its handle, which its area
    made at ``open``; what a handle does not do is refused."""

    direct_io = False   # the kernel must not cache its pages (content made on open, uploads)
    keep_cache = False  # the kernel may keep the pages it has from an earlier open

    def __init__(self, node: Node) -> None:
        self.node = node

    async def read(self, offset: int, size: int) -> bytes:
        raise BadHandle("not open for reading")

    async def write(self, offset: int, data: bytes) -> int:
        raise BadHandle(f"{self.node.name} is not open for writing")

    async def flush(self) -> None:
        """A close(2) of one of its descriptors."""

    async def fsync(self, datasync: bool) -> None:
        pass

    async def release(self) -> None:
        """The last descriptor is closed."""


class Area:
    """The defaults: a read-only part of the mount."""

    kinds: tuple[Kind, ...] = ()

    def __init__(self, tree: Tree, kernel: Kernel) -> None:
        self.tree = tree
        self.kernel = kernel

    # ------------------------------------------------------------- contents
    async def children(self, node: Node) -> list[Node]:
        """Every entry of the folder ``node``, in a stable order."""
        return []

    def shown(self, entries: list[Node]) -> list[Node]:
        """The entries a listing shows (an area may hide some it still knows)."""
        return entries

    async def unlisted_child(self, parent: Node, name: str) -> Node | None:
        """A name that resolves without being listed."""
        return None

    async def top_entries(self, root: Node) -> list[Node]:
        """What this area puts in the mount's root folder."""
        return []

    # ------------------------------------------------------------ attributes
    def writable(self, node: Node) -> bool:
        """Whether the node's mode shows the owner may write (the kernel checks it)."""
        return False

    def size(self, node: Node) -> int:
        return node.size

    def timeouts(self, node: Node) -> tuple[float, float]:
        """How long the kernel may keep the node's entry and its attributes."""
        return self.tree.metadata_ttl, self.tree.metadata_ttl

    async def refresh(self, node: Node) -> None:
        """Bring the node up to date before its attributes are given (NotFound:
        it is gone)."""

    async def setattr(self, node: Node, *, size: int | None, mtime_ns: int | None) -> None:
        raise ReadOnly(f"{node.name} cannot be changed")

    def readlink(self, node: Node) -> bytes:
        raise InvalidArgument(f"{node.name} is not a link")

    # ------------------------------------------------------------ open files
    async def open(self, node: Node, *, writing: bool, truncate: bool, writer: Writer) -> Handle:
        raise ReadOnly(f"{node.name} cannot be opened here")

    # ----------------------------------------------- names in a folder of ours
    async def create(self, parent: Node, name: str, writer: Writer) -> tuple[Node, Handle]:
        raise ReadOnly(f"no files can be made in {parent.name or '/'}")

    async def mkdir(self, parent: Node, name: str) -> Node:
        raise ReadOnly(f"no folders can be made in {parent.name or '/'}")

    async def unlink(self, parent: Node, node: Node) -> None:
        raise ReadOnly(f"{node.name} cannot be removed")

    async def rmdir(self, parent: Node, node: Node) -> None:
        raise ReadOnly(f"{node.name} cannot be removed")

    async def rename(self, node: Node, new_parent: Node, new_name: str) -> None:
        raise ReadOnly(f"{node.name} cannot be moved")

    def refuse_special(self, parent: Node) -> None:
        """A link or device file made in ``parent``: never stored anywhere."""
        raise ReadOnly(f"nothing can be made in {parent.name or '/'}")

    # -------------------------------------------------- extended attributes
    async def refresh_xattrs(self, node: Node) -> None:
        """Our own attributes are about to be read: bring them up to date."""

    def user_xattrs(self, node: Node) -> dict[str, bytes]:
        """``user.*`` attributes set on the node by the user (kept by the upload area)."""
        return {}

    async def getxattr(self, node: Node, key: str) -> bytes:
        if key.startswith(OWN_XATTRS):
            await self.refresh_xattrs(node)
        elif key in (stored := self.user_xattrs(node)):
            return stored[key]
        value = node.xattrs.get(key)
        if value is None:
            raise NoAttribute(key)
        return value.encode()

    async def listxattr(self, node: Node) -> list[str]:
        """Brought up to date first, as for ``getxattr``: ``getfattr -d`` reads only
        the names listed."""
        await self.refresh_xattrs(node)
        return [*node.xattrs, *self.user_xattrs(node)]

    async def setxattr(self, node: Node, key: str, value: bytes) -> None:
        """Not supported, rather than read-only: ``cp -a``/``mv`` copy a file's ACL
        (``system.posix_acl_access``) and treat ENOTSUP as "nothing to keep",
        where EROFS fails them."""
        raise NotSupported(key)

    async def removexattr(self, node: Node, key: str) -> None:
        raise NotSupported(key)

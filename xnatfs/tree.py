"""The common tree under every area: nodes, inode numbers, lookup counts, and
the metadata cache.

Each area of the mount (``xnatfs/areas/``) makes its own kinds of node and
answers what they contain and what file operations mean for them; the tree
keeps what all of them share:

* **Inode numbers.** A node's number is a hash of its key (what it is in
  XNAT), so an entry keeps its number when it is made again, and across
  remounts, with nothing kept per entry.
* **Lifetimes.** A node lives while the kernel holds it (its FUSE lookup
  count is above zero) or a listing still being served refers to it; after
  the kernel forgets it, it is dropped and made again from the listings when
  next wanted, so a walk over a whole archive leaves nothing behind.
* **Listings.** Cached for ``metadata_ttl`` seconds; a listing wanted by many
  callers at once is fetched once; names that do not exist are remembered for
  ``negative_ttl`` seconds.
* **Names.** A name a server gives twice in one folder reaches both entries
  (the later ones get a ``%~`` suffix).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio
from cachetools import TTLCache

from .errors import NotFound, XnatError
from .naming import NAME_MAX

if TYPE_CHECKING:  # node payloads of lower layers, for type checking only
    from .client import RemoteFile
    from .spoolfiles import Upload

ROOT_INODE = 1


@dataclass(frozen=True, eq=False)
class Kind:
    """What a node is. Each area makes its own kinds and registers for them, so
    that every node leads to the one area that knows what it means."""

    name: str
    is_dir: bool = True
    is_link: bool = False

    def __repr__(self) -> str:
        return f"<Kind {self.name}>"


ROOT = Kind("root")


@dataclass
class Node:
    """One file or directory. ``key`` says what it is in XNAT and keeps its inode
    stable; the other fields are what its area needs to list and open it."""

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
    folder: str = ""                       # path of a folder inside its resource ("" = files/)
    file: RemoteFile | None = None         # a file listed by XNAT
    xattrs: dict[str, str] = field(default_factory=dict)
    prearchive_uri: str = ""               # set on everything below a prearchive session
    upload: Upload | None = None           # a file in the upload area
    relpath: str = ""                      # below uploads/<PROJECT>/ for upload nodes
    text: bytes = b""                      # a generated file's content when last made,
                                           # a link's target
    generator: Any = None                  # what makes a generated file's content

    @property
    def is_dir(self) -> bool:
        return self.kind.is_dir

    @property
    def size(self) -> int:
        if self.file is not None:
            return self.file.size
        if self.upload is not None:
            return self.upload.record.size
        return len(self.text)


class Area(Protocol):
    """What the tree asks of an area (``xnatfs/areas/base.py`` has the rest)."""

    @property
    def kinds(self) -> tuple[Kind, ...]: ...

    async def children(self, node: Node) -> list[Node]: ...

    def shown(self, entries: list[Node]) -> list[Node]: ...

    async def unlisted_child(self, parent: Node, name: str) -> Node | None: ...


class Tree:
    """Inodes, names and the metadata cache, shared by the areas of the mount."""

    def __init__(self, client: Any, *, metadata_ttl: float = 60.0,
                 negative_ttl: float = 5.0, max_listings: int = 20_000) -> None:
        self.client = client
        self.metadata_ttl = max(metadata_ttl, 1.0)
        self._areas: dict[Kind, Area] = {}
        # Every live node; the kernel's (and the root) are also held in _held.
        self._nodes: weakref.WeakValueDictionary[int, Node] = weakref.WeakValueDictionary()
        self._held: dict[int, Node] = {}
        self._lookups: dict[int, int] = {}  # the kernel's lookup count of each held node
        self._forget_listeners: list[Callable[[int], None]] = []
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
        self.mount_time_ns = int(dt.datetime.now().timestamp() * 1e9)
        root = Node(ROOT_INODE, ROOT, "", ROOT_INODE, ("root",), mtime_ns=self.mount_time_ns)
        self._nodes[ROOT_INODE] = self._held[ROOT_INODE] = root

    # ------------------------------------------------------------------ areas
    def register(self, area: Area) -> None:
        """``area`` answers for the kinds it names."""
        for kind in area.kinds:
            if kind in self._areas:
                raise ValueError(f"two areas claim {kind}")
            self._areas[kind] = area

    def area_of(self, node: Node) -> Any:
        """The area that knows what ``node`` means."""
        return self._areas[node.kind]

    # ------------------------------------------------------------------ nodes
    @property
    def root(self) -> Node:
        return self._held[ROOT_INODE]

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"inode {inode} is unknown") from None

    def live_nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def live(self, key: Hashable) -> Node | None:
        """The live node for ``key``, if there is one."""
        return self._slot(key)[1]

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

    def child(self, parent: Node, kind: Kind, name: str, key: Hashable, **fields: Any) -> Node:
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

    def rekey(self, node: Node, key: Hashable) -> None:
        """``node`` now stands for ``key`` (a folder renamed in place): it keeps its
        number, and the kernel's entry with it."""
        self._displaced.pop(node.key, None)
        node.key = key
        self._displaced[key] = node.inode

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
        for listener in self._forget_listeners:
            listener(inode)
        return True

    def add_forget_listener(self, listener: Callable[[int], None]) -> None:
        """``listener(inode)`` is called once the kernel holds ``inode`` no more."""
        self._forget_listeners.append(listener)

    def entries_made_from(self, node: Node, sources: tuple[object, ...]) -> list[Node] | None:
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

    def last_entries(self, inode: int) -> list[Node]:
        """The entries of ``inode`` as last listed (hidden ones too)."""
        return self._entries.get(inode, [])

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

    def is_cached_or_coming(self, key: Hashable) -> bool:
        return key in self._listings or key in self._inflight

    def invalidate(self, key: Hashable) -> None:
        self._listings.pop(key, None)

    def peek(self, key: Hashable) -> Any:
        """A cached listing, or None; nothing is fetched."""
        return self._listings.get(key)

    def invalidate_where(self, wanted: Callable[[Hashable], bool]) -> None:
        """Forget every cached listing whose key ``wanted`` picks, and every name
        looked up in vain (it may exist now)."""
        for key in list(self._listings.keys()):
            if wanted(key):
                self._listings.pop(key, None)
        self._negative.clear()

    def forget_negative(self, parent_inode: int | None = None) -> None:
        """A name was just created under ``parent_inode`` (None: anywhere): drop
        remembered misses there."""
        if parent_inode is None:
            self._negative.clear()
            return
        for key in [k for k in self._negative.keys() if k[0] == parent_inode]:
            self._negative.pop(key, None)

    # ---------------------------------------------------------------- names
    async def children(self, inode: int) -> list[Node]:
        """A directory's entries, in a stable order."""
        node = self.node(inode)
        area = self.area_of(node)
        entries: list[Node] = _unique_names(await area.children(node))
        self._entries[inode] = entries  # all of them: a listing reused must show the hidden again
        return area.shown(entries)

    async def lookup(self, parent_inode: int, name: str) -> Node:
        parent = self.node(parent_inode)
        if (parent_inode, name) in self._negative:
            raise NotFound(name)
        for child in await self.children(parent_inode):
            if child.name == name:
                return child
        unlisted = await self.area_of(parent).unlisted_child(parent, name)
        if unlisted is not None:
            return unlisted
        self._negative[(parent_inode, name)] = True
        raise NotFound(name)

    async def existing_child(self, parent_inode: int, name: str) -> Node | None:
        """The entry ``name`` in ``parent_inode``, or None (also when the server
        cannot say)."""
        try:
            return await self.lookup(parent_inode, name)
        except XnatError:
            return None


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


def xnat_xattrs(**values: str | None) -> dict[str, str]:
    """Extended attributes under ``user.xnat.*``, skipping empty values."""
    return {f"user.xnat.{k}": v for k, v in values.items() if v}


def time_ns(stamp: str | None, default: int) -> int:
    """XNAT's ``2023-09-27 17:31:21.352`` (or a bare date) as nanoseconds."""
    if not stamp:
        return default
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return int(dt.datetime.strptime(stamp, fmt).timestamp() * 1e9)
        except ValueError:
            continue
    return default

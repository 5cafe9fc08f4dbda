"""What the block cache keeps per file: its identity, the blocks on their way,
and the bookkeeping of a file being read.

Plain data, with no I/O: the tiers (:mod:`.disk`), the downloads
(:mod:`.downloads`) and the digest check (:mod:`.integrity`) all read and
change a :class:`FileState`, so it is defined below all of them.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import trio

from ..client import ByteStream

Block = bytes | bytearray


@dataclass(frozen=True)
class FileIdentity:
    """What a block belongs to: a changed size or digest is a different file."""

    uri: str
    size: int
    digest: str | None

    @functools.cached_property
    def key(self) -> str:  # computed once: every read of every block asks for it
        raw = f"{self.uri}\0{self.size}\0{self.digest or ''}".encode()
        return hashlib.sha256(raw).hexdigest()[:40]


class PendingBlock:
    """A block being downloaded; readers wait for the prefix they need."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.buffer: bytearray | None = None  # allocated with the first byte
        self.filled = 0
        self.error: BaseException | None = None
        self._waiters: list[tuple[int, trio.Event]] = []

    @property
    def complete(self) -> bool:
        return self.filled >= self.length

    def feed_at(self, within: int, data: memoryview) -> None:
        """Bytes that belong at offset ``within``; only what extends the filled prefix counts."""
        end = within + len(data)
        if within > self.filled or end <= self.filled:
            return
        if self.buffer is None:
            self.buffer = bytearray(self.length)
        self.buffer[self.filled:end] = data[self.filled - within:]
        self.filled = end
        ready = [w for w in self._waiters if w[0] <= end]
        if ready:
            self._waiters = [w for w in self._waiters if w[0] > end]
            for _, event in ready:
                event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        for _, event in self._waiters:
            event.set()
        self._waiters = []

    async def wait_for(self, end: int) -> None:
        """Return once ``buffer[:end]`` is filled; raise if the download failed first."""
        while self.filled < end:
            if self.error is not None:
                raise self.error
            event = trio.Event()
            self._waiters.append((end, event))
            await event.wait()

    def view(self, lo: int, hi: int) -> memoryview:
        assert self.buffer is not None and hi <= self.filled
        return memoryview(self.buffer)[lo:hi]


@dataclass(eq=False)
class Download:
    """A running whole-file download (servers without Range): where it is, where it stops."""

    position: int
    stop: int
    halted: bool = False  # it should stop: paused too long, or its slot is wanted


@dataclass(eq=False)
class FileState:
    """Per-file bookkeeping while a file is being read."""

    ident: FileIdentity
    nblocks: int
    pending: dict[int, PendingBlock] = field(default_factory=dict)
    on_disk: set[int] = field(default_factory=set)
    loading: dict[int, trio.Event] = field(default_factory=dict)  # disk reads under way
    downloads: list[Download] = field(default_factory=list)       # whole-file streams
    wanted: int = 0             # furthest byte asked for (by readers or a prefetch)
    progress: trio.Event = field(default_factory=trio.Event)  # set when wanted or hash_next grow
    fetched: bool = False       # a block was downloaded, not just found in a cache
    end_served: bool = False    # a read asked for the end of the file
    dropped: bool = False       # its blocks were dropped: the state is dead
    next_read: int = -1         # where a sequential reader would read next
    window: int = 0             # current read-ahead, bytes
    ahead_until: int = 0        # blocks below this index are already on their way
    census: trio.Event | None = None  # set once on_disk lists what the disk had
    hasher: object = None
    hash_next: int = 0          # next block index to feed into the digest check
    hashing: bool = False
    hash_done: trio.Event = field(default_factory=trio.Event)
    verified: bool | None = None  # digest matched / did not / not known yet
    version: str | None = None  # Last-Modified of its first download: every later one must match
    received: int = 0           # bytes received by its finished downloads
    arrived_at: float = float("-inf")  # trio time its last downloaded bytes arrived
    streams: list[ByteStream] = field(default_factory=list)  # its downloads under way
    shared_claims: set[int] = field(default_factory=set)  # blocks this mount claimed in the shared tier
    claiming: dict[int, trio.Event] = field(default_factory=dict)  # claims still being written
    from_shared: set[int] = field(default_factory=set)    # blocks that came from the shared tier


@dataclass
class CacheStatistics:
    memory_hits: int = 0
    disk_hits: int = 0
    disk_lookups: int = 0
    fetched_blocks: int = 0
    fetch_requests: int = 0
    digest_checks: int = 0
    digest_failures: int = 0
    bytes_from_cache: int = 0  # read bytes that were already there (memory or disk)
    downloads_running: int = 0  # downloads from XNAT under way now
    bytes_from_shared: int = 0  # read bytes of blocks that came from the shared tier
    shared_published: int = 0   # blocks this mount put in the shared tier
    shared_bad: int = 0         # damaged shared entries found (and removed)
    shared_outages: int = 0     # shared-tier calls that failed or hung


def want(state: FileState, end: int) -> None:
    """Note that bytes up to ``end`` are asked for; wake the streams paused short of them."""
    if end > state.wanted:
        state.wanted = end
        progressed(state)


def progressed(state: FileState) -> None:
    """Wake the streams paused on ``state.progress`` (what is asked for, or hashed, moved on)."""
    state.progress.set()
    state.progress = trio.Event()

"""Lazy, block-cached file contents: fetched once, shared by all readers, kept on disk.

A file is cut into fixed-size blocks keyed by the file's identity (URI, size
and digest), so a file changed on the server never hits stale blocks. A block
is looked for in memory (a small LRU of hot blocks), then on disk, and only
then fetched; a reader is woken as soon as the bytes it asked for have
arrived, and a whole file is checked against its listed MD5 before its end
is returned.

How the package is laid out, one concern a module:

* :mod:`.blocks`: what is kept per file: :class:`FileIdentity`, the pending
  blocks downloads fill and readers wait on, a file's bookkeeping while it is
  read (``FileState``), the statistics. Plain data.
* :mod:`.disk`: the disk tier: block files (through ``directdisk``; eviction
  is the disk cache's own, least recently stored), the index of cached files
  read at mount time, a file's census, the disk read-ahead, the stores.
* :mod:`.shared`: the shared tier on a cluster file system (``--shared-cache``):
  block files published by rename, claims, pruning. Blocking calls only.
* :mod:`.sharedtier`: the block cache's use of it, from worker threads,
  bounded: looked up after the disk and before XNAT, filled after a download.
* :mod:`.integrity`: the digest check, and dropping a file's blocks when they
  are wrong.
* :mod:`.downloads`: ranged blocks in parallel, the single streaming download
  when the server ignores Range, its pacing, ``Last-Modified``.
* :mod:`.cache`: :class:`BlockCache`, the façade (``read``,
  ``prefetch_whole``, ``first_bytes``, ``received``, ``add_drop_listener``,
  ``drop``, ``close``) and the read path with its read-ahead window.

Composition: the layers are classes that add methods, never state, each on
the one below (:class:`~.disk.DiskTier` ← :class:`~.sharedtier.SharedTier` ←
:class:`~.integrity.DigestCheck` ←
:class:`~.downloads.Downloads` ← :class:`BlockCache`), and ``BlockCache``
sets the state they share in its ``__init__``. A read calls them as methods
of one object, as it did when this was one module: no forwarding layer, no
attribute chain per read. Imports go one way, down that chain.

The tuning constants are re-exported here to be read; each module reads its
own, so a test that changes one patches the module that holds it
(``PAUSED_DOWNLOAD_LIMIT``: :mod:`.downloads`).
"""

from __future__ import annotations

from .blocks import Block, CacheStatistics, Download, FileIdentity, FileState, PendingBlock
from .cache import DEFAULT_BLOCK_SIZE, SEQUENTIAL_AHEAD, SEQUENTIAL_BEHIND, BlockCache
from .disk import DISK_READ_AHEAD_BLOCKS
from .sharedtier import prepare_shared
from .downloads import PAUSED_DOWNLOAD_LIMIT, PAUSED_DOWNLOAD_POLL

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DISK_READ_AHEAD_BLOCKS",
    "PAUSED_DOWNLOAD_LIMIT",
    "PAUSED_DOWNLOAD_POLL",
    "SEQUENTIAL_AHEAD",
    "SEQUENTIAL_BEHIND",
    "Block",
    "BlockCache",
    "CacheStatistics",
    "Download",
    "FileIdentity",
    "FileState",
    "PendingBlock",
    "prepare_shared",
]

"""The areas of the mount, one module each, and the one place they are put together.

========================  ==================================================
``archive``               projects down to scans and assessors (and mkdir of a subject)
``resources``             resources at every level, read and written (results)
``uploads``               ``uploads/``: files dropped there are sent to XNAT
``prearchive``            ``prearchive/``: archive, move and delete sessions
``generated``             files whose text the mount writes (status, info)
``documents``             not an area: each object's XML document (generated files)
``accession``             accession IDs as links to the labelled folders
``status``                ``.xnatfs-status.json`` in the root: the mount's counters
``snapshot``              a snapshot mount's tree (``--snapshot``), in place of all but status
``root``                  the root folder: each area's top entries
``remote_files``          not an area: reading listed files, for archive and prearchive
``tables``                not an area: project tables (CSV) and subjects'/sessions' metadata
                          attributes, for archive
========================  ==================================================

Adding an area: write its module (kinds, an :class:`~.base.Area` subclass
with what it allows), make it here, and give it to the root if it has a top
folder. ``fs.py`` needs no change. See ``docs/architecture.md``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..blockcache import BlockCache
from ..deadlines import Deadlines
from ..tree import Node, Tree
from ..imports import UploadManager
from ..results import ResultWrites
from ..snapshot import Snapshot
from ..status import StatusSources, gather
from .accession import AccessionArea
from .archive import ArchiveArea
from .base import Area, Kernel
from .documents import Documents
from .generated import GeneratedArea
from .prearchive import PrearchiveArea
from .remote_files import RemoteFiles
from .resources import ResourceArea
from .root import RootArea
from .snapshot import CHECK_FIRST, SnapshotArea
from .status import StatusArea
from .uploads import UploadArea


class MountAreas(Protocol):
    """What ``fs.py`` asks of a mount's areas as a whole."""

    async def local_space(self) -> os.statvfs_result: ...

    async def sync(self) -> None: ...


@dataclass
class Areas:
    """Every area of one mount, registered with its tree."""

    tree: Tree
    archive: ArchiveArea
    resources: ResourceArea
    uploads: UploadArea
    prearchive: PrearchiveArea
    generated: GeneratedArea
    accession: AccessionArea
    root: RootArea

    def of(self, node: Node) -> Area:
        """The area that answers for ``node``."""
        area: Area = self.tree.area_of(node)
        return area

    async def local_space(self) -> os.statvfs_result:
        """The local disk that holds what the mount keeps (``df`` on the mount)."""
        return await self.uploads.local_space()

    async def sync(self) -> None:
        """fsync of a folder: every file written behind a close is in XNAT (or failed)."""
        await self.resources.sync()
        await self.uploads.manager.sync()


def install(tree: Tree, kernel: Kernel, *, blocks: BlockCache, uploads: UploadManager,
            deadlines: Deadlines, nursery: trio.Nursery,
            prearchive_ttl: float | None = None, results: ResultWrites | None = None,
            allow_overwrite: bool = False, allow_delete: bool = False,
            failures: Counter[str] | None = None, started: float | None = None) -> Areas:
    """Make the areas of a mount and register them with ``tree``.

    ``failures``: the failed file operations by errno name (``fs.py`` counts
    them), for the status file; ``started``: when the mount began (Unix time)."""
    files = RemoteFiles(tree, blocks, kernel, deadlines, nursery)
    archive = ArchiveArea(tree, kernel, files)
    resources = ResourceArea(tree, kernel, archive, files, results,
                             allow_overwrite=allow_overwrite, allow_delete=allow_delete,
                             nursery=nursery)
    prearchive = PrearchiveArea(tree, kernel, archive, files, ttl=prearchive_ttl)
    upload_area = UploadArea(tree, kernel, uploads, on_imported=prearchive.invalidate,
                             on_sheet_applied=archive.invalidate_project)
    if results is not None:  # its files are in UPLOAD_STATUS.txt too
        upload_area.status_file.spools.append(results)
    generated = GeneratedArea(tree, kernel)
    archive.extra_entries = Documents(tree, archive, nursery).entries
    accession = AccessionArea(tree, kernel, archive)
    archive.unlisted_by_id = accession.in_folder
    # The areas' own folders first: a project whose ID is `uploads` or
    # `prearchive` is listed after them, and so gets the %~ suffix of names
    # listed twice instead of hiding (or being hidden by) the area.
    spools = [uploads] + ([results] if results is not None else [])
    sources = StatusSources(tree.client, blocks, spools, failures if failures is not None
                            else Counter(), time.time() if started is None else started)
    status = StatusArea(tree, kernel, lambda: gather(sources))
    # The status file's name has a dot, which no project ID has: no clash to order.
    root = RootArea(tree, kernel, [upload_area, prearchive, status, archive],
                    unlisted=accession.at_root)
    areas = Areas(tree, archive, resources, upload_area, prearchive, generated, accession, root)
    for area in (root, archive, resources, upload_area, prearchive, generated, accession):
        tree.register(area)
    return areas


@dataclass
class SnapshotAreas:
    """The areas of a snapshot mount: the snapshot's tree and the status file."""

    tree: Tree
    snapshot: SnapshotArea
    root: RootArea
    cache_dir: Path

    async def local_space(self) -> os.statvfs_result:
        """The disk of the block cache (nothing is written into the mount)."""
        return await trio.to_thread.run_sync(os.statvfs, self.cache_dir)

    async def sync(self) -> None:
        """Nothing is ever written: nothing to wait for."""


def install_snapshot(tree: Tree, kernel: Kernel, snapshot: Snapshot, *, blocks: BlockCache,
                     deadlines: Deadlines, nursery: trio.Nursery, cache_dir: Path,
                     check_first: int = CHECK_FIRST,
                     failures: Counter[str] | None = None,
                     started: float | None = None) -> SnapshotAreas:
    """Make the areas of a snapshot mount (``--snapshot``): the root shows the
    snapshot's projects and the status file; no uploads, no prearchive, no
    documents or tables (a snapshot pins only what XNAT lists)."""
    files = RemoteFiles(tree, blocks, kernel, deadlines, nursery)
    area = SnapshotArea(tree, kernel, snapshot, files, check_first=check_first)
    sources = StatusSources(tree.client, blocks, [], failures if failures is not None
                            else Counter(), time.time() if started is None else started)
    status = StatusArea(tree, kernel, lambda: gather(sources))
    root = RootArea(tree, kernel, [status, area])
    for registered in (root, area, GeneratedArea(tree, kernel)):
        tree.register(registered)
    return SnapshotAreas(tree, area, root, cache_dir)

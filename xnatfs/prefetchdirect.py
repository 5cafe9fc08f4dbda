"""``xnatfs prefetch --url SITE PROJECT[/SUBJECT[/SESSION[/scans/SCAN]]]``: no mount.

For a login node without FUSE (or without a mount): the files are found with
the mount's own tree and areas (the same listings, the same names, the same
``%~`` suffixes), and read through the same :class:`~xnatfs.blockcache.BlockCache`
into the same cache folder (``--cache-dir``): a mount started later on this
machine finds their blocks and downloads nothing. With ``--to DIR`` the bytes
are also written into ``DIR`` under the mount's layout.

Everything runs in one trio nursery, as in :mod:`.mount`; Ctrl-C and SIGTERM
cancel the reads (blocks already downloaded are still written to the cache:
its writes are shielded) and the summary says so.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import trio

from .areas.archive import (ASSESSOR, ASSESSORS, FILE, FOLDER, PROJECT, RESOURCE, RESOURCES,
                            SCAN, SCANS, SESSION, SUBJECT, ArchiveArea)
from .areas.generated import GeneratedArea
from .areas.remote_files import RemoteFiles, identity
from .areas.resources import ResourceArea
from .areas.root import RootArea
from .blockcache import DEFAULT_BLOCK_SIZE, BlockCache, prepare_shared
from .client import XnatClient
from .deadlines import Deadlines
from .errors import XnatError
from .naming import safe_name
from .prefetch import Destination, Item, PartFile, PrefetchError
from .progress import Progress
from .tree import Node, Tree

# The folders a walk goes down into; everything else (documents, tables,
# links) is skipped.
WALKED = frozenset({PROJECT, SUBJECT, SESSION, SCANS, SCAN, ASSESSORS, ASSESSOR, RESOURCES,
                    RESOURCE, FOLDER})
LISTING_TTL = 3600.0  # s: one walk lists each folder once


class NoKernel:
    """The areas' :class:`~xnatfs.areas.base.Kernel` without one: no pages to drop."""

    def forget_entry(self, parent_inode: int, name: str, inode: int = 0) -> None:
        pass

    async def drop_pages(self, inode: int) -> None:
        pass


def archive_tree(client: XnatClient, blocks: BlockCache, deadlines: Deadlines,
                 nursery: trio.Nursery) -> Tree:
    """The mount's tree with only what is read: projects down to resources' files."""
    tree = Tree(client, metadata_ttl=LISTING_TTL)
    kernel = NoKernel()
    files = RemoteFiles(tree, blocks, kernel, deadlines, nursery)
    archive = ArchiveArea(tree, kernel, files)
    resources = ResourceArea(tree, kernel, archive, files, None, nursery=nursery)
    root = RootArea(tree, kernel, [archive])
    for area in (root, archive, resources, GeneratedArea(tree, kernel)):
        tree.register(area)
    return tree


async def resolve(tree: Tree, target: str) -> tuple[Node, PurePosixPath]:
    """The node ``target`` names (labels, or names as the mount shows them; a
    scan by its ID or its ``ID-type`` folder), and its path in the mount."""
    node, rel = tree.root, PurePosixPath()
    for part in [p for p in target.strip("/").split("/") if p]:
        entries = [e for e in await tree.children(node.inode) if e.kind in WALKED or
                   (e.kind is FILE and e.file is not None)]
        found = (next((e for e in entries if e.name == part), None)
                 or next((e for e in entries if e.name == safe_name(part)), None)
                 or next((e for e in entries if e.kind is SCAN and e.scan_id == part), None))
        if found is None:
            shown = f"{rel}/{part}" if rel.parts else part
            raise PrefetchError(f"{shown}: not found (or not readable with this account)")
        node, rel = found, rel / found.name
    if node is tree.root:
        raise PrefetchError("give a project (or a folder below one) to prefetch")
    return node, rel


async def walk(tree: Tree, node: Node, rel: PurePosixPath, out: list[Item],
               limiter: trio.CapacityLimiter) -> None:
    """Every file XNAT lists below ``node``, folders listed ``limiter``-many at once."""
    if not node.is_dir:
        if node.kind is FILE and node.file is not None:
            out.append(Item(rel, node.file.size, node, node.file.digest))
        return
    async with limiter:
        entries = await tree.children(node.inode)
    async with trio.open_nursery() as nursery:
        for entry in entries:
            if entry.kind in WALKED or (entry.kind is FILE and entry.file is not None):
                nursery.start_soon(walk, tree, entry, rel / entry.name, out, limiter)


async def fetch(item: Item, blocks: BlockCache, progress: Progress, dest: Destination | None,
                timeout: float, disk: trio.CapacityLimiter) -> None:
    """One file through the block cache (and into ``dest``), counting as it goes."""
    ident = identity(item.source)
    read = 0
    part: PartFile | None = None
    try:
        if dest is not None:
            if await trio.to_thread.run_sync(dest.complete, item, limiter=disk):
                progress.already(item.size)
                return
            part = await trio.to_thread.run_sync(dest.start, item, limiter=disk)
        cached = await blocks.cached_bytes(ident)
        if dest is None and cached >= item.size:
            progress.already(item.size)
            return
        while read < item.size:
            # Bounded while nothing arrives, as a read through the mount is.
            with trio.fail_after(timeout):
                data = await blocks.read(ident, read, blocks.block_size)
            if not data:
                raise OSError(f"{read} bytes read, {item.size} listed")
            if part is not None:
                await trio.to_thread.run_sync(part.write, data, limiter=disk)
            read += len(data)
            progress.moved(len(data))
        if part is not None:
            await trio.to_thread.run_sync(part.commit, item.size, item.source.file.digest,
                                          limiter=disk)
            part = None
    except trio.Cancelled:
        if part is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(part.abandon)
        progress.moved(-read)
        raise
    except (Exception, trio.TooSlowError) as exc:  # counted and named; the others go on
        if part is not None:
            await trio.to_thread.run_sync(part.abandon)
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        progress.failed(str(item.rel), why, read)
        return
    progress.finished(item.size, cached)


async def prefetch_site(client: XnatClient, args: argparse.Namespace, progress: Progress,
                        dest: Destination | None) -> bool:
    """The direct prefetch, in one nursery; True if interrupted."""
    cache_dir = args.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cache_dir.chmod(0o700)  # cached data is as private as a mount's
    shared, shared_max = shared_tier(args, client.credentials.url)
    if shared is not None:
        try:
            await prepare_shared(shared, DEFAULT_BLOCK_SIZE)
        except OSError as exc:
            raise PrefetchError(f"the shared cache {shared}: {exc.strerror or exc}") from None
    interrupted = False
    failure: Exception | None = None
    blocks: BlockCache | None = None
    try:
        async with trio.open_nursery() as nursery:
            blocks = BlockCache(client, cache_dir / "blocks", size_limit=args.cache_size,
                                nursery=nursery, shared_dir=shared, shared_max=shared_max)
            deadlines = Deadlines(op_timeout=4 * args.timeout)
            tree = archive_tree(client, blocks, deadlines, nursery)
            with trio.CancelScope() as work:
                nursery.start_soon(_cancel_on_signal, work)
                items: list[Item] = []
                limiter = trio.CapacityLimiter(args.jobs)
                try:
                    for target in args.paths:
                        node, rel = await resolve(tree, target)
                        await walk(tree, node, rel, items, limiter)
                except (PrefetchError, XnatError) as exc:  # raised out of the nursery, bare
                    failure = exc
                    nursery.cancel_scope.cancel()
                    return False
                unique = {item.rel: item for item in items}
                progress.listed(len(unique), sum(item.size for item in unique.values()))
                progress.draw(force=True)
                disk = trio.CapacityLimiter(4)
                queue = iter(sorted(unique.values(), key=lambda i: i.rel))
                nursery.start_soon(_draw_progress, progress)
                async with trio.open_nursery() as readers:
                    for _ in range(args.jobs):  # --jobs readers take the files in turn
                        readers.start_soon(_reader, queue, blocks, progress, dest,
                                           4 * args.timeout, disk)
            interrupted = work.cancelled_caught
            # The digest checks of the files read whole mark their blocks as
            # trusted for the next mount, and the shared tier gets what was
            # downloaded: wait for them (bounded), not for downloads under way.
            await blocks.settle()
            # Stops the signal watcher and the progress line; block writes are shielded.
            nursery.cancel_scope.cancel()
    finally:
        if blocks is not None:
            blocks.close()
        if failure is not None:
            raise failure
    return interrupted


def shared_tier(args: argparse.Namespace, site: str) -> tuple[Path | None, int | None]:
    """The shared cache a mount of ``site`` would use: ``--shared-cache`` (and
    ``--shared-cache-max``), else the config file's ``shared_cache``, as for
    ``xnatfs mount``."""
    from .cli import parse_size
    from .credentials import CredentialsError, mount_values

    shared, shared_max = args.shared_cache, args.shared_cache_max
    try:
        values = mount_values(site, args.profile)
    except CredentialsError as exc:
        raise PrefetchError(str(exc)) from None
    if shared is None and "shared_cache" in values:
        shared = Path(values["shared_cache"]).expanduser()
    if shared_max is None and "shared_cache_max" in values:
        try:
            shared_max = parse_size(str(values["shared_cache_max"]))
        except argparse.ArgumentTypeError as exc:
            raise PrefetchError(f"shared_cache_max in the config file: {exc}") from None
    return shared, shared_max


async def _reader(queue: Iterator[Item], blocks: BlockCache, progress: Progress,
                  dest: Destination | None, timeout: float, disk: trio.CapacityLimiter) -> None:
    for item in queue:  # one trio thread: no two readers take the same item
        await fetch(item, blocks, progress, dest, timeout, disk)


async def _draw_progress(progress: Progress) -> None:
    while True:
        await trio.sleep(0.2)
        progress.draw()


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def run_direct(args: argparse.Namespace, progress: Progress, dest: Destination | None) -> bool:
    """Log in (as the other site commands do) and prefetch; True if interrupted."""
    from .cli import run_with_client

    async def work(client: XnatClient) -> bool:
        return await prefetch_site(client, args, progress, dest)

    return bool(run_with_client(args, work))

"""``xnatfs prefetch``: fill the caches ahead of a cluster run, or copy into a folder.

Two ways to reach XNAT, one way to count and report (:mod:`.progress`):

* **through a running mount** (``xnatfs prefetch MOUNT/PROJECT/...``): walk the
  folders and read every file XNAT lists below a ``resources/LABEL/files/``
  folder through the mount, which fills its caches. Plain blocking reads in a
  thread pool (``--jobs``). Generated files (documents, tables, the status
  file), ``uploads/``, ``prearchive/`` and links are skipped. What is cached
  already is learnt from the file's ``user.xnatfs.cached`` attribute (bytes
  of it on the mount's local disk cache), not by reading it: a rerun after an
  interrupt goes on where it stopped.
* **directly** (``--url``/``--profile``): :mod:`.prefetchdirect` walks the same
  tree with the mount's own areas and fills the same block cache a later
  mount on this machine uses.

``--to DIR`` writes each file into ``DIR`` under the path the mount shows
it at, as a temporary renamed into place once its size (and digest, where
XNAT lists one) is right: an interrupted copy leaves no partial file under
a final name, and a rerun skips the files already there.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .progress import Progress
from .status import STATUS_FILE_NAME

CACHED_XATTR = "user.xnatfs.cached"   # areas/resources.py answers it
DIGEST_XATTR = "user.xnat.digest"
CHUNK = 1024 * 1024
SKIPPED_AT_ROOT = frozenset({"uploads", "prearchive", STATUS_FILE_NAME})
TICK = 0.2  # s between looks at the readers (and chances to redraw)


class PrefetchError(Exception):
    """A target that cannot be prefetched (not in a mount, an area that is skipped...)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: readers stop at their next chunk."""


@dataclass(frozen=True)
class Item:
    """One file to fetch: where the mount shows it (``rel``, from the mount's
    root), its size and digest, and where to read it (a path, or a tree node)."""

    rel: PurePosixPath
    size: int
    source: Any
    digest: str | None = None


# ------------------------------------------------------------------ --to DIR
class Destination:
    """``--to DIR``: files under the mount's layout, each complete or absent."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def final(self, item: Item) -> Path:
        parts = item.rel.parts
        # The mount's names are single safe components (naming.py); checked
        # again, since these paths are written to.
        if not parts or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
            raise PrefetchError(f"refused to write {item.rel!s} under {self.root}")
        return self.root.joinpath(*parts)

    def complete(self, item: Item) -> bool:
        """Whether a run before wrote this file whole (only checked ones get their name)."""
        try:
            st = self.final(item).lstat()
        except FileNotFoundError:
            return False
        return st.st_size == item.size and os.path.isfile(self.final(item))

    def start(self, item: Item) -> PartFile:
        return PartFile(self.final(item))


class PartFile:
    """A file being written under a temporary name in its final folder."""

    def __init__(self, final: Path) -> None:
        self.final = final
        # Short and hidden: the final name may already be 255 bytes long.
        tag = hashlib.sha256(os.fsencode(final.name)).hexdigest()[:16]
        self.temp = final.parent / f".xnatfs-part-{tag}"
        final.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.temp, "wb")  # noqa: SIM115 - closed by commit/abandon
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.file.write(data)
        self.md5.update(data)
        self.size += len(data)

    def commit(self, size: int, digest: str | None) -> None:
        """Renamed into place if whole and right; otherwise removed (raises OSError)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())  # the name must never stand for lost bytes
            self.file.close()
            if self.size != size:
                raise OSError(errno.EIO, f"{self.size} bytes read, {size} listed")
            if digest and self.md5.hexdigest() != digest.lower():
                raise OSError(errno.EIO, "the bytes do not match the digest XNAT lists")
            os.replace(self.temp, self.final)
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        self.file.close()
        try:
            self.temp.unlink()
        except FileNotFoundError:
            pass


# ------------------------------------------------------- through a mount
def mount_root_of(path: Path) -> Path | None:
    """The xnatfs mount ``path`` is in (from /proc/self/mountinfo, not stat)."""
    from .mount import mounted_type

    for candidate in (path, *path.parents):
        if mounted_type(candidate) == "fuse.xnatfs":
            return candidate
    return None


def in_resource_files(rel: PurePosixPath) -> bool:
    """Below ``resources/LABEL/files/``: a file XNAT has, not one the mount makes."""
    parts = rel.parts
    return any(parts[i] == "resources" and parts[i + 2] == "files"
               for i in range(len(parts) - 3))


def walk_mount(root: Path, top: Path) -> Iterator[Item]:
    """The files to read below ``top`` (or ``top`` itself), links not followed."""
    rel = PurePosixPath(top.relative_to(root).as_posix())
    if rel.parts and rel.parts[0] in SKIPPED_AT_ROOT:
        raise PrefetchError(f"{top}: uploads, the prearchive and the status file are "
                            "not prefetched")
    if not top.is_dir():
        if in_resource_files(rel):
            yield Item(rel, top.stat().st_size, top)
        return
    folders = [(top, rel)]
    while folders:
        folder, folder_rel = folders.pop()
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda e: e.name, reverse=True)
        for entry in listed:
            entry_rel = folder_rel / entry.name
            if entry.is_symlink():
                continue  # accession IDs: the same files under another name
            if entry.is_dir(follow_symlinks=False):
                if not (len(entry_rel.parts) == 1 and entry.name in SKIPPED_AT_ROOT):
                    folders.append((Path(entry.path), entry_rel))
            elif entry.is_file(follow_symlinks=False) and in_resource_files(entry_rel):
                yield Item(entry_rel, entry.stat(follow_symlinks=False).st_size,
                           Path(entry.path))


def _xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode()
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def read_through_mount(item: Item, progress: Progress, stop: threading.Event,
                       dest: Destination | None) -> None:
    """Read one file through the mount (into ``dest`` if given), counting as it goes."""
    path: Path = item.source
    read = 0
    part: PartFile | None = None
    try:
        cached_text = _xattr(path, CACHED_XATTR)
        # No answer (a result still being sent, a mount that does not tell): read it,
        # which costs XNAT nothing more than reading it later would.
        cached = 0 if cached_text is None else int(cached_text)
        if dest.complete(item) if dest is not None else cached >= item.size:
            progress.already(item.size)
            return
        if dest is not None:
            digest = _xattr(path, DIGEST_XATTR)
            part = dest.start(item)
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                if stop.is_set():
                    raise Interrupted
                if part is not None:
                    part.write(chunk)
                read += len(chunk)
                progress.moved(len(chunk))
        if part is not None:
            part.commit(item.size, digest)
            part = None
        elif read != item.size:
            raise OSError(errno.EIO, f"{read} bytes read, {item.size} listed")
    except Interrupted:
        if part is not None:
            part.abandon()
        progress.moved(-read)
        return
    except (OSError, PrefetchError, ValueError) as exc:
        if part is not None:
            part.abandon()
        progress.failed(str(item.rel), getattr(exc, "strerror", None) or str(exc), read)
        return
    progress.finished(item.size, cached)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_through_mount(paths: list[str], jobs: int, progress: Progress,
                      dest: Destination | None) -> bool:
    """Prefetch ``paths`` of running mounts; True if interrupted."""
    items: dict[tuple[Path, PurePosixPath], Item] = {}
    for target in paths:
        top = Path(os.path.realpath(target))
        root = mount_root_of(top)
        if root is None:
            raise PrefetchError(f"{target} is not in an xnatfs mount (without a mount, "
                                "give the site with --url or --profile)")
        for item in walk_mount(root, top):
            items.setdefault((root, item.rel), item)
    progress.listed(len(items), sum(item.size for item in items.values()))
    progress.draw(force=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="prefetch")
    try:
        pending = {pool.submit(read_through_mount, item, progress, stop, dest)
                   for item in items.values()}
        while pending:
            _, pending = wait(pending, timeout=TICK)
            progress.draw()
    except KeyboardInterrupt:
        stop.set()  # the readers stop at their next chunk; the queued never start
        pool.shutdown(wait=True, cancel_futures=True)
        return True
    finally:
        pool.shutdown(wait=True)
        signal.signal(signal.SIGTERM, previous)
    return False


# ----------------------------------------------------------------- command
def prefetch_command(args: argparse.Namespace) -> int:
    """``xnatfs prefetch``: exit 0 if every file is cached (or written), 1 if some
    failed (named on stderr), 130 if interrupted."""
    from .cli import UserError

    if args.jobs < 1:
        raise UserError("xnatfs: --jobs must be at least 1")
    dest = Destination(args.to.absolute()) if args.to is not None else None
    progress = Progress(interval=args.progress_interval)
    if dest is not None:
        progress.already_word = "already in the folder"
    try:
        if args.url is not None or args.profile is not None:
            from .prefetchdirect import run_direct

            interrupted = run_direct(args, progress, dest)
        else:
            interrupted = run_through_mount(args.paths, args.jobs, progress, dest)
    except PrefetchError as exc:
        raise UserError(f"xnatfs: {exc}") from None
    except KeyboardInterrupt:  # before the readers started (listing, logging in)
        interrupted = True
    progress.close(interrupted=interrupted, into=str(dest.root) if dest is not None else None)
    if interrupted:
        return 130
    return 1 if progress.failures else 0

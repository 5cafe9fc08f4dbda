"""The shared cache tier on a cluster file system: block files many mounts read
and fill, with no lock and no database (NFS makes both unsafe).

Modelled on CernVM-FS's "alien cache". The layout is::

    DIR/v1/b<block size>/<ab>/<key>/<index>          a published block
    DIR/v1/b<block size>/<ab>/<key>/<index>.claim    someone is downloading it
    DIR/v1/b<block size>/<ab>/<key>/.tmp-<host>-<pid>-<random>   being written

``key`` is :attr:`FileIdentity.key` (a hash of the file's URI, size and
digest: never a name from the server), so a file changed on the server is a
different folder. A block is written to a temporary in its folder and
published with ``os.rename``, atomic on POSIX file systems, NFS and Lustre:
a reader opens only published names and sees a whole block or none. Each
published file starts with a header holding a BLAKE2b hash of the block, so
a truncated or altered entry is caught before its bytes are served (the
whole-file MD5 check stays as the last word); a bad entry is removed.

Claims make many nodes wanting one block cost the server about one download:
a claim is created with ``O_CREAT|O_EXCL``; a node finding a fresh one polls
the published name for a while instead of downloading. Claims are an
optimisation only: a stale one (older than ``CLAIM_STALE``) is ignored.

Every function here does blocking file I/O: the mount calls them from worker
threads (:mod:`.sharedtier`), ``xnatfs cache prune`` directly. Pruning
removes whole folders, least recently used first (a mount touches a folder's
mtime when it first uses the file: atime is unreliable on noatime mounts),
and temporaries and claims older than an age. A reader that loses a block to
a pruner between looking and opening gets a miss, and downloads it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

LAYOUT = "v1"
MAGIC = b"XNATFSB1"          # what a published block starts with
HASH_SIZE = 32              # BLAKE2b-256 of the block, after the magic
HEADER_SIZE = len(MAGIC) + HASH_SIZE
DIR_MODE = 0o2770           # group-shared; setgid: entries keep the folder's group
FILE_MODE = 0o640           # the group reads; only the writer rewrites (anyone in it may unlink)
CLAIM_STALE = 30.0          # a claim older than this is ignored (its holder died)
TEMPORARY_PREFIX = ".tmp-"
CLAIM_SUFFIX = ".claim"


class Lookup(Enum):
    """What looking for a block found, when it found no bytes."""

    CLAIMED = "claimed"   # nobody has it: the caller holds the claim and downloads it
    BUSY = "busy"         # another node's fresh claim: poll again shortly
    BAD = "bad"           # a published entry was damaged; it was removed


@dataclass(frozen=True)
class SharedCache:
    """One shared tier folder, for one block size."""

    root: Path
    block_size: int

    @property
    def base(self) -> Path:
        return self.root / LAYOUT / f"b{self.block_size}"

    def folder(self, key: str) -> Path:
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError("a shared-cache key is a hex digest")  # never a path from outside
        return self.base / key[:2] / key

    def entry(self, key: str, index: int) -> Path:
        return self.folder(key) / str(index)

    def prepare(self) -> None:
        """Create the root and layout folders, group-shared (an existing root is
        left as its owner made it: its permissions say who may read)."""
        if not self.root.is_dir():
            _mkdir(self.root)
        for path in (self.root / LAYOUT, self.base):
            if not path.is_dir():
                _mkdir(path)

    # ---------------------------------------------------------- reading
    def read_or_claim(self, key: str, index: int, length: int) -> bytes | Lookup:
        """The block's bytes if published and sound; else claim it (``CLAIMED``),
        or say another node claimed it (``BUSY``), or that a bad entry was
        removed (``BAD``)."""
        path = self.entry(key, index)
        try:
            with open(path, "rb") as f:
                raw = f.read(HEADER_SIZE + length + 1)
        except FileNotFoundError:
            pass
        else:
            data = unpack(raw, length)
            if data is not None:
                return data
            _unlink(path)
            return Lookup.BAD
        return self._claim(key, index, path, length)

    def _claim(self, key: str, index: int, published: Path, length: int) -> bytes | Lookup:
        claim = published.with_name(f"{index}{CLAIM_SUFFIX}")
        for _ in range(3):
            try:
                fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileNotFoundError:  # the file's folder does not exist yet (or was pruned)
                _makedirs(claim.parent, self.base)
                continue
            except FileExistsError:
                try:
                    age = time.time() - os.stat(claim).st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: published, or its download failed
                if age < CLAIM_STALE:
                    return Lookup.BUSY
                _unlink(claim)  # its holder died: take it over
                continue
            try:
                os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.3f}\n".encode())
            finally:
                os.close(fd)
            # Published between our look and our claim: use it.
            data = _read_entry(published, length)
            if data is not None:
                _unlink(claim)
                return data
            return Lookup.CLAIMED
        return Lookup.BUSY

    def claim(self, key: str, index: int) -> bool:
        """Claim a block a running download will fill; False if someone holds a claim."""
        claim = self.folder(key) / f"{index}{CLAIM_SUFFIX}"
        for _ in range(2):
            try:
                os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
                return True
            except FileNotFoundError:
                _makedirs(claim.parent, self.base)
            except FileExistsError:
                return False
        return False

    def release(self, key: str, index: int) -> None:
        _unlink(self.folder(key) / f"{index}{CLAIM_SUFFIX}")

    def touch(self, key: str) -> None:
        """Record that the file was used (its folder's mtime: the LRU order of pruning)."""
        try:
            os.utime(self.folder(key))
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------- writing
    def publish(self, key: str, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Write a block under a temporary name and rename it into place (over a
        bad entry, or an equal one another node published meanwhile); remove
        the claim. True once published."""
        folder = self.folder(key)
        published = folder / str(index)
        header = MAGIC + hashlib.blake2b(data, digest_size=HASH_SIZE).digest()
        name = f"{TEMPORARY_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}"
        temporary = folder / name
        for _ in range(2):
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
                break
            except FileNotFoundError:  # pruned, or never made
                _makedirs(folder, self.base)
        else:
            raise FileNotFoundError(errno.ENOENT, "the shared cache folder vanished", str(folder))
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            with os.fdopen(fd, "wb", closefd=True) as f:
                f.write(header)
                f.write(data)
            os.rename(temporary, published)
        except BaseException:
            _unlink(temporary)
            raise
        _unlink(folder / f"{index}{CLAIM_SUFFIX}")
        return True

    def drop_file(self, key: str) -> None:
        """Remove every published block of a file (they failed its digest check)."""
        folder = self.folder(key)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for name in names:
            if name.isdigit():
                _unlink(folder / name)


def unpack(raw: bytes, length: int) -> bytes | None:
    """A published entry's block, or None when it is not ``length`` sound bytes."""
    if len(raw) != HEADER_SIZE + length or not raw.startswith(MAGIC):
        return None
    data = raw[HEADER_SIZE:]
    if hashlib.blake2b(data, digest_size=HASH_SIZE).digest() != raw[len(MAGIC):HEADER_SIZE]:
        return None
    return data


def _read_entry(path: Path, length: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return unpack(f.read(HEADER_SIZE + length + 1), length)
    except FileNotFoundError:
        return None


def _mkdir(path: Path) -> None:
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # mkdir's mode passes through the umask


def _makedirs(folder: Path, base: Path) -> None:
    """``folder`` and its parents up to ``base``, each group-shared."""
    missing = []
    path = folder
    while path != base and not path.is_dir():
        missing.append(path)
        path = path.parent
    if not base.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the shared cache is gone", str(base))
    for path in reversed(missing):
        _mkdir(path)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------ pruning
@dataclass
class PruneReport:
    kept_bytes: int = 0
    removed_bytes: int = 0
    removed_files: int = 0      # published files (not folders) removed to fit
    removed_temporaries: int = 0  # temporaries and claims past their age


def prune(root: Path, max_bytes: int, *, max_age: float = 3600.0,
          now: float | None = None) -> PruneReport:
    """Bound the tier at ``max_bytes``: remove whole file folders, least recently
    used first (folder mtime), and temporaries and claims older than ``max_age``.
    Safe beside mounts and other pruners: it only unlinks and ``rmdir``s."""
    now = time.time() if now is None else now
    report = PruneReport()
    folders: list[tuple[float, int, Path]] = []
    layout = root / LAYOUT
    for sizes in _subfolders(layout):
        for fan in _subfolders(sizes):
            for folder in _subfolders(fan):
                used, size = _scan(folder, now, max_age, report)
                folders.append((used, size, folder))
                report.kept_bytes += size
    folders.sort()
    for _used, size, folder in folders:
        if report.kept_bytes <= max_bytes:
            break
        removed = _remove_folder(folder)
        report.removed_files += removed
        report.removed_bytes += size
        report.kept_bytes -= size
    return report


def _subfolders(path: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(path)
                if entry.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _scan(folder: Path, now: float, max_age: float, report: PruneReport) -> tuple[float, int]:
    """(last use, bytes of published blocks); removes old temporaries and claims."""
    try:
        used = os.stat(folder).st_mtime
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0.0, 0
    size = 0
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if entry.name.startswith(TEMPORARY_PREFIX) or entry.name.endswith(CLAIM_SUFFIX):
            if now - info.st_mtime > max_age:
                _unlink(Path(entry.path))
                report.removed_temporaries += 1
            continue
        size += info.st_size
    return used, size


def _remove_folder(folder: Path) -> int:
    """Unlink a file folder's published blocks, then the folder if it is empty
    (a block published meanwhile keeps it)."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.isdigit():
            _unlink(folder / name)
            removed += 1
    try:
        os.rmdir(folder)
    except OSError:  # not empty (a temporary or claim in use), or removed already
        pass
    return removed

"""The files in the spool: each upload's local copy, its record, and its stream.

``<root>/<id>/data`` holds what was written, ``<root>/<id>/meta.json`` what is
known of it (:class:`UploadRecord`), until its destination has it; what is
left there (failed, cut off, never answered) is what ``xnatfs uploads``
lists, retries and discards, and what a remount shows again. The spool
(:mod:`.spool`) decides when they are written, sent and removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .errors import BadRequest, NoSpace, XnatError

log = logging.getLogger(__name__)

STREAM_CHUNKS = 8            # chunks buffered between writer and the streaming request

# A record's kind is its sender's word for what the file is; two are the spool's own:
UNKNOWN = "unknown"          # not classified yet (not enough bytes)
LITTER = "litter"            # kept locally, never sent under its name (Sender.is_litter)


class State(str, enum.Enum):
    WRITING = "writing"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    KEPT = "kept"             # not uploaded: litter (temporaries too) or empty


@dataclass
class UploadRecord:
    """What is known about one dropped file; saved next to its spool as JSON."""

    id: str
    project: str
    relpath: str
    kind: str = UNKNOWN
    state: str = State.WRITING.value
    size: int = 0
    message: str = ""
    result: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    site: str = ""                # its XNAT's normalised URL ("" in older records)
    mtime_ns: int | None = None   # set by the writer (cp -a, rsync), else None
    incomplete: bool = False      # its writer was killed while writing it
    # Lines shown below the entry in UPLOAD_STATUS.txt and never logged: they
    # may name subjects (a spreadsheet's outcome, row by row).
    details: list[str] = field(default_factory=list)
    # Its sender's details of where it goes. Stored flat among the fields above,
    # as ``direct_archive`` always was, so earlier versions read new records.
    destination: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(UploadRecord)) - {"destination"}


class Upload:
    """One file written into the mount: its record, its local copy, and (for
    kinds sent while written) its stream."""

    def __init__(self, record: UploadRecord, spool_dir: Path) -> None:
        self.record = record
        self.spool_dir = spool_dir
        self.data_path = spool_dir / "data"
        self.fd = -1
        self.fd_lock = threading.Lock()  # close_spool runs in worker threads
        self.ensure_spool()
        self.head = bytearray()
        self.next_offset = 0                     # where a sequential writer continues
        self.dirty = False                       # written since the last upload
        self.stream_send: trio.MemorySendChannel[bytes] | None = None
        self.stream_done: trio.Event | None = None
        self.stream_result: list[str] | BaseException | None = None
        self.stream_scope: trio.CancelScope | None = None
        self.lock = trio.Lock()                  # one finish at a time
        self.background: trio.Event | None = None  # set when a write-behind upload ends
        self.open_handles = 0
        self.writers = 0                         # open handles that may write
        self.failure: type[XnatError] = BadRequest  # what the last failure was (its errno)
        self.user_xattrs: dict[str, bytes] = {}  # set by rsync -X and the like; not uploaded

    def raise_if_failed(self) -> None:
        """Raise what the last upload attempt failed with, as its errno says it."""
        if self.state is State.FAILED:
            raise self.failure(self.record.message or "upload failed")

    @property
    def busy(self) -> bool:
        """Being written or sent: where it goes (its path, its labels) is fixed."""
        return bool(self.writers or self.background is not None or self.lock.locked()
                    or self.stream_send is not None)

    @property
    def state(self) -> State:
        return State(self.record.state)

    def ensure_spool(self) -> None:
        """(Re)open the local copy: a finished upload's spool is gone until written again."""
        if self.fd < 0:
            self.spool_dir.mkdir(mode=0o700, exist_ok=True)
            self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)

    def close_spool(self) -> None:
        """Close the local copy; safe from several threads at once (each fd is
        closed once: the last close of a write-behind upload can race its end)."""
        with self.fd_lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    # ---------------------------------------- sent while written (bounded memory)
    def start_stream(self, nursery: trio.Nursery,
                     send: Callable[[AsyncIterator[bytes]], Awaitable[list[str]]]) -> None:
        """``send`` gets what is fed, as it is fed; its answer (or what it failed
        with) is :meth:`end_stream`'s."""
        channel, receive = trio.open_memory_channel[bytes](STREAM_CHUNKS)
        self.stream_send = channel
        self.stream_done = trio.Event()
        self.record.state = State.UPLOADING.value

        async def body() -> AsyncIterator[bytes]:
            async with receive:
                async for chunk in receive:
                    yield chunk

        async def run() -> None:
            with trio.CancelScope() as scope:
                self.stream_scope = scope
                try:
                    self.stream_result = await send(body())
                except XnatError as exc:
                    self.stream_result = exc
                finally:
                    # However the request ended, nothing reads the stream any more:
                    # the writer's next send fails at once (the spool has it all)
                    # instead of waiting for room that never comes.
                    receive.close()
            if scope.cancelled_caught:
                self.stream_result = XnatError("stream abandoned")
            assert self.stream_done is not None
            self.stream_done.set()

        nursery.start_soon(run)

    async def feed_stream(self, data: bytes) -> None:
        send = self.stream_send
        if send is None:
            return
        try:
            await send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The request ended early (refused or failed); the spool has everything.
            self.stream_send = None

    def abandon_stream(self, why: str) -> None:
        self.next_offset = -1  # never sequential again
        if self.stream_send is not None:
            log.info("%s: %s; uploading from the local copy at close", self.record.relpath, why)
            self.stream_send.close()
            self.stream_send = None
            if self.stream_scope is not None:
                self.stream_scope.cancel()

    async def end_stream(self) -> list[str] | BaseException | None:
        """All was fed: the destination's answer (a list), or what it failed with."""
        assert self.stream_send is not None and self.stream_done is not None
        await self.stream_send.aclose()
        self.stream_send = None
        await self.stream_done.wait()
        outcome = self.stream_result
        self.stream_done = None
        return outcome

    # The local copy's own reads and writes, each run in a worker thread.
    def write_spool(self, offset: int, data: bytes) -> None:
        self.ensure_spool()
        view, at = memoryview(data), offset
        while view:
            written = os.pwrite(self.fd, view, at)
            view, at = view[written:], at + written

    def truncate_spool(self, size: int) -> None:
        self.ensure_spool()
        os.ftruncate(self.fd, size)

    def read_spool(self, offset: int, size: int) -> bytes:
        """Open or not: the kernel sends a writer's RELEASE asynchronously, so it
        may close the spool while a reader reads."""
        with self.fd_lock:
            if self.fd >= 0:
                return os.pread(self.fd, size, offset)
        with open(self.data_path, "rb") as f:
            f.seek(offset)
            return f.read(size)


@contextlib.contextmanager
def full_disk_refused(upload: Upload) -> Iterator[None]:
    """A full spool disk is the user's to fix (ENOSPC to ``cp``), not a bug."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NoSpace(f"no room left for the local copy of the upload in {upload.spool_dir}",
                      path=upload.record.relpath) from None


def save_record(upload: Upload) -> None:
    """Its record as it is now, unless it is gone already."""
    try:
        write_record(upload.spool_dir, upload.record)
    except FileNotFoundError:
        pass  # done and cleaned up (perhaps just now, by release): nothing to describe


def write_record(spool_dir: Path, record: UploadRecord) -> None:
    """Describe an upload next to its spool (atomically: a crash leaves old or new)."""
    meta = spool_dir / "meta.json"
    fields = dataclasses.asdict(record)
    fields.update(fields.pop("destination"))  # flat: see UploadRecord.destination
    if not fields["details"]:
        del fields["details"]  # a record without is as earlier versions wrote (and read) it
    # One temporary per thread: two saves of one upload may run at once.
    tmp = spool_dir / f"meta.{threading.get_ident()}.tmp"
    # 0600 whatever the umask: it names the file, and its details may name subjects.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(fields))
    os.replace(tmp, meta)


def read_record(spool_dir: Path) -> UploadRecord:
    """The record :func:`write_record` left (OSError, ValueError or TypeError if it
    is gone or unreadable); what is not a field of its own is its destination."""
    fields = json.loads((spool_dir / "meta.json").read_text())
    if not isinstance(fields, dict):
        raise TypeError(f"{spool_dir / 'meta.json'} holds no record")
    destination = {k: fields.pop(k) for k in list(fields) if k not in RECORD_FIELDS}
    return UploadRecord(**fields, destination=destination)


def reread_records(uploads: list[Upload]) -> list[tuple[Upload, UploadRecord | None]]:
    """Their records on disk now (None: gone), for changes made from the command line."""
    out: list[tuple[Upload, UploadRecord | None]] = []
    for upload in uploads:
        try:
            out.append((upload, read_record(upload.spool_dir)))
        except FileNotFoundError:
            out.append((upload, None))
        except (OSError, ValueError, TypeError):
            continue  # being rewritten, or not ours to judge: as it was
    return out


def record_retried(spool_dir: Path, record: UploadRecord, result: list[str]) -> None:
    """A kept upload sent by ``xnatfs uploads retry``: its copy goes; its record says
    done, for a mount still showing it (removed when the next mount starts)."""
    record.state, record.result = State.DONE.value, result
    record.message, record.finished = "", time.time()
    write_record(spool_dir, record)
    (spool_dir / "data").unlink(missing_ok=True)


def remove_spool(spool_dir: Path) -> None:
    """An upload's local copy and record go, and its folder once empty."""
    for path in [spool_dir / "data", spool_dir / "meta.json", *spool_dir.glob("meta.*tmp")]:
        path.unlink(missing_ok=True)
    try:
        spool_dir.rmdir()
    except OSError:
        pass


def kept_uploads(spool_root: Path) -> list[tuple[UploadRecord, Path]]:
    """Uploads left on disk (failed, interrupted): for ``xnatfs uploads list``."""
    out: list[tuple[UploadRecord, Path]] = []
    if not spool_root.is_dir():
        return out
    for meta in sorted(spool_root.glob("*/meta.json")):
        try:
            record = read_record(meta.parent)
        except (OSError, ValueError, TypeError):
            continue
        if record.state not in (State.DONE.value, State.KEPT.value) and (
                record.kind != LITTER):
            out.append((record, meta.parent))
    return out


def purge_local_only(spool_root: Path) -> None:
    """Drop what an earlier mount left with nothing to upload: litter, empty files,
    and records of uploads done (by ``xnatfs uploads retry``)."""
    if not spool_root.is_dir():
        return
    for meta in spool_root.glob("*/meta.json"):
        try:
            record = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if record.get("kind") == LITTER or record.get("state") in (
                State.KEPT.value, State.DONE.value):
            remove_spool(meta.parent)

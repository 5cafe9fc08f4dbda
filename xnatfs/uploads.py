"""Writes below ``uploads/<PROJECT>/`` become imports into XNAT's prearchive.

Every file written there is spooled to local disk (``CACHE_DIR/uploads``)
until the server has confirmed it, so a failed upload loses nothing. What a
file is gets decided by its content, not its name (so tools that write to a
temporary name and rename work):

* archives (zip, tar, tar.gz) → ``DICOM-zip`` import. A file written
  sequentially starts flowing to the server while it is being written,
  through a bounded channel (bounded memory); an out-of-order write drops the
  stream and the spool is uploaded at close instead;
* DICOM files (``DICM`` at byte 128) → ``gradual-DICOM``, one request each;
* file-manager litter (``.DS_Store``, ``._*``, ``Thumbs.db``...) is accepted
  and kept locally but never uploaded, unless renamed to a real name;
* anything else is refused at close with EINVAL and a message in the status.

``close()`` (FUSE flush) and ``fsync()`` return only once the server has
accepted the data, and fail when it refused. Transient failures are retried;
if they persist the spool is kept and reported, and ``xnatfs uploads``
lists, retries or discards kept uploads.

Labels: XNAT takes subject and session from the DICOM headers. A folder named
``subject=LABEL`` or ``session=LABEL`` anywhere below the project folder
names them instead; other folders only organise the upload.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fnmatch
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypedDict

import trio

from .errors import (BadRequest, Conflict, Forbidden, Interrupted, NoSpace, NotFound, Stale,
                     Unanswered, XnatError)
from .naming import require_label

log = logging.getLogger(__name__)

LITTER_PATTERNS = (".DS_Store", "._*", "Thumbs.db", "ehthumbs.db", "desktop.ini",
                   ".goutputstream-*", ".directory", ".~lock.*#", "*~", ".Trash-*",
                   ".fuse_hidden*", ".nfs*")
RSYNC_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9]{6}")
HEAD_BYTES = 264             # enough to recognise zip, gzip, tar (ustar at 257) and DICOM
STREAM_CHUNKS = 8            # chunks buffered between writer and the streaming request
UPLOAD_ATTEMPTS = 3          # uploads from the spool after the stream failed
NOTICE_INTERVAL = 0.5        # s between looks at kept records changed from the command line
CALLER_POLL_INTERVAL = 0.2   # s between looks whether a close waiting for XNAT was interrupted
# Not sent again: the server said no, or got all of it and may have imported it.
NOT_RESENT = (BadRequest, Conflict, Forbidden, NotFound, Unanswered)


class Kind(str, enum.Enum):
    UNKNOWN = "unknown"       # not enough bytes yet
    ARCHIVE = "archive"
    DICOM = "dicom"
    LITTER = "litter"
    REFUSED = "refused"       # neither DICOM nor an archive


class State(str, enum.Enum):
    WRITING = "writing"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    KEPT = "kept"             # not uploaded: litter (temporaries too) or empty


def is_litter(name: str) -> bool:
    """Kept locally, never uploaded unless renamed to another name: file-manager
    litter, and the temporaries that tools rename once complete (GNOME's
    ``.goutputstream-*``, rsync's ``.NAME.XXXXXX``). rsync's is uploaded at its
    rename: a failed close ends rsync's whole run, a failed rename only that
    file's, and an rsync stopped with Ctrl-C deletes its temporary unsent."""
    return RSYNC_TEMPORARY.fullmatch(name) is not None or any(
        fnmatch.fnmatchcase(name, pattern) for pattern in LITTER_PATTERNS)


def classify(name: str, head: bytes) -> Kind:
    """What a file is, from its first bytes (at least 264 of them when the file is that long)."""
    if is_litter(name):
        return Kind.LITTER
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return Kind.ARCHIVE
    if head.startswith(b"\x1f\x8b"):
        return Kind.ARCHIVE  # tar.gz / tgz
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Kind.ARCHIVE
    if len(head) >= 132 and head[128:132] == b"DICM":
        return Kind.DICOM
    return Kind.REFUSED


def archive_name(head: bytes) -> str:
    """The name XNAT's DICOM-zip importer needs to pick zip or tar."""
    if head.startswith(b"PK"):
        return "upload.zip"
    if head.startswith(b"\x1f\x8b"):
        return "upload.tar.gz"
    return "upload.tar"


def check_folder_name(name: str) -> None:
    """A folder made or renamed in the upload area: a ``subject=``/``session=``
    label must be one XNAT keeps as given (:func:`naming.require_label`)."""
    for prefix in ("subject=", "session="):
        if name.startswith(prefix) and len(name) > len(prefix):
            require_label(name[len(prefix):], prefix[:-1])


def relocated(relpath: str, folder: str, new_folder: str) -> str | None:
    """Where ``relpath`` goes when ``folder`` is renamed ``new_folder`` (None: not
    at or below it)."""
    if relpath == folder:
        return new_folder
    if relpath.startswith(folder + "/"):
        return new_folder + relpath[len(folder):]
    return None


def labels_from_path(relpath: str) -> tuple[str | None, str | None]:
    """``subject=`` and ``session=`` folders in the path below the project folder."""
    subject = session = None
    for part in relpath.split("/")[:-1]:
        if part.startswith("subject=") and len(part) > 8:
            subject = part[8:]
        elif part.startswith("session=") and len(part) > 8:
            session = part[8:]
    return subject, session


class ImportTarget(TypedDict):
    """Where an upload goes: the keyword arguments of both :class:`Importer` calls."""

    project: str
    subject: str | None
    session: str | None
    direct_archive: bool


class Importer(Protocol):
    """What uploads need from the client (``XnatClient`` implements it)."""

    async def import_archive(self, body: Path | AsyncIterator[bytes], *, name: str,
                             project: str, subject: str | None, session: str | None,
                             direct_archive: bool) -> list[str]: ...

    async def import_dicom_file(self, path: Path, *, project: str, subject: str | None,
                                session: str | None, direct_archive: bool) -> str: ...


def import_target(record: UploadRecord) -> ImportTarget:
    """Where an upload goes: its project, the labels its path names, and the
    mount's --direct-archive when it was made."""
    subject, session = labels_from_path(record.relpath)
    return ImportTarget(project=record.project, subject=subject, session=session,
                        direct_archive=record.direct_archive)


async def import_local_copy(importer: Importer, record: UploadRecord, data: Path,
                            head: bytes) -> list[str]:
    """One attempt at sending an upload's local copy (the mount, and ``xnatfs
    uploads retry``): an archive through DICOM-zip, a DICOM file through gradual-DICOM."""
    if record.kind == Kind.ARCHIVE.value:
        return await importer.import_archive(data, name=archive_name(head),
                                             **import_target(record))
    return [await importer.import_dicom_file(data, **import_target(record))]


@dataclass
class UploadRecord:
    """What is known about one dropped file; saved next to its spool as JSON."""

    id: str
    project: str
    relpath: str
    kind: str = Kind.UNKNOWN.value
    state: str = State.WRITING.value
    size: int = 0
    message: str = ""
    result: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    direct_archive: bool = False  # the mount's --direct-archive, for a later retry
    site: str = ""                # its XNAT's normalised URL ("" in older records)
    mtime_ns: int | None = None   # set by the writer (cp -a, rsync), else None
    incomplete: bool = False      # its writer was killed while writing it

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


class Upload:
    """One file being written into the upload area."""

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
    def kind(self) -> Kind:
        return Kind(self.record.kind)

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


class UploadManager:
    """The upload area's files: spooling, streaming, importing, and their status."""

    def __init__(self, importer: Importer, spool_root: Path, nursery: trio.Nursery, *,
                 site: str = "", direct_archive: bool = False, write_behind: bool = False,
                 max_parallel: int = 8) -> None:
        self.importer = importer
        self.site = site  # recorded with each upload: a retry must go to the same XNAT
        self.spool_root = spool_root
        spool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(spool_root, 0o700)
        purge_local_only(spool_root)
        self.nursery = nursery
        self.direct_archive = direct_archive
        # close() of a loose DICOM file returns once it is on local disk; its upload
        # runs in the background (fsync still waits for XNAT's answer).
        self.write_behind = write_behind
        self.on_finished: Callable[[Upload], None] | None = None  # background outcomes
        self.limiter = trio.CapacityLimiter(max_parallel)
        self.disk_limiter = trio.CapacityLimiter(4)
        self.uploads: dict[str, Upload] = {}     # by id
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self._noticed_at = -math.inf  # when the records on disk were last looked at
        self._adopt_kept()

    def _adopt_kept(self) -> None:
        """Uploads an earlier mount of this site kept as failed (refused, server
        errors, cut off) are listed again, so a file manager shows them after a
        restart too. (At mount time, before any request is served, like the
        purge before it.) Ones left writing or uploading, by a crash or by
        another mount sharing the cache, stay for ``xnatfs uploads``."""
        for record, spool_dir in kept_uploads(self.spool_root):
            if record.state != State.FAILED.value or not record.site \
                    or record.site != self.site:
                continue
            upload = Upload(record, spool_dir)
            upload.close_spool()
            self.uploads[record.id] = upload

    # --------------------------------------------------------------- writing
    async def create(self, project: str, relpath: str) -> Upload:
        def make() -> Upload:
            upload_id = uuid.uuid4().hex
            spool_dir = self.spool_root / upload_id
            spool_dir.mkdir(mode=0o700)
            upload = Upload(UploadRecord(upload_id, project, relpath, site=self.site,
                                         direct_archive=self.direct_archive), spool_dir)
            if is_litter(upload.record.name):
                upload.record.kind = Kind.LITTER.value
            _write_meta(upload)
            return upload

        upload = await trio.to_thread.run_sync(make, limiter=self.disk_limiter)
        self.uploads[upload.record.id] = upload
        return upload

    async def write(self, upload: Upload, offset: int, data: bytes) -> int:
        if upload.state in (State.DONE, State.FAILED):
            # Rewriting a finished upload starts it over (editors that save twice).
            upload.record.state = State.WRITING.value
            upload.record.result = []
            upload.record.message = ""
            upload.record.incomplete = False
        end = offset + len(data)
        if upload.stream_send is not None and offset == upload.next_offset:
            # A sequential write of a streaming archive: the local copy and the
            # stream take it at the same time (one waits for the disk, the other
            # for the server).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._spool_write, upload, offset, data)
                await self._stream_feed(upload, data)
            upload.dirty = True
            upload.record.size = max(upload.record.size, end)
            upload.next_offset = end
            return len(data)
        await self._spool_write(upload, offset, data)
        upload.dirty = True
        upload.record.size = max(upload.record.size, end)
        if offset != upload.next_offset:
            self._abandon_stream(upload, "out-of-order write")
            return len(data)
        upload.next_offset = end
        if upload.kind is Kind.UNKNOWN and len(upload.head) < HEAD_BYTES:
            upload.head += data[:HEAD_BYTES - len(upload.head)]
            if len(upload.head) >= HEAD_BYTES:
                upload.record.kind = classify(upload.record.name, bytes(upload.head)).value
                if upload.kind is Kind.ARCHIVE:
                    self._start_stream(upload)
                    # Everything written so far is in the spool; it goes first.
                    await self._stream_feed(upload, await self._read_spool(upload, 0, end))
        return len(data)

    async def _spool_write(self, upload: Upload, offset: int, data: bytes) -> None:
        def spool() -> None:
            upload.ensure_spool()
            view, at = memoryview(data), offset
            while view:
                written = os.pwrite(upload.fd, view, at)
                view, at = view[written:], at + written

        with _full_disk_refused(upload):
            await trio.to_thread.run_sync(spool, limiter=self.disk_limiter)

    async def truncate(self, upload: Upload, size: int) -> None:
        """``O_TRUNC`` or ``truncate()``: the upload starts over from ``size`` bytes."""
        if size == upload.record.size:
            return
        def cut() -> None:
            upload.ensure_spool()
            os.ftruncate(upload.fd, size)

        await trio.to_thread.run_sync(cut, limiter=self.disk_limiter)
        if size < upload.record.size:
            self._abandon_stream(upload, "truncated")
            if size == 0:
                # A fresh start (editors, cp over an earlier copy): stream again.
                upload.next_offset = 0
                upload.head = bytearray()
                upload.record.kind = Kind.UNKNOWN.value
        upload.record.size = size
        upload.dirty = True
        upload.record.mtime_ns = None  # changed since a time was set
        if upload.state in (State.DONE, State.FAILED):
            upload.record.state = State.WRITING.value
            upload.record.incomplete = False

    async def _read_spool(self, upload: Upload, offset: int, size: int) -> bytes:
        """From the local copy, open or not: the kernel sends a writer's RELEASE
        asynchronously, so it may close the spool while a reader reads."""
        def read_local_copy() -> bytes:
            with upload.fd_lock:
                if upload.fd >= 0:
                    return os.pread(upload.fd, size, offset)
            with open(upload.data_path, "rb") as f:
                f.seek(offset)
                return f.read(size)

        return await trio.to_thread.run_sync(read_local_copy, limiter=self.disk_limiter)

    async def read(self, upload: Upload, offset: int, size: int) -> bytes:
        """A kept file, litter a file manager reads back, a failed upload; an
        uploaded file's copy is gone: EACCES, not EIO (opening it still works, for
        an fsync that asks how its write-behind upload went)."""
        try:
            return await self._read_spool(upload, offset, size)
        except FileNotFoundError:
            if upload.state is State.DONE:
                raise Forbidden(f"{upload.record.relpath} was uploaded; its local copy is "
                                f"gone (read it from prearchive/ or the archive)",
                                path=upload.record.relpath) from None
            raise Stale(f"{upload.record.relpath}: its local copy was removed (discarded?)",
                        path=upload.record.relpath) from None

    # -------------------------------------------------------------- streaming
    def _start_stream(self, upload: Upload) -> None:
        send, receive = trio.open_memory_channel[bytes](STREAM_CHUNKS)
        upload.stream_send = send
        upload.stream_done = trio.Event()
        upload.record.state = State.UPLOADING.value

        async def body() -> AsyncIterator[bytes]:
            async with receive:
                async for chunk in receive:
                    yield chunk

        async def run() -> None:
            with trio.CancelScope() as scope:
                upload.stream_scope = scope
                try:
                    async with self.limiter:
                        self._note_in_flight(+1)
                        try:
                            upload.stream_result = await self.importer.import_archive(
                                body(), name=archive_name(bytes(upload.head)),
                                **import_target(upload.record))
                        finally:
                            self._note_in_flight(-1)
                except XnatError as exc:
                    upload.stream_result = exc
                finally:
                    # However the request ended, nothing reads the stream any more:
                    # the writer's next send fails at once (the spool has it all)
                    # instead of waiting for room that never comes.
                    receive.close()
            if scope.cancelled_caught:
                upload.stream_result = XnatError("stream abandoned")
            assert upload.stream_done is not None
            upload.stream_done.set()

        self.nursery.start_soon(run)

    async def _stream_feed(self, upload: Upload, data: bytes) -> None:
        send = upload.stream_send
        if send is None:
            return
        try:
            await send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The request ended early (refused or failed); the spool has everything.
            upload.stream_send = None

    def _abandon_stream(self, upload: Upload, why: str) -> None:
        upload.next_offset = -1  # never sequential again
        if upload.stream_send is not None:
            log.info("%s: %s; uploading from the local copy at close", upload.record.relpath, why)
            upload.stream_send.close()
            upload.stream_send = None
            if upload.stream_scope is not None:
                upload.stream_scope.cancel()

    def _note_in_flight(self, delta: int) -> None:
        self.in_flight += delta
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

    # -------------------------------------------------------------- finishing
    async def finish(self, upload: Upload, *, closing: bool = False,
                     caller_stopped: Callable[[], bool] | None = None) -> None:
        """Called at flush (``closing``) and fsync: return once the server has the
        data, raise if refused; with write-behind, a flush of a DICOM file returns
        once it is queued (it is already on local disk).

        ``caller_stopped``: whether the process waiting has been told to stop
        (Ctrl-C): then it is answered at once (:class:`Interrupted`) and the
        upload, sent or being sent, finishes in the background.
        """
        while upload.background is not None and not closing:
            await upload.background.wait()  # fsync: the write-behind upload's answer
        async with upload.lock:
            if upload.record.size == 0 and upload.state is State.WRITING:
                # touch, a file manager's "New Document", cp of an empty file: nothing
                # to upload yet (written to later, it is uploaded then).
                upload.record.state = State.KEPT.value
                upload.record.message = "empty"
                upload.dirty = False
                await self._save(upload)
                return
            if not upload.dirty:
                upload.raise_if_failed()
                return
            if upload.kind is Kind.UNKNOWN or len(upload.head) < HEAD_BYTES:
                upload.head = bytearray(await self._read_spool(upload, 0, HEAD_BYTES))
                upload.record.kind = classify(upload.record.name, bytes(upload.head)).value
            kind = upload.kind
            if kind is Kind.LITTER:
                upload.record.state = State.KEPT.value
                upload.dirty = False
                await self._save(upload)
                return
            if kind is Kind.REFUSED:
                await self._fail(upload, "not DICOM and not a zip/tar archive: "
                                         "XNAT cannot import it")
                raise BadRequest(upload.record.message)
            upload.dirty = False
            upload.record.state = State.UPLOADING.value
            await self._save(upload)
            if closing and self.write_behind and kind is Kind.DICOM:
                upload.background = trio.Event()
                self.nursery.start_soon(self._upload_in_background, upload, upload.background)
                return
            if caller_stopped is None:
                await self._upload_and_record(upload)
                return
            done = upload.background = trio.Event()
            self.nursery.start_soon(self._upload_in_background, upload, done)
        # Outside the lock, which the upload takes.
        while not done.is_set():
            with trio.move_on_after(CALLER_POLL_INTERVAL):
                await done.wait()
            if not done.is_set() and caller_stopped():
                log.info("%s: the program waiting for its upload was interrupted; the "
                         "upload goes on", upload.record.relpath)
                raise Interrupted("interrupted while XNAT had not answered yet; the upload "
                                  "goes on", path=upload.record.relpath)
        upload.raise_if_failed()
        if upload.state is not State.DONE:  # a bug, logged by the background task
            raise XnatError(f"the upload of {upload.record.relpath} did not finish")

    async def abandon(self, upload: Upload, why: str) -> None:
        """The writer was killed while writing (a flush from a dying process): what
        it wrote is not sent, since XNAT would import a cut-off file as if whole.
        Kept and marked incomplete, so ``xnatfs uploads retry`` will not send it
        either. An archive streamed so far is cut off, unfinished."""
        async with upload.lock:
            if not upload.dirty:
                return
            streamed = upload.stream_send is not None
            self._abandon_stream(upload, why)
            upload.record.incomplete = True
            await self._fail(upload, f"incomplete, not sent: {why}; copy it again" + (
                " (XNAT may have kept the part streamed to it so far: look in prearchive/)"
                if streamed else ""), Interrupted)

    async def outcome(self, upload: Upload) -> None:
        """Wait for the upload under way (write-behind) and raise if it failed,
        starting none: for handles that did not write (another may be writing)."""
        while upload.background is not None:
            await upload.background.wait()
        upload.raise_if_failed()

    async def notice_outside_changes(self) -> None:
        """Failed uploads that ``xnatfs uploads retry`` sent or ``discard`` dropped
        meanwhile (their record on disk says so): show them as they are now.
        At most every NOTICE_INTERVAL s: ``ls -l`` asks once per entry."""
        if trio.current_time() - self._noticed_at < NOTICE_INTERVAL:
            return
        self._noticed_at = trio.current_time()
        settled = [u for u in self.uploads.values() if u.state is State.FAILED
                   and not u.open_handles and u.background is None]

        def read_records() -> list[tuple[Upload, UploadRecord | None]]:
            out: list[tuple[Upload, UploadRecord | None]] = []
            for upload in settled:
                try:
                    out.append((upload, read_record(upload.spool_dir)))
                except FileNotFoundError:
                    out.append((upload, None))
                except (OSError, ValueError, TypeError):
                    continue  # being rewritten, or not ours to judge: as it was
            return out

        if not settled:
            return
        for upload, on_disk in await trio.to_thread.run_sync(read_records,
                                                             limiter=self.disk_limiter):
            if on_disk is None:
                self.uploads.pop(upload.record.id, None)  # discarded
            elif on_disk.state == State.DONE.value:
                upload.record = on_disk

    async def _upload_and_record(self, upload: Upload) -> None:
        try:
            result = await self._upload(upload)
        except Unanswered as exc:
            await self._fail(upload, f"{exc}; not sent again: look in prearchive/ (or the "
                                     "archive) before 'xnatfs uploads retry'", type(exc))
            raise
        except XnatError as exc:
            await self._fail(upload, str(exc), type(exc))
            raise
        upload.record.state = State.DONE.value
        upload.record.result = result
        upload.record.finished = time.time()
        await self._save(upload)
        log.info("uploaded %s/%s → %s", upload.record.project, upload.record.relpath,
                 ", ".join(result))

    async def finish_background_uploads(self) -> None:
        """At unmount: write-behind uploads still queued or running go on until
        XNAT has them (each is bounded by the client's timeouts), as ``cp`` was
        told they would; the mount point is already free meanwhile."""
        waiting = [u for u in self.uploads.values() if u.background is not None]
        if waiting:
            log.info("unmounted; finishing %d write-behind uploads first", len(waiting))
        for upload in waiting:
            while upload.background is not None:
                await upload.background.wait()

    async def _upload_in_background(self, upload: Upload, done: trio.Event) -> None:
        """Write-behind: the upload a flush did not wait for. A refusal is recorded
        (status file, extended attributes, ``xnatfs uploads list``) and kept."""
        try:
            async with upload.lock:
                await self._upload_and_record(upload)
        except XnatError:
            pass  # _fail recorded it and kept the file
        except Exception:  # a bug: keep the mount alive, say so
            log.exception("background upload of %s failed", upload.record.relpath)
        finally:
            if upload.background is done:
                upload.background = None
            done.set()
        try:
            if self.on_finished is not None:
                self.on_finished(upload)
            await self.release(upload)  # its handles may all be closed by now
        except Exception:
            log.exception("cleaning up after the upload of %s failed", upload.record.relpath)

    async def _upload(self, upload: Upload) -> list[str]:
        if upload.stream_send is not None:
            await upload.stream_send.aclose()
            upload.stream_send = None
            assert upload.stream_done is not None
            await upload.stream_done.wait()
            outcome = upload.stream_result
            upload.stream_done = None
            if isinstance(outcome, list):
                return outcome
            if isinstance(outcome, NOT_RESENT):
                raise outcome
            log.warning("streaming %s failed (%s); uploading the local copy",
                        upload.record.relpath, outcome)
        return await self._upload_from_spool(upload)

    async def _upload_from_spool(self, upload: Upload) -> list[str]:
        failure: XnatError | None = None
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                async with self.limiter:
                    self._note_in_flight(+1)
                    try:
                        return await import_local_copy(self.importer, upload.record,
                                                       upload.data_path, bytes(upload.head))
                    finally:
                        self._note_in_flight(-1)
            except NOT_RESENT:
                raise
            except XnatError as exc:
                failure = exc
                log.warning("upload of %s failed (%s), attempt %d of %d",
                            upload.record.relpath, exc, attempt + 1, UPLOAD_ATTEMPTS)
                if attempt + 1 < UPLOAD_ATTEMPTS:
                    await trio.sleep(min(2 ** attempt, 8))
        assert failure is not None
        raise failure

    async def _fail(self, upload: Upload, message: str,
                    failure: type[XnatError] = BadRequest) -> None:
        """Record the upload as failed and keep it; ``failure`` is what a later
        fsync of a reading handle raises (its errno)."""
        upload.failure = failure
        upload.record.state = State.FAILED.value
        upload.record.message = message
        upload.record.finished = time.time()
        upload.dirty = False
        await self._save(upload)
        log.error("upload of %s/%s failed: %s (kept in %s)", upload.record.project,
                  upload.record.relpath, message, upload.spool_dir)

    async def release(self, upload: Upload) -> None:
        """Last handle closed: a finished upload's spool is no longer needed."""
        if upload.open_handles > 0 or upload.background is not None:
            return  # still open, or still uploading in the background

        def close() -> None:
            upload.close_spool()
            if upload.state is State.DONE:
                _remove_spool(upload.spool_dir)

        await trio.to_thread.run_sync(close, limiter=self.disk_limiter)

    # ------------------------------------------------------------- namespace
    async def rename(self, upload: Upload, new_relpath: str) -> None:
        """A file kept under a litter or temporary name is uploaded (by the caller,
        once its writers closed it) when renamed to a real name."""
        upload.record.relpath = new_relpath
        name = upload.record.name
        set_aside = upload.kind is Kind.LITTER or (upload.state is State.KEPT
                                                   and upload.record.size > 0)
        if set_aside and not is_litter(name):
            upload.record.kind = classify(name, bytes(upload.head)).value
            if upload.state is State.KEPT:
                upload.record.state = State.WRITING.value
                upload.record.message = ""
            upload.dirty = True
        await self._save(upload)

    async def set_mtime(self, upload: Upload, mtime_ns: int) -> None:
        upload.record.mtime_ns = mtime_ns
        await self._save(upload)

    def below(self, project: str, folder: str) -> list[Upload]:
        """The uploads in ``folder`` (a path below ``uploads/<project>/``) and its subfolders."""
        return [u for u in self.uploads.values() if u.record.project == project
                and u.record.relpath.startswith(folder + "/")]

    def move_folder(self, project: str, folder: str, new_folder: str) -> list[Upload]:
        """A folder renamed: the uploads below it move along, at once (no other
        request may see half of them moved); the caller saves them, having made
        sure none is :attr:`Upload.busy` (what they are uploaded as follows the path)."""
        moved = self.below(project, folder)
        for upload in moved:
            target = relocated(upload.record.relpath, folder, new_folder)
            assert target is not None  # below() chose it
            upload.record.relpath = target
        return moved

    async def save(self, uploads: list[Upload]) -> None:
        for upload in uploads:
            await self._save(upload)

    async def forget(self, upload: Upload) -> None:
        """``rm`` of an upload entry: the server keeps what it got; local copy goes."""
        self.uploads.pop(upload.record.id, None)

        def remove() -> None:
            upload.close_spool()
            _remove_spool(upload.spool_dir)

        await trio.to_thread.run_sync(remove, limiter=self.disk_limiter)

    async def local_space(self) -> os.statvfs_result:
        """The disk the local copies of uploads go to: the room an upload really
        has (XNAT does not say how much it has), and what file managers check
        before they copy (they refuse when a mount reports none)."""
        return await trio.to_thread.run_sync(os.statvfs, self.spool_root)

    def status_text(self, project: str | None = None) -> str:
        lines = []
        for upload in sorted(self.uploads.values(), key=lambda u: u.record.created):
            rec = upload.record
            if (project is not None and rec.project != project) or rec.kind == Kind.LITTER:
                continue
            detail = ", ".join(rec.result) if rec.state == State.DONE else rec.message
            lines.append(f"{rec.state:9} {rec.project}/{rec.relpath}"
                         + (f"  {detail}" if detail else ""))
        return "\n".join(lines) + ("\n" if lines else "")

    async def _save(self, upload: Upload) -> None:
        with _full_disk_refused(upload):
            await trio.to_thread.run_sync(_write_meta, upload, limiter=self.disk_limiter)


@contextlib.contextmanager
def _full_disk_refused(upload: Upload) -> Iterator[None]:
    """A full spool disk is the user's to fix (ENOSPC to ``cp``), not a bug."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NoSpace(f"no room left for the local copy of the upload in {upload.spool_dir}",
                      path=upload.record.relpath) from None


def _write_meta(upload: Upload) -> None:
    try:
        write_record(upload.spool_dir, upload.record)
    except FileNotFoundError:
        pass  # done and cleaned up (perhaps just now, by release): nothing to describe


def write_record(spool_dir: Path, record: UploadRecord) -> None:
    """Describe an upload next to its spool (atomically: a crash leaves old or new)."""
    meta = spool_dir / "meta.json"
    # One temporary per thread: two saves of one upload may run at once.
    tmp = spool_dir / f"meta.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, meta)


def read_record(spool_dir: Path) -> UploadRecord:
    """The record :func:`write_record` left (OSError, ValueError or TypeError if it
    is gone or unreadable)."""
    return UploadRecord(**json.loads((spool_dir / "meta.json").read_text()))


def record_retried(spool_dir: Path, record: UploadRecord, result: list[str]) -> None:
    """A kept upload sent by ``xnatfs uploads retry``: its copy goes; its record says
    done, for a mount still showing it (removed when the next mount starts)."""
    record.state, record.result = State.DONE.value, result
    record.message, record.finished = "", time.time()
    write_record(spool_dir, record)
    (spool_dir / "data").unlink(missing_ok=True)


def _remove_spool(spool_dir: Path) -> None:
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
                record.kind != Kind.LITTER.value):
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
        if record.get("kind") == Kind.LITTER.value or record.get("state") in (
                State.KEPT.value, State.DONE.value):
            _remove_spool(meta.parent)

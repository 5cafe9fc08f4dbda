"""The loss-free spool: a file written into the mount reaches XNAT, or stays on local disk.

Every file is kept on local disk (:mod:`.spoolfiles`: its local copy and the
record beside it) until its destination has confirmed it, so a failed upload
loses nothing: failures are retried; if they persist the copy is kept and
reported, listed again after a remount, and ``xnatfs uploads`` lists, retries
or discards it. ``close()`` (FUSE flush) and ``fsync()`` return only once the
destination has the data, and fail when it refused (write-behind: a flush
returns once the file is queued; fsync still waits). A writer killed midway
sends nothing: its file is kept, failed and marked incomplete.

Where files go, and how, is a :class:`Sender`'s business. To plug in a
second writer (files into archive resources, say):

1. implement :class:`Sender`: what a file is (``is_litter`` by its name,
   ``classify`` by its first bytes), which kinds are refused, sent while
   written (``streams``) or may be sent after close() returned
   (``writes_behind``), and one attempt at sending each way
   (``send_stream``, ``send_local_copy``; the spool retries, but not what
   :data:`NOT_RESENT` names);
2. give each file its destination: ``Sender.destination`` returns its details
   (JSON-able, no key named like a field of :class:`UploadRecord`); the
   record keeps them (``record.destination``, flat in ``meta.json``) for its
   sending and for a retry from the command line;
3. build a :class:`Spool` with it and call it from the mount's handlers
   (``imports.UploadManager`` does, for XNAT's importer).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import trio

from .errors import (BadRequest, Conflict, Forbidden, Interrupted, NotFound, Stale, Unanswered,
                     XnatError)
from .spoolfiles import (LITTER, UNKNOWN, State, Upload, UploadRecord, full_disk_refused,
                         kept_uploads, purge_local_only, remove_spool, reread_records,
                         save_record)

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3          # uploads from the spool after the stream failed
NOTICE_INTERVAL = 0.5        # s between looks at kept records changed from the command line
CALLER_POLL_INTERVAL = 0.2   # s between looks whether a close waiting for XNAT was interrupted
# Not sent again: the server said no, or got all of it and may have imported it.
NOT_RESENT = (BadRequest, Conflict, Forbidden, NotFound, Unanswered)


class Sender(Protocol):
    """What a destination is and how a file gets there (see the module docstring).
    Kinds are the sender's own strings, besides :data:`UNKNOWN` and :data:`LITTER`."""

    head_bytes: int          # how many first bytes classify() needs to see
    advice_unanswered: str   # a file sent whole but not answered: where to look first
    advice_sent: str         # a sent file's local copy is gone: where to read it instead
    advice_cut_off: str      # a stream cut off by a killed writer: what may have arrived

    resend_after_crash: bool  # sent after the next mount starts, when a crash left it queued
    sends_empty: bool         # an empty file is sent (else kept, until written to)

    def owns(self, record: UploadRecord) -> bool:
        """Whether a kept record is one of this sender's (spools may share a folder)."""

    def destination(self, project: str, relpath: str) -> dict[str, Any]:
        """Where a new file goes, as its record keeps it (JSON-able)."""

    def is_litter(self, name: str) -> bool:
        """Kept locally and never sent under this name (unless renamed)."""

    def classify(self, head: bytes) -> str:
        """What a file is, from its first ``head_bytes`` (fewer: it is that short)."""

    def refusal(self, kind: str) -> str | None:
        """Why a file of this kind cannot be sent (it fails at close), or None."""

    def streams(self, kind: str) -> bool:
        """Sent while it is written (in order), starting once it is classified."""

    def writes_behind(self, kind: str) -> bool:
        """With write-behind, its close() may return before the answer."""

    async def send_stream(self, record: UploadRecord, head: bytes,
                          body: AsyncIterator[bytes]) -> list[str]:
        """Send the file as ``body`` yields it; what the destination made of it."""

    async def send_local_copy(self, record: UploadRecord, data: Path,
                              head: bytes) -> list[str]:
        """One attempt at sending the local copy; what the destination made of it."""


@contextlib.contextmanager
def held_open(upload: Upload) -> Iterator[None]:
    """Counted as an open handle meanwhile: a sending that ends meanwhile
    removes the local copy of a confirmed file nobody holds open (an open with
    O_TRUNC waits in :meth:`Spool.truncate` before its handle exists)."""
    upload.open_handles += 1
    try:
        yield
    finally:
        upload.open_handles -= 1


class Spool:
    """Files written into the mount: their local copies, sending, and their status."""

    def __init__(self, sender: Sender, spool_root: Path, nursery: trio.Nursery, *,
                 site: str = "", write_behind: bool = False, max_parallel: int = 8) -> None:
        self.sender = sender
        self.site = site  # recorded with each upload: a retry must go to the same XNAT
        self.spool_root = spool_root
        spool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(spool_root, 0o700)
        purge_local_only(spool_root)
        self.nursery = nursery
        # close() of a file its sender writes behind returns once it is on local
        # disk; its upload runs in the background (fsync still waits for the answer).
        self.write_behind = write_behind
        self.on_finished: Callable[[Upload], None] | None = None  # background outcomes
        self.limiter = trio.CapacityLimiter(max_parallel)
        self.disk_limiter = trio.CapacityLimiter(4)
        self.uploads: dict[str, Upload] = {}     # by id
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.outcomes: Counter[str] = Counter()  # "sent", "failed" since the mount (status file)
        self._noticed_at = -math.inf  # when the records on disk were last looked at
        self._adopt_kept()

    def _adopt_kept(self) -> None:
        """Uploads an earlier mount of this site kept as failed (refused, server
        errors, cut off) are listed again, so a file manager shows them after a
        restart too. (At mount time, before any request is served, like the
        purge before it.) Ones left writing or uploading, by a crash or by
        another mount sharing the cache, stay for ``xnatfs uploads``."""
        for record, spool_dir in kept_uploads(self.spool_root):
            if not record.site or record.site != self.site or not self.sender.owns(record):
                continue
            if record.state == State.FAILED.value:
                upload = Upload(record, spool_dir)
                upload.close_spool()
                self.uploads[record.id] = upload
            elif self.sender.resend_after_crash:
                self._adopt_after_crash(record, spool_dir)

    def _adopt_after_crash(self, record: UploadRecord, spool_dir: Path) -> None:
        """A record an earlier mount of this site left unfinished (it crashed or
        was killed): one closed and queued is sent now (its sender checks
        whether the server has it already); one still being written is kept as
        cut off, and never sent."""
        upload = Upload(record, spool_dir)
        upload.close_spool()
        self.uploads[record.id] = upload
        if record.state == State.UPLOADING.value:
            log.info("sending %s/%s, queued when an earlier mount stopped", record.project,
                     record.relpath)
            upload.background = trio.Event()
            self.nursery.start_soon(self._upload_in_background, upload, upload.background)
            return
        record.state, record.incomplete = State.FAILED.value, True
        record.message = "incomplete, not sent: the mount stopped while it was written"
        upload.failure = Interrupted
        save_record(upload)

    def _classify(self, upload: Upload) -> None:
        """Its kind, from its name and the first bytes in ``upload.head``."""
        upload.record.kind = (LITTER if self.sender.is_litter(upload.record.name)
                              else self.sender.classify(bytes(upload.head)))

    # --------------------------------------------------------------- writing
    async def create(self, project: str, relpath: str,
                     destination: dict[str, Any] | None = None) -> Upload:
        """A new file; ``destination``: its details, if not the sender's for the path."""
        if destination is None:
            destination = self.sender.destination(project, relpath)

        def make() -> Upload:
            upload_id = uuid.uuid4().hex
            spool_dir = self.spool_root / upload_id
            spool_dir.mkdir(mode=0o700)
            upload = Upload(UploadRecord(upload_id, project, relpath, site=self.site,
                                         destination=destination), spool_dir)
            if self.sender.is_litter(upload.record.name):
                upload.record.kind = LITTER
            # A new file counts as written for a sender of empty files (cp of one writes nothing).
            upload.dirty = self.sender.sends_empty
            save_record(upload)
            return upload

        upload = await trio.to_thread.run_sync(make, limiter=self.disk_limiter)
        self.uploads[upload.record.id] = upload
        return upload

    async def write(self, upload: Upload, offset: int, data: bytes) -> int:
        """Never while the file is being sent (its lock: a close waiting for the
        answer, a write-behind sending): a second writer starting the file over
        under a request (``cp`` again, an editor saving twice) started a new
        stream that the waiting close then waited for, for ever, and its own
        close behind it; or changed a body whose length was sent. Such a write
        waits for that sending."""
        with held_open(upload):
            async with upload.lock:
                self._written_again(upload)
                return await self._write_now(upload, offset, data)

    async def truncate(self, upload: Upload, size: int) -> None:
        """``O_TRUNC`` or ``truncate()``: the upload starts over from ``size`` bytes
        (never while it is being sent, as :meth:`write`)."""
        with held_open(upload):
            async with upload.lock:
                self._written_again(upload)
                await self._truncate_now(upload, size)

    def _written_again(self, upload: Upload) -> None:
        """Called before a write or truncation, under the upload's lock (a sender
        whose finished files leave :attr:`uploads` takes them back here)."""

    async def _write_now(self, upload: Upload, offset: int, data: bytes) -> int:
        if upload.state in (State.DONE, State.FAILED):
            # Rewriting a finished upload starts it over (editors that save twice).
            upload.record.state = State.WRITING.value
            upload.record.result = []
            upload.record.message = ""
            upload.record.details = []
            upload.record.incomplete = False
        end = offset + len(data)
        if upload.stream_send is not None and offset == upload.next_offset:
            # A sequential write of a streaming file: the local copy and the
            # stream take it at the same time (one waits for the disk, the other
            # for the server).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._spool_write, upload, offset, data)
                await upload.feed_stream(data)
            upload.dirty = True
            upload.record.size = max(upload.record.size, end)
            upload.next_offset = end
            return len(data)
        await self._spool_write(upload, offset, data)
        upload.dirty = True
        upload.record.size = max(upload.record.size, end)
        if offset != upload.next_offset:
            upload.abandon_stream("out-of-order write")
            return len(data)
        upload.next_offset = end
        head_bytes = self.sender.head_bytes
        if upload.record.kind == UNKNOWN and len(upload.head) < head_bytes:
            upload.head += data[:head_bytes - len(upload.head)]
            if len(upload.head) >= head_bytes:
                self._classify(upload)
                if self.sender.streams(upload.record.kind):
                    self._start_stream(upload)
                    # Everything written so far is in the spool; it goes first.
                    await upload.feed_stream(await self._read_spool(upload, 0, end))
        return len(data)

    async def _spool_write(self, upload: Upload, offset: int, data: bytes) -> None:
        with full_disk_refused(upload):
            await trio.to_thread.run_sync(upload.write_spool, offset, data,
                                          limiter=self.disk_limiter)

    async def _truncate_now(self, upload: Upload, size: int) -> None:
        if size == upload.record.size:
            return
        await trio.to_thread.run_sync(upload.truncate_spool, size, limiter=self.disk_limiter)
        if size < upload.record.size:
            upload.abandon_stream("truncated")
            if size == 0:
                # A fresh start (editors, cp over an earlier copy): stream again.
                upload.next_offset = 0
                upload.head = bytearray()
                upload.record.kind = UNKNOWN
        upload.record.size = size
        upload.dirty = True
        upload.record.mtime_ns = None  # changed since a time was set
        if upload.state in (State.DONE, State.FAILED):
            # (as write: the last sending's result or failure is not this version's)
            upload.record.state = State.WRITING.value
            upload.record.result = []
            upload.record.message = ""
            upload.record.details = []
            upload.record.incomplete = False

    async def _read_spool(self, upload: Upload, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(upload.read_spool, offset, size,
                                             limiter=self.disk_limiter)

    async def read(self, upload: Upload, offset: int, size: int) -> bytes:
        """A kept file, litter a file manager reads back, a failed upload; an
        uploaded file's copy is gone: EACCES, not EIO (opening it still works, for
        an fsync that asks how its write-behind upload went)."""
        try:
            return await self._read_spool(upload, offset, size)
        except FileNotFoundError:
            if upload.state is State.DONE:
                raise Forbidden(f"{upload.record.relpath} was uploaded; its local copy is "
                                f"gone ({self.sender.advice_sent})",
                                path=upload.record.relpath) from None
            raise Stale(f"{upload.record.relpath}: its local copy was removed (discarded?)",
                        path=upload.record.relpath) from None

    # -------------------------------------------------------------- sending
    def _start_stream(self, upload: Upload) -> None:
        async def send(body: AsyncIterator[bytes]) -> list[str]:
            async with self._sending():
                return await self.sender.send_stream(upload.record, bytes(upload.head), body)

        upload.start_stream(self.nursery, send)

    @contextlib.asynccontextmanager
    async def _sending(self) -> AsyncIterator[None]:
        """One request to a destination: at most ``max_parallel`` at a time."""
        async with self.limiter:
            self._note_in_flight(+1)
            try:
                yield
            finally:
                self._note_in_flight(-1)

    def _note_in_flight(self, delta: int) -> None:
        self.in_flight += delta
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

    # -------------------------------------------------------------- finishing
    async def finish(self, upload: Upload, *, closing: bool = False,
                     caller_stopped: Callable[[], bool] | None = None) -> None:
        """Called at flush (``closing``) and fsync: return once the server has the
        data, raise if refused; with write-behind, a flush of a file its sender
        writes behind returns once it is queued (it is already on local disk).

        ``caller_stopped``: whether the process waiting has been told to stop
        (Ctrl-C): then it is answered at once (:class:`Interrupted`) and the
        upload, sent or being sent, finishes in the background.
        """
        while upload.background is not None and not closing:
            await upload.background.wait()  # fsync: the write-behind upload's answer
        async with upload.lock:
            if upload.record.size == 0 and upload.state is State.WRITING \
                    and not self.sender.sends_empty:
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
            if upload.record.kind == UNKNOWN or len(upload.head) < self.sender.head_bytes:
                upload.head = bytearray(await self._read_spool(upload, 0,
                                                               self.sender.head_bytes))
                self._classify(upload)
            kind = upload.record.kind
            if kind == LITTER:
                upload.record.state = State.KEPT.value
                upload.dirty = False
                await self._save(upload)
                return
            if (refusal := self.sender.refusal(kind)) is not None:
                await self._fail(upload, refusal)
                raise BadRequest(upload.record.message)
            upload.dirty = False
            upload.record.state = State.UPLOADING.value
            await self._save(upload)
            if closing and self.write_behind and self.sender.writes_behind(kind):
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
        either. A file streamed so far is cut off, unfinished."""
        async with upload.lock:
            if not upload.dirty:
                return
            streamed = upload.stream_send is not None
            upload.abandon_stream(why)
            upload.record.incomplete = True
            await self._fail(upload, f"incomplete, not sent: {why}; copy it again" + (
                f" ({self.sender.advice_cut_off})" if streamed else ""), Interrupted)

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

        if not settled:
            return
        for upload, on_disk in await trio.to_thread.run_sync(reread_records, settled,
                                                             limiter=self.disk_limiter):
            if on_disk is None:
                self.uploads.pop(upload.record.id, None)  # discarded
            elif on_disk.state == State.DONE.value:
                upload.record = on_disk

    async def _upload_and_record(self, upload: Upload) -> None:
        try:
            result = await self._upload(upload)
        except Unanswered as exc:
            await self._fail(upload, f"{exc}; not sent again: {self.sender.advice_unanswered}",
                             type(exc))
            raise
        except XnatError as exc:
            await self._fail(upload, str(exc), type(exc))
            raise
        upload.record.state = State.DONE.value
        self.outcomes["sent"] += 1
        upload.record.result = result
        upload.record.finished = time.time()
        await self._save(upload)
        log.info("uploaded %s/%s → %s", upload.record.project, upload.record.relpath,
                 ", ".join(result))

    async def sync(self) -> None:
        """Wait for every upload sent behind a close (failures stay recorded)."""
        for upload in list(self.uploads.values()):
            while upload.background is not None:
                await upload.background.wait()

    async def finish_background_uploads(self) -> None:
        """At unmount: write-behind uploads still queued or running go on until
        XNAT has them (each is bounded by the client's timeouts), as ``cp`` was
        told they would; the mount point is already free meanwhile."""
        waiting = sum(u.background is not None for u in self.uploads.values())
        if waiting:
            log.info("unmounted; finishing %d write-behind uploads first", waiting)
        await self.sync()

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
            outcome = await upload.end_stream()
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
                async with self._sending():
                    return await self.sender.send_local_copy(upload.record, upload.data_path,
                                                             bytes(upload.head))
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
        self.outcomes["failed"] += 1
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
                remove_spool(upload.spool_dir)

        await trio.to_thread.run_sync(close, limiter=self.disk_limiter)

    # ------------------------------------------------------------- namespace
    async def rename(self, upload: Upload, new_relpath: str) -> None:
        """A file kept under a litter or temporary name is uploaded (by the caller,
        once its writers closed it) when renamed to a real name."""
        upload.record.relpath = new_relpath
        set_aside = upload.record.kind == LITTER or (upload.state is State.KEPT
                                                     and upload.record.size > 0)
        if set_aside and not self.sender.is_litter(upload.record.name):
            self._classify(upload)
            if upload.state is State.KEPT:
                upload.record.state = State.WRITING.value
                upload.record.message = ""
            upload.dirty = True
        await self._save(upload)

    async def set_mtime(self, upload: Upload, mtime_ns: int) -> None:
        upload.record.mtime_ns = mtime_ns
        await self._save(upload)

    async def save(self, uploads: list[Upload]) -> None:
        for upload in uploads:
            await self._save(upload)

    async def forget(self, upload: Upload) -> None:
        """``rm`` of an upload entry: the server keeps what it got; local copy goes."""
        self.uploads.pop(upload.record.id, None)

        def remove() -> None:
            upload.close_spool()
            remove_spool(upload.spool_dir)

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
            if (project is not None and rec.project != project) or rec.kind == LITTER:
                continue
            detail = ", ".join(rec.result) if rec.state == State.DONE else rec.message
            lines.append(f"{rec.state:9} {rec.project}/{rec.relpath}"
                         + (f"  {detail}" if detail else ""))
            lines += [f"    {line}" for line in rec.details]
        return "\n".join(lines) + ("\n" if lines else "")

    async def _save(self, upload: Upload) -> None:
        with full_disk_refused(upload):
            await trio.to_thread.run_sync(save_record, upload, limiter=self.disk_limiter)


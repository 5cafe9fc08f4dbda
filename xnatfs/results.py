"""Files written into archive resources: the spool's sender for XNAT's resources.

A pipeline's outputs written below ``.../resources/<LABEL>/files/`` go
through the loss-free spool (:mod:`.spool`) like uploads: kept on local disk
until XNAT has them, retried, listed by ``xnatfs uploads``, sent after a
crash. This module says how such a file reaches XNAT and when it counts as
there:

* **Confirmed by the listing, never by the answer.** XNAT answers 200 to an
  upload it did not store (a user who may read but not edit) and 200 with a
  ``duplicates`` list to one whose name is taken. A file is sent only when
  the resource's listing afterwards shows it with our size and MD5.
* **One writer per catalog.** XNAT rewrites a resource's catalog for every
  file and fails the second of two concurrent writers (500). Each resource
  has one queue (:class:`ResourceQueue`), sending one request at a time.
* **Many small files, few requests.** Files that arrive while a request of
  their resource is under way wait for it, and then go together as one zip
  with ``extract=true`` (XNAT unpacks it into the resource's root keeping
  the paths; inner ``.gz`` names are kept, only a bare ``.gz`` upload would
  be gunzipped), checked by one listing. A FreeSurfer tree written with
  write-behind costs a handful of requests, not one round trip per file.
* **Scanner data is not touched by accident.** A duplicate is never
  overwritten unless the file was opened to replace it under
  ``--allow-overwrite`` (``overwrite`` in its record).
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import logging
import os
import re
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from .client import RemoteFile
from .errors import Conflict, Forbidden, XnatError
from .imports import is_litter as is_upload_litter
from .spool import Spool
from .spoolfiles import State, Upload, UploadRecord

log = logging.getLogger(__name__)

FILE_KIND = "file"                  # every file is sent as it is
BATCH_FILE_MAX = 8 * 1024 * 1024    # larger files go alone
BATCH_BYTES_MAX = 256 * 1024 * 1024
BATCH_FILES_MAX = 1000
BATCH_NAME = "xnatfs-batch-{}.zip"  # what XNAT is told the zip is called (never stored)
# Temporaries that tools rename into place: Python's tempfile (mkstemp),
# sed -i's (mkstemp "sedXXXXXX"), editors' swap and backup files. Sent when
# renamed to a real name.
TEMPORARY_PATTERNS = (re.compile(r"tmp[a-z0-9_]{8}(\.[^.]+)*"), re.compile(r"sed[A-Za-z0-9]{6}"),
                      re.compile(r".*\.(tmp|swp|swx|part)"), re.compile(r"\.#.*"))
LOCK_NAME = "resource-writes.lock"  # held by the mount that sends what a crash left


class ResourceClient(Protocol):
    """What the sender needs of :class:`~xnatfs.client.XnatClient`."""

    async def put_file(self, resource_uri: str, path: str, data: Path, size: int, *,
                       overwrite: bool = False, extract: bool = False,
                       content_type: str = "application/octet-stream") -> list[str]: ...

    async def list_resource_files(self, resource_uri: str) -> list[RemoteFile]: ...


def is_temporary(name: str) -> bool:
    """Kept locally and sent only once renamed: litter, rsync's and Python's
    temporaries, editors' swap files."""
    return is_upload_litter(name) or any(p.fullmatch(name) for p in TEMPORARY_PATTERNS) \
        or fnmatch.fnmatchcase(name, "*.~*")


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_batch(zip_path: Path, members: list[tuple[str, Path]]) -> int:
    """The zip of a batch (stored, not compressed: outputs are often compressed
    already, and the link is rarely slower than deflate); its size."""
    fd = os.open(zip_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # as the spool
    with os.fdopen(fd, "wb") as file, zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED,
                                                      allowZip64=True) as zf:
        for name, data in members:
            zf.write(data, name)
    return zip_path.stat().st_size


@dataclass(eq=False)
class Pending:
    """One file waiting in its resource's queue."""

    path: str                 # in the resource
    data: Path                # its local copy
    size: int
    md5: str
    overwrite: bool
    done: trio.Event = field(default_factory=trio.Event)
    result: list[str] | XnatError | _Stray | None = None


class ResourceQueue:
    """One resource's files, sent one request at a time, as batches."""

    def __init__(self, sender: ResourceSender, resource_uri: str) -> None:
        self.sender = sender
        self.resource_uri = resource_uri
        self.waiting: list[Pending] = []
        self.running = False

    async def send(self, item: Pending) -> list[str]:
        self.waiting.append(item)
        if not self.running:
            self.running = True
            self.sender.nursery.start_soon(self._drain)
        await item.done.wait()
        if isinstance(item.result, XnatError):
            raise item.result
        assert isinstance(item.result, list)
        return item.result

    async def _drain(self) -> None:
        try:
            while self.waiting:
                batch = self._next_batch()
                try:
                    async with self.sender.requests:
                        await self._send(batch)
                except XnatError as exc:
                    for item in batch:
                        if not isinstance(item.result, list):
                            item.result = exc
                except BaseException:
                    for item in batch:  # cancelled (unmount) or a bug: nobody waits forever
                        if not isinstance(item.result, list):
                            item.result = XnatError("the send was stopped")
                    raise
                finally:
                    for item in batch:
                        item.done.set()
        finally:
            self.running = False
            for item in self.waiting:  # only if cancelled
                item.result = item.result or XnatError("the send was stopped")
                item.done.set()

    def _next_batch(self) -> list[Pending]:
        """The first waiting file alone, or with the small new files after it."""
        first = self.waiting.pop(0)
        if first.overwrite or first.size > BATCH_FILE_MAX:
            return [first]
        batch, total = [first], first.size
        for item in list(self.waiting):
            if len(batch) >= BATCH_FILES_MAX or total + item.size > BATCH_BYTES_MAX:
                break
            if item.overwrite or item.size > BATCH_FILE_MAX or \
                    any(b.path == item.path for b in batch):
                continue
            self.waiting.remove(item)
            batch.append(item)
            total += item.size
        return batch

    async def _put(self, batch: list[Pending]) -> list[str]:
        """One request: a file alone as it is, else a zip (XNAT refuses an empty
        body, 400: an empty file goes in a zip too). The duplicates XNAT names."""
        if len(batch) == 1 and batch[0].size > 0:
            item = batch[0]
            return await self.sender.client.put_file(self.resource_uri, item.path, item.data,
                                                     item.size, overwrite=item.overwrite)
        return await self._send_zip(batch)

    async def _send(self, batch: list[Pending]) -> None:
        duplicates = await self._put(batch)
        listed = await self._listing()
        for item in batch:
            item.result = self._outcome(item, listed.get(item.path), item.path in duplicates)
        strays = [i for i in batch if isinstance(i.result, _Stray)]
        for item in strays:
            # A file left on disk by a failed catalog write (another writer's
            # 500) is a duplicate of nothing listed: stored again over it.
            item.overwrite = True
            await self._put([item])
        if strays:
            listed = await self._listing()
            for item in strays:
                item.result = self._outcome(item, listed.get(item.path), False)
                if isinstance(item.result, _Stray):
                    item.result = XnatError(f"{item.path}: XNAT keeps answering that it has "
                                            "the file, but does not list it")

    async def _listing(self) -> dict[str, RemoteFile]:
        """The resource's files as XNAT lists them now (kept for the mount's
        listings, which then need not ask again)."""
        files = await self.sender.client.list_resource_files(self.resource_uri)
        self.sender.listings[self.resource_uri] = files
        return {f.path: f for f in files}

    async def _send_zip(self, batch: list[Pending]) -> list[str]:
        zip_path = self.sender.batch_dir / BATCH_NAME.format(uuid.uuid4().hex)
        try:
            size = await trio.to_thread.run_sync(
                write_batch, zip_path, [(item.path, item.data) for item in batch])
            log.debug("sending %d files to %s as one zip of %d bytes", len(batch),
                      self.resource_uri, size)
            return await self.sender.client.put_file(
                self.resource_uri, zip_path.name, zip_path, size, extract=True,
                overwrite=batch[0].overwrite, content_type="application/zip")
        finally:
            await trio.to_thread.run_sync(lambda: zip_path.unlink(missing_ok=True))

    def _outcome(self, item: Pending, listed: RemoteFile | None,
                 duplicate: bool) -> list[str] | XnatError | _Stray:
        """What the listing says of one file we sent."""
        uri = f"{self.resource_uri}/files/{item.path}"
        if listed is not None and listed.size == item.size and (
                listed.digest is None or listed.digest.lower() == item.md5):
            return [uri]
        if listed is not None and duplicate:
            return Conflict(f"XNAT has another file under this name ({uri}); the mount "
                            "replaces files only with --allow-overwrite", path=uri)
        if duplicate:
            return _Stray(uri)
        if listed is not None:
            return XnatError(f"XNAT lists {uri} with {listed.size} bytes and MD5 "
                             f"{listed.digest}, not the {item.size} bytes and MD5 "
                             f"{item.md5} sent", path=uri)
        return Forbidden(f"XNAT answered but did not store {uri}: your account may "
                         "read this project but not write to it", path=uri)


class _Stray:
    """XNAT called the file a duplicate, but does not list it (an outcome to act
    on, not an error)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri


class ResourceSender:
    """The spool's :class:`~xnatfs.spool.Sender` for files of archive resources."""

    head_bytes = 0
    resend_after_crash = True
    sends_empty = True          # an empty output (a "done" marker) is a file too
    advice_unanswered = "look in the resource's folder before 'xnatfs uploads retry'"
    advice_sent = "read it from the archive"
    advice_cut_off = "nothing of it was sent"

    def __init__(self, client: ResourceClient, nursery: trio.Nursery, batch_dir: Path, *,
                 max_requests: int = 4) -> None:
        self.client = client
        self.nursery = nursery
        self.batch_dir = batch_dir
        batch_dir.mkdir(mode=0o700, exist_ok=True)
        self.requests = trio.CapacityLimiter(max_requests)  # across resources
        self.queues: dict[str, ResourceQueue] = {}
        self.listings: dict[str, list[RemoteFile]] = {}  # each resource's, last checked

    def owns(self, record: UploadRecord) -> bool:
        return "resource" in record.destination

    def destination(self, project: str, relpath: str) -> dict[str, Any]:
        raise TypeError("a resource file's destination is given when it is made")

    def is_litter(self, name: str) -> bool:
        return is_temporary(name)

    def classify(self, head: bytes) -> str:
        return FILE_KIND

    def refusal(self, kind: str) -> str | None:
        return None

    def streams(self, kind: str) -> bool:
        return False  # the length must be known: XNAT refuses chunked raw bodies

    def writes_behind(self, kind: str) -> bool:
        return True

    async def send_stream(self, record: UploadRecord, head: bytes,
                          body: AsyncIterator[bytes]) -> list[str]:
        raise TypeError("resource files are not streamed")

    async def send_local_copy(self, record: UploadRecord, data: Path, head: bytes) -> list[str]:
        size, md5 = await trio.to_thread.run_sync(
            lambda: (os.stat(data).st_size, md5_of(data)))
        resource_uri = record.destination["resource"]
        queue = self.queues.get(resource_uri)
        if queue is None:
            queue = self.queues[resource_uri] = ResourceQueue(self, resource_uri)
        return await queue.send(Pending(record.destination["path"], data, size, md5,
                                        bool(record.destination.get("overwrite"))))


def resource_destination(resource_uri: str, path: str, *, overwrite: bool) -> dict[str, Any]:
    """What a record of a resource file keeps of where it goes."""
    return {"resource": resource_uri, "path": path, "overwrite": overwrite}


class ResultWrites(Spool):
    """Files written into archive resources, kept and sent by the spool."""

    def __init__(self, client: ResourceClient, spool_root: Path, nursery: trio.Nursery, *,
                 site: str = "", write_behind: bool = False, max_requests: int = 4) -> None:
        spool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sender_of_resources = ResourceSender(client, nursery, spool_root / "batches",
                                                  max_requests=max_requests)
        # Files a crashed mount left queued are sent by the next mount, unless
        # another mount sharing this cache is alive (it may be sending them).
        self._lock_fd = os.open(spool_root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another mount uses %s: files left queued there are left to it",
                     spool_root)
            self.sender_of_resources.resend_after_crash = False
        # The spool's own bound counts files waiting in their queue too: it must
        # not cap a batch (the sender bounds the requests).
        super().__init__(self.sender_of_resources, spool_root, nursery, site=site,
                         write_behind=write_behind, max_parallel=10_000)
        self.on_rewritten: Callable[[Upload], None] | None = None

    async def new_file(self, project: str, shown_path: str, resource_uri: str, path: str, *,
                       overwrite: bool = False) -> Upload:
        """A file made (or replaced, ``overwrite``) at ``path`` in a resource;
        ``shown_path``: where the mount shows it, below the project's folder."""
        return await self.create(project, shown_path,
                                 resource_destination(resource_uri, path, overwrite=overwrite))

    def _written_again(self, upload: Upload) -> None:
        """A file XNAT confirmed, and dropped from the spool, is written again
        (after waiting for that sending, see Spool.write): the mount says how
        (``on_rewritten``: may it replace XNAT's?)."""
        if upload.state is State.DONE and self.uploads.get(upload.record.id) is not upload \
                and self.on_rewritten is not None:
            self.on_rewritten(upload)

    async def _upload_and_record(self, upload: Upload) -> None:
        if upload.dirty:
            # Queued behind a close (write-behind), and written again before
            # its turn came: half a new version is not sent; that writer's
            # close sends it whole.
            upload.record.state = State.WRITING.value
            await self._save(upload)
            return
        await super()._upload_and_record(upload)

    def in_resource(self, resource_uri: str) -> list[Upload]:
        """Its files not yet confirmed (written, queued, failed)."""
        return [u for u in self.uploads.values() if u.state is not State.DONE
                and u.record.destination.get("resource") == resource_uri]

    async def move(self, upload: Upload, shown_path: str, path: str, *,
                   overwrite: bool) -> None:
        """Renamed within its resource (a temporary renamed into place)."""
        upload.record.destination.update(path=path, overwrite=overwrite)
        await self.rename(upload, shown_path)

    def drop(self, upload: Upload) -> None:
        """Confirmed: XNAT's listing shows it from now on (its copy goes at release)."""
        self.uploads.pop(upload.record.id, None)


async def send_kept(client: ResourceClient, record: UploadRecord, data: Path) -> list[str]:
    """One attempt at sending a kept file from the command line (``xnatfs uploads
    retry``), checked against the listing as the mount checks it."""
    async with trio.open_nursery() as nursery:
        sender = ResourceSender(client, nursery, data.parent)
        return await sender.send_local_copy(record, data, b"")

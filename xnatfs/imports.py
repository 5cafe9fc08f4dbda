"""Writes below ``uploads/<PROJECT>/`` become imports into XNAT's prearchive.

Every file written there goes through the loss-free spool (:mod:`.spool`:
kept on local disk until XNAT confirmed it, retried, listed by ``xnatfs
uploads``); this module says what such a file is and how XNAT's importer
takes it. What a file is gets decided by its content, not its name (so tools
that write to a temporary name and rename work):

* archives (zip, tar, tar.gz) → ``DICOM-zip`` import. A file written
  sequentially starts flowing to the server while it is being written,
  through a bounded channel (bounded memory); an out-of-order write drops the
  stream and the spool is uploaded at close instead;
* DICOM files (``DICM`` at byte 128) → ``gradual-DICOM``, one request each
  (the only kind ``--write-behind`` sends after close() returned);
* file-manager litter (``.DS_Store``, ``._*``, ``Thumbs.db``...) is accepted
  and kept locally but never uploaded, unless renamed to a real name;
* a ``.csv`` directly in a project's folder whose header makes it a
  spreadsheet of subjects or sessions is checked and applied
  (:mod:`.spreadsheets`); the sender sees it as text, and decides once it has
  all of it;
* anything else is refused at close with EINVAL and a message in the status.

Labels: XNAT takes subject and session from the DICOM headers. A folder named
``subject=LABEL`` or ``session=LABEL`` anywhere below the project folder
names them instead; other folders only organise the upload.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol, TypedDict

import trio

from .naming import require_label
from .spool import Spool
from .spoolfiles import Upload, UploadRecord
from .spreadsheets import SHEET_KIND, SheetClient, send_sheet

LITTER_PATTERNS = (".DS_Store", "._*", "Thumbs.db", "ehthumbs.db", "desktop.ini",
                   ".goutputstream-*", ".directory", ".~lock.*#", "*~", ".Trash-*",
                   ".fuse_hidden*", ".nfs*")
RSYNC_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9]{6}")
HEAD_BYTES = 264             # enough to recognise zip, gzip, tar (ustar at 257) and DICOM


class Kind(str, enum.Enum):
    """What XNAT's importer makes of a file (the spool's own kinds are
    ``spoolfiles.UNKNOWN`` and ``spoolfiles.LITTER``)."""

    ARCHIVE = "archive"
    DICOM = "dicom"
    TEXT = "text"             # perhaps a spreadsheet (spreadsheets.SHEET_KIND once read so)
    REFUSED = "refused"       # neither DICOM nor an archive nor text


def is_litter(name: str) -> bool:
    """Kept locally, never uploaded unless renamed to another name: file-manager
    litter, and the temporaries that tools rename once complete (GNOME's
    ``.goutputstream-*``, rsync's ``.NAME.XXXXXX``). rsync's is uploaded at its
    rename: a failed close ends rsync's whole run, a failed rename only that
    file's, and an rsync stopped with Ctrl-C deletes its temporary unsent."""
    return RSYNC_TEMPORARY.fullmatch(name) is not None or any(
        fnmatch.fnmatchcase(name, pattern) for pattern in LITTER_PATTERNS)


def classify(head: bytes) -> Kind:
    """What a file is, from its first bytes (at least 264 of them when the file is that long)."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return Kind.ARCHIVE
    if head.startswith(b"\x1f\x8b"):
        return Kind.ARCHIVE  # tar.gz / tgz
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Kind.ARCHIVE
    if len(head) >= 132 and head[128:132] == b"DICM":
        return Kind.DICOM
    if b"\0" not in head:
        return Kind.TEXT
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


class Importer(SheetClient, Protocol):
    """What uploads need from the client (``XnatClient`` implements it): its
    importers, and the calls of a spreadsheet."""

    async def import_archive(self, body: Path | AsyncIterator[bytes], *, name: str,
                             project: str, subject: str | None, session: str | None,
                             direct_archive: bool) -> list[str]: ...

    async def import_dicom_file(self, path: Path, *, project: str, subject: str | None,
                                session: str | None, direct_archive: bool) -> str: ...


def import_target(record: UploadRecord) -> ImportTarget:
    """Where an upload goes: its project, the labels its path names, and the
    mount's --direct-archive when it was made (its record's destination)."""
    subject, session = labels_from_path(record.relpath)
    return ImportTarget(project=record.project, subject=subject, session=session,
                        direct_archive=record.destination.get("direct_archive", False))


NOT_IMPORTABLE = "not DICOM and not a zip/tar archive: XNAT cannot import it"


async def import_local_copy(importer: Importer, record: UploadRecord, data: Path,
                            head: bytes) -> list[str]:
    """One attempt at sending an upload's local copy (the mount, and ``xnatfs
    uploads retry``): an archive through DICOM-zip, a DICOM file through
    gradual-DICOM, a spreadsheet row by row."""
    if record.kind in (Kind.TEXT.value, SHEET_KIND):
        return await send_sheet(importer, record, data, NOT_IMPORTABLE)
    if record.kind == Kind.ARCHIVE.value:
        return await importer.import_archive(data, name=archive_name(head),
                                             **import_target(record))
    return [await importer.import_dicom_file(data, **import_target(record))]


class ImportSender:
    """The spool's :class:`~.spool.Sender` for XNAT's importer."""

    head_bytes = HEAD_BYTES
    advice_unanswered = "look in prearchive/ (or the archive) before 'xnatfs uploads retry'"
    advice_sent = "read it from prearchive/ or the archive"
    advice_cut_off = "XNAT may have kept the part streamed to it so far: look in prearchive/"

    def __init__(self, importer: Importer, *, direct_archive: bool = False) -> None:
        self.importer = importer
        self.direct_archive = direct_archive  # kept in each record, for a later retry

    sends_empty = False         # no importer takes an empty file
    resend_after_crash = False  # an import cut off may be in the prearchive: the user decides

    def owns(self, record: UploadRecord) -> bool:
        return "resource" not in record.destination  # see results.ResourceSender

    def destination(self, project: str, relpath: str) -> dict[str, Any]:
        # The labels are not kept: they follow the path until the file is sent.
        return {"direct_archive": self.direct_archive}

    def is_litter(self, name: str) -> bool:
        return is_litter(name)

    def classify(self, head: bytes) -> str:
        return classify(head).value

    def refusal(self, kind: str) -> str | None:
        if kind == Kind.REFUSED:
            return NOT_IMPORTABLE
        return None

    def streams(self, kind: str) -> bool:
        return kind == Kind.ARCHIVE

    def writes_behind(self, kind: str) -> bool:
        return kind == Kind.DICOM

    async def send_stream(self, record: UploadRecord, head: bytes,
                          body: AsyncIterator[bytes]) -> list[str]:
        return await self.importer.import_archive(body, name=archive_name(head),
                                                  **import_target(record))

    async def send_local_copy(self, record: UploadRecord, data: Path, head: bytes) -> list[str]:
        return await import_local_copy(self.importer, record, data, head)


class UploadManager(Spool):
    """The upload area's files: the spool, sending to XNAT's importer, and the
    area's folders."""

    def __init__(self, importer: Importer, spool_root: Path, nursery: trio.Nursery, *,
                 site: str = "", direct_archive: bool = False, write_behind: bool = False,
                 max_parallel: int = 8) -> None:
        super().__init__(ImportSender(importer, direct_archive=direct_archive), spool_root,
                         nursery, site=site, write_behind=write_behind,
                         max_parallel=max_parallel)
        self.importer = importer
        self.direct_archive = direct_archive

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

"""The prearchive: where uploaded DICOM waits to be archived, as in XNAT 1.8.

This module holds the HTTP-free logic behind ``/data/services/import``,
``/data/prearchive/...`` and ``/data/services/archive``. Every method either
returns what the server needs for its response or raises
``StoreError(status, message)`` with XNAT's status and text. Permission checks
stay in the server, except that an upload only lands in a project the user
may add data to (owner, member or admin), exactly as XNAT silently routes
anything else to ``Unassigned``.

How the store's tables model XNAT's prearchive folders:

* A ``prearc_sessions`` row is one ``/prearchive/projects/P/TS/FOLDER`` entry.
* ``prearc_files.scan_id`` is the scan *directory* XNAT files an object under
  (``SCANS/{dir}/DICOM/{name}``): the series number, or the cleaned
  SeriesInstanceUID. Two series that share a number share a directory, so file
  names are unique per directory (``GradualDicomImporter.getSafeFile``), and the
  scan IDs clients see are worked out when listing or archiving, where clashes
  become ``{n}-{MOD}{k}`` (``DICOMSessionBuilder``).
* Two tables of our own, created here so ``store.py`` stays untouched:
  ``prearc_series`` (each series' modality, needed for ``{MOD}``) and
  ``prearc_session_details`` (fields that become experiment fields on archive,
  and the uploader, who is the user an automatic archive runs as).

Blobs are shared, never copied, when a session is archived: the archive's
``files`` rows point at the prearchive's blobs, and ``Store._drop_blob`` only
deletes a blob once neither table refers to it.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import tempfile
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from xnatfs.testing.dicomimport import (
    DicomInstance,
    clean_label,
    generated_file_name,
    iter_dicom_instances,
    lead_modality,
    read_dicom,
    requested_file_name,
    scan_modality_code,
    session_xsi_type,
)
from xnatfs.testing.store import Store, StoreError

UNASSIGNED = "Unassigned"
DICOM_RESOURCE = "DICOM"
DEFAULT_RECEIVING_IDLE_SECONDS = 300.0  # XNAT's sessionXmlRebuilderInterval: 5 minutes

# PrearcSessionArchiver's messages.
PRE_EXISTS = "Session already exists, retry with overwrite enabled"
SUBJECT_MOD = "Invalid modification of session subject via archive process."
UID_MOD = "Invalid modification of session UID via archive process."
MODALITY_MOD = ("Invalid modification of session modality via archive process.  "
                "Data may require a manual merge.")
BUSY_MESSAGE = "Operation already in progress on this prearchive entry."

_RECEIVING = ("RECEIVING", "RECEIVING_INTERRUPT")
_INTERRUPTABLE = ("READY", "ERROR", "CONFLICT")
_IN_PROGRESS = ("BUILDING", "ARCHIVING", "MOVING", "DELETING", "SEPARATING")
STATUSES = frozenset((*_RECEIVING, *_INTERRUPTABLE, *_IN_PROGRESS,
                      *(f"QUEUED_{s}" for s in _IN_PROGRESS), *(f"_{s}" for s in _IN_PROGRESS)))
_AUTOARCHIVE_BY_CODE = {4: "AutoArchive", 5: "AutoArchiveOverwrite"}

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS prearc_series (
        session_id INTEGER NOT NULL REFERENCES prearc_sessions(id) ON DELETE CASCADE,
        series_uid TEXT NOT NULL, modality TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (session_id, series_uid))""",
    """CREATE TABLE IF NOT EXISTS prearc_session_details (
        session_id INTEGER PRIMARY KEY REFERENCES prearc_sessions(id) ON DELETE CASCADE,
        session_type TEXT NOT NULL DEFAULT '', scanner_manufacturer TEXT NOT NULL DEFAULT '',
        scanner_model TEXT NOT NULL DEFAULT '', field_strength TEXT NOT NULL DEFAULT '',
        uploader TEXT NOT NULL DEFAULT '')""",
)

_DEST_PREARCHIVE = re.compile(r"/prearchive(?:/projects/([^/]+))?/?")
_DEST_ARCHIVE = re.compile(
    r"/archive/projects/([^/]+)(?:/subjects/([^/]+)(?:/experiments/([^/]+))?)?/?")
_SRC = re.compile(r"/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?")


@dataclass(frozen=True)
class MergePolicy:
    """What archiving may do to an experiment that already exists.

    ``allow_merge`` False refuses any existing experiment (``PRE_EXISTS``);
    ``override_exceptions`` lets a differing study UID through and folds a scan
    whose UID is already archived under another number into that scan.
    """

    allow_merge: bool
    override_exceptions: bool

    @classmethod
    def for_import(cls, overwrite: str | None) -> MergePolicy:
        """``Importer.parseOverrideValue``: only a *missing* ``overwrite`` refuses
        to merge; ``delete``/``override`` also override, any other value
        (``none`` and ``true`` included) just merges."""
        if overwrite is None:
            return cls(False, False)
        return cls(True, overwrite.lower() in ("delete", "override"))

    @classmethod
    def for_archive(cls, overwrite: str | None) -> MergePolicy:
        """``Archiver``: the session merge is always allowed (it passes
        ``allowSessionMerge=true``); ``append``/``delete`` override."""
        return cls(True, (overwrite or "").lower() in ("append", "delete"))

    @classmethod
    def for_autoarchive(cls, autoarchive: str) -> MergePolicy | None:
        return {"AutoArchive": cls(True, False),
                "AutoArchiveOverwrite": cls(True, True)}.get(autoarchive)


@dataclass(frozen=True)
class PrearchiveScan:
    """A scan as the built session shows it, and where its files live."""

    id: str
    directory: str
    series_uid: str
    xsi_type: str
    series_description: str
    modality: str
    file_count: int
    file_size: int


@dataclass(frozen=True)
class PrearchiveFile:
    scan_id: str
    resource: str
    path: str
    size: int
    digest: str
    uri: str
    blob_path: Path

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def listing_row(self) -> dict[str, str]:
        return {"Name": self.name, "Size": str(self.size), "URI": self.uri}


@dataclass(frozen=True)
class _Destination:
    to_archive: bool
    project: str | None = None
    subject: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class _ImportRequest:
    project: str | None
    subject: str | None
    session: str | None
    to_archive: bool
    direct_archive: bool
    ignore_unparsable: bool
    policy: MergePolicy


def prearchive_url(project: str, timestamp: str, folder: str) -> str:
    """The ``url`` column of a listing row: no ``/data``."""
    return f"/prearchive/projects/{project}/{timestamp}/{folder}"


class Prearchive:
    """Prearchive sessions, imports into them, and archiving out of them.

    ``clock`` is injectable so tests can age sessions without sleeping.
    """

    def __init__(self, store: Store, *,
                 receiving_idle_seconds: float = DEFAULT_RECEIVING_IDLE_SECONDS,
                 clock: Callable[[], dt.datetime] = dt.datetime.now) -> None:
        self.store = store
        self.receiving_idle_seconds = receiving_idle_seconds
        self._clock = clock
        with store.transaction():
            for statement in _SCHEMA:
                store.execute(statement)

    # ---------------------------------------------------------------- imports
    def import_dicom_zip(self, archive: Path | BinaryIO, archive_name: str,
                         params: Mapping[str, str], user: str) -> list[str]:
        """``import-handler=DICOM-zip``: the URIs XNAT's body would list.

        ``archive`` is a file or a stream read front to back (a request body
        as it arrives): each object is filed as soon as it has been read, so
        a body that breaks off leaves what came before it RECEIVING, as in XNAT.

        Every session the archive touched is built (READY) at the end. With
        ``dest=/archive/...``, or ``Direct-Archive=true`` and a known project,
        it is then archived at once and its archive URI returned; a project
        that auto-archives archives it too. Archive conflicts are 400 here.
        """
        request = self._zip_request(params)
        project = self._upload_project(request.project, user)
        touched: dict[int, None] = {}
        with tempfile.TemporaryDirectory(dir=self.store.tmp_dir) as work_dir:
            for instance in iter_dicom_instances(archive, archive_name, Path(work_dir),
                                                 ignore_unparsable=request.ignore_unparsable):
                touched[self._receive(instance, request, project, user, move=True)] = None
        return list(dict.fromkeys(self._finish_zip_session(s, request, user) for s in touched))

    def import_gradual(self, file_path: Path, name: str, params: Mapping[str, str],
                       user: str) -> str:
        """``import-handler=gradual-DICOM``: one object; the session stays
        RECEIVING until :meth:`settle` or :meth:`build`.

        With ``Direct-Archive=true`` and a known project the session is marked
        to archive itself when it settles, and the URI is XNAT's
        ``/xapi/direct-archive/{project}/{StudyInstanceUID}/{name}``.
        """
        request = self._gradual_request(params)
        instance = read_dicom(Path(file_path), name)
        project = self._upload_project(request.project, user)
        session_id = self._receive(instance, request, project, user, move=False)
        row = self._session_by_id(session_id)
        if request.direct_archive and row["project"] != UNASSIGNED:
            return f"/xapi/direct-archive/{row['project']}/{row['tag']}/{row['name']}"
        return "/data" + _url(row)

    def _zip_request(self, params: Mapping[str, str]) -> _ImportRequest:
        """DicomZipImporter: ``project``/``subject``/``session`` beat ``dest``,
        which beats ``PROJECT_ID``/``SUBJECT_ID``/``EXPT_LABEL``."""
        dest = _parse_dest(params.get("dest")) or _Destination(to_archive=False)
        project = _first(params.get("project"), dest.project, params.get("PROJECT_ID"))
        dest_label = None
        if dest.experiment:
            project_row = self.store.project(project) if project else None
            existing = project_row and self.store.experiment(project_row["id"], dest.experiment)
            dest_label = existing["label"] if existing else dest.experiment
        unparsable = params.get("Ignore-Unparsable")
        return _ImportRequest(
            project=project,
            subject=_first(params.get("subject"), dest.subject, params.get("SUBJECT_ID")),
            session=_first(params.get("session"), dest_label, params.get("EXPT_LABEL")),
            to_archive=dest.to_archive,
            direct_archive=_is_true(params.get("Direct-Archive")),
            # Importer turns it on for action=commit unless the client said otherwise.
            ignore_unparsable=(_is_true(unparsable) if unparsable is not None
                               else (params.get("action") or "").lower() == "commit"),
            policy=MergePolicy.for_import(params.get("overwrite")),
        )

    @staticmethod
    def _gradual_request(params: Mapping[str, str]) -> _ImportRequest:
        """GradualDicomImporter reads only the upper-case keys."""
        return _ImportRequest(
            project=_first(params.get("PROJECT_ID")),
            subject=_first(params.get("SUBJECT_ID")),
            session=_first(params.get("EXPT_LABEL")),
            to_archive=False,
            direct_archive=_is_true(params.get("Direct-Archive")),
            ignore_unparsable=False,
            policy=MergePolicy.for_import(params.get("overwrite")),
        )

    def _finish_zip_session(self, session_id: int, request: _ImportRequest, user: str) -> str:
        row = self._session_by_id(session_id)
        wants_archive = request.to_archive or (request.direct_archive
                                               and row["project"] != UNASSIGNED)
        if not wants_archive:
            return self._complete(session_id)
        self._set_status_by_id(session_id, "READY")
        try:
            return self._archive_session(session_id, project=row["project"],
                                         subject=row["subject"], label=row["name"],
                                         policy=request.policy, user=user)
        except StoreError as exc:
            if exc.status == 409:
                self._set_status_by_id(session_id, "ERROR")
            raise StoreError(400, exc.message) from exc

    def _receive(self, instance: DicomInstance, request: _ImportRequest, project: str,
                 user: str, *, move: bool) -> int:
        """File one object into its prearchive session in ``project``; return
        the session id. ``move`` hands the spooled file to the blob store."""
        blob, size, digest = self.store.store_blob_from_path(instance.path, move=move)
        try:
            with self.store.transaction():
                session_id = self._receiving_session(instance, request, project, user)
                replaced_blob = self._add_prearc_file(session_id, instance, blob, size, digest)
        except BaseException:
            self.store._drop_blob(blob)
            raise
        if replaced_blob:
            self.store._drop_blob(replaced_blob)
        return session_id

    def _upload_project(self, alias: str | None, user: str) -> str:
        """The project an upload lands in: XNAT sends anything it cannot match,
        or the user may not write to, to ``Unassigned`` without complaint."""
        row = self.store.project(alias) if alias else None
        if row is None:
            return UNASSIGNED
        account = self.store.user(user)
        allowed = (account is not None and account["is_admin"]) or \
            self.store.role(row["id"], user) in ("owner", "member")
        return row["id"] if allowed else UNASSIGNED

    def _receiving_session(self, instance: DicomInstance, request: _ImportRequest,
                           project: str, user: str) -> int:
        """``PrearcDatabase.eitherGetOrCreateSession``: reuse the session with
        this project, study UID and label unless it is busy, else make one."""
        label = clean_label(request.session or "") or instance.session_label
        moment = self._clock()
        now = self._stamp(moment)
        for row in self.store.query(
                "SELECT id, status FROM prearc_sessions WHERE project = ? AND tag = ? AND name = ?"
                " ORDER BY id DESC", (project, instance.study_uid, label)):
            status = row["status"]
            if status in _RECEIVING:
                new_status = status
            elif status == "BUILDING":
                new_status = "RECEIVING_INTERRUPT"
            elif status in _INTERRUPTABLE:
                new_status = "RECEIVING"
            else:
                continue
            self.store.execute("UPDATE prearc_sessions SET status = ?, lastmod = ? WHERE id = ?",
                               (new_status, now, row["id"]))
            return int(row["id"])

        timestamp = f"{moment:%Y%m%d_%H%M%S}{moment.microsecond // 1000:03d}"
        folder, suffix = label, 1
        while self.store.query_one(
                "SELECT 1 FROM prearc_sessions WHERE project = ? AND timestamp = ? AND folder = ?",
                (project, timestamp, folder)):
            folder, suffix = f"{label}_{suffix}", suffix + 1
        if request.direct_archive and project != UNASSIGNED:
            autoarchive = "AutoArchive"
        else:
            project_row = self.store.project(project)
            code = project_row["prearchive_code"] if project_row else 0
            autoarchive = _AUTOARCHIVE_BY_CODE.get(code, "Manual")
        subject = clean_label(request.subject) if request.subject else instance.subject_label
        session_id = self.store.insert(
            "INSERT INTO prearc_sessions (project, timestamp, folder, name, subject, tag, status,"
            " uploaded, lastmod, scan_date, scan_time, autoarchive, modality)"
            " VALUES (?, ?, ?, ?, ?, ?, 'RECEIVING', ?, ?, ?, ?, ?, ?)",
            (project, timestamp, folder, folder, subject, instance.study_uid, now, now,
             instance.scan_date, instance.scan_time, autoarchive, instance.modality))
        self.store.execute(
            "INSERT INTO prearc_session_details (session_id, session_type, scanner_manufacturer,"
            " scanner_model, field_strength, uploader) VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, instance.study_description, instance.manufacturer, instance.model,
             instance.field_strength, user))
        return session_id

    def _add_prearc_file(self, session_id: int, instance: DicomInstance, blob: str,
                         size: int, digest: str) -> str | None:
        """Store the object under XNAT's file name; return a blob it replaced."""
        directory = instance.scan_id
        name, replaced = self._prearc_file_name(session_id, directory, instance)
        if replaced is not None:
            self.store.execute("DELETE FROM prearc_files WHERE id = ?", (replaced["id"],))
        self.store.execute(
            "INSERT INTO prearc_files (session_id, scan_id, series_description, xsi_type,"
            " series_uid, resource, path, size, digest, mtime, blob, sop_uid)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (session_id, directory, instance.series_description, instance.scan_xsi_type,
             instance.series_uid, DICOM_RESOURCE, name, size, digest,
             self.store.blob_path(blob).stat().st_mtime, blob, instance.sop_instance_uid))
        new_series = self.store.execute(
            "INSERT OR IGNORE INTO prearc_series (session_id, series_uid, modality)"
            " VALUES (?, ?, ?)", (session_id, instance.series_uid, instance.modality)).rowcount
        if new_series:
            modalities = [r["modality"] for r in self.store.query(
                "SELECT modality FROM prearc_series WHERE session_id = ?", (session_id,))]
            self.store.execute("UPDATE prearc_sessions SET modality = ? WHERE id = ?",
                               (lead_modality(modalities), session_id))
        return replaced["blob"] if replaced is not None else None

    def _prearc_file_name(self, session_id: int, directory: str,
                          instance: DicomInstance) -> tuple[str, sqlite3.Row | None]:
        """``getSafeFile``: keep the uploaded name unless another object already
        has it in this scan directory (the same object is simply replaced)."""
        requested = requested_file_name(instance.name)
        if requested:
            existing = self._prearc_file_row(session_id, directory, requested)
            if existing is None or existing["sop_uid"] == instance.sop_instance_uid:
                return requested, existing
        generated = generated_file_name(instance)
        return generated, self._prearc_file_row(session_id, directory, generated)

    def _prearc_file_row(self, session_id: int, directory: str, path: str) -> sqlite3.Row | None:
        return self.store.query_one(
            "SELECT id, blob, sop_uid FROM prearc_files WHERE session_id = ? AND scan_id = ?"
            " AND resource = ? AND path = ?", (session_id, directory, DICOM_RESOURCE, path))

    # ---------------------------------------------------------------- settling
    def settle(self, idle_seconds: float | None = None) -> list[str]:
        """Build every session that has received nothing for ``idle_seconds``
        (default: the constructor's window), as XNAT's SessionXMLRebuilder does,
        and archive those whose project or upload asked for it. Returns the URI
        of each settled session (archive URI when it was archived)."""
        idle = self.receiving_idle_seconds if idle_seconds is None else idle_seconds
        cutoff = self._stamp(self._clock() - dt.timedelta(seconds=idle))
        ids = [r["id"] for r in self.store.query(
            "SELECT id FROM prearc_sessions WHERE status IN (?, ?) AND lastmod <= ?"
            " ORDER BY id", (*_RECEIVING, cutoff))]
        settled = []
        for session_id in ids:
            claimed = self.store.execute(
                "UPDATE prearc_sessions SET status = 'READY', lastmod = ? WHERE id = ?"
                " AND status IN (?, ?) AND lastmod <= ?",
                (self._stamp(), session_id, *_RECEIVING, cutoff)).rowcount
            if claimed:
                settled.append(self._complete(session_id))
        return settled

    def _complete(self, session_id: int) -> str:
        """Mark a session READY, then archive it if it is set to auto-archive.

        A failed automatic archive leaves the session in ERROR, as XNAT does;
        it is not the uploader's request that failed."""
        self._set_status_by_id(session_id, "READY")
        row = self._session_by_id(session_id)
        policy = MergePolicy.for_autoarchive(row["autoarchive"])
        if policy is None or row["project"] == UNASSIGNED:
            return "/data" + _url(row)
        details = self._details(session_id)
        try:
            return self._archive_session(session_id, project=row["project"],
                                         subject=row["subject"], label=row["name"],
                                         policy=policy, user=details["uploader"])
        except StoreError:
            self._set_status_by_id(session_id, "ERROR")
            return "/data" + _url(row)

    # ---------------------------------------------------------------- listings
    def sessions(self, projects: Collection[str]) -> list[dict[str, str]]:
        """Listing rows for the given projects (the caller decides which the
        user may see; include ``Unassigned`` for admins)."""
        if not projects:
            return []
        marks = ", ".join("?" * len(projects))
        return [_listing_row(r) for r in self.store.query(
            f"SELECT * FROM prearc_sessions WHERE project IN ({marks})"
            " ORDER BY project, timestamp, folder", list(projects))]

    def session(self, project: str, timestamp: str, folder: str) -> dict[str, str]:
        return _listing_row(self._session_row(project, timestamp, folder))

    def scans(self, project: str, timestamp: str, folder: str) -> list[dict[str, str]]:
        row = self._session_row(project, timestamp, folder)
        return [{"ID": s.id, "xsiType": s.xsi_type, "series_description": s.series_description}
                for s in self._built_scans(row["id"])]

    def scan_resources(self, project: str, timestamp: str, folder: str,
                       scan_id: str) -> list[dict[str, str]]:
        row = self._session_row(project, timestamp, folder)
        scan = self._built_scan(row, scan_id)
        return [{"label": DICOM_RESOURCE, "file_count": str(scan.file_count),
                 "file_size": str(scan.file_size)}]

    def scan_files(self, project: str, timestamp: str, folder: str, scan_id: str,
                   resource: str) -> list[PrearchiveFile]:
        row = self._session_row(project, timestamp, folder)
        scan = self._built_scan(row, scan_id)
        if resource != DICOM_RESOURCE:
            raise StoreError(404, f"{_url(row)}/scans/{scan_id}/resources/{resource} not found.")
        return self._scan_files(row, scan)

    def scan_file(self, project: str, timestamp: str, folder: str, scan_id: str,
                  resource: str, path: str) -> PrearchiveFile:
        for file in self.scan_files(project, timestamp, folder, scan_id, resource):
            if file.path == path:
                return file
        raise StoreError(404, "Unable to find file.")

    def session_files(self, project: str, timestamp: str, folder: str) -> list[PrearchiveFile]:
        """Every file of a session, for ``?format=zip``."""
        row = self._session_row(project, timestamp, folder)
        return [f for scan in self._built_scans(row["id"]) for f in self._scan_files(row, scan)]

    def _scan_files(self, row: sqlite3.Row, scan: PrearchiveScan) -> list[PrearchiveFile]:
        base = f"/data{_url(row)}/scans/{scan.id}/resources/{DICOM_RESOURCE}/files/"
        return [PrearchiveFile(scan_id=scan.id, resource=DICOM_RESOURCE, path=f["path"],
                               size=f["size"], digest=f["digest"], uri=base + f["path"],
                               blob_path=self.store.blob_path(f["blob"]))
                for f in self._scan_file_rows(row["id"], scan)]

    def _scan_file_rows(self, session_id: int, scan: PrearchiveScan) -> list[sqlite3.Row]:
        return self.store.query(
            "SELECT path, size, digest, blob FROM prearc_files WHERE session_id = ? AND scan_id = ?"
            " AND series_uid = ? AND resource = ? ORDER BY path",
            (session_id, scan.directory, scan.series_uid, DICOM_RESOURCE))

    def _built_scan(self, row: sqlite3.Row, scan_id: str) -> PrearchiveScan:
        for scan in self._built_scans(row["id"]):
            if scan.id == scan_id:
                return scan
        raise StoreError(404, f"{_url(row)}/scans/{scan_id} not found.")

    def _built_scans(self, session_id: int) -> list[PrearchiveScan]:
        """One scan per series, numbered as ``DICOMSessionBuilder`` does: a
        series number shared by several series becomes ``{n}-{MOD}{k}`` for
        each of them, counting per modality in SeriesInstanceUID order."""
        by_directory: dict[str, list[sqlite3.Row]] = defaultdict(list)
        for r in self.store.query(
                "SELECT f.scan_id AS directory, f.series_uid, MAX(f.xsi_type) AS xsi_type,"
                " MAX(f.series_description) AS series_description,"
                " IFNULL(s.modality, '') AS modality, COUNT(*) AS file_count,"
                " SUM(f.size) AS file_size FROM prearc_files f LEFT JOIN prearc_series s"
                " ON s.session_id = f.session_id AND s.series_uid = f.series_uid"
                " WHERE f.session_id = ? GROUP BY f.scan_id, f.series_uid", (session_id,)):
            by_directory[r["directory"]].append(r)
        scans = []
        for directory in sorted(by_directory, key=_scan_sort_key):
            series = sorted(by_directory[directory], key=lambda r: r["series_uid"])
            per_modality: dict[str, int] = defaultdict(int)
            for r in series:
                if len(series) == 1:
                    scan_id = directory
                else:
                    modality = lead_modality([r["modality"]])
                    per_modality[modality] += 1
                    scan_id = f"{directory}-{modality}{per_modality[modality]}"
                scans.append(PrearchiveScan(
                    id=scan_id, directory=directory, series_uid=r["series_uid"],
                    xsi_type=r["xsi_type"], series_description=r["series_description"],
                    modality=r["modality"], file_count=int(r["file_count"]),
                    file_size=int(r["file_size"])))
        return scans

    # ----------------------------------------------------------------- actions
    def build(self, project: str, timestamp: str, folder: str) -> str:
        """``action=build``: the session is complete; returns its URI."""
        with self.store.transaction():
            row = self._session_row(project, timestamp, folder)
            if _is_busy(row["status"]):
                raise StoreError(409, "session document locked")
            self._set_status_by_id(row["id"], "READY")
        return "/data" + _url(row)

    def set_status(self, project: str, timestamp: str, folder: str, status: str) -> None:
        if status not in STATUSES:
            raise StoreError(400, f"Invalid status: {status}")
        with self.store.transaction():
            row = self._session_row(project, timestamp, folder)
            self.store.execute("UPDATE prearc_sessions SET status = ? WHERE id = ?",
                               (status, row["id"]))

    def reset_status(self, project: str, timestamp: str, folder: str) -> None:
        """``action=reset-status``: our sessions are always buildable, so READY."""
        self.set_status(project, timestamp, folder, "READY")

    def delete(self, project: str, timestamp: str, folder: str) -> None:
        with self.store.transaction():
            row = self._session_row(project, timestamp, folder)
            _refuse_if_busy(row)
            blobs = [r["blob"] for r in self.store.query(
                "SELECT blob FROM prearc_files WHERE session_id = ?", (row["id"],))]
            self.store.execute("DELETE FROM prearc_sessions WHERE id = ?", (row["id"],))
        for blob in blobs:
            self.store._drop_blob(blob)

    def move(self, project: str, timestamp: str, folder: str, new_project: str) -> str:
        """``action=move&newProject=Q``: returns the session's new URI."""
        target = self.store.project(new_project)
        if target is None:
            raise StoreError(404, f"Unable to identify project {new_project}")
        new_url = prearchive_url(target["id"], timestamp, folder)
        with self.store.transaction():
            row = self._session_row(project, timestamp, folder)
            _refuse_if_busy(row)
            if target["id"] != row["project"]:
                if self._find_session(target["id"], timestamp, folder):
                    raise StoreError(409, f"{new_url} already exists.")
                self.store.execute(
                    "UPDATE prearc_sessions SET project = ?, lastmod = ? WHERE id = ?",
                    (target["id"], self._stamp(), row["id"]))
        return "/data" + new_url

    def archive_src(self, src: str | None, *, user: str, dest: str | None = None,
                    project: str | None = None, subject: str | None = None,
                    session: str | None = None, overwrite: str | None = None) -> str:
        """``POST /data/services/archive?src=...``: parse ``src``, then :meth:`archive`."""
        if not src:
            raise StoreError(404, "Unknown prearchive session.")
        match = _SRC.fullmatch(_strip_data(src))
        if match is None:
            raise StoreError(400, f"Invalid src URI ({src})")
        return self.archive(*match.groups(), user=user, dest=dest, new_project=project,
                            subject=subject, label=session, overwrite=overwrite)

    def archive(self, project: str, timestamp: str, folder: str, *, user: str,
                dest: str | None = None, new_project: str | None = None,
                subject: str | None = None, label: str | None = None,
                overwrite: str | None = None) -> str:
        """Archive a prearchive session; returns
        ``/data/archive/projects/P/subjects/S/experiments/E``.

        Explicit ``new_project``/``subject``/``label`` beat ``dest``, which beats
        the session's own values. Raises 404 "{url} not found.", 403 when
        another operation holds the session, 400 when no project can be found
        (``Unassigned``), and 500 "FAILED: ..." when the archive itself is
        refused, e.g. the label is taken by a different study.
        """
        target = _parse_dest(dest) or _Destination(to_archive=True)
        if not target.to_archive:
            raise StoreError(400, f"Invalid dest URI ({dest})")
        row = self._session_row(project, timestamp, folder)
        try:
            return self._archive_session(
                row["id"], project=_first(new_project, target.project, row["project"]),
                subject=_first(subject, target.subject, row["subject"]),
                label=_first(label, target.experiment, row["name"]),
                policy=MergePolicy.for_archive(overwrite), user=user)
        except StoreError as exc:
            if exc.status != 409:
                raise
            self._set_status_by_id(row["id"], "ERROR")
            raise StoreError(500, f"FAILED: {exc.message}") from exc

    def _archive_session(self, session_id: int, *, project: str | None, subject: str | None,
                         label: str | None, policy: MergePolicy, user: str) -> str:
        """Move one prearchive session into the archive, atomically.

        Conflicts raise 409 with ``PrearcSessionArchiver``'s text; callers turn
        that into their endpoint's status. Every check runs before the first
        write: ``Store.add_file`` deletes a replaced blob at once, which a
        rollback could not undo.
        """
        with self.store.transaction():
            row = self._session_by_id(session_id)
            _refuse_if_busy(row)
            project_row = self.store.project(project) if project and project != UNASSIGNED else None
            if project_row is None:
                raise StoreError(400, "unable to identify destination project")
            project = project_row["id"]
            subject = clean_label(subject or "")
            if not subject:
                raise StoreError(400, "Unable to identify subject.")
            scans = self._built_scans(session_id)
            xsi_type = session_xsi_type(s.modality for s in scans)
            experiment_label = clean_label(label or row["name"])
            existing = self.store.experiment(project, experiment_label)
            subject_row = self.store.subject(project, subject)
            plan: list[tuple[PrearchiveScan, str, sqlite3.Row | None]]
            if existing is None:
                plan = [(scan, scan.id, None) for scan in scans]
            else:
                _check_merge(existing, row, xsi_type, subject_row, policy)
                plan = _merge_plan(scans, self.store.scans(existing["id"]), policy)

            if subject_row is None:
                subject_id = self.store.add_subject(project, subject, user=user)
                subject_label = subject
            else:
                subject_id, subject_label = subject_row["id"], subject_row["label"]
            if existing is None:
                details = self._details(session_id)
                experiment_id = self.store.add_experiment(
                    project, subject_id, experiment_label, xsi_type, user=user,
                    date=row["scan_date"], time=row["scan_time"],
                    modality=lead_modality(s.modality for s in scans), uid=row["tag"],
                    session_type=details["session_type"],
                    scanner_manufacturer=details["scanner_manufacturer"],
                    scanner_model=details["scanner_model"],
                    field_strength=details["field_strength"])
            else:
                experiment_id, experiment_label = existing["id"], existing["label"]
            for scan, scan_id, archived_scan in plan:
                self._archive_scan(session_id, experiment_id, scan, scan_id, archived_scan)
            self.store.execute("DELETE FROM prearc_sessions WHERE id = ?", (session_id,))
        return (f"/data/archive/projects/{project}/subjects/{subject_label}"
                f"/experiments/{experiment_label}")

    def _archive_scan(self, session_id: int, experiment_id: str, scan: PrearchiveScan,
                      scan_id: str, archived_scan: sqlite3.Row | None) -> None:
        if archived_scan is None:
            scan_pk = self.store.add_scan(
                experiment_id, scan_id, scan.xsi_type, type=scan.series_description,
                series_description=scan.series_description, uid=scan.series_uid,
                frames=str(scan.file_count), modality=scan.modality)
        else:
            scan_pk = archived_scan["pk"]
        resource = self.store.resource(experiment_id, scan_pk, DICOM_RESOURCE)
        resource_id = resource["id"] if resource else self.store.add_resource(
            experiment_id, scan_pk, DICOM_RESOURCE, format="DICOM", content="RAW")
        for f in self._scan_file_rows(session_id, scan):
            self.store.add_file(resource_id, f["path"], f["blob"], f["size"], f["digest"],
                                format="DICOM", content="RAW", overwrite=True)

    # ----------------------------------------------------------------- helpers
    def _session_row(self, project: str, timestamp: str, folder: str) -> sqlite3.Row:
        row = self._find_session(project, timestamp, folder)
        if row is None:
            raise StoreError(404, f"{prearchive_url(project, timestamp, folder)} not found.")
        return row

    def _find_session(self, project: str, timestamp: str, folder: str) -> sqlite3.Row | None:
        return self.store.query_one(
            "SELECT * FROM prearc_sessions WHERE project = ? AND timestamp = ? AND folder = ?",
            (project, timestamp, folder))

    def _session_by_id(self, session_id: int) -> sqlite3.Row:
        row = self.store.query_one("SELECT * FROM prearc_sessions WHERE id = ?", (session_id,))
        if row is None:
            raise StoreError(404, "Unknown prearchive session.")
        return row

    def _details(self, session_id: int) -> sqlite3.Row:
        return self.store.aggregate(  # every session has its one row of details
            "SELECT * FROM prearc_session_details WHERE session_id = ?", (session_id,))

    def _set_status_by_id(self, session_id: int, status: str) -> None:
        self.store.execute("UPDATE prearc_sessions SET status = ?, lastmod = ? WHERE id = ?",
                           (status, self._stamp(), session_id))

    def _stamp(self, moment: dt.datetime | None = None) -> str:
        """``lastmod``/``uploaded`` format: ``2021-12-29 10:11:28.996``; the folder
        timestamp is the same moment as ``yyyyMMdd_HHmmssSSS``."""
        moment = moment or self._clock()
        return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d}"


def _check_merge(existing: sqlite3.Row, session: sqlite3.Row, xsi_type: str,
                 subject_row: sqlite3.Row | None, policy: MergePolicy) -> None:
    """``PrearcSessionArchiver.checkForConflicts``, in its order."""
    if not policy.allow_merge:
        raise StoreError(409, PRE_EXISTS)
    if existing["xsi_type"] != xsi_type:
        raise StoreError(409, MODALITY_MOD)
    if subject_row is None or subject_row["id"] != existing["subject_id"]:
        raise StoreError(
            409, f"{SUBJECT_MOD}: {existing['label']} Already Exists for another Subject")
    if (not policy.override_exceptions and existing["uid"] and session["tag"]
            and existing["uid"] != session["tag"]):
        raise StoreError(409, UID_MOD)


def _merge_plan(scans: list[PrearchiveScan], archived: list[sqlite3.Row],
                policy: MergePolicy) -> list[tuple[PrearchiveScan, str, sqlite3.Row | None]]:
    """``ScanIdValidator``: where each incoming scan goes in an existing session.

    A scan whose UID is archived already joins that scan (under another number
    only when exceptions are overridden); one whose number is taken by a
    different series is renamed ``{n}-{MOD}{k}``.
    """
    by_id = {r["scan_id"]: r for r in archived}
    by_uid = {r["uid"]: r for r in archived if r["uid"]}
    used = set(by_id)
    plan: list[tuple[PrearchiveScan, str, sqlite3.Row | None]] = []
    for scan in scans:
        same_uid = by_uid.get(scan.series_uid)
        if same_uid is not None:
            if same_uid["scan_id"] != scan.id and not policy.override_exceptions:
                raise StoreError(409, "Session already contains a scan with the same UID, "
                                      f"but a different number ({same_uid['scan_id']}).")
            plan.append((scan, same_uid["scan_id"], same_uid))
            continue
        same_id = by_id.get(scan.id)
        if same_id is not None and not same_id["uid"]:
            plan.append((scan, scan.id, same_id))
            continue
        scan_id = scan.id
        code = scan_modality_code(scan.xsi_type)
        stub = scan_id.rsplit("-", 1)[0] if re.fullmatch(rf".*-{code}[0-9]+", scan_id) else scan_id
        count = 1
        while scan_id in used:
            scan_id, count = f"{stub}-{code}{count}", count + 1
        used.add(scan_id)
        plan.append((scan, scan_id, None))
    return plan


def _listing_row(row: sqlite3.Row) -> dict[str, str]:
    """``DatabaseSession`` columns, all strings."""
    return {
        "project": row["project"], "timestamp": row["timestamp"], "lastmod": row["lastmod"],
        "uploaded": row["uploaded"], "scan_date": row["scan_date"], "scan_time": row["scan_time"],
        "subject": row["subject"], "folderName": row["folder"], "name": row["name"],
        "tag": row["tag"], "status": row["status"], "url": _url(row),
        "autoarchive": row["autoarchive"], "prevent_anon": "false", "prevent_auto_commit": "false",
        "SOURCE": row["source"], "VISIT": row["visit"], "PROTOCOL": row["protocol"],
        "TIMEZONE": "",
    }


def _url(row: sqlite3.Row) -> str:
    return prearchive_url(row["project"], row["timestamp"], row["folder"])


def _refuse_if_busy(row: sqlite3.Row) -> None:
    if _is_busy(row["status"]):
        raise StoreError(403, BUSY_MESSAGE)


def _is_busy(status: str) -> bool:
    return status in _IN_PROGRESS or status.startswith(("QUEUED_", "_"))


def _parse_dest(dest: str | None) -> _Destination | None:
    if not dest:
        return None
    path = _strip_data(dest.strip())
    if match := _DEST_PREARCHIVE.fullmatch(path):
        return _Destination(to_archive=False, project=match.group(1))
    if match := _DEST_ARCHIVE.fullmatch(path):
        return _Destination(True, *match.groups())
    raise StoreError(400, "Parameter dest format error")


def _strip_data(uri: str) -> str:
    return uri[len("/data"):] if uri.startswith("/data/") else uri


def _first(*values: str | None) -> str | None:
    """The first value that is present and not blank."""
    for value in values:
        if value is not None and value.strip():
            return value.strip()
    return None


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _scan_sort_key(scan_id: str) -> tuple[int, int, str]:
    """XNAT's MaybeNumericStringComparator, approximately: numbers first, by value."""
    try:
        return (0, int(scan_id), scan_id)
    except ValueError:
        return (1, 0, scan_id)

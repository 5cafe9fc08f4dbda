"""Prearchive sessions as XNAT keeps them: their table, listings, contents and actions.

A session is one ``/prearchive/projects/P/TS/FOLDER`` entry; its files sit in
scan directories, and the scans clients see are worked out from those when
listing (``DICOMSessionBuilder``'s numbering). Build, status changes, delete
and move act on one session at a time, refusing one that another operation
holds.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from xnatfs.testing.dicomimport import lead_modality
from xnatfs.testing.store import Store, StoreError
from xnatfs.testing.storedb import java_timestamp

UNASSIGNED = "Unassigned"
DICOM_RESOURCE = "DICOM"
DEFAULT_RECEIVING_IDLE_SECONDS = 300.0  # XNAT's sessionXmlRebuilderInterval: 5 minutes

BUSY_MESSAGE = "Operation already in progress on this prearchive entry."

_RECEIVING = ("RECEIVING", "RECEIVING_INTERRUPT")
_INTERRUPTABLE = ("READY", "ERROR", "CONFLICT")
_IN_PROGRESS = ("BUILDING", "ARCHIVING", "MOVING", "DELETING", "SEPARATING")
STATUSES = frozenset((*_RECEIVING, *_INTERRUPTABLE, *_IN_PROGRESS,
                      *(f"QUEUED_{s}" for s in _IN_PROGRESS), *(f"_{s}" for s in _IN_PROGRESS)))

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


def prearchive_url(project: str, timestamp: str, folder: str) -> str:
    """The ``url`` column of a listing row: no ``/data``."""
    return f"/prearchive/projects/{project}/{timestamp}/{folder}"


class PrearchiveSessions:
    """The prearchive's sessions: looking them up, listing them, and acting on them.

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
        """``lastmod``/``uploaded`` format: ``2021-12-29 10:11:28.996`` (a Java
        timestamp: ``...:25.0`` on a whole second); the folder timestamp is the
        same moment as ``yyyyMMdd_HHmmssSSS``."""
        return java_timestamp(moment or self._clock())


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


def _scan_sort_key(scan_id: str) -> tuple[int, int, str]:
    """XNAT's MaybeNumericStringComparator, approximately: numbers first, by value."""
    try:
        return (0, int(scan_id), scan_id)
    except ValueError:
        return (1, 0, scan_id)

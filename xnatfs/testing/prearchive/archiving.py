"""Archiving prearchive sessions, on request or by themselves once they settle.

``/data/services/archive`` and ``action=commit`` archive a session on
request; a session that stops receiving settles (is built) and archives
itself when its project or upload asked for it. Merging into an experiment
that exists follows ``PrearcSessionArchiver`` and ``ScanIdValidator``, with
their messages. Blobs are shared, never copied: the archive's ``files`` rows
point at the prearchive's blobs.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from dataclasses import dataclass

from xnatfs.testing.dicomimport import (
    clean_label,
    lead_modality,
    scan_modality_code,
    session_xsi_type,
)
from xnatfs.testing.store import StoreError

from .sessions import (
    _RECEIVING,
    DICOM_RESOURCE,
    UNASSIGNED,
    PrearchiveScan,
    PrearchiveSessions,
    _refuse_if_busy,
    _url,
)

# PrearcSessionArchiver's messages.
PRE_EXISTS = "Session already exists, retry with overwrite enabled"
SUBJECT_MOD = "Invalid modification of session subject via archive process."
UID_MOD = "Invalid modification of session UID via archive process."
MODALITY_MOD = ("Invalid modification of session modality via archive process.  "
                "Data may require a manual merge.")

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
class _Destination:
    to_archive: bool
    project: str | None = None
    subject: str | None = None
    experiment: str | None = None


class PrearchiveArchiver(PrearchiveSessions):
    """Prearchive sessions, and archiving out of them."""

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
                    date=row["scan_date"], time=row["scan_time"].split(".")[0],
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

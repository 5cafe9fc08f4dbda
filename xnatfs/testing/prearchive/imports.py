"""Uploads into the prearchive: ``import-handler=DICOM-zip`` and ``gradual-DICOM``.

Each DICOM object is filed into the session for its project, study and label
as it arrives (``PrearcDatabase.eitherGetOrCreateSession``), under the file
name XNAT would give it (``GradualDicomImporter.getSafeFile``). A zip's
sessions are built at the end, and archived at once when the upload or the
project asks for it; a gradual upload's session waits to settle.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Mapping
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
)
from xnatfs.testing.store import StoreError

from .archiving import MergePolicy, PrearchiveArchiver, _Destination, _first, _parse_dest
from .sessions import _INTERRUPTABLE, _RECEIVING, DICOM_RESOURCE, UNASSIGNED, _url

_AUTOARCHIVE_BY_CODE = {4: "AutoArchive", 5: "AutoArchiveOverwrite"}


@dataclass(frozen=True)
class _ImportRequest:
    project: str | None
    subject: str | None
    session: str | None
    to_archive: bool
    direct_archive: bool
    ignore_unparsable: bool
    policy: MergePolicy


class Prearchive(PrearchiveArchiver):
    """Prearchive sessions, imports into them, and archiving out of them.

    ``clock`` is injectable so tests can age sessions without sleeping.
    """

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


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"

"""Getting data into XNAT: its import services (DICOM-zip archives and
single DICOM files through gradual-DICOM), the projects a user may upload to,
and the prearchive they land in (list, look inside, archive, move, delete).

:class:`ImportCalls` gives :class:`~xnatfs.client.XnatClient` these calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import trio

from ..errors import Conflict, ServerError, XnatError
from .connection import XnatConnection, body_text, discard_body
from .items import (
    PrearchiveSession,
    RemoteFile,
    Resource,
    Scan,
    as_text,
    data_path,
    file_size,
    malformed_rows,
)


class ImportCalls(XnatConnection):
    """Uploads (``import_*``) and the prearchive (``*_prearchive*``)."""

    async def issue_alias_token(self) -> dict[str, Any]:
        """A new alias token of the logged-in user: ``GET /data/services/tokens/issue``
        (XNAT's AliasTokenRestlet), answered with the token's JSON (``alias``,
        ``secret``, ``estimatedExpirationTime`` in epoch ms...)."""
        answer = await self._get_json("/data/services/tokens/issue", kind="tokens.issue")
        if not isinstance(answer, dict):
            raise ServerError("the token answer is not a JSON object",
                              path="/data/services/tokens/issue")
        return answer

    # ----------------------------------------------------------------- imports
    async def import_archive(self, body: Path | AsyncIterator[bytes], *, name: str,
                             project: str, subject: str | None = None,
                             session: str | None = None,
                             direct_archive: bool = False) -> list[str]:
        """``POST /data/services/import`` with ``import-handler=DICOM-zip``.

        ``body`` is a file (re-read on each attempt, so failures are retried) or
        a live stream of bytes (one attempt: it cannot be sent twice). ``name``
        (``upload.zip``, ``upload.tar.gz``...) tells XNAT zip from tar.
        Returns the URIs XNAT answers (prearchive or archive sessions).
        """
        params = _import_params(project, subject, session, direct_archive)
        params.update({"import-handler": "DICOM-zip", "inbody": "true"})
        content_type = _ARCHIVE_TYPES.get(name.split(".", 1)[-1], "application/octet-stream")
        if isinstance(body, Path):
            source: Path = body
            make_body = lambda: file_chunks(source, self.settings.chunk_size)  # noqa: E731
            attempts = None
        else:
            stream = body
            make_body = lambda: stream  # noqa: E731
            attempts = 1
        text = await self._send("POST", "/data/services/import", kind="import.archive",
                                params=params, headers={"Content-Type": content_type},
                                body=make_body, attempts=attempts, handle=body_text)
        return [uri for uri in text.replace("\r\n", "\n").split("\n") if uri.strip()]

    async def import_dicom_file(self, path: Path, *, project: str, subject: str | None = None,
                                session: str | None = None,
                                direct_archive: bool = False) -> str:
        """One DICOM object through ``gradual-DICOM``; returns XNAT's session URI."""
        params = {"import-handler": "gradual-DICOM", "inbody": "true", "PROJECT_ID": project}
        if subject:
            params["SUBJECT_ID"] = subject
        if session:
            params["EXPT_LABEL"] = session
        if direct_archive:
            params["Direct-Archive"] = "true"
        return (await self._send(
            "POST", "/data/services/import", kind="import.dicom", params=params,
            headers={"Content-Type": "application/dicom"},
            body=lambda: file_chunks(path, self.settings.chunk_size),
            handle=body_text)).strip()

    async def list_upload_projects(self) -> list[str]:
        """Projects this user may add subjects and sessions to, as XNAT's own upload
        pages ask (``ProjectListResource.PermissionsProjectHandler``): owners and
        members of a project, and data admins everywhere."""
        path = "/data/projects"
        rows = await self._get_rows(path, kind="projects.roles",
                                    params={"permissions": "edit",
                                            "dataType": "xnat:subjectData"})
        with malformed_rows(path):
            return [str(row.get("id") or row["ID"]) for row in rows]

    # -------------------------------------------------------------- prearchive
    async def list_prearchive(self, project: str | None = None) -> list[PrearchiveSession]:
        """Prearchive entries of every project the user may edit, or of one project."""
        path = "/data/prearchive/projects" + (f"/{project}" if project else "")
        rows = await self._get_rows(path, kind="prearchive.list")
        with malformed_rows(path):
            return [PrearchiveSession(
                project=row["project"], timestamp=row["timestamp"],
                folder_name=row["folderName"], name=row.get("name") or row["folderName"],
                subject=as_text(row.get("subject")), status=row["status"],
                uri=data_path(row["url"]), uploaded=as_text(row.get("uploaded")),
                lastmod=as_text(row.get("lastmod")), scan_date=as_text(row.get("scan_date")),
                tag=as_text(row.get("tag")), autoarchive=as_text(row.get("autoarchive")))
                for row in rows]

    async def list_prearchive_scans(self, session_uri: str) -> list[Scan]:
        rows = await self._get_rows(f"{session_uri}/scans", kind="prearchive.scans")
        with malformed_rows(session_uri):
            return [Scan(id=str(r["ID"]), type=as_text(r.get("series_description")),
                         series_description=as_text(r.get("series_description")),
                         xsi_type=str(r.get("xsiType") or ""), quality=None,
                         resources=(Resource("DICOM", "DICOM", "DICOM", None, None, None),))
                    for r in rows]

    async def list_prearchive_files(self, session_uri: str, scan_id: str,
                                    resource: str = "DICOM") -> list[RemoteFile]:
        path = f"{session_uri}/scans/{scan_id}/resources/{resource}/files"
        rows = await self._get_rows(path, kind="prearchive.files")
        with malformed_rows(path):
            return [RemoteFile(path=data_path(r["URI"]).split("/files/", 1)[1],
                               size=file_size(r["Size"], r["URI"]),
                               digest=as_text(r.get("digest")),
                               uri=data_path(r["URI"]), resource_label=resource,
                               resource_id=resource, scan_id=scan_id, owner_kind="scan")
                    for r in rows]

    async def archive_prearchive(self, session_uri: str, *, project: str | None = None,
                                 subject: str | None = None,
                                 session: str | None = None) -> str:
        """``POST /data/services/archive``; returns the archived session's URI."""
        form = {"src": session_uri}
        for key, value in (("project", project), ("subject", subject), ("session", session)):
            if value:
                form[key] = value
        encoded = urlencode(form).encode()
        text = await self._send(
            "POST", "/data/services/archive", kind="prearchive.archive",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            body=lambda: _one_chunk(encoded), handle=body_text, final=_archive_refusal)
        return text.strip()

    async def move_prearchive(self, session_uri: str, project: str) -> str:
        """``POST {session}?action=move&newProject=P`` (XNAT answers 301 with the new URI)."""
        text = await self._send("POST", session_uri, kind="prearchive.move",
                                params={"action": "move", "newProject": project},
                                accept={301}, handle=body_text)
        return data_path(text.strip())

    async def delete_prearchive(self, session_uri: str) -> None:
        await self._send("DELETE", session_uri, kind="prearchive.delete", handle=discard_body)


_ARCHIVE_TYPES = {"zip": "application/zip", "tar": "application/x-tar",
                  "tar.gz": "application/x-gzip", "tgz": "application/x-gzip"}


def _import_params(project: str, subject: str | None, session: str | None,
                   direct_archive: bool) -> dict[str, str]:
    params = {"project": project, "overwrite": "append"}
    if subject:
        params["subject"] = subject
    if session:
        params["session"] = session
    if direct_archive:
        params["Direct-Archive"] = "true"
    else:
        params["dest"] = f"/prearchive/projects/{project}"
    return params


async def file_chunks(path: Path, chunk_size: int) -> AsyncIterator[bytes]:
    """A file as request-body chunks, read in a worker thread. Whoever iterates
    it closes it (``aclose``) when done with it, sent whole or not: the file is
    closed then (shielded: also when the request was cancelled), not when the
    garbage collector gets to it."""
    handle = await trio.to_thread.run_sync(open, path, "rb")
    try:
        while chunk := await trio.to_thread.run_sync(handle.read, chunk_size):
            yield chunk
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(handle.close)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _archive_refusal(error: XnatError) -> XnatError | None:
    """XNAT answers a session it will not archive (its label or UID is taken by
    another study, the subject differs...) with 500 "FAILED: why": final, and
    a conflict, not a server in trouble."""
    if error.status == 500 and error.message.startswith("FAILED"):
        return Conflict(error.message, status=error.status, path=error.path)
    return None

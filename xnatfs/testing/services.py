"""HTTP face of the prearchive: ``/data/services/{import,archive,prearchive/*}``
and ``/data/prearchive/...`` (reference sections 5 and 6).

The logic lives in :mod:`.prearchive` and :mod:`.dicomimport`; this module
parses requests, checks who may see which project, runs the slow parts in
worker threads and renders XNAT's answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl

from aiohttp import web

from .archive.resolve import Access
from .bodystream import read_in_thread
from .auth import Caller
from .downloads import archive_response, send_blob, zip_entry_name
from .knobs import Knobs
from .prearchive import UNASSIGNED, Prearchive
from .spool import spool_body
from .store import Store, StoreError
from .xnatformat import XnatHTTPError, table_response, text_response

log = logging.getLogger(__name__)

IMPORT_HANDLERS = {"DICOM-zip", "gradual-DICOM", "SI"}
# Raw bodies are named from their Content-Type (RequestUtil), and DICOM-zip picks
# zip or tar from that name.
_RAW_BODY_NAMES = {
    "application/zip": "upload.zip", "application/x-zip-compressed": "upload.zip",
    "application/x-tar": "upload.tar", "application/x-gtar": "upload.tar.gz",
    "application/x-gzip": "upload.tar.gz", "application/gzip": "upload.tar.gz",
    "application/dicom": "upload.dcm",
}
LISTING_COLUMNS = ["project", "timestamp", "lastmod", "uploaded", "scan_date", "scan_time",
                   "subject", "folderName", "name", "tag", "status", "url", "autoarchive",
                   "prevent_anon", "prevent_auto_commit", "SOURCE", "VISIT", "PROTOCOL",
                   "TIMEZONE"]
BATCH_STATUS = {"delete": "QUEUED_DELETING", "move": "QUEUED_MOVING",
                "rebuild": "QUEUED_BUILDING"}


class ServiceRoutes:
    """Import, prearchive and archive routes over one :class:`Prearchive`."""

    def __init__(self, store: Store, knobs: Knobs) -> None:
        self.store = store
        self.knobs = knobs
        self.prearchive = Prearchive(store, receiving_idle_seconds=knobs.prearchive_settle_s)

    async def background(self) -> None:
        """Settle gradual-DICOM sessions that stopped receiving, as XNAT's rebuilder does."""
        while True:
            await asyncio.sleep(min(1.0, max(self.knobs.prearchive_settle_s / 4, 0.05)))
            try:
                await asyncio.to_thread(self.prearchive.settle, self.knobs.prearchive_settle_s)
            except Exception:
                log.exception("settling prearchive sessions failed")

    async def handle(self, request: web.Request, caller: Caller,
                     segments: list[str]) -> web.StreamResponse:
        params = await _parameters(request)
        access = Access(self.store, caller)
        if segments[0] == "prearchive":
            return await self._prearchive(request, access, params, segments[1:])
        if segments[:2] == ["services", "import"]:
            return await self._import(request, caller, params)
        if segments[:2] == ["services", "archive"]:
            return await self._archive(request, caller, params)
        if segments[:2] == ["services", "prearchive"] and len(segments) == 3:
            return await self._batch(request, access, params, segments[2])
        raise XnatHTTPError(404, "The requested resource was not found.")

    # ----------------------------------------------------------------- import
    async def _import(self, request: web.Request, caller: Caller,
                      params: Mapping[str, str]) -> web.Response:
        request["route"] = "services.import"
        if request.method != "POST":
            raise XnatHTTPError(405, "Method Not Allowed")
        handler = params.get("import-handler") or params.get("handler") or "SI"
        if handler not in IMPORT_HANDLERS:
            raise XnatHTTPError(404, f"Unknown importer implementation specified: {handler}")
        multipart = (request.content_type or "").startswith("multipart/")
        if multipart and params.get("inbody") == "true":
            raise XnatHTTPError(406, "Multipart uploads cannot be combined with inbody=true.")
        raw_name = None if multipart else _RAW_BODY_NAMES.get(_media_type(request))
        if not multipart and handler != "gradual-DICOM" and not (
                raw_name or "").endswith(".dcm"):
            # DICOM-zip reads the body while it arrives, as XNAT's ZipInputStream does.
            def import_stream(body: BinaryIO) -> list[str]:
                head = body.peek(4)  # type: ignore[attr-defined]
                if not head:
                    raise XnatHTTPError(400, "Unable to identify upload format.")
                name = raw_name or _sniffed_body_name(head)
                return self._import_zip(body, name, params, caller.login, handler)

            uris = await read_in_thread(request, self.knobs, import_stream)
            return text_response("\r\n".join(uris))
        body = await spool_body(request, self.store.tmp_dir, self.knobs)
        try:
            if body.size == 0:
                raise XnatHTTPError(400, "Unable to identify upload format.")
            if multipart:
                name = body.name
            else:
                with open(body.path, "rb") as spooled:
                    name = raw_name or _sniffed_body_name(spooled.read(4))
            if handler == "gradual-DICOM" or (handler == "SI" and name.endswith(".dcm")):
                uris = [await asyncio.to_thread(self.prearchive.import_gradual, body.path, name,
                                                params, caller.login)]
            else:
                uris = await asyncio.to_thread(self._import_zip, body.path, name, params,
                                               caller.login, handler)
        finally:
            body.cleanup()
        return text_response("\r\n".join(uris))

    def _import_zip(self, archive: Path | BinaryIO, name: str, params: Mapping[str, str],
                    login: str, handler: str) -> list[str]:
        try:
            return self.prearchive.import_dicom_zip(archive, name, params, login)
        except StoreError as exc:
            # The SI importer answers conflicts with 409, DICOM-zip with 400.
            if handler == "SI" and exc.status == 400 and "already exists" in exc.message:
                raise StoreError(409, exc.message) from exc
            raise

    # ---------------------------------------------------------------- archive
    async def _archive(self, request: web.Request, caller: Caller,
                       params: Mapping[str, str]) -> web.StreamResponse:
        request["route"] = "services.archive"
        if request.method != "POST":
            raise XnatHTTPError(405, "Method Not Allowed")
        sources = request.query.getall("src", []) or ([params["src"]] if "src" in params else [])
        if len(sources) > 1:
            rows = []
            for src in sources:
                project, timestamp, folder = _split_src(src)
                self._require_project(Access(self.store, caller), project)
                rows.append(self.prearchive.session(project, timestamp, folder))
                await asyncio.to_thread(self.prearchive.archive_src, src, user=caller.login,
                                        overwrite=params.get("overwrite"))
            return table_response(request, rows, LISTING_COLUMNS, default_format="json")
        access = Access(self.store, caller)
        self._check_source_access(access, sources[0] if sources else None)
        # Archiving into another project creates an experiment there, which needs
        # edit rights on it as well (a collaborator may only read).
        destination = params.get("project") or _dest_project(params.get("dest"))
        if destination:
            self._require_project(access, destination)
        uri = await asyncio.to_thread(
            self.prearchive.archive_src, sources[0] if sources else None, user=caller.login,
            dest=params.get("dest"), project=params.get("project"),
            subject=params.get("subject"), session=params.get("session"),
            overwrite=params.get("overwrite"))
        if params.get("redirect") == "true":
            raise web.HTTPSeeOther(location=uri)
        return text_response(uri + "\r\n", content_type="text/uri-list")

    def _check_source_access(self, access: Access, src: str | None) -> None:
        if not src:
            return
        parts = [p for p in src.split("/") if p]
        if parts and parts[0] == "data":
            parts = parts[1:]
        if len(parts) >= 3 and parts[:2] == ["prearchive", "projects"]:
            self._require_project(access, parts[2])

    # ------------------------------------------------------------------ batch
    async def _batch(self, request: web.Request, access: Access, params: Mapping[str, str],
                     action: str) -> web.Response:
        request["route"] = f"services.prearchive.{action}"
        if request.method != "POST" or action not in BATCH_STATUS:
            raise XnatHTTPError(404, "The requested resource was not found.")
        sources = request.query.getall("src", []) or ([params["src"]] if "src" in params else [])
        rows = []
        for src in sources:
            project, timestamp, folder = _split_src(src)
            self._require_project(access, project)
            row = self.prearchive.session(project, timestamp, folder)
            rows.append({**row, "status": BATCH_STATUS[action]})
            if action == "delete":
                await asyncio.to_thread(self.prearchive.delete, project, timestamp, folder)
            elif action == "move":
                target = params.get("newProject", "")
                self._require_project(access, target)
                await asyncio.to_thread(self.prearchive.move, project, timestamp, folder, target)
            else:
                await asyncio.to_thread(self.prearchive.build, project, timestamp, folder)
        return table_response(request, rows, LISTING_COLUMNS, default_format="xml")

    # -------------------------------------------------------------- prearchive
    def _projects_for(self, access: Access) -> list[str]:
        """Projects whose prearchive the user may see: those they can edit."""
        projects = [p["id"] for p in self.store.projects() if access.editable(p)]
        if access.caller.is_admin:
            projects.append(UNASSIGNED)
        return projects

    def _require_project(self, access: Access, project: str) -> None:
        if project == UNASSIGNED and access.caller.is_admin:
            return
        row = self.store.project(project)
        if row is None or not access.editable(row):
            raise XnatHTTPError(403, "The current user does not have access to the requested "
                                     f"project: {project}")

    async def _prearchive(self, request: web.Request, access: Access,
                          params: Mapping[str, str], rest: list[str]) -> web.StreamResponse:
        if rest and rest[0] == "projects":
            rest = rest[1:]
        elif rest:
            raise XnatHTTPError(404, "The requested resource was not found.")
        if len(rest) <= 1:
            request["route"] = "prearchive.list"
            if rest:
                projects = rest[0].split(",")
                for project in projects:
                    self._require_project(access, project)
            else:
                projects = self._projects_for(access)
            rows = self.prearchive.sessions(projects)
            return table_response(request, rows, LISTING_COLUMNS)
        if len(rest) == 2:
            raise XnatHTTPError(404, "The requested resource was not found.")
        project, timestamp, folder = rest[:3]
        self._require_project(access, project)
        tail = rest[3:]
        if not tail:
            return await self._prearchive_session(request, access, params, project, timestamp,
                                                  folder)
        if tail[0] != "scans" or request.method not in ("GET", "HEAD"):
            raise XnatHTTPError(404, "The requested resource was not found.")
        return await self._prearchive_contents(request, project, timestamp, folder, tail[1:])

    async def _prearchive_session(self, request: web.Request, access: Access,
                                  params: Mapping[str, str], project: str, timestamp: str,
                                  folder: str) -> web.StreamResponse:
        request["route"] = "prearchive.session"
        pa = self.prearchive
        if request.method == "DELETE":
            await asyncio.to_thread(pa.delete, project, timestamp, folder)
            return text_response("")
        if request.method == "POST":
            return await self._session_action(request, access, params, project, timestamp,
                                              folder)
        fmt = (request.query.get("format") or "xml").lower()
        if fmt == "zip":
            request["route"] = "prearchive.zip"
            entries = [(f"{folder}/scans/{f.scan_id}/resources/{f.resource}/files/{f.path}",
                        f.blob_path, time.time())
                       for f in pa.session_files(project, timestamp, folder)]
            return await archive_response(request, entries, "zip", folder, self.knobs)
        row = pa.session(project, timestamp, folder)
        if fmt in ("json", "csv"):
            return table_response(request, [row], LISTING_COLUMNS)
        if row["status"] not in ("READY", "ERROR", "CONFLICT"):
            raise XnatHTTPError(404, f"{row['url']} has not been built yet.")
        return text_response(_session_xml(row, pa.scans(project, timestamp, folder)),
                             content_type="text/xml")

    async def _session_action(self, request: web.Request, access: Access,
                              params: Mapping[str, str], project: str, timestamp: str,
                              folder: str) -> web.Response:
        pa = self.prearchive
        action = params.get("action", "")
        request["route"] = f"prearchive.{action or 'post'}"
        if action == "build":
            uri = await asyncio.to_thread(pa.build, project, timestamp, folder)
            return text_response(uri, content_type="text/uri-list")
        if action == "reset-status":
            await asyncio.to_thread(pa.reset_status, project, timestamp, folder)
            return text_response("")
        if action == "set-status":
            await asyncio.to_thread(pa.set_status, project, timestamp, folder,
                                    params.get("status", ""))
            return text_response("")
        if action == "move":
            target = params.get("newProject", "")
            self._require_project(access, target)
            uri = await asyncio.to_thread(pa.move, project, timestamp, folder, target)
            return web.Response(status=301, text=uri, content_type="text/plain")
        if action == "commit":
            auto = params.get("AA") == "true" or self._auto_archives(project)
            if not auto:
                row = pa.session(project, timestamp, folder)
                return text_response("/data" + row["url"])
            uri = await asyncio.to_thread(pa.archive, project, timestamp, folder,
                                          user=access.caller.login,
                                          overwrite=params.get("overwrite"))
            return web.Response(status=301, text=uri, content_type="text/plain")
        raise XnatHTTPError(400, f"User {access.caller.login} requested an unsupported action "
                                 f"on prearchive session: {action}")

    def _auto_archives(self, project: str) -> bool:
        row = self.store.project(project)
        return row is not None and row["prearchive_code"] in (4, 5)

    async def _prearchive_contents(self, request: web.Request, project: str, timestamp: str,
                                   folder: str, rest: list[str]) -> web.StreamResponse:
        pa = self.prearchive
        if not rest:
            request["route"] = "prearchive.scans"
            rows = pa.scans(project, timestamp, folder)
            return table_response(request, rows, ["ID", "xsiType", "series_description"])
        scan_id = rest[0]
        if rest[1:] == ["resources"]:
            request["route"] = "prearchive.resources"
            rows = pa.scan_resources(project, timestamp, folder, scan_id)
            return table_response(request, rows, ["label", "file_count", "file_size"])
        if len(rest) >= 4 and rest[1] == "resources" and rest[3] == "files":
            resource = rest[2]
            relpath = "/".join(rest[4:])
            if not relpath:
                fmt = (request.query.get("format") or "json").lower()
                files = pa.scan_files(project, timestamp, folder, scan_id, resource)
                if fmt == "zip":
                    entries = [(zip_entry_name(folder, {"scan_id": scan_id, "type": ""},
                                               resource, f.path), f.blob_path, time.time())
                               for f in files]
                    return await archive_response(request, entries, "zip", folder, self.knobs)
                request["route"] = "prearchive.files"
                # XNAT's prearchive file rows carry no digest (reference section 6).
                rows = [f.listing_row() for f in files]
                return table_response(request, rows, ["Name", "Size", "URI"])
            request["route"] = "prearchive.download"
            f = pa.scan_file(project, timestamp, folder, scan_id, resource, relpath)
            return await send_blob(request, f.blob_path, f.name, f.size,
                                   f.blob_path.stat().st_mtime, self.knobs)
        raise XnatHTTPError(404, "The requested resource was not found.")


# ----------------------------------------------------------------- helpers
async def _parameters(request: web.Request) -> dict[str, str]:
    """Query parameters, plus form fields for url-encoded bodies (archive, actions)."""
    params = dict(request.query)
    if request.method in ("POST", "PUT") and (
            request.content_type == "application/x-www-form-urlencoded"):
        body = await request.text()
        for key, value in parse_qsl(body):
            params.setdefault(key, value)
    return params


def _media_type(request: web.Request) -> str:
    return (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()


def _sniffed_body_name(head: bytes) -> str:
    """XNAT names a raw body after its Content-Type; other types are sniffed."""
    if head.startswith(b"PK"):
        return "upload.zip"
    if head.startswith(b"\x1f\x8b"):
        return "upload.tar.gz"
    return "upload.tar"


def _split_src(src: str) -> tuple[str, str, str]:
    parts = [p for p in src.split("/") if p]
    if parts and parts[0] == "data":
        parts = parts[1:]
    if len(parts) != 5 or parts[:2] != ["prearchive", "projects"]:
        raise XnatHTTPError(400, f"Invalid src URI ({src})")
    return parts[2], parts[3], parts[4]


def _session_xml(row: Mapping[str, str], scans: list[dict[str, str]]) -> str:
    from xml.sax.saxutils import escape, quoteattr

    scan_xml = "".join(
        f'<xnat:scan ID={quoteattr(s["ID"])} xsi:type={quoteattr(s["xsiType"])}>'
        f"<xnat:series_description>{escape(s['series_description'])}</xnat:series_description>"
        "</xnat:scan>" for s in scans)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<xnat:Session '
            'xmlns:xnat="http://nrg.wustl.edu/xnat" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'label={quoteattr(row["name"])} project={quoteattr(row["project"])} '
            f'UID={quoteattr(row["tag"])}><xnat:subject_ID>{escape(row["subject"])}'
            f"</xnat:subject_ID><xnat:scans>{scan_xml}</xnat:scans></xnat:Session>")


def _dest_project(dest: str | None) -> str | None:
    """P of ``dest=/archive/projects/P/...`` (``/data`` prefix optional)."""
    parts = [p for p in (dest or "").split("/") if p]
    if parts and parts[0] == "data":
        parts = parts[1:]
    if len(parts) >= 3 and parts[:2] == ["archive", "projects"]:
        return parts[2]
    return None

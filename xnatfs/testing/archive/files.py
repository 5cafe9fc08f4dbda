"""The archive's files: listings, downloads, zips, uploads, and the resources they live in.

Everything below a ``files`` segment (reference sections 3 and 4): the file
table (whose URIs depend on how the request named its resources), one file's
download, ``format=zip|tar.gz|tar`` of many, a file PUT (raw, multipart, or
an archive unpacked with ``extract=true``), a file DELETE, and creating the
resource a PUT names.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from aiohttp import web

from ..downloads import archive_response, send_blob, zip_entry_name
from ..knobs import Knobs
from ..spool import extract_members, safe_relpath, spool_body
from ..store import FileRow, Store
from ..xnatformat import XnatHTTPError, table_response, text_response
from .paths import ArchivePath
from .resolve import Access, Resolved, assessor_resources, require_edit, resolve


def file_sources(store: Store, res: Resolved, request: web.Request | None = None
                 ) -> list[tuple[sqlite3.Row | None, sqlite3.Row]]:
    """(scan, resource) pairs a ``files`` URL covers. ``all=true`` on a
    session's own ``files`` adds every scan's resources and every assessor's
    output resources, as XNAT's ``XNATTemplate.loadCatalogs`` does (it adds
    reconstructions too, which this server does not model)."""
    if res.experiment is None:
        return []
    eid = res.experiment["id"]
    if res.assessor is not None:
        resources = res.resources if res.resources is not None else \
            assessor_resources(store, res)
        return [(None, r) for r in resources]
    pairs: list[tuple[sqlite3.Row | None, sqlite3.Row]] = []
    scans: list[sqlite3.Row | None] = [*res.scans] if res.scans is not None else [None]
    every = (res.scans is None and res.resources is None and request is not None
             and request.query.get("all", "").lower() == "true")
    if every:
        scans = [None, *store.scans(eid)]
    scan_by_pk = {s["pk"]: s for s in (res.scans or [])}
    if res.resources is not None:
        return [(scan_by_pk.get(r["scan_pk"]), r) for r in res.resources]
    for scan in scans:
        pk = scan["pk"] if scan is not None else None
        pairs += [(scan, r) for r in store.resources(eid, pk)]
    if every:
        pairs += [(None, r) for r in store.assessor_resources(eid)]
    return pairs


def _is_multi(res: Resolved) -> bool:
    return res.resources is None or res.resource_multi or res.scan_multi


def _file_uri(res: Resolved, path: ArchivePath, scan: sqlite3.Row | None,
              resource: sqlite3.Row, f: FileRow) -> str:
    tail = f"resources/{resource['id']}/files/{f.path}"
    if scan is not None:
        tail = f"scans/{scan['scan_id']}/{tail}"
    elif resource["assessor_id"] is not None:
        # With its kind always, and by ID always, however the request named it.
        tail = f"assessors/{resource['assessor_id']}/out/{tail}"
    eid = res.the_experiment["id"]
    if _is_multi(res):
        # Built from SQL resource_path, which lacks /data (reference, section 2).
        return f"/experiments/{eid}/{tail}"
    if path.via_project:
        return (f"/data/projects/{res.the_project['id']}/subjects/"
                f"{res.the_subject['id']}/experiments/{eid}/{tail}")
    return f"/data/experiments/{eid}/{tail}"


FILE_COLUMNS = ["Name", "Size", "URI", "collection", "file_tags", "file_format",
                "file_content", "cat_ID", "digest"]


# Where XNAT keeps a project's files (its default archive root), for ``locator=``.
ARCHIVE_ROOT = "/data/xnat/archive"
LOCATORS = ("absolutePath", "projectPath")


def _list_files(request: web.Request, store: Store, path: ArchivePath,
                res: Resolved) -> web.Response:
    """The file table. ``locator=absolutePath|projectPath`` (xnat2bids asks for
    it) renames the ``URI`` column and gives the file's place on the server's
    disk instead (``FileList``/``CatalogUtils``, docs/xnat-verified.md)."""
    request["route"] = "files.list"
    locator = request.query.get("locator")
    uri_column = locator if locator in LOCATORS else "URI"
    rows = []
    for scan, resource in file_sources(store, res, request):
        for f in store.files(resource["id"]):
            where = (_disk_path(store, res, scan, resource, f, project_relative=(
                         uri_column == "projectPath"))
                     if uri_column != "URI" else _file_uri(res, path, scan, resource, f))
            rows.append({"Name": f.path.rsplit("/", 1)[-1], "Size": f.size,
                         uri_column: where,
                         "collection": resource["label"], "file_tags": f.tags,
                         "file_format": f.format, "file_content": f.content,
                         "cat_ID": resource["id"], "digest": f.digest})
    columns = [uri_column if c == "URI" else c for c in FILE_COLUMNS]
    return table_response(request, rows, columns, envelope={"title": "Files"},
                          json_columns_header=[{"key": uri_column, "serverRoot": ""}])


def _disk_path(store: Store, res: Resolved, scan: sqlite3.Row | None, resource: sqlite3.Row,
               f: FileRow, *, project_relative: bool) -> str:
    """Where XNAT's layout puts a file: ``<root>/<PROJECT>/arc001/<SESSION>/SCANS/
    <scan>/<resource>/<path>`` (``RESOURCES/...`` for the session's own,
    ``ASSESSORS/<assessor>/...`` for an assessor's)."""
    experiment = res.the_experiment
    inside = f"{_resource_dir(store, experiment, scan, resource)}/{f.path}"
    return inside if project_relative else f"{ARCHIVE_ROOT}/{experiment['project']}/{inside}"


def _resource_dir(store: Store, experiment: sqlite3.Row, scan: sqlite3.Row | None,
                  resource: sqlite3.Row) -> str:
    """A resource's folder below its project's archive root."""
    if scan is not None:
        owner = f"SCANS/{scan['scan_id']}"
    elif resource["assessor_id"] is not None:
        assessor = store.assessor(experiment["id"], resource["assessor_id"])
        owner = f"ASSESSORS/{assessor['label'] if assessor else resource['assessor_id']}"
    else:
        owner = "RESOURCES"
    return f"arc001/{experiment['label']}/{owner}/{resource['label']}"


def catalog_path(store: Store, experiment: sqlite3.Row, scan: sqlite3.Row | None,
                 resource: sqlite3.Row) -> str:
    """The catalog file of a resource on the server's disk: a resource item's
    ``URI`` in XNAT 1.8. ``DefaultCatalogService`` names it after the scan ID
    for a scan's resource, after the label otherwise (xnat-write-api.md 2.4)."""
    name = scan["scan_id"] if scan is not None else resource["label"]
    return (f"{ARCHIVE_ROOT}/{experiment['project']}/"
            f"{_resource_dir(store, experiment, scan, resource)}/{name}_catalog.xml")


async def get_files(request: web.Request, store: Store, knobs: Knobs, path: ArchivePath,
                    res: Resolved) -> web.StreamResponse:
    """A GET below ``files``: the table, one file, or a zip or tar of them all."""
    fmt = (request.query.get("format") or "").lower()
    if path.file_path is None:
        if fmt in ("zip", "tar.gz", "tar"):
            request["route"] = "files.archive"
            return await _archive_download(request, store, knobs, res, fmt)
        return _list_files(request, store, path, res)
    request["route"] = "files.download"
    for _scan, resource in file_sources(store, res, request):
        f = store.file(resource["id"], path.file_path)
        if f is not None:
            return await send_blob(request, store.blob_path(f.blob),
                                   f.path.rsplit("/", 1)[-1], f.size, f.mtime, knobs)
    if request.query.get("accept-not-found") == "true":
        return web.Response(status=204)
    raise XnatHTTPError(404, "Unable to find file.")


async def _archive_download(request: web.Request, store: Store, knobs: Knobs,
                            res: Resolved, fmt: str) -> web.StreamResponse:
    """``?format=zip|tar.gz|tar`` with XNAT's entry layout, streamed chunked."""
    structure = request.query.get("structure", "default")
    label = res.experiment["label"] if res.experiment is not None else "download"
    entries: list[tuple[str, Path, float]] = []
    for scan, resource in file_sources(store, res, request):
        for f in store.files(resource["id"]):
            if resource["assessor_id"] is not None:
                # The layout of a session's zip (RestFileUtils.buildRelativePath); XNAT
                # names an assessor's own zip differently (its label first).
                name = (f"{label}/assessors/{resource['assessor_id']}/out/resources/"
                        f"{resource['label']}/files/{f.path}")
            else:
                name = zip_entry_name(label, scan, resource["label"], f.path, structure)
            entries.append((name, store.blob_path(f.blob), f.mtime))
    if not entries:
        raise XnatHTTPError(404, "No matching files found.")
    return await archive_response(request, entries, fmt, label, knobs)


def put_resource(request: web.Request, store: Store, access: Access,
                 path: ArchivePath) -> web.Response:
    """PUT of a resource's own URL: create it, with its format, content and tags."""
    res = resolve(store, access, path, for_write=True)
    require_edit(store, access, res)
    if res.resources:
        raise XnatHTTPError(409, "Specified resource already exists.")
    if res.experiment is None or res.scan_multi:
        raise XnatHTTPError(400, "Resources can only be created on a session or scan.")
    q = request.query
    _new_resource(store, res, path, format=q.get("format", ""), content=q.get("content", ""),
                  tags=q.get("tags", ""))
    return text_response("", 200)


def _new_resource(store: Store, res: Resolved, path: ArchivePath, **fields: str) -> int:
    """The resource a PUT names, made on its session, scan or assessor."""
    if res.assessor is not None and res.assessor_kind == "in":
        raise XnatHTTPError(400, "This server keeps assessor output resources only.")
    scan_pk = res.scans[0]["pk"] if res.scans else None
    return store.add_resource(
        res.the_experiment["id"], scan_pk, path.ids["resource"],
        assessor_id=res.assessor["id"] if res.assessor is not None else None,
        format=fields.get("format", ""), content=fields.get("content", ""),
        tags=fields.get("tags", ""))


async def put_file(request: web.Request, store: Store, knobs: Knobs, access: Access,
                   path: ArchivePath) -> web.Response:
    """PUT below ``files``: one file, or an archive's members with ``extract=true``;
    the resource is made when it does not exist yet."""
    request["route"] = "files.put"
    res = resolve(store, access, path, for_write=True)
    require_edit(store, access, res)
    if path.file_path is None and request.query.get("extract") != "true":
        raise XnatHTTPError(400, "You must specify a file name.")
    if res.experiment is None or res.scan_multi or res.resource_multi:
        raise XnatHTTPError(400, "Files can only be added to one resource.")
    if "resource" not in path.ids:
        raise XnatHTTPError(400, "You must specify a resource.")
    if path.file_path and not safe_relpath(path.file_path):
        raise XnatHTTPError(400, f"Invalid file path: {path.file_path}")
    q = request.query
    spooled = await spool_body(request, store.tmp_dir, knobs)
    try:
        if spooled.size == 0:
            raise XnatHTTPError(400, "You tried to PUT to this service, but didn't provide "
                                     "any data (found 0 files). Please provide data and "
                                     "try again.")
        if res.resources:
            resource = res.resources[0]
        else:
            rid = _new_resource(store, res, path)
            resource = store.aggregate("SELECT * FROM resources WHERE id = ?", (rid,))
        overwrite = q.get("overwrite") == "true"
        opts = {"format": q.get("format", ""), "content": q.get("content", ""),
                "tags": q.get("tags", "")}
        if q.get("extract") == "true":
            items = await asyncio.to_thread(extract_members, spooled.path, spooled.name,
                                            store.tmp_dir)
        else:
            assert path.file_path is not None  # checked above
            items = [(path.file_path, spooled.path)]
        duplicates = []
        for relpath, local in items:
            if store.file(resource["id"], relpath) and not overwrite:
                duplicates.append(relpath)
                continue
            blob, size, digest = await asyncio.to_thread(
                store.store_blob_from_path, local, move=True)
            store.add_file(resource["id"], relpath, blob, size, digest,
                           overwrite=overwrite, **opts)
    finally:
        spooled.cleanup()
    if duplicates:
        return web.Response(status=200, text=json.dumps({"duplicates": duplicates}),
                            content_type="text/html")
    return text_response("", 200)


def delete_file(store: Store, res: Resolved, path: ArchivePath) -> web.Response:
    """DELETE below ``files``: the named file, in every resource the path covers."""
    if path.file_path is None:
        raise XnatHTTPError(400, "You must specify a file.")
    matched = False
    for _scan, resource in file_sources(store, res):
        f = store.file(resource["id"], path.file_path)
        if f is not None:
            store.delete_file(f)
            matched = True
    if not matched:
        raise XnatHTTPError(404, "No matched files")
    return text_response("", 200)

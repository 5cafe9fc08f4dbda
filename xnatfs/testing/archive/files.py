"""The archive's files, read: listings, downloads and zips.

Everything a GET below a ``files`` segment answers (reference sections 3 and
4): the file table (whose URIs depend on how the request named its
resources), one file's download, ``format=zip|tar.gz|tar`` of many. Writes
(file PUT/POST/DELETE, resources) are :mod:`.filewrites`'.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from aiohttp import web

from ..downloads import archive_response, send_blob, zip_entry_name
from ..knobs import Knobs
from ..store import Store
from ..storefiles import FileRow
from ..xnatformat import XnatHTTPError, table_response
from .paths import ArchivePath
from .resolve import Resolved, assessor_resources, resource_owner


def file_sources(store: Store, res: Resolved, request: web.Request | None = None
                 ) -> list[tuple[sqlite3.Row | None, sqlite3.Row]]:
    """(scan, resource) pairs a ``files`` URL covers. ``all=true`` on a
    session's own ``files`` adds every scan's resources and every assessor's
    output resources, as XNAT's ``XNATTemplate.loadCatalogs`` does (it adds
    reconstructions too, which this server does not model)."""
    if res.experiment is None:
        if res.project is None:
            return []
        if res.resources is not None:
            return [(None, r) for r in res.resources]
        owner, owner_id = resource_owner(res)
        return [(None, r) for r in store.owned_resources(owner, owner_id)]
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
    if resource["experiment_id"] is None:
        # XNATCatalogTemplate.getBaseURI: /data/projects/P[/subjects/{subject ID}].
        base = f"/data/projects/{res.the_project['id']}"
        if resource["subject_id"] is not None:
            base += f"/subjects/{resource['subject_id']}"
        return f"{base}/{tail}"
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
            where = (_disk_path(store, scan, resource, f, project_relative=(
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


def _disk_path(store: Store, scan: sqlite3.Row | None, resource: sqlite3.Row, f: FileRow, *,
               project_relative: bool) -> str:
    """Where XNAT's layout puts a file: ``<root>/<PROJECT>/arc001/<SESSION>/SCANS/
    <scan>/<resource>/<path>`` (``RESOURCES/...`` for the session's own,
    ``ASSESSORS/<assessor>/...`` for an assessor's, ``<PROJECT>/resources/<R>``
    and ``<PROJECT>/subjects/<SUBJECT>/<R>`` for a project's and a subject's)."""
    inside = f"{resource_dir(store, scan, resource)}/{f.path}"
    return inside.split("/", 1)[1] if project_relative else f"{ARCHIVE_ROOT}/{inside}"


def resource_dir(store: Store, scan: sqlite3.Row | None, resource: sqlite3.Row) -> str:
    """A resource's folder below the archive root, its project first
    (``DefaultCatalogService.insert*ResourceCatalog``, xnat-write-api.md 2.4)."""
    if resource["project_id"] is not None:
        return f"{resource['project_id']}/resources/{resource['label']}"
    if resource["subject_id"] is not None:
        subject = store.subject(None, resource["subject_id"])
        assert subject is not None
        return f"{subject['project']}/subjects/{subject['label']}/{resource['label']}"
    experiment = store.experiment(None, resource["experiment_id"])
    assert experiment is not None
    if scan is not None:
        owner = f"SCANS/{scan['scan_id']}"
    elif resource["assessor_id"] is not None:
        assessor = store.assessor(experiment["id"], resource["assessor_id"])
        owner = f"ASSESSORS/{assessor['label'] if assessor else resource['assessor_id']}"
    else:
        owner = "RESOURCES"
    return f"{experiment['project']}/arc001/{experiment['label']}/{owner}/{resource['label']}"


def catalog_path(store: Store, scan: sqlite3.Row | None, resource: sqlite3.Row) -> str:
    """The catalog file of a resource on the server's disk: a resource item's
    ``URI`` in XNAT 1.8. ``DefaultCatalogService`` names it after the scan ID
    for a scan's resource, after the label otherwise (xnat-write-api.md 2.4)."""
    name = scan["scan_id"] if scan is not None else resource["label"]
    return f"{ARCHIVE_ROOT}/{resource_dir(store, scan, resource)}/{name}_catalog.xml"


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
    label = (res.experiment["label"] if res.experiment is not None else
             res.subject["label"] if res.subject is not None else res.the_project["id"])
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

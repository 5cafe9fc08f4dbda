"""The archive's file and resource writes: XNAT's ``CatalogResource`` and ``FileList``
PUT/POST/DELETE (reference sections 2-4 and 10, docs/xnat-verified.md).

* A PUT (or POST) of a resource's URL creates it at project, subject,
  session, scan or assessor level: 200 with an empty body, 409 when the label
  is taken.
* A PUT below ``files`` stores a file, creating its resource when the label
  is new; a file already there is not written and is named in a 200
  ``{"duplicates": [...]}`` (``text/html``) unless ``overwrite``; a raw body
  needs a known length unless it is ``application/zip`` (500); multipart form
  fields are ignored (metadata comes from the query); ``extract`` unpacks an
  archive, chosen by its name's suffix, into the resource's root; a user who
  may read but not edit gets 200 and nothing happens.
* XNAT reads a resource's catalog before it writes the upload and checks, when
  it writes the catalog back, that nobody else wrote it meanwhile: the loser of
  two concurrent uploads into one resource gets a 500, its file left on disk
  but not in the catalog (a later upload of it is a duplicate).
* A DELETE below ``files`` removes every entry whose path starts with the
  path given (all of them for none); a DELETE of a resource that does not
  exist answers 200.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import sqlite3
import uuid
from pathlib import Path

from aiohttp import web

from ..knobs import Knobs
from ..spool import extract_members, safe_relpath, spool_body
from ..store import Store, StoreError
from ..xnatformat import XnatHTTPError, text_response
from .files import file_sources
from .paths import ArchivePath
from .resolve import Access, Resolved, require_edit, resolve, resource_owner

# RequestUtil: raw bodies whose media type names a file ("upload" + this when
# the URL names none); application/zip may stream with no length.
RAW_SUFFIX = {"application/zip": ".zip", "application/octet-stream": ".unsupported"}


def flag(request: web.Request, name: str) -> bool:
    """``SecureResource.isQueryVariableTrue``: present, and neither ``false`` nor ``0``."""
    value = request.query.get(name)
    return value is not None and value.lower() not in ("false", "0")


def put_resource(request: web.Request, store: Store, access: Access,
                 path: ArchivePath) -> web.Response:
    """PUT of a resource's own URL: create it, with its format, content and tags."""
    res = resolve(store, access, path, for_write=True)
    require_edit(store, access, res)
    if res.resources:
        raise XnatHTTPError(409, "Specified resource already exists.")
    if res.scan_multi or res.resource_multi:
        raise XnatHTTPError(400, "Resources can only be created one at a time.")
    q = request.query
    try:
        new_resource(store, res, path.ids["resource"], format=q.get("format", ""),
                     content=q.get("content", ""), tags=q.get("tags", ""))
    except StoreError as e:
        raise XnatHTTPError(e.status, e.message) from None
    return text_response("", 200)


def new_resource(store: Store, res: Resolved, label: str, **fields: str) -> int:
    """The resource a PUT names, made on its project, subject, session, scan or
    assessor (always an output resource: ``insertCatalog`` passes no type)."""
    if res.experiment is None:
        owner, owner_id = resource_owner(res)
        return store.add_owned_resource(owner, owner_id, label, **fields)
    scan_pk = res.scans[0]["pk"] if res.scans else None
    return store.add_resource(
        res.the_experiment["id"], scan_pk, label,
        assessor_id=res.assessor["id"] if res.assessor is not None else None, **fields)


def _target_resource(store: Store, res: Resolved, path: ArchivePath) -> sqlite3.Row:
    """The resource a file PUT writes into: the one named (made when new), or
    with no label the parent's first (FileList: ``getCatalogs().getFirstObject()``)."""
    if res.resources:
        return res.resources[0]
    if "resource" in path.ids:
        label = path.ids["resource"]
    else:
        first = [r for _scan, r in file_sources(store, res)]
        if first:
            return first[0]
        label = ""  # XNAT: a resource with no label, in a timestamp-named folder
    try:
        rid = new_resource(store, res, label)
    except StoreError:  # made meanwhile by a concurrent upload
        rid = new_resource_id(store, res, label)
    return store.aggregate("SELECT * FROM resources WHERE id = ?", (rid,))


def new_resource_id(store: Store, res: Resolved, label: str) -> int:
    if res.experiment is None:
        row = store.owned_resource(*resource_owner(res), label)
    else:
        row = store.resource(res.experiment["id"], res.scans[0]["pk"] if res.scans else None,
                             label, assessor_id=res.assessor["id"] if res.assessor else None)
    assert row is not None
    return int(row["id"])


async def put_file(request: web.Request, store: Store, knobs: Knobs, access: Access,
                   path: ArchivePath) -> web.Response:
    """PUT/POST below ``files`` (FileList.handlePost)."""
    request["route"] = "files.put"
    res = resolve(store, access, path, for_write=True)
    try:
        require_edit(store, access, res)
    except XnatHTTPError:
        # FileList.handlePost: ``if (Permissions.canEdit(user, security)) {...}`` has
        # no else: a reader's upload is a 200 with nothing written.
        await request.read()
        return text_response("", 200)
    if res.scan_multi or res.resource_multi:
        raise XnatHTTPError(404, "Unable to identify a single resource.")
    if path.file_path and not safe_relpath(path.file_path):
        raise XnatHTTPError(400, f"Invalid file path: {path.file_path}")
    ctype = request.content_type or ""
    multipart = ctype.startswith("multipart/")
    if flag(request, "inbody") and multipart:
        raise XnatHTTPError(406, "In-body File posts must include the file directly as the "
                                 "body of the message (not as part of multi-part form data).")
    if not multipart and request.content_length is None and ctype != "application/zip":
        raise XnatHTTPError(500, "The request entity size is -1 but the media type is not "
                                 "application/zip (i.e. streaming compressed upload)")
    resource = _target_resource(store, res, path)
    # A raw body is written while it arrives, after the catalog was read; a
    # multipart one is parsed whole first (DefaultFileItemFactory).
    read_version = store.catalog_version(resource["id"])
    spooled = await spool_body(request, store.tmp_dir, knobs)
    try:
        if multipart:
            read_version = store.catalog_version(resource["id"])
        if spooled.size == 0:
            raise XnatHTTPError(400, "You tried to PUT to this service, but didn't provide "
                                     "any data (found request entity size of 0). Please "
                                     "check the format of your service request.")
        name = spooled.name.rsplit("\\", 1)[-1] if multipart else (
            (path.file_path or "").rsplit("/", 1)[-1]
            or "upload" + RAW_SUFFIX.get(ctype, ".unsupported"))
        relpath = path.file_path or name
        items = await _members(store, spooled.path, name, relpath, flag(request, "extract"))
        duplicates = await _store_items(store, knobs, resource, items, read_version,
                                        overwrite=flag(request, "overwrite"), request=request)
    finally:
        spooled.cleanup()
    if duplicates:
        return web.Response(status=200, text=json.dumps({"duplicates": duplicates}),
                            content_type="text/html")
    return text_response("", 200)


async def _members(store: Store, local: Path, name: str, relpath: str,
                   extract: bool) -> list[tuple[str, Path]]:
    """What an upload stores: itself at ``relpath``, or with ``extract`` and an
    archive's name (case-sensitive suffix, ZipUtils.isCompressedFile) its members
    at the resource's root, or a gunzipped ``x.gz`` as ``x``."""
    if not extract:
        return [(relpath, local)]
    if name.endswith((".zip", ".zar", ".tar", ".xar", ".tar.gz", ".tgz")):
        return await asyncio.to_thread(extract_members, local, name, store.tmp_dir)
    if name.endswith(".gz"):
        target = store.tmp_dir / f"gunzip-{uuid.uuid4().hex}"

        def gunzip() -> None:
            with gzip.open(local, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            await asyncio.to_thread(gunzip)
        except (OSError, EOFError):
            target.unlink(missing_ok=True)
            raise XnatHTTPError(500, f"Unable to extract {name}.") from None
        return [(name[:-3], target)]
    return [(relpath, local)]


async def _store_items(store: Store, knobs: Knobs, resource: sqlite3.Row,
                       items: list[tuple[str, Path]], read_version: int, *, overwrite: bool,
                       request: web.Request) -> list[str]:
    """CatalogUtils.storeCatalogEntry: write each file (those on disk already are
    duplicates unless ``overwrite``), then the catalog, if nobody wrote it since
    it was read (writeCatalogToFile's checksum: ConcurrentModificationException)."""
    rid = resource["id"]
    q = request.query
    opts = {"format": q.get("format", ""), "content": q.get("content", ""),
            "tags": q.get("tags", "")}
    duplicates: list[str] = []
    written: list[tuple[str, str, int, str]] = []
    for relpath, local in items:
        if not safe_relpath(relpath):
            continue
        if store.on_disk(rid, relpath) and not overwrite:
            duplicates.append(relpath)
            continue
        blob, size, digest = await asyncio.to_thread(store.store_blob_from_path, local,
                                                     move=True)
        written.append((relpath, blob, size, digest))
    if knobs.catalog_conflicts and store.catalog_version(rid) != read_version:
        for relpath, blob, _size, _digest in written:
            store.add_stray(rid, relpath, blob)  # on disk, not in the catalog
        raise XnatHTTPError(500, f"Another thread or process modified the catalog of "
                                 f"resource {rid} since I last read it or I don't have a "
                                 "previous checksum to compare. To avoid overwriting "
                                 "changes, I'm throwing an exception.")
    for relpath, blob, size, digest in written:
        store.drop_stray(rid, relpath)
        store.add_file(rid, relpath, blob, size, digest, overwrite=True, **opts)
    return duplicates


def delete_file(request: web.Request, store: Store, res: Resolved,
                path: ArchivePath) -> web.Response:
    """FileList.handleDelete: every entry of the named resource whose path starts
    with the path given (``CatalogUtils.findCatEntriesWithinPath``: ``a`` takes
    ``a.txt`` and ``ab/`` too; a trailing ``*`` is a pattern; no path takes all)."""
    if "resource" not in path.ids or not res.resources:
        raise XnatHTTPError(400, "Unable to determine resource, parent, or security.")
    prefix = path.file_path or ""
    matched = False
    for resource in res.resources:
        for f in store.files(resource["id"]):
            if (f.path.startswith(prefix[:-1]) if prefix.endswith("*")
                    else f.path.startswith(prefix)):
                if flag(request, "removeFiles") or "removeFiles" not in request.query:
                    store.delete_file(f)
                else:  # removeFiles=false: out of the catalog, left on disk
                    store.add_stray(resource["id"], f.path, f.blob)
                    store.delete_file(f)
                matched = True
    if not matched:
        if request.query.get("accept-not-found") == "true":
            return web.Response(status=204)
        raise XnatHTTPError(404, "No matched files")
    return text_response("", 200)

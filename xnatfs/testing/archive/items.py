"""The archive's items: one project, subject, experiment, assessor, scan or resource.

A GET of an object's own URL answers XNAT's item JSON (``format=json``, the
default): its fields, with its children nested as XNAT nests them (an
experiment's scans, resources and assessors, a scan's and an assessor's
resources, where an object is shared). ``format=xml`` gives a small XML
rendering, and a resource answers with its catalog.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

from ..metadata import DEMOGRAPHICS, EXPERIMENT_FIELDS
from ..store import Store
from ..xnatformat import XnatHTTPError, child_field, item_json, json_response, text_response
from . import itemxml
from .files import catalog_path
from .paths import ArchivePath
from .resolve import Resolved


def get_item(request: web.Request, store: Store, path: ArchivePath,
             res: Resolved) -> web.Response:
    """The one object a path names, as an item (or a resource's catalog)."""
    fmt = (request.query.get("format") or _negotiated(request)).lower()
    kind = object_named(path, res)
    if kind == "resource" and fmt != "json":
        return text_response(catalog_xml(store, res.the_resource), content_type="text/xml")
    if fmt == "json":
        return json_response({"items": [_ITEM_JSON[kind](store, res)]})
    if fmt == "xml":
        site_url = f"{request.scheme}://{request.host}"
        return text_response(itemxml.document(store, kind, res, site_url),
                             content_type="text/xml")
    if fmt == "html":
        return text_response(_report_page(kind, res), content_type="text/html")
    raise XnatHTTPError(400, f"Unsupported format: {fmt}")


def _negotiated(request: web.Request) -> str:
    """Without ``format``, XNAT's item resources offer HTML, then XML, and
    Restlet keeps the first on a tie: ``Accept: */*`` (curl, requests, no
    Accept at all) gets the HTML report page; XML only when asked for by
    name (docs/xnat-verified.md, "Item GET without format")."""
    quality = {"html": 0.0, "xml": 0.0}
    for part in request.headers.get("Accept", "*/*").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = next((float(p[2:]) for p in params if p.startswith("q=")
                  and p[2:].replace(".", "", 1).isdigit()), 1.0)
        for name, types in (("html", ("text/html", "text/*", "*/*")),
                            ("xml", ("text/xml", "application/xml", "text/*", "*/*"))):
            if media in types:
                quality[name] = max(quality[name], q)
    return "xml" if quality["xml"] > quality["html"] else "html"


def _report_page(kind: str, res: Resolved) -> str:
    """XNAT's report page for an object (``ItemHTMLRepresentation``), reduced to
    what names the object: a client that forgot ``format=json`` gets HTML, as
    from a real server, and fails the same way."""
    row = {"project": res.project, "subject": res.subject, "experiment": res.experiment,
           "assessor": res.assessor, "scan": res.scans[0] if res.scans else None}.get(kind)
    name = escape(str(row["label"] if row is not None and "label" in row.keys()
                      else row["id"] if row is not None else kind))
    return (f"<!DOCTYPE html>\n<html>\n<head><title>XNAT</title></head>\n"
            f"<body><h1>{escape(kind)} {name}</h1></body>\n</html>\n")


def object_named(path: ArchivePath, res: Resolved) -> str:
    """Which object a resolved path names: project, subject, experiment,
    assessor, scan or resource (404 when it names none, or several)."""
    level = path.level
    if res.assessor is not None and level in ("experiment", "assessor"):
        return "assessor"
    if level == "scan" and (res.scan_multi or not res.scans):
        raise XnatHTTPError(404, "Unable to find the specified scan.")
    if level == "resource" and (res.resource_multi or not res.resources):
        raise XnatHTTPError(404, "Unable to find the specified resource.")
    if level not in ("project", "subject", "experiment", "scan", "resource"):
        raise XnatHTTPError(404, "The requested resource was not found.")
    return level


_ITEM_JSON: dict[str, Callable[[Store, Resolved], dict[str, Any]]] = {
    "project": lambda store, res: project_item(res.the_project, store),
    "subject": lambda store, res: subject_item(store, res.the_subject),
    "experiment": lambda store, res: experiment_item(store, res.the_experiment),
    "assessor": lambda store, res: assessor_item(store, res.the_assessor, res.the_experiment),
    "scan": lambda store, res: scan_item(store, res.the_scan, res.the_experiment),
    "resource": lambda store, res: resource_item(store, res.the_resource,
                                                 res.the_experiment),
}


def project_item(p: sqlite3.Row, store: Store | None = None) -> dict[str, Any]:
    """A project, with its own resources (``resources/resource``) when asked for."""
    resources = [resource_item(store, r) for r in
                 store.owned_resources("project", p["id"])] if store is not None else []
    return item_json("xnat:projectData", {
        "ID": p["id"], "secondary_ID": p["secondary_id"], "name": p["name"],
        "description": p["description"], "active": "true"},
        [child_field("resources/resource", resources)] if resources else [],
        last_modified=p["last_modified"])


def subject_item(store: Store, s: sqlite3.Row) -> dict[str, Any]:
    """A subject with its whole tree, as ``FlattenedItem.renderChildren`` loads
    every exposed reference of ``xnat:subjectData`` from the database:
    ``sharing/share``, ``demographics`` and ``experiments/experiment``, each
    experiment with its own scans (and their ``file``s), resources and
    assessors. (Subject-level resources are not modelled by this store.)"""
    children = _sharing(store, "subject", s["id"], "xnat:projectParticipant",
                        "xnat_projectParticipant_id", {"subject_ID": s["id"]})
    demographics = demographic_values(s)
    if demographics:
        number = _rowid(store, "subjects", s["id"])
        item = item_json("xnat:demographicData", {
            **demographics, "xnat_abstractdemographicdata_id": number,
            "xnat_abstractDemographicData_id": number}, last_modified=s["last_modified"])
        children.append(child_field("demographics", [item]))
    children += _custom_fields(store, "subject", s["id"], s["last_modified"])
    resources = [resource_item(store, r) for r in store.owned_resources("subject", s["id"])]
    if resources:
        children.append(child_field("resources/resource", resources))
    experiments = [experiment_item(store, e) for e in store.query(
        "SELECT * FROM experiments WHERE subject_id = ? ORDER BY id", (s["id"],))]
    if experiments:
        children.append(child_field("experiments/experiment", experiments))
    fields = {"ID": s["id"], "project": s["project"], "label": s["label"],
              "group": s["subject_group"], "src": s["src"]}
    return item_json("xnat:subjectData", {k: v for k, v in fields.items() if v != ""},
                     children, last_modified=s["last_modified"])


def demographic_values(s: sqlite3.Row) -> dict[str, Any]:
    """A subject's demographics as XFT types them (yob an Integer, age a
    Double...), in schema order, only those set."""
    out: dict[str, Any] = {}
    for f in DEMOGRAPHICS:
        value = s[f.column]
        if value == "":
            continue
        if f.kind == "integer" and value.lstrip("+-").isdigit():
            out[f.shortcut] = int(value)
        elif f.kind in ("double", "float"):
            out[f.shortcut] = _java_double(value)
        else:
            out[f.shortcut] = value
    return out


def _custom_fields(store: Store, kind: str, owner_id: str,
                   last_modified: str) -> list[dict[str, Any]]:
    """The ``fields/field`` child: one item per custom variable, ``name`` and
    ``field`` (its value), keyed as XFT keys the ``xnat:subjectData_field``
    / ``xnat:experimentData_field`` tables."""
    element = "xnat:subjectData_field" if kind == "subject" else "xnat:experimentData_field"
    pk = element.replace(":", "_") + "_id"
    # A value emptied by NULL is a null column: no "field" key.
    items = [item_json(element, {"name": f["name"], "field": f["value"] or None,
                                 pk: f["rowid"]},
                       last_modified=last_modified)
             for f in store.custom_fields(kind, owner_id)]
    return [child_field("fields/field", items)] if items else []


def _rowid(store: Store, table: str, key: str) -> int:
    row = store.query_one(f"SELECT rowid FROM {table} WHERE id = ?", (key,))
    return int(row[0]) if row else 0


def _sharing(store: Store, kind: str, object_id: str, xsi_type: str, pk: str,
             extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The ``sharing/share`` child of an item: the projects it is shared into,
    with its label in each (where xnatpy reads a subject's label per project),
    each row with its own numeric key (``xnat_projectParticipant_id``,
    ``xnat_experimentData_share_id``: XFT's default key, ``getSQLName() +
    "_id"``, for elements without a stated one)."""
    shares = [item_json(xsi_type, {"label": row["label"], "project": row["project"],
                                   pk: int(row["rowid"]), **(extra or {})})
              for row in store.query(
                  "SELECT rowid, project, label FROM shares WHERE kind = ? AND id = ?"
                  " ORDER BY project", (kind, object_id))]
    return [child_field("sharing/share", shares)] if shares else []


def experiment_item(store: Store, e: sqlite3.Row) -> dict[str, Any]:
    children = _sharing(store, "experiment", e["id"], "xnat:experimentData_share",
                        "xnat_experimentData_share_id")
    resource_items = [resource_item(store, r, e) for r in store.resources(e["id"], None)]
    if resource_items:
        children.append(child_field("resources/resource", resource_items))
    scan_items = [scan_item(store, s, e) for s in store.scans(e["id"])]
    if scan_items:
        children.append(child_field("scans/scan", scan_items))
    assessor_items = [assessor_item(store, a, e) for a in store.assessors(e["id"])]
    if assessor_items:
        children.append(child_field("assessors/assessor", assessor_items))
    children += _custom_fields(store, "experiment", e["id"], e["last_modified"])
    # No insert_date/insert_user: they are meta, not fields of the item.
    fields = {"subject_ID": e["subject_id"], "scanner/model": e["scanner_model"],
              "scanner/manufacturer": e["scanner_manufacturer"], "date": e["date"],
              "time": e["time"], "modality": e["modality"], "project": e["project"],
              "label": e["label"], "UID": e["uid"],
              **{f.shortcut: e[f.column] for f in EXPERIMENT_FIELDS}}
    if e["xsi_type"] == "xnat:mrSessionData" and e["field_strength"]:
        fields["fieldStrength"] = _java_double(e["field_strength"])
    fields.update({"id": e["id"], "ID": e["id"], "session_type": e["session_type"]})
    return item_json(e["xsi_type"], {k: v for k, v in fields.items() if v != ""}, children,
                     last_modified=e["last_modified"])


def _java_double(value: str) -> str:
    """A number as XNAT stores a DICOM decimal: Java's ``Double.toString`` (``3.0``)."""
    try:
        return repr(float(value))
    except ValueError:
        return value


def assessor_item(store: Store, a: sqlite3.Row, e: sqlite3.Row) -> dict[str, Any]:
    """An assessor with its output resources (``out/file``), as XNAT nests it."""
    resource_items = [resource_item(store, r, e) for r in
                      store.resources(e["id"], None, assessor_id=a["id"])]
    children = [child_field("out/file", resource_items)] if resource_items else []
    fields = {"ID": a["id"], "id": a["id"], "label": a["label"], "project": e["project"],
              "imageSession_ID": e["id"], "date": a["date"]}
    return item_json(a["xsi_type"], {k: v for k, v in fields.items() if v != ""}, children,
                     last_modified=a["last_modified"])


def scan_item(store: Store, s: sqlite3.Row, e: sqlite3.Row) -> dict[str, Any]:
    """A scan: ``xnat_imagescandata_id`` is the key of its own table (mrScanData
    extends imageScanData), ``xnat_imageScanData_id`` the default key of
    imageScanData (``getSQLName() + "_id"``, its case kept): the same number."""
    resource_items = [resource_item(store, r, e, s) for r in store.resources(e["id"], s["pk"])]
    children = [child_field("file", resource_items)] if resource_items else []
    fields = {"ID": s["scan_id"], "type": s["type"], "quality": s["quality"],
              "note": s["note"], "series_description": s["series_description"],
              "UID": s["uid"], "frames": int(s["frames"]) if s["frames"] else None,
              "modality": s["modality"], "xnat_imagescandata_id": s["pk"],
              "xnat_imageScanData_id": s["pk"],
              "image_session_ID": e["id"], "project": e["project"]}
    return item_json(s["xsi_type"], {k: v for k, v in fields.items() if v not in ("", None)},
                     children, last_modified=s["last_modified"])


def resource_item(store: Store, r: sqlite3.Row, e: sqlite3.Row | None = None,
                  scan: sqlite3.Row | None = None) -> dict[str, Any]:
    """A resource catalog: ``URI`` is its catalog file on the server's disk;
    ``xnat_abstractresource_id`` (its table's key) and ``xnat_abstractResource_id``
    (abstractResource's default key) the same number; its tags as
    ``tags/tag`` children (``name=value`` tags with a ``name``)."""
    if scan is None and r["scan_pk"] is not None:
        scan = store.query_one("SELECT * FROM scans WHERE pk = ?", (r["scan_pk"],))
    count, size = store.resource_totals(r["id"])
    tags = []
    for index, tag in enumerate(t.strip() for t in r["tags"].split(",") if t.strip()):
        name, _, value = tag.partition("=") if "=" in tag else ("", "", tag)
        tags.append(item_json("xnat:abstractResource_tag", {
            "tag": value, "name": name or None,
            "xnat_abstractResource_tag_id": r["id"] * 1000 + index + 1},
            last_modified=r["last_modified"]))
    children = [child_field("tags/tag", tags)] if tags else []
    fields = {"label": r["label"], "format": r["format"], "content": r["content"],
              "xnat_abstractresource_id": r["id"], "xnat_abstractResource_id": r["id"],
              "file_count": count, "file_size": size,
              "URI": catalog_path(store, scan, r)}
    return item_json("xnat:resourceCatalog",
                     {k: v for k, v in fields.items() if v not in ("", None)}, children,
                     last_modified=r["last_modified"])


def catalog_xml(store: Store, resource: sqlite3.Row) -> str:
    """A resource's catalog, as XNAT serves it for a plain GET of the resource."""
    entries = "".join(
        f"<cat:entry URI={quoteattr(f.path)} ID={quoteattr(f.path)} name="
        f"{quoteattr(f.path.rsplit('/', 1)[-1])} digest={quoteattr(f.digest)} "
        f'xsi:type="cat:entry"/>' for f in store.files(resource["id"]))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog '
            'xmlns:cat="http://nrg.wustl.edu/catalog" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'ID={quoteattr(str(resource["id"]))}><cat:entries>{entries}</cat:entries>'
            "</cat:Catalog>")


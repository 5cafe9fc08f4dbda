"""The archive's listings: projects, subjects, experiments, scans, resources, assessors.

Projects, subjects, experiments, scans and assessors are XNAT's
query-organiser tables (``columns=``, filters and paging, :mod:`..listings`);
resources are a fixed table. ``/data/projects`` has two more flavours that
XNAT's own pages ask for: ``permissions=`` and the DisplaySearch one.
Subjects and experiments shared into a project are listed there under their
label in it.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from aiohttp import web

from .. import listings
from ..listings import ListingSpec
from ..metadata import EXPERIMENT_FIELDS, SUBJECT_FIELDS
from ..store import Store
from ..xnatformat import XnatHTTPError, table_response
from .paths import ArchivePath
from .resolve import Access, Resolved, assessor_resources, resource_owner


# Projects ------------------------------------------------------------
PROJECT_SPEC = ListingSpec(
    defaults=("ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname"),
    aliases={"ID": "ID", "secondary_ID": "secondary_ID", "name": "name",
             "description": "description", "pi_firstname": "pi_firstname",
             "pi_lastname": "pi_lastname", "URI": "URI"},
)
_DISPLAY_SEARCH_PARAMS = ("accessible", "owner", "member", "collaborator", "recent",
                          "favorite", "activeSince", "admin", "prearc_code")


def _project_row(p: sqlite3.Row) -> dict[str, Any]:
    return {"ID": p["id"], "secondary_ID": p["secondary_id"], "name": p["name"],
            "description": p["description"], "pi_firstname": p["pi_firstname"],
            "pi_lastname": p["pi_lastname"], "URI": f"/data/projects/{p['id']}"}


def list_projects(request: web.Request, store: Store, access: Access) -> web.Response:
    projects = [p for p in store.projects() if access.listed(p)]
    if "permissions" in request.query:  # XNAT picks this handler over the others
        return _projects_with_permission(request, store, access)
    if any(k in request.query for k in _DISPLAY_SEARCH_PARAMS):
        return _display_search_projects(request, store, access)
    return listings.render(request, PROJECT_SPEC, [_project_row(p) for p in projects])


# SecurityManager's actions; any other value is refused (it goes into SQL there).
_PERMISSIONS = ("activate", "create", "delete", "edit", "read")


def _projects_with_permission(request: web.Request, store: Store,
                              access: Access) -> web.Response:
    """``?permissions=ACTION&dataType=TYPE`` (PermissionsProjectHandler, what
    XNAT's upload pages ask): the projects where the user may do ACTION to
    TYPE, every project for a data admin; columns as SQL returns them."""
    action = request.query.get("permissions", "")
    if action not in _PERMISSIONS:
        raise XnatHTTPError(500, "You must specify one of the following values for the "
                                 "permissions parameter: " + ", ".join(_PERMISSIONS))
    if ":" not in request.query.get("dataType", ""):
        raise XnatHTTPError(500, "Failed to identify projects")
    allowed = {"read": ("owner", "member", "collaborator"), "delete": ("owner",)}.get(
        action, ("owner", "member"))
    rows = [{"id": p["id"], "secondary_id": p["secondary_id"]}
            for p in sorted(store.projects(), key=lambda p: p["secondary_id"])
            if access.caller.is_admin or access.role(p["id"]) in allowed
            or (action == "read" and p["accessibility"] == "public")]
    return table_response(request, rows, ["id", "secondary_id"])


def _display_search_projects(request: web.Request, store: Store,
                             access: Access) -> web.Response:
    """The DisplaySearch flavour of ``/data/projects``: lower-case keys."""
    user = store.user(access.caller.login)
    uid = user["xdat_user_id"] if user else 0
    role_names = {"owner": "Owners", "member": "Members", "collaborator": "Collaborators"}
    rows = []
    for p in store.projects():
        role = access.role(p["id"])
        if "owner" in request.query and role != "owner":
            continue
        if "member" in request.query and role != "member":
            continue
        if "collaborator" in request.query and role != "collaborator":
            continue
        # The user's read criteria on xnat:projectData (protected ones too);
        # ``accessible=false``: only those the user has no role in.
        if not access.visible(p) or (
                request.query.get("accessible", "").lower() == "false" and role is not None):
            continue
        rows.append({
            "id": p["id"], "secondary_id": p["secondary_id"], "name": p["name"],
            "description": p["description"],
            "pi": f"{p['pi_firstname']} {p['pi_lastname']}".strip(),
            "project_invs": "", "project_access": p["accessibility"],
            "project_access_img": "/@WEBAPPimages/" + (
                "globe.gif" if p["accessibility"] == "public" else "key.gif"),
            "insert_date": p["insert_date"], "insert_user": p["insert_user"],
            f"user_role_{uid}": role_names.get(role or "", ""),
            f"last_accessed_{uid}": "", "quarantine_status": "active",
        })
    columns = ["id", "secondary_id", "name", "description", "pi", "project_invs",
               "project_access", "project_access_img", "insert_date", "insert_user",
               f"user_role_{uid}", f"last_accessed_{uid}", "quarantine_status"]
    return table_response(request, rows, columns, envelope={
        "title": "Projects", "xdat_user_id": str(uid), "totalRecords": str(len(rows))})


# Subjects ------------------------------------------------------------
# Custom variables as XNAT joins them: xnat:subjectData/fields/field/{name,field}.
_FIELD_JOINS = {"fields/field/name": (("fields",), "field_name"),
                "fields/field/field": (("fields",), "field_value")}
SUBJECT_SPEC = ListingSpec(
    defaults=("ID", "project", "label", "insert_date", "insert_user"),
    aliases={"ID": "ID", "project": "project", "label": "label",
             "insert_date": "insert_date", "insert_user": "insert_user",
             "last_modified": "last_modified", "URI": "URI",
             **{f.shortcut: f.shortcut for f in SUBJECT_FIELDS}},
    joins=_FIELD_JOINS,
    join_roots={"fields": "xnat:subjectdata"},
)


def _field_children(fields: list[sqlite3.Row]) -> list[dict[str, Any]]:
    return [{"field_name": f["name"], "field_value": f["value"]} for f in fields]


def list_subjects(request: web.Request, store: Store, access: Access,
                  res: Resolved) -> web.Response:
    project = res.project
    if project is None:  # /data/subjects: those of every project the user reads
        readable = [p["id"] for p in store.projects() if access.readable(p)]
        subjects = store.query(
            "SELECT s.*, s.label AS here_label FROM subjects s WHERE s.project IN"
            f" ({','.join('?' * len(readable)) or 'NULL'}) ORDER BY s.label", readable)
    else:
        if not access.readable(project):
            raise XnatHTTPError(403, f"Unable to read subjects for Project: {project['id']}")
        # Its own subjects and those shared into it, under their label here.
        subjects = store.query(
            "SELECT s.*, COALESCE(h.label, s.label) AS here_label FROM subjects s"
            " LEFT JOIN shares h ON h.kind = 'subject' AND h.id = s.id AND h.project = ?"
            " WHERE s.project = ? OR h.id IS NOT NULL ORDER BY here_label",
            (project["id"], project["id"]))
    fields = store.custom_fields_of("subject", [s["id"] for s in subjects])
    rows = [{"ID": s["id"], "project": s["project"], "label": s["here_label"],
             "insert_date": s["insert_date"], "insert_user": s["insert_user"],
             "last_modified": s["last_modified"], "URI": f"/data/subjects/{s['id']}",
             **{f.shortcut: s[f.column] for f in SUBJECT_FIELDS},
             listings.join_key("fields"): _field_children(fields[s["id"]])}
            for s in subjects]
    return listings.render(request, SUBJECT_SPEC, rows)


# Experiments -----------------------------------------------------------
EXPERIMENT_ALIASES = {
    "ID": "ID", "project": "project", "date": "date", "xsiType": "xsiType",
    "label": "label", "insert_date": "insert_date", "insert_user": "insert_user",
    "last_modified": "last_modified", "subject_ID": "subject_ID",
    "subject_label": "subject_label", "time": "time", "modality": "modality",
    "UID": "UID", "session_type": "session_type", "URI": "URI",
    "xnat:subjectassessordata/id": "ID",
    **{f.shortcut: f.shortcut for f in EXPERIMENT_FIELDS},
}
# A session's scans (and each scan's resources) and an experiment's custom
# variables, joined as QueryOrganizer joins them.
_SCAN_COLUMNS = {"id": "scan_id", "type": "type", "series_description": "series_description",
                 "quality": "quality", "frames": "frames", "note": "note"}
EXPERIMENT_JOINS = {
    **{f"scans/scan/{leaf}": (("scans",), f"scan_{key}") for leaf, key in _SCAN_COLUMNS.items()},
    "scans/scan/file/label": (("scans", "files"), "file_label"),
    **_FIELD_JOINS,
}
# Scans belong to image sessions; fields to any experiment.
_SESSION_ROOT = r"xnat:(image|[a-z]+)sessiondata"
EXPERIMENT_JOIN_ROOTS = {"scans": _SESSION_ROOT,
                         "fields": rf"xnat:(experimentdata|subjectassessordata|{_SESSION_ROOT[5:]})"}
# pyxnat's scans array names the scan element itself: xnat:imageScanData/ID.
EXPERIMENT_CHILD_ELEMENTS = {
    r"xnat:(image|[a-z]+)scandata": (("scans",), {leaf: f"scan_{key}"
                                                  for leaf, key in _SCAN_COLUMNS.items()}),
}
# xsiType= names an element; XNAT lists it and every element extending it.
_EXTENDED_BY = {"xnat:experimentdata": "%", "xnat:subjectassessordata": "%",
                "xnat:imagesessiondata": "%sessiondata"}


def list_experiments(request: web.Request, store: Store, access: Access, path: ArchivePath,
                     res: Resolved) -> web.Response:
    sql = ("SELECT e.*, e.label AS here_label, s.label AS subject_label"
           " FROM experiments e JOIN subjects s ON s.id = e.subject_id")
    args: list[Any] = []
    where = []
    if res.project is not None:
        if not access.readable(res.project):
            raise XnatHTTPError(403, f"Unable to read experiments for Project: "
                                     f"{res.project['id']}")
        # Its own experiments and those shared into it, labelled as they are here.
        here = res.project["id"]
        sql = ("SELECT e.*, COALESCE(he.label, e.label) AS here_label,"
               " CASE WHEN s.project = ? THEN s.label ELSE COALESCE(hs.label, s.label) END"
               " AS subject_label FROM experiments e JOIN subjects s ON s.id = e.subject_id"
               " LEFT JOIN shares he ON he.kind = 'experiment' AND he.id = e.id"
               " AND he.project = ?"
               " LEFT JOIN shares hs ON hs.kind = 'subject' AND hs.id = s.id"
               " AND hs.project = ?")
        args.extend([here, here, here])
        where.append("(e.project = ? OR he.id IS NOT NULL)")
        args.append(here)
    else:
        readable = [p["id"] for p in store.projects() if access.readable(p)]
        where.append(f"e.project IN ({','.join('?' * len(readable)) or 'NULL'})")
        args.extend(readable)
    if res.subject is not None:
        where.append("e.subject_id = ?")
        args.append(res.subject["id"])
    xsi_type = request.query.get("xsiType")
    if xsi_type:
        pattern = _EXTENDED_BY.get(xsi_type.lower())
        where.append("lower(e.xsi_type) LIKE ?" if pattern else "lower(e.xsi_type) = lower(?)")
        args.append(pattern or xsi_type)
    rows = []
    experiments = store.query(f"{sql} WHERE {' AND '.join(where)} ORDER BY here_label", args)
    joined = _requested(request, ("scans/scan/", "fields/field/"))
    if re.search(r"(^|,)\s*xnat:[a-z]*scandata/", (request.query.get("columns") or "").lower()):
        joined.add("scans/scan/")
    fields = (store.custom_fields_of("experiment", [e["id"] for e in experiments])
              if "fields/field/" in joined else {})
    for e in experiments:
        rows.append({
            "ID": e["id"], "project": e["project"], "date": e["date"],
            "xsiType": e["xsi_type"], "label": e["here_label"],
            "insert_date": e["insert_date"], "insert_user": e["insert_user"],
            "last_modified": e["last_modified"], "subject_ID": e["subject_id"], "subject_label": e["subject_label"],
            "time": e["time"], "modality": e["modality"], "UID": e["uid"],
            "session_type": e["session_type"], "URI": f"/data/experiments/{e['id']}",
            **{f.shortcut: e[f.column] for f in EXPERIMENT_FIELDS},
            listings.join_key("scans"): (_scan_children(store, e["id"])
                                        if "scans/scan/" in joined else []),
            listings.join_key("fields"): _field_children(fields.get(e["id"], [])),
        })
    defaults = ["ID", "project", "date", "xsiType", "label", "insert_date"]
    if "project" not in path.ids and "subject" not in path.ids:
        defaults += ["subject_ID", "subject_label"]
    pk = f"{(xsi_type or 'xnat:subjectAssessorData').lower()}/id"
    aliases = dict(EXPERIMENT_ALIASES)
    aliases[pk] = "ID"
    # XNAT adds extension_item/element_name and project unless the root element
    # (xsiType=) is a secured one (ProjSubExptList.java:325-328,
    # ExperimentListResource.java:210-213).
    always = () if xsi_type else ("xsiType", "project")
    spec = ListingSpec(defaults=defaults, aliases=aliases, pk_column=pk, always=always,
                       joins=EXPERIMENT_JOINS, join_roots=EXPERIMENT_JOIN_ROOTS,
                       child_elements=EXPERIMENT_CHILD_ELEMENTS)
    return listings.render(request, spec, rows)


def _requested(request: web.Request, tails: tuple[str, ...]) -> set[str]:
    """Which of the joinable children (``scans/scan/``...) the columns name,
    so a listing loads only those."""
    columns = [c.strip().lower().partition("/")[2]
               for c in (request.query.get("columns") or "").split(",")]
    return {t for t in tails if any(c.startswith(t) for c in columns)}


def _scan_children(store: Store, experiment_id: str) -> list[dict[str, Any]]:
    """A session's scans in scan order, each with its resources' labels."""
    children = []
    for s in store.scans(experiment_id):
        files = [{"file_label": r["label"]} for r in store.resources(experiment_id, s["pk"])]
        children.append({**{f"scan_{key}": s[key]
                            for key in _SCAN_COLUMNS.values()},
                         listings.join_key("files"): files})
    return children


# Scans -----------------------------------------------------------------
SCAN_SPEC = ListingSpec(
    defaults=("xnat_imagescandata_id", "ID", "type", "quality", "xsiType", "note",
              "series_description"),
    aliases={"xnat_imagescandata_id": "xnat_imagescandata_id", "ID": "ID", "type": "type",
             "quality": "quality", "xsiType": "xsiType", "note": "note",
             "series_description": "series_description", "frames": "frames",
             "UID": "UID", "modality": "modality", "insert_date": "insert_date",
             "insert_user": "insert_user", "last_modified": "last_modified", "URI": "URI"},
)


def list_scans(request: web.Request, store: Store, res: Resolved) -> web.Response:
    if res.experiment is None:
        raise XnatHTTPError(404, "The requested resource was not found.")
    eid = res.experiment["id"]
    rows = [{"xnat_imagescandata_id": s["pk"], "ID": s["scan_id"], "type": s["type"],
             "quality": s["quality"], "xsiType": s["xsi_type"], "note": s["note"],
             "series_description": s["series_description"], "frames": s["frames"],
             "UID": s["uid"], "modality": s["modality"], "insert_date": s["insert_date"],
             "insert_user": s["insert_user"], "last_modified": s["last_modified"],
             "URI": f"/data/experiments/{eid}/scans/{s['scan_id']}"}
            for s in store.scans(eid)]
    return listings.render(request, SCAN_SPEC, rows)


# Resources -------------------------------------------------------------
RESOURCE_COLUMNS = ["xnat_abstractresource_id", "label", "element_name", "category",
                    "cat_id", "cat_desc", "file_count", "file_size", "tags", "content",
                    "format"]


def _resource_row(store: Store, r: sqlite3.Row, scan: sqlite3.Row | None,
                  experiment: sqlite3.Row | None) -> dict[str, Any]:
    count, size = store.resource_totals(r["id"])
    if experiment is None:  # a project's or subject's own (CatalogUtils.populateTable)
        category, cat_id, cat_desc = "resources", r["project_id"] or r["subject_id"], " "
    elif scan is not None:
        category, cat_id, cat_desc = "scans", scan["scan_id"], scan["type"]
    elif r["assessor_id"] is not None:
        assessor = store.assessor(experiment["id"], r["assessor_id"])
        assert assessor is not None
        category, cat_id, cat_desc = "assessors", assessor["id"], assessor["xsi_type"]
    else:
        category, cat_id, cat_desc = "resources", experiment["id"], " "
    return {"xnat_abstractresource_id": r["id"], "label": r["label"],
            "element_name": "xnat:resourceCatalog", "category": category,
            "cat_id": cat_id, "cat_desc": cat_desc,
            "file_count": count, "file_size": size, "tags": r["tags"],
            "content": r["content"], "format": r["format"]}


def list_resources(request: web.Request, store: Store, res: Resolved) -> web.Response:
    rows: list[dict[str, Any]] = []
    if res.experiment is None and res.project is not None:
        rows = [_resource_row(store, r, None, None)
                for r in store.owned_resources(*resource_owner(res))]
    elif res.assessor is not None:
        rows = [_resource_row(store, r, None, res.the_experiment)
                for r in assessor_resources(store, res)]
    elif res.experiment is not None:
        eid = res.experiment["id"]
        scans: list[sqlite3.Row | None] = [*res.scans] if res.scans is not None else [None]
        every = res.scans is None and request.query.get("all") == "true"
        if every:
            scans = [None, *store.scans(eid)]
        for scan in scans:
            pk = scan["pk"] if scan is not None else None
            rows += [_resource_row(store, r, scan, res.experiment)
                     for r in store.resources(eid, pk)]
        if every:  # XNAT adds the assessors' output resources
            rows += [_resource_row(store, r, None, res.experiment)
                     for r in store.assessor_resources(eid)]
    return table_response(request, rows, RESOURCE_COLUMNS,
                          envelope={"title": "Resources", "totalRecords": str(len(rows))})


# Assessors -------------------------------------------------------------
ASSESSOR_SPEC = ListingSpec(
    defaults=("ID", "project", "label", "date", "xsiType", "insert_date", "session_ID",
              "session_label"),
    aliases={a: a for a in ("ID", "project", "label", "date", "xsiType", "insert_date",
                            "session_ID", "session_label", "URI")},
    pk_column="xnat:imageassessordata/id",
    title="Project Subject Experiment Assessors",
)


def list_assessors(request: web.Request, store: Store, res: Resolved) -> web.Response:
    """``ProjSubExptAsstList``: an assessor's URI is its own, flat
    ``/data/experiments/{ID}``, not one below the session."""
    if res.experiment is None or res.assessor is not None:
        raise XnatHTTPError(404, "The requested resource was not found.")
    e = res.experiment
    rows = [{"ID": a["id"], "project": e["project"], "label": a["label"], "date": a["date"],
             "xsiType": a["xsi_type"], "insert_date": a["insert_date"],
             "session_ID": e["id"], "session_label": e["label"],
             "xnat:imageassessordata/id": a["id"], "URI": f"/data/experiments/{a['id']}"}
            for a in store.assessors(e["id"])]
    return listings.render(request, ASSESSOR_SPEC, rows)


def list_children(request: web.Request, store: Store, access: Access, path: ArchivePath,
                  res: Resolved) -> web.Response:
    """The table a resolved path's trailing collection names (``scans``...)."""
    collection = path.collection
    if collection == "subjects":
        return list_subjects(request, store, access, res)
    if collection == "experiments":
        return list_experiments(request, store, access, path, res)
    if collection == "scans":
        return list_scans(request, store, res)
    if collection == "resources":
        return list_resources(request, store, res)
    if collection == "assessors":
        return list_assessors(request, store, res)
    if collection == "reconstructions":  # not modelled: always none
        return table_response(request, [], ["ID", "type", "baseScanType", "URI"],
                              envelope={"totalRecords": "0"})
    raise XnatHTTPError(404, "The requested resource was not found.")


# The projects a subject or experiment is in --------------------------
PROJECTS_OF_COLUMNS = ["label", "ID", "Secondary_ID", "Name"]


def list_projects_of(request: web.Request, store: Store, path: ArchivePath,
                     res: Resolved) -> web.Response:
    """``.../subjects/S/projects`` and ``.../experiments/E/projects``
    (``SecureResource.representProjectsForArchivableItem``): its primary project
    with its label there, then each project it is shared into with its label
    in that one; no ``totalRecords`` (the table is rendered without params)."""
    if path.level == "subject":
        kind, item = "subject", res.the_subject
    elif res.assessor is not None:  # ExperimentResource finds assessors by ID too
        session = res.the_experiment
        primary = store.project(session["project"])
        assert primary is not None
        return table_response(request, [_projects_of_row(res.assessor["label"], primary)],
                              PROJECTS_OF_COLUMNS)
    else:
        kind, item = "experiment", res.the_experiment
    rows = []
    primary = store.project(item["project"])
    assert primary is not None
    rows.append(_projects_of_row(item["label"], primary))
    for share in store.query("SELECT project, label FROM shares WHERE kind = ? AND id = ?"
                             " ORDER BY project", (kind, item["id"])):
        project = store.project(share["project"])
        if project is not None:
            rows.append(_projects_of_row(share["label"], project))
    return table_response(request, rows, PROJECTS_OF_COLUMNS)


def _projects_of_row(label: str, project: sqlite3.Row) -> dict[str, Any]:
    return {"label": label, "ID": project["id"], "Secondary_ID": project["secondary_id"],
            "Name": project["name"]}

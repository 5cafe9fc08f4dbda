"""The archive's writes: creating and deleting projects, subjects, experiments,
assessors and scans, and a project's prearchive code.

A PUT of an object's URL creates it (201, its ID) or finds it (200, its ID),
taking fields from the query, plain or ``xsiType/field``-prefixed as
``req_format=qs`` sends them; a subject's or experiment's metadata (shortcut
keys and xpaths, :mod:`.fieldwrites`) is set on creation and on update, after
XNAT's validation. A DELETE takes the object and everything below
it, except that data deleted through a project it is only shared into loses
that share instead. Files and resources are written in :mod:`.filewrites`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..metadata import ValidationFailure
from ..store import Store
from ..xnatformat import XnatHTTPError, text_response
from . import fieldwrites
from .filewrites import delete_file
from .paths import ArchivePath
from .resolve import Access, require_edit, resolve, shared_here

PROJECT_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")


async def put_params(request: web.Request) -> dict[str, str]:
    """A PUT's parameters as ``loadItem`` takes them: an urlencoded body's
    fields, then the query's, which win."""
    params: dict[str, str] = {}
    if request.content_type == "application/x-www-form-urlencoded" and request.can_read_body:
        form = await request.post()
        params.update((k, v) for k, v in form.items() if isinstance(v, str))
    params.update(request.query.items())
    return params


def put_object(request: web.Request, store: Store, access: Access,
               path: ArchivePath, params: Mapping[str, str]) -> web.Response:
    """PUT of a project's, subject's, experiment's, assessor's or scan's own URL."""
    if path.level == "project":
        return _put_project(request, store, access, path)
    if "project" not in path.ids and path.level in ("subject", "experiment"):
        return _put_by_id(store, access, path, params)
    parent_path = ArchivePath(ids={k: v for k, v in path.ids.items() if k != path.level},
                              order=path.order[:-1], via_project=path.via_project)
    res = resolve(store, access, parent_path)
    if res.project is None or not access.editable(res.project):
        raise XnatHTTPError(403, "User account doesn't have permission to edit this "
                                 "session.")
    label = path.ids[path.level]
    query = request.query
    if path.level == "subject":
        existing = store.subject(res.project["id"], label)
        changes = _changes(params, "xnat:subjectData", shortcuts=True)
        if existing:
            store.update_subject(existing["id"], changes.values, changes.custom)
            return text_response(existing["id"], 200)
        new_label = query.get("xnat:subjectData/label") or query.get("label") or label
        sid = store.add_subject(res.project["id"], new_label, user=access.caller.login,
                                custom={k: v for k, v in changes.custom.items()
                                        if v is not None}, **changes.values)
        return text_response(sid, 201)
    if path.level == "experiment":
        existing = store.experiment(res.project["id"], label)
        # Shortcuts only through SubjAssessmentResource (.../subjects/S/experiments/E).
        shortcuts = "subject" in path.ids
        if existing:
            changes = _changes(params, existing["xsi_type"], shortcuts=shortcuts)
            store.update_experiment(existing["id"], changes.values, changes.custom)
            return text_response(existing["id"], 200)
        if res.subject is None:
            raise XnatHTTPError(400, "Experiments must be created under a subject.")
        xsi_type = query.get("xsiType", "xnat:mrSessionData")
        fields = _prefixed_fields(query, xsi_type, {"date", "time", "modality", "UID"})
        new_label = fields.pop("label", "") or query.get("label") or label
        changes = _changes(params, xsi_type, shortcuts=shortcuts)
        extra: dict[str, Any] = {k.lower() if k != "UID" else "uid": v
                                 for k, v in fields.items()
                                 if k in ("date", "time", "modality", "UID")}
        extra.update(changes.values)
        eid = store.add_experiment(res.project["id"], res.subject["id"], new_label,
                                   xsi_type, user=access.caller.login,
                                   custom={k: v for k, v in changes.custom.items()
                                           if v is not None}, **extra)
        return text_response(eid, 201)
    if path.level == "assessor":  # xnatpy's create_assessor
        experiment = res.the_experiment
        existing = store.assessor(experiment["id"], label)
        if existing:
            return text_response(existing["id"], 200)
        xsi_type = query.get("xsiType", "")
        if not xsi_type.endswith("AssessmentData") and not xsi_type.endswith("AssessorData"):
            raise XnatHTTPError(400, f"Unknown or missing assessor type: {xsi_type!r}")
        new_label = query.get(f"{xsi_type}/label") or query.get("label") or label
        return text_response(store.add_assessor(
            experiment["id"], new_label, xsi_type, date=query.get("date", ""),
            user=access.caller.login), 201)
    if path.level == "scan":
        scan_id = label.replace("[SLASH]", "/")
        existing = store.scan(res.the_experiment["id"], scan_id)
        if existing:
            return text_response(scan_id, 200)
        xsi_type = query.get("xsiType", "xnat:mrScanData")
        fields = _prefixed_fields(query, xsi_type,
                                  {"type", "quality", "note", "series_description"})
        store.add_scan(res.the_experiment["id"], scan_id, xsi_type, user=access.caller.login,
                       **{k: v for k, v in fields.items()
                          if k in ("type", "quality", "note", "series_description")})
        return text_response(scan_id, 201)
    raise XnatHTTPError(405, "Method Not Allowed")


def _changes(params: Mapping[str, str], xsi_type: str, *,
             shortcuts: bool) -> fieldwrites.FieldChanges:
    """The metadata a PUT sets, validated as XNAT validates it (400 with
    ``ValidationResults.toFullString()``, nothing stored)."""
    changes = fieldwrites.read_changes(params, xsi_type, shortcuts=shortcuts)
    try:
        fieldwrites.check(changes, xsi_type)
    except ValidationFailure as failure:
        raise XnatHTTPError(400, failure.body) from None
    return changes


def _put_by_id(store: Store, access: Access, path: ArchivePath,
               params: Mapping[str, str]) -> web.Response:
    """``/data/subjects/{ID}`` (SubjectResource: shortcuts apply) and
    ``/data/experiments/{ID}`` (ExperimentResource: xpaths only) update an
    existing object by accession ID; creating needs a project (422)."""
    key = path.ids[path.level]
    if path.level == "subject":
        subject = store.subject(None, key)
        if subject is None:
            raise XnatHTTPError(422, "Submitted subject record must include the project "
                                     "attribute.")
        project = store.project(subject["project"])
        if project is None or not access.editable(project):
            raise XnatHTTPError(403, "Specified user account has insufficient edit "
                                     "privileges for subjects in this project.")
        changes = _changes(params, "xnat:subjectData", shortcuts=True)
        store.update_subject(subject["id"], changes.values, changes.custom)
        return text_response(subject["id"], 200)
    experiment = store.experiment(None, key)
    if experiment is None:
        raise XnatHTTPError(404, "Unable to find the specified experiment.")
    project = store.project(experiment["project"])
    if project is None or not access.editable(project):
        raise XnatHTTPError(403, "Specified user account has insufficient edit privileges "
                                 "for experiments in this project.")
    changes = _changes(params, experiment["xsi_type"], shortcuts=False)
    store.update_experiment(experiment["id"], changes.values, changes.custom)
    return text_response(experiment["id"], 200)


def _put_project(request: web.Request, store: Store, access: Access,
                 path: ArchivePath) -> web.Response:
    pid = path.ids["project"]
    existing = store.project(pid)
    if existing is not None:
        if not access.editable(existing):
            raise XnatHTTPError(403, "Unable to edit project.")
        return text_response(existing["id"], 200)
    if not PROJECT_ID_RE.match(pid):
        raise XnatHTTPError(417, "Invalid character in project ID.")
    q = request.query
    store.add_project(
        pid, name=q.get("xnat:projectData/name") or q.get("name") or pid,
        description=q.get("xnat:projectData/description") or q.get("description") or "",
        secondary_id=q.get("xnat:projectData/secondary_ID") or q.get("secondary_ID"),
        accessibility=q.get("accessibility", "private"), owner=access.caller.login)
    return text_response(pid, 201)


def _prefixed_fields(query: Any, xsi_type: str, names: set[str]) -> dict[str, str]:
    """``xnat:mrSessionData/date=..`` style (``req_format=qs``) and plain fields."""
    out: dict[str, str] = {}
    lowered = xsi_type.lower()
    for key, value in query.items():
        if "/" in key:
            prefix, _, leaf = key.partition("/")
            if prefix.lower() == lowered:
                out[leaf] = value
        elif key in names or key == "label":
            out.setdefault(key, value)
    return out


def delete(request: web.Request, store: Store, access: Access,
           path: ArchivePath) -> web.Response:
    """DELETE of an object, of its files, or of its share into the project of the path."""
    # CatalogResource.handleDelete returns (200, empty) when no resource matches.
    missing_ok = path.level == "resource" and path.collection is None
    res = resolve(store, access, path, flat_assessor=True, for_write=missing_ok)
    # /data/experiments/{ID} may name an assessor: then it is what goes.
    assessor_named = (res.assessor is not None and path.collection is None
                      and path.level in ("experiment", "assessor"))
    unshare = (shared_here(res) if path.collection is None and not assessor_named
               and path.level in ("experiment", "subject") else None)
    require_edit(store, access, res, owner_too=unshare is None)
    request["route"] = f"{path.collection or path.level}.delete"
    if path.collection == "files":
        return delete_file(request, store, res, path)
    if path.collection is not None:
        raise XnatHTTPError(405, "Method Not Allowed")
    level = path.level
    if assessor_named:
        level = "assessor"
    if level == "resource":
        for r in res.resources or []:
            store.delete_resource(r["id"])
    elif level == "scan":
        for s in res.scans or []:
            for r in store.resources(res.the_experiment["id"], s["pk"]):
                store.delete_resource(r["id"])
            store.execute("DELETE FROM scans WHERE pk = ?", (s["pk"],))
    elif level == "assessor":
        assert res.assessor is not None
        for r in store.resources(res.the_experiment["id"], None,
                                 assessor_id=res.assessor["id"]):
            store.delete_resource(r["id"])
        store.execute("DELETE FROM assessors WHERE id = ?", (res.assessor["id"],))
    elif unshare is not None:
        # Deleted through a project it is only shared into: XNAT removes the share.
        store.execute("DELETE FROM shares WHERE kind = ? AND id = ? AND project = ?",
                      (level, unshare["id"], res.the_project["id"]))
    elif level == "experiment":
        _delete_experiment(store, res.the_experiment["id"])
    elif level == "subject":
        _delete_subject(store, res.the_subject["id"])
    elif level == "project":
        project_id = res.the_project["id"]
        if not (access.caller.is_admin or access.role(project_id) == "owner"):
            raise XnatHTTPError(403, "Unable to delete project.")
        for s in store.query("SELECT id FROM subjects WHERE project = ?", (project_id,)):
            _delete_subject(store, s["id"])
        for r in store.owned_resources("project", project_id):
            store.delete_resource(r["id"])
        store.execute("DELETE FROM projects WHERE id = ?", (project_id,))
    return text_response("", 200)


def _delete_subject(store: Store, subject_id: str) -> None:
    for r in store.owned_resources("subject", subject_id):
        store.delete_resource(r["id"])
    for e in store.query("SELECT id FROM experiments WHERE subject_id = ?", (subject_id,)):
        _delete_experiment(store, e["id"])
    store.execute("DELETE FROM shares WHERE kind = 'subject' AND id = ?", (subject_id,))
    store.execute("DELETE FROM custom_fields WHERE kind = 'subject' AND owner_id = ?",
                  (subject_id,))
    store.execute("DELETE FROM subjects WHERE id = ?", (subject_id,))


def _delete_experiment(store: Store, experiment_id: str) -> None:
    for r in store.query("SELECT id FROM resources WHERE experiment_id = ?", (experiment_id,)):
        store.delete_resource(r["id"])
    store.execute("DELETE FROM shares WHERE kind = 'experiment' AND id = ?", (experiment_id,))
    store.execute("DELETE FROM custom_fields WHERE kind = 'experiment' AND owner_id = ?",
                  (experiment_id,))
    store.execute("DELETE FROM experiments WHERE id = ?", (experiment_id,))


def prearchive_code(request: web.Request, store: Store, access: Access,
                    path: ArchivePath) -> web.Response:
    """``/data/projects/P/prearchive_code[/N]``: what the prearchive does with
    P's uploads (4 archives them, 5 archives them overwriting, others wait)."""
    request["route"] = "prearchive_code"
    project = resolve(store, access, ArchivePath(ids={"project": path.ids["project"]},
                                                 order=["project"],
                                                 via_project=True)).the_project
    if request.method == "GET":
        return text_response(str(project["prearchive_code"]))
    if request.method in ("PUT", "POST") and path.file_path:
        if not access.editable(project):
            raise XnatHTTPError(403, "Unable to edit project.")
        try:
            code = int(path.file_path)
        except ValueError:
            raise XnatHTTPError(400, "Invalid prearchive code.") from None
        store.execute("UPDATE projects SET prearchive_code = ? WHERE id = ?",
                      (code, project["id"]))
        return text_response("", 200)
    raise XnatHTTPError(405, "Method Not Allowed")

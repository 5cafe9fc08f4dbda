"""The ``/data[/archive]/...`` archive routes: listings, items, downloads and writes.

XNAT matches these routes by prefix and resolves identifiers level by level
(``shared/reference/xnat-rest-api.md`` sections 2-5 and 8): a path is parsed
into an :class:`ArchivePath`, each level is resolved with the caller's
permissions (invisible → 404, protected → 403), and the last segment picks the
handler.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import sqlite3
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from aiohttp import BodyPartReader, web

from . import listings
from .auth import Caller
from .knobs import Knobs, send_file_body
from .listings import ListingSpec
from .store import FileRow, Store
from .xnatformat import (
    XnatHTTPError,
    child_field,
    item_json,
    json_response,
    table_response,
    text_response,
)

LEVEL_KEYS = {
    "root": {"projects", "subjects", "experiments"},
    "project": {"subjects", "experiments", "resources", "files", "prearchive_code"},
    "subject": {"experiments", "resources", "files"},
    "experiment": {"scans", "resources", "files", "assessors", "reconstructions"},
    "scan": {"resources", "files"},
    # An assessor's resources may be named with their kind: out (the default) or in.
    "assessor": {"resources", "files", "out", "in"},
    "resource": {"files"},
}
CHILD_LEVEL = {"projects": "project", "subjects": "subject", "experiments": "experiment",
               "scans": "scan", "assessors": "assessor", "resources": "resource"}

# Content types XNAT's buildMediaType knows; everything else is octet-stream.
_KNOWN_TYPES = {".txt": "text/plain", ".xml": "text/xml", ".jpg": "image/jpeg",
                ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                ".pdf": "application/pdf", ".html": "text/html", ".htm": "text/html",
                ".svg": "image/svg+xml", ".tif": "image/tiff", ".tiff": "image/tiff",
                ".bmp": "image/bmp"}

PROJECT_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")

SESSION_TYPES = {"MR": "xnat:mrSessionData", "CT": "xnat:ctSessionData",
                 "PET": "xnat:petSessionData", "PT": "xnat:petSessionData"}


@dataclass
class ArchivePath:
    """A parsed archive URL: which objects it names and what it asks for.

    ``collection`` is the trailing listing name (``scans``, ``files``...) or
    ``None`` when the path names a single object; ``ids`` holds the raw
    identifier given at each level; ``file_path`` is what follows ``files/``.
    """

    ids: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    collection: str | None = None
    file_path: str | None = None
    via_project: bool = False
    assessor_kind: str = "out"  # .../assessors/A/{out|in}/resources (out when not said)

    @property
    def level(self) -> str:
        return self.order[-1] if self.order else "root"


def parse_archive_path(segments: list[str]) -> ArchivePath:
    """Split ``projects/P/subjects/S/...`` into levels; raise 404 on nonsense."""
    path = ArchivePath()
    i = 0
    while i < len(segments):
        key = segments[i]
        if key not in LEVEL_KEYS[path.level]:
            raise XnatHTTPError(404, "The requested resource was not found.")
        if key == "files":
            path.collection = "files"
            rest = segments[i + 1:]
            path.file_path = "/".join(rest) if rest else None
            return path
        if key == "prearchive_code":
            path.collection = "prearchive_code"
            path.file_path = "/".join(segments[i + 1:]) or None
            return path
        if key == "reconstructions":
            path.collection = key
            if i + 1 < len(segments):
                raise XnatHTTPError(404, "The requested resource was not found.")
            return path
        if key in ("out", "in"):
            if path.order[-1] != "assessor" or i + 1 == len(segments) or segments[i + 1] in (
                    "out", "in"):
                raise XnatHTTPError(404, "The requested resource was not found.")
            path.assessor_kind = key
            i += 1
            continue
        if i + 1 == len(segments):
            path.collection = key
            return path
        level = CHILD_LEVEL[key]
        if level in path.ids:
            raise XnatHTTPError(404, "The requested resource was not found.")
        path.ids[level] = segments[i + 1]
        path.order.append(level)
        if level == "project":
            path.via_project = True
        i += 2
    return path


@dataclass
class Resolved:
    """Rows for each level named by an :class:`ArchivePath`."""

    project: sqlite3.Row | None = None
    subject: sqlite3.Row | None = None
    experiment: sqlite3.Row | None = None
    scans: list[sqlite3.Row] | None = None      # None: no scan level in the path
    scan_multi: bool = False
    resources: list[sqlite3.Row] | None = None
    resource_multi: bool = False
    assessor: sqlite3.Row | None = None
    assessor_kind: str = "out"  # this server models output resources only

    # For handlers whose path names the level (resolve raised 404 otherwise).
    @property
    def the_project(self) -> sqlite3.Row:
        assert self.project is not None
        return self.project

    @property
    def the_subject(self) -> sqlite3.Row:
        assert self.subject is not None
        return self.subject

    @property
    def the_experiment(self) -> sqlite3.Row:
        assert self.experiment is not None
        return self.experiment


class Access:
    """XNAT's project permissions for one caller."""

    def __init__(self, store: Store, caller: Caller) -> None:
        self.store = store
        self.caller = caller

    def role(self, project_id: str) -> str | None:
        return self.store.role(project_id, self.caller.login)

    def visible(self, project: sqlite3.Row) -> bool:
        return (self.caller.is_admin or project["accessibility"] in ("public", "protected")
                or self.role(project["id"]) is not None)

    def readable(self, project: sqlite3.Row) -> bool:
        return (self.caller.is_admin or project["accessibility"] == "public"
                or self.role(project["id"]) is not None)

    def editable(self, project: sqlite3.Row) -> bool:
        return self.caller.is_admin or self.role(project["id"]) in ("owner", "member")

    def listed(self, project: sqlite3.Row) -> bool:
        """``/data/projects`` lists only the projects the user can read."""
        return self.readable(project)


class ArchiveRoutes:
    """Handlers for everything under ``/data/{projects,subjects,experiments}``."""

    def __init__(self, store: Store, knobs: Knobs) -> None:
        self.store = store
        self.knobs = knobs

    # ------------------------------------------------------------ dispatch
    async def handle(self, request: web.Request, caller: Caller,
                     segments: list[str]) -> web.StreamResponse:
        path = parse_archive_path(segments)
        access = Access(self.store, caller)
        method = request.method
        if path.collection == "prearchive_code":
            return self._prearchive_code(request, access, path)
        if method in ("GET", "HEAD"):
            return await self._get(request, access, path)
        if method in ("PUT", "POST"):
            return await self._put(request, access, path)
        if method == "DELETE":
            return self._delete(request, access, path)
        raise XnatHTTPError(405, "Method Not Allowed")

    # --------------------------------------------------------- resolution
    def resolve(self, access: Access, path: ArchivePath, *, for_write: bool = False,
                flat_assessor: bool = False) -> Resolved:
        """The rows ``path`` names, level by level. ``flat_assessor``: a GET of
        ``/data/experiments/{ID}`` may name an assessor (the URI its listing gives)."""
        store = self.store
        out = Resolved()
        ids = path.ids
        if "project" in ids:
            project = store.project(ids["project"])
            if project is None or not access.visible(project):
                raise XnatHTTPError(404, f"Unable to find project {ids['project']}.")
            out.project = project
        if "subject" in ids:
            if out.project is not None:
                subject = store.subject(out.project["id"], ids["subject"])
                if subject is None:
                    raise XnatHTTPError(404, f"Unable to identify subject {ids['subject']}")
            else:
                subject = store.subject(None, ids["subject"])
                if subject is None:
                    raise XnatHTTPError(
                        404, "Unable to find the specified subject. When accessing a subject "
                        "directly, you must specify the accession number and not the subject "
                        "label.")
            out.subject = subject
        if "experiment" in ids:
            if out.project is not None:
                experiment = store.experiment(out.project["id"], ids["experiment"])
            else:
                experiment = store.experiment(None, ids["experiment"])
                if experiment is None and flat_assessor and path.order == ["experiment"] \
                        and path.collection is None:
                    out.assessor = store.query_one("SELECT * FROM assessors WHERE id = ?",
                                                   (ids["experiment"],))
                    if out.assessor is not None:
                        experiment = store.experiment(None, out.assessor["experiment_id"])
            if experiment is None or (
                    out.subject is not None and experiment["subject_id"] != out.subject["id"]):
                raise XnatHTTPError(404, "Unable to find the specified experiment.")
            out.experiment = experiment
            if out.subject is None:
                out.subject = store.subject(None, experiment["subject_id"])
        owner_project_id = None
        if out.experiment is not None:
            owner_project_id = out.experiment["project"]
        elif out.subject is not None:
            owner_project_id = out.subject["project"]
        if owner_project_id is not None and out.project is None:
            project = store.project(owner_project_id)
            if project is None or not access.visible(project):
                raise XnatHTTPError(404, "Unable to find the specified experiment.")
            out.project = project
        if out.project is not None and (out.subject is not None or path.collection not in (None,)):
            if not access.readable(out.project) and path.level != "project":
                raise XnatHTTPError(403, f"Unable to read data for Project: {out.project['id']}")
        if "assessor" in ids:
            out.assessor = store.assessor(out.the_experiment["id"], ids["assessor"])
            # The assessor itself (ExptAssessmentResource) is named by ID, or by
            # label under a project; its resources and files by either anywhere.
            if out.assessor is None or (path.collection is None and not path.via_project
                                        and out.assessor["id"] != ids["assessor"]):
                raise XnatHTTPError(404, "Unable to find the specified experiment.")
            out.assessor_kind = path.assessor_kind
        if "scan" in ids:
            out.scans, out.scan_multi = self._select_scans(out.the_experiment, ids["scan"])
            if not out.scans and not out.scan_multi:
                raise XnatHTTPError(404, f"Unable to find scan {ids['scan']}.")
        if "resource" in ids:
            out.resources, out.resource_multi = self._select_resources(out, ids["resource"])
            if not out.resources and not for_write:
                raise XnatHTTPError(404, f"Unable to find resource {ids['resource']}.")
        return out

    def _select_scans(self, experiment: sqlite3.Row,
                      spec: str) -> tuple[list[sqlite3.Row], bool]:
        """Scans named by ``spec``: an ID, a comma list, ``ALL``/``*``, or a type."""
        spec = spec.replace("[SLASH]", "/")
        scans = self.store.scans(experiment["id"])
        if spec in ("ALL", "*"):
            return scans, True
        wanted = spec.split(",")
        chosen = [s for s in scans if s["scan_id"] in wanted or s["type"] in wanted]
        multi = len(wanted) > 1 or any(s["scan_id"] not in wanted for s in chosen)
        return chosen, multi

    def _select_resources(self, out: Resolved,
                          spec: str) -> tuple[list[sqlite3.Row], bool]:
        if out.experiment is None:
            # Project and subject resources: our model has none, as a fresh XNAT.
            return [], "," in spec
        wanted = spec.split(",")
        chosen: list[sqlite3.Row] = []
        if out.assessor is not None:
            chosen = [r for r in self._assessor_resources(out) if r["label"] in wanted
                      or str(r["id"]) in wanted]
            return chosen, len(wanted) > 1 or len(chosen) > 1
        for scan_pk in self._scan_pks(out):
            for name in wanted:
                row = self.store.resource(out.experiment["id"], scan_pk, name)
                if row is not None and row not in chosen:
                    chosen.append(row)
        return chosen, len(wanted) > 1 or len(chosen) > 1

    def _assessor_resources(self, out: Resolved) -> list[sqlite3.Row]:
        """An assessor's output resources (``in`` ones are not modelled: none)."""
        assert out.assessor is not None
        if out.assessor_kind == "in":
            return []
        return self.store.resources(out.assessor["experiment_id"], None,
                                    assessor_id=out.assessor["id"])

    @staticmethod
    def _scan_pks(out: Resolved) -> list[int | None]:
        return [s["pk"] for s in out.scans] if out.scans is not None else [None]

    # ---------------------------------------------------------------- GET
    async def _get(self, request: web.Request, access: Access,
                   path: ArchivePath) -> web.StreamResponse:
        collection = path.collection
        if collection == "projects":
            request["route"] = "projects.list"
            return self._list_projects(request, access)
        res = self.resolve(access, path, flat_assessor=True)
        if collection is None:
            request["route"] = f"{path.level}.get"
            return self._get_item(request, access, path, res)
        if collection == "subjects":
            request["route"] = "subjects.list"
            return self._list_subjects(request, access, path, res)
        if collection == "experiments":
            request["route"] = "experiments.list"
            return self._list_experiments(request, access, path, res)
        if collection == "scans":
            request["route"] = "scans.list"
            return self._list_scans(request, res)
        if collection == "resources":
            request["route"] = "resources.list"
            return self._list_resources(request, res)
        if collection == "assessors":
            request["route"] = "assessors.list"
            return self._list_assessors(request, res)
        if collection == "reconstructions":
            request["route"] = "reconstructions.list"
            return table_response(request, [], ["ID", "type", "baseScanType", "URI"],
                                  envelope={"totalRecords": "0"})
        if collection == "files":
            return await self._files(request, path, res)
        raise XnatHTTPError(404, "The requested resource was not found.")

    # Projects ------------------------------------------------------------
    PROJECT_SPEC = ListingSpec(
        defaults=("ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname"),
        aliases={"ID": "ID", "secondary_ID": "secondary_ID", "name": "name",
                 "description": "description", "pi_firstname": "pi_firstname",
                 "pi_lastname": "pi_lastname", "URI": "URI"},
    )
    _DISPLAY_SEARCH_PARAMS = ("accessible", "owner", "member", "collaborator", "recent",
                              "favorite", "activeSince", "admin", "prearc_code")

    def _project_row(self, p: sqlite3.Row) -> dict[str, Any]:
        return {"ID": p["id"], "secondary_ID": p["secondary_id"], "name": p["name"],
                "description": p["description"], "pi_firstname": p["pi_firstname"],
                "pi_lastname": p["pi_lastname"], "URI": f"/data/projects/{p['id']}"}

    def _list_projects(self, request: web.Request, access: Access) -> web.Response:
        projects = [p for p in self.store.projects() if access.listed(p)]
        if "permissions" in request.query:  # XNAT picks this handler over the others
            return self._projects_with_permission(request, access)
        if any(k in request.query for k in self._DISPLAY_SEARCH_PARAMS):
            return self._display_search_projects(request, access)
        return listings.render(request, self.PROJECT_SPEC,
                               [self._project_row(p) for p in projects])

    # SecurityManager's actions; any other value is refused (it goes into SQL there).
    _PERMISSIONS = ("activate", "create", "delete", "edit", "read")

    def _projects_with_permission(self, request: web.Request, access: Access) -> web.Response:
        """``?permissions=ACTION&dataType=TYPE`` (PermissionsProjectHandler, what
        XNAT's upload pages ask): the projects where the user may do ACTION to
        TYPE, every project for a data admin; columns as SQL returns them."""
        action = request.query.get("permissions", "")
        if action not in self._PERMISSIONS:
            raise XnatHTTPError(500, "You must specify one of the following values for the "
                                     "permissions parameter: " + ", ".join(self._PERMISSIONS))
        if ":" not in request.query.get("dataType", ""):
            raise XnatHTTPError(500, "Failed to identify projects")
        allowed = {"read": ("owner", "member", "collaborator"), "delete": ("owner",)}.get(
            action, ("owner", "member"))
        rows = [{"id": p["id"], "secondary_id": p["secondary_id"]}
                for p in sorted(self.store.projects(), key=lambda p: p["secondary_id"])
                if access.caller.is_admin or access.role(p["id"]) in allowed
                or (action == "read" and p["accessibility"] == "public")]
        return table_response(request, rows, ["id", "secondary_id"])

    def _display_search_projects(self, request: web.Request, access: Access) -> web.Response:
        """The DisplaySearch flavour of ``/data/projects``: lower-case keys."""
        user = self.store.user(access.caller.login)
        uid = user["xdat_user_id"] if user else 0
        role_names = {"owner": "Owners", "member": "Members", "collaborator": "Collaborators"}
        rows = []
        for p in self.store.projects():
            role = access.role(p["id"])
            if "owner" in request.query and role != "owner":
                continue
            if "member" in request.query and role != "member":
                continue
            if "collaborator" in request.query and role != "collaborator":
                continue
            if not (access.readable(p) or ("accessible" not in request.query and access.visible(p))):
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
    SUBJECT_SPEC = ListingSpec(
        defaults=("ID", "project", "label", "insert_date", "insert_user"),
        aliases={"ID": "ID", "project": "project", "label": "label",
                 "insert_date": "insert_date", "insert_user": "insert_user",
                 "gender": "gender", "yob": "yob", "URI": "URI"},
    )

    def _list_subjects(self, request: web.Request, access: Access, path: ArchivePath,
                       res: Resolved) -> web.Response:
        project = res.project
        if project is None:
            raise XnatHTTPError(404, "The requested resource was not found.")
        if not access.readable(project):
            raise XnatHTTPError(403, f"Unable to read subjects for Project: {project['id']}")
        # Its own subjects and those shared into it, under their label here.
        rows = [{"ID": s["id"], "project": s["project"], "label": s["here_label"],
                 "insert_date": s["insert_date"], "insert_user": s["insert_user"],
                 "gender": s["gender"], "yob": s["yob"], "URI": f"/data/subjects/{s['id']}"}
                for s in self.store.query(
                    "SELECT s.*, COALESCE(h.label, s.label) AS here_label FROM subjects s"
                    " LEFT JOIN shares h ON h.kind = 'subject' AND h.id = s.id AND h.project = ?"
                    " WHERE s.project = ? OR h.id IS NOT NULL ORDER BY here_label",
                    (project["id"], project["id"]))]
        return listings.render(request, self.SUBJECT_SPEC, rows)

    # Experiments -----------------------------------------------------------
    EXPERIMENT_ALIASES = {
        "ID": "ID", "project": "project", "date": "date", "xsiType": "xsiType",
        "label": "label", "insert_date": "insert_date", "subject_ID": "subject_ID",
        "subject_label": "subject_label", "time": "time", "modality": "modality",
        "UID": "UID", "session_type": "session_type", "URI": "URI",
        "xnat:subjectassessordata/id": "ID",
    }

    def _list_experiments(self, request: web.Request, access: Access, path: ArchivePath,
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
            readable = [p["id"] for p in self.store.projects() if access.readable(p)]
            where.append(f"e.project IN ({','.join('?' * len(readable)) or 'NULL'})")
            args.extend(readable)
        if res.subject is not None:
            where.append("e.subject_id = ?")
            args.append(res.subject["id"])
        xsi_type = request.query.get("xsiType")
        if xsi_type:
            where.append("lower(e.xsi_type) = lower(?)")
            args.append(xsi_type)
        rows = []
        for e in self.store.query(f"{sql} WHERE {' AND '.join(where)} ORDER BY here_label", args):
            rows.append({
                "ID": e["id"], "project": e["project"], "date": e["date"],
                "xsiType": e["xsi_type"], "label": e["here_label"],
                "insert_date": e["insert_date"],
                "subject_ID": e["subject_id"], "subject_label": e["subject_label"],
                "time": e["time"], "modality": e["modality"], "UID": e["uid"],
                "session_type": e["session_type"], "URI": f"/data/experiments/{e['id']}",
            })
        defaults = ["ID", "project", "date", "xsiType", "label", "insert_date"]
        if "project" not in path.ids and "subject" not in path.ids:
            defaults += ["subject_ID", "subject_label"]
        pk = f"{(xsi_type or 'xnat:subjectAssessorData').lower()}/id"
        aliases = dict(self.EXPERIMENT_ALIASES)
        aliases[pk] = "ID"
        spec = ListingSpec(defaults=defaults, aliases=aliases, pk_column=pk)
        return listings.render(request, spec, rows)

    # Scans -----------------------------------------------------------------
    SCAN_SPEC = ListingSpec(
        defaults=("xnat_imagescandata_id", "ID", "type", "quality", "xsiType", "note",
                  "series_description"),
        aliases={"xnat_imagescandata_id": "xnat_imagescandata_id", "ID": "ID", "type": "type",
                 "quality": "quality", "xsiType": "xsiType", "note": "note",
                 "series_description": "series_description", "frames": "frames",
                 "UID": "UID", "modality": "modality", "URI": "URI"},
    )

    def _list_scans(self, request: web.Request, res: Resolved) -> web.Response:
        if res.experiment is None:
            raise XnatHTTPError(404, "The requested resource was not found.")
        eid = res.experiment["id"]
        rows = [{"xnat_imagescandata_id": s["pk"], "ID": s["scan_id"], "type": s["type"],
                 "quality": s["quality"], "xsiType": s["xsi_type"], "note": s["note"],
                 "series_description": s["series_description"], "frames": s["frames"],
                 "UID": s["uid"], "modality": s["modality"],
                 "URI": f"/data/experiments/{eid}/scans/{s['scan_id']}"}
                for s in self.store.scans(eid)]
        return listings.render(request, self.SCAN_SPEC, rows)

    # Resources -------------------------------------------------------------
    RESOURCE_COLUMNS = ["xnat_abstractresource_id", "label", "element_name", "category",
                        "cat_id", "cat_desc", "file_count", "file_size", "tags", "content",
                        "format"]

    def _resource_row(self, r: sqlite3.Row, scan: sqlite3.Row | None,
                      experiment: sqlite3.Row) -> dict[str, Any]:
        count, size = self.store.resource_totals(r["id"])
        if scan is not None:
            category, cat_id, cat_desc = "scans", scan["scan_id"], scan["type"]
        elif r["assessor_id"] is not None:
            assessor = self.store.assessor(experiment["id"], r["assessor_id"])
            assert assessor is not None
            category, cat_id, cat_desc = "assessors", assessor["id"], assessor["xsi_type"]
        else:
            category, cat_id, cat_desc = "resources", experiment["id"], " "
        return {"xnat_abstractresource_id": r["id"], "label": r["label"],
                "element_name": "xnat:resourceCatalog", "category": category,
                "cat_id": cat_id, "cat_desc": cat_desc,
                "file_count": count, "file_size": size, "tags": r["tags"],
                "content": r["content"], "format": r["format"]}

    def _list_resources(self, request: web.Request, res: Resolved) -> web.Response:
        rows: list[dict[str, Any]] = []
        if res.assessor is not None:
            rows = [self._resource_row(r, None, res.the_experiment)
                    for r in self._assessor_resources(res)]
        elif res.experiment is not None:
            eid = res.experiment["id"]
            scans: list[sqlite3.Row | None] = [*res.scans] if res.scans is not None else [None]
            every = res.scans is None and request.query.get("all") == "true"
            if every:
                scans = [None, *self.store.scans(eid)]
            for scan in scans:
                pk = scan["pk"] if scan is not None else None
                rows += [self._resource_row(r, scan, res.experiment)
                         for r in self.store.resources(eid, pk)]
            if every:  # XNAT adds the assessors' output resources
                rows += [self._resource_row(r, None, res.experiment)
                         for r in self.store.assessor_resources(eid)]
        return table_response(request, rows, self.RESOURCE_COLUMNS,
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

    def _list_assessors(self, request: web.Request, res: Resolved) -> web.Response:
        """``ProjSubExptAsstList``: an assessor's URI is its own, flat
        ``/data/experiments/{ID}``, not one below the session."""
        if res.experiment is None or res.assessor is not None:
            raise XnatHTTPError(404, "The requested resource was not found.")
        e = res.experiment
        rows = [{"ID": a["id"], "project": e["project"], "label": a["label"], "date": a["date"],
                 "xsiType": a["xsi_type"], "insert_date": a["insert_date"],
                 "session_ID": e["id"], "session_label": e["label"],
                 "xnat:imageassessordata/id": a["id"], "URI": f"/data/experiments/{a['id']}"}
                for a in self.store.assessors(e["id"])]
        return listings.render(request, self.ASSESSOR_SPEC, rows)

    # Items -----------------------------------------------------------------
    def _get_item(self, request: web.Request, access: Access, path: ArchivePath,
                  res: Resolved) -> web.Response:
        fmt = (request.query.get("format") or "json").lower()
        level = path.level
        if level == "project":
            item = self._project_item(res.the_project)
        elif level == "subject":
            item = self._subject_item(res.the_subject)
        elif res.assessor is not None and level in ("experiment", "assessor"):
            item = self._assessor_item(res.assessor, res.the_experiment)
        elif level == "experiment":
            item = self._experiment_item(res.the_experiment)
        elif level == "scan":
            if res.scan_multi or not res.scans:
                raise XnatHTTPError(404, "Unable to find the specified scan.")
            item = self._scan_item(res.scans[0], res.the_experiment)
        elif level == "resource":
            if res.resource_multi or not res.resources:
                raise XnatHTTPError(404, "Unable to find the specified resource.")
            item = self._resource_item(res.resources[0])
            if fmt != "json":
                return text_response(catalog_xml(self.store, res.resources[0]),
                                     content_type="text/xml")
        else:
            raise XnatHTTPError(404, "The requested resource was not found.")
        if fmt == "json":
            return json_response({"items": [item]})
        if fmt == "xml":
            return text_response(item_to_xml(item), content_type="text/xml")
        raise XnatHTTPError(400, f"Unsupported format: {fmt}")

    def _project_item(self, p: sqlite3.Row) -> dict[str, Any]:
        return item_json("xnat:projectData", {
            "ID": p["id"], "secondary_ID": p["secondary_id"], "name": p["name"],
            "description": p["description"], "active": "true"})

    def _subject_item(self, s: sqlite3.Row) -> dict[str, Any]:
        demographics = item_json("xnat:demographicData", {
            "gender": s["gender"], "yob": int(s["yob"]) if s["yob"] else None})
        demographics["data_fields"] = {k: v for k, v in demographics["data_fields"].items()
                                       if v not in ("", None)}
        children = [child_field("demographics", [demographics])] if s["gender"] or s["yob"] \
            else []
        children += self._sharing("subject", s["id"], "xnat:projectParticipant")
        return item_json("xnat:subjectData", {
            "ID": s["id"], "project": s["project"], "label": s["label"],
            "insert_date": s["insert_date"], "insert_user": s["insert_user"]}, children)

    def _sharing(self, kind: str, object_id: str, xsi_type: str) -> list[dict[str, Any]]:
        """The ``sharing/share`` child of an item: the projects it is shared into,
        with its label in each (where xnatpy reads a subject's label per project)."""
        shares = [item_json(xsi_type, {"label": row["label"], "project": row["project"]})
                  for row in self.store.query(
                      "SELECT project, label FROM shares WHERE kind = ? AND id = ?"
                      " ORDER BY project", (kind, object_id))]
        return [child_field("sharing/share", shares)] if shares else []

    def _experiment_item(self, e: sqlite3.Row) -> dict[str, Any]:
        scan_items = [self._scan_item(s, e) for s in self.store.scans(e["id"])]
        resource_items = [self._resource_item(r) for r in self.store.resources(e["id"], None)]
        children = []
        if scan_items:
            children.append(child_field("scans/scan", scan_items))
        if resource_items:
            children.append(child_field("resources/resource", resource_items))
        assessor_items = [self._assessor_item(a, e) for a in self.store.assessors(e["id"])]
        if assessor_items:
            children.append(child_field("assessors/assessor", assessor_items))
        children += self._sharing("experiment", e["id"], "xnat:experimentData_share")
        fields = {"ID": e["id"], "id": e["id"], "project": e["project"],
                  "subject_ID": e["subject_id"], "label": e["label"], "date": e["date"],
                  "time": e["time"], "modality": e["modality"], "UID": e["uid"],
                  "session_type": e["session_type"],
                  "scanner/manufacturer": e["scanner_manufacturer"],
                  "scanner/model": e["scanner_model"], "insert_date": e["insert_date"],
                  "insert_user": e["insert_user"]}
        if e["xsi_type"] == "xnat:mrSessionData" and e["field_strength"]:
            fields["fieldStrength"] = e["field_strength"]
        return item_json(e["xsi_type"], {k: v for k, v in fields.items() if v != ""}, children)

    def _assessor_item(self, a: sqlite3.Row, e: sqlite3.Row) -> dict[str, Any]:
        """An assessor with its output resources (``out/file``), as XNAT nests it."""
        resource_items = [self._resource_item(r) for r in
                          self.store.resources(e["id"], None, assessor_id=a["id"])]
        children = [child_field("out/file", resource_items)] if resource_items else []
        fields = {"ID": a["id"], "id": a["id"], "label": a["label"], "project": e["project"],
                  "imageSession_ID": e["id"], "date": a["date"],
                  "insert_date": a["insert_date"], "insert_user": a["insert_user"]}
        return item_json(a["xsi_type"], {k: v for k, v in fields.items() if v != ""}, children)

    def _scan_item(self, s: sqlite3.Row, e: sqlite3.Row) -> dict[str, Any]:
        resource_items = [self._resource_item(r) for r in self.store.resources(e["id"], s["pk"])]
        children = [child_field("file", resource_items)] if resource_items else []
        fields = {"ID": s["scan_id"], "type": s["type"], "quality": s["quality"],
                  "note": s["note"], "series_description": s["series_description"],
                  "UID": s["uid"], "frames": int(s["frames"]) if s["frames"] else None,
                  "modality": s["modality"], "xnat_imagescandata_id": s["pk"],
                  "image_session_ID": e["id"], "project": e["project"]}
        return item_json(s["xsi_type"], {k: v for k, v in fields.items() if v not in ("", None)},
                         children)

    def _resource_item(self, r: sqlite3.Row) -> dict[str, Any]:
        count, size = self.store.resource_totals(r["id"])
        fields = {"label": r["label"], "format": r["format"], "content": r["content"],
                  "xnat_abstractresource_id": r["id"], "file_count": count, "file_size": size,
                  "URI": f"/archive/resources/{r['id']}"}
        return item_json("xnat:resourceCatalog",
                         {k: v for k, v in fields.items() if v != ""})

    # Files -----------------------------------------------------------------
    def _file_sources(self, res: Resolved, request: web.Request | None = None
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
                self._assessor_resources(res)
            return [(None, r) for r in resources]
        pairs: list[tuple[sqlite3.Row | None, sqlite3.Row]] = []
        scans: list[sqlite3.Row | None] = [*res.scans] if res.scans is not None else [None]
        every = (res.scans is None and res.resources is None and request is not None
                 and request.query.get("all", "").lower() == "true")
        if every:
            scans = [None, *self.store.scans(eid)]
        scan_by_pk = {s["pk"]: s for s in (res.scans or [])}
        if res.resources is not None:
            return [(scan_by_pk.get(r["scan_pk"]), r) for r in res.resources]
        for scan in scans:
            pk = scan["pk"] if scan is not None else None
            pairs += [(scan, r) for r in self.store.resources(eid, pk)]
        if every:
            pairs += [(None, r) for r in self.store.assessor_resources(eid)]
        return pairs

    def _is_multi(self, res: Resolved) -> bool:
        return res.resources is None or res.resource_multi or res.scan_multi

    def _file_uri(self, res: Resolved, path: ArchivePath, scan: sqlite3.Row | None,
                  resource: sqlite3.Row, f: FileRow) -> str:
        tail = f"resources/{resource['id']}/files/{f.path}"
        if scan is not None:
            tail = f"scans/{scan['scan_id']}/{tail}"
        elif resource["assessor_id"] is not None:
            # With its kind always, and by ID always, however the request named it.
            tail = f"assessors/{resource['assessor_id']}/out/{tail}"
        eid = res.the_experiment["id"]
        if self._is_multi(res):
            # Built from SQL resource_path, which lacks /data (reference, section 2).
            return f"/experiments/{eid}/{tail}"
        if path.via_project:
            return (f"/data/projects/{res.the_project['id']}/subjects/"
                    f"{res.the_subject['id']}/experiments/{eid}/{tail}")
        return f"/data/experiments/{eid}/{tail}"

    FILE_COLUMNS = ["Name", "Size", "URI", "collection", "file_tags", "file_format",
                    "file_content", "cat_ID", "digest"]

    def _list_files(self, request: web.Request, path: ArchivePath,
                    res: Resolved) -> web.Response:
        request["route"] = "files.list"
        rows = []
        for scan, resource in self._file_sources(res, request):
            for f in self.store.files(resource["id"]):
                rows.append({"Name": f.path.rsplit("/", 1)[-1], "Size": f.size,
                             "URI": self._file_uri(res, path, scan, resource, f),
                             "collection": resource["label"], "file_tags": f.tags,
                             "file_format": f.format, "file_content": f.content,
                             "cat_ID": resource["id"], "digest": f.digest})
        return table_response(request, rows, self.FILE_COLUMNS, envelope={"title": "Files"},
                              json_columns_header=[{"key": "URI", "serverRoot": ""}])

    async def _files(self, request: web.Request, path: ArchivePath,
                     res: Resolved) -> web.StreamResponse:
        fmt = (request.query.get("format") or "").lower()
        if path.file_path is None:
            if fmt in ("zip", "tar.gz", "tar"):
                request["route"] = "files.archive"
                return await self._archive_download(request, path, res, fmt)
            return self._list_files(request, path, res)
        request["route"] = "files.download"
        for _scan, resource in self._file_sources(res, request):
            f = self.store.file(resource["id"], path.file_path)
            if f is not None:
                return await send_blob(request, self.store.blob_path(f.blob),
                                       f.path.rsplit("/", 1)[-1], f.size, f.mtime,
                                       self.knobs)
        if request.query.get("accept-not-found") == "true":
            return web.Response(status=204)
        raise XnatHTTPError(404, "Unable to find file.")

    async def _archive_download(self, request: web.Request, path: ArchivePath,
                                res: Resolved, fmt: str) -> web.StreamResponse:
        """``?format=zip|tar.gz|tar`` with XNAT's entry layout, streamed chunked."""
        structure = request.query.get("structure", "default")
        label = res.experiment["label"] if res.experiment is not None else "download"
        entries: list[tuple[str, Path, float]] = []
        for scan, resource in self._file_sources(res, request):
            for f in self.store.files(resource["id"]):
                if resource["assessor_id"] is not None:
                    # The layout of a session's zip (RestFileUtils.buildRelativePath); XNAT
                    # names an assessor's own zip differently (its label first).
                    name = (f"{label}/assessors/{resource['assessor_id']}/out/resources/"
                            f"{resource['label']}/files/{f.path}")
                else:
                    name = zip_entry_name(label, scan, resource["label"], f.path, structure)
                entries.append((name, self.store.blob_path(f.blob), f.mtime))
        if not entries:
            raise XnatHTTPError(404, "No matching files found.")
        return await archive_response(request, entries, fmt, label, self.knobs)

    # ------------------------------------------------------------- writes
    async def _put(self, request: web.Request, access: Access,
                   path: ArchivePath) -> web.StreamResponse:
        if path.collection == "files":
            return await self._put_file(request, access, path)
        if path.collection is not None:
            raise XnatHTTPError(405, "Method Not Allowed")
        request["route"] = f"{path.level}.put"
        if path.level == "project":
            return self._put_project(request, access, path)
        if path.level == "resource":
            return self._put_resource(request, access, path)
        parent_path = ArchivePath(ids={k: v for k, v in path.ids.items() if k != path.level},
                                  order=path.order[:-1], via_project=path.via_project)
        res = self.resolve(access, parent_path)
        if res.project is None or not access.editable(res.project):
            raise XnatHTTPError(403, "User account doesn't have permission to edit this "
                                     "session.")
        label = path.ids[path.level]
        query = request.query
        if path.level == "subject":
            existing = self.store.subject(res.project["id"], label)
            if existing:
                return text_response(existing["id"], 200)
            new_label = query.get("xnat:subjectData/label") or query.get("label") or label
            sid = self.store.add_subject(res.project["id"], new_label, user=access.caller.login)
            return text_response(sid, 201)
        if path.level == "experiment":
            existing = self.store.experiment(res.project["id"], label)
            if existing:
                return text_response(existing["id"], 200)
            if res.subject is None:
                raise XnatHTTPError(400, "Experiments must be created under a subject.")
            xsi_type = query.get("xsiType", "xnat:mrSessionData")
            fields = _prefixed_fields(query, xsi_type, {"date", "time", "modality", "UID"})
            new_label = fields.pop("label", "") or query.get("label") or label
            extra = {k.lower() if k != "UID" else "uid": v for k, v in fields.items()
                     if k in ("date", "time", "modality", "UID")}
            eid = self.store.add_experiment(res.project["id"], res.subject["id"], new_label,
                                            xsi_type, user=access.caller.login, **extra)
            return text_response(eid, 201)
        if path.level == "assessor":  # xnatpy's create_assessor
            experiment = res.the_experiment
            existing = self.store.assessor(experiment["id"], label)
            if existing:
                return text_response(existing["id"], 200)
            xsi_type = query.get("xsiType", "")
            if not xsi_type.endswith("AssessmentData") and not xsi_type.endswith("AssessorData"):
                raise XnatHTTPError(400, f"Unknown or missing assessor type: {xsi_type!r}")
            new_label = query.get(f"{xsi_type}/label") or query.get("label") or label
            return text_response(self.store.add_assessor(
                experiment["id"], new_label, xsi_type, date=query.get("date", ""),
                user=access.caller.login), 201)
        if path.level == "scan":
            scan_id = label.replace("[SLASH]", "/")
            existing = self.store.scan(res.the_experiment["id"], scan_id)
            if existing:
                return text_response(scan_id, 200)
            xsi_type = query.get("xsiType", "xnat:mrScanData")
            fields = _prefixed_fields(query, xsi_type,
                                      {"type", "quality", "note", "series_description"})
            self.store.add_scan(res.the_experiment["id"], scan_id, xsi_type,
                                **{k: v for k, v in fields.items()
                                   if k in ("type", "quality", "note", "series_description")})
            return text_response(scan_id, 201)
        raise XnatHTTPError(405, "Method Not Allowed")

    def _put_project(self, request: web.Request, access: Access,
                     path: ArchivePath) -> web.Response:
        pid = path.ids["project"]
        existing = self.store.project(pid)
        if existing is not None:
            if not access.editable(existing):
                raise XnatHTTPError(403, "Unable to edit project.")
            return text_response(existing["id"], 200)
        if not PROJECT_ID_RE.match(pid):
            raise XnatHTTPError(417, "Invalid character in project ID.")
        q = request.query
        self.store.add_project(
            pid, name=q.get("xnat:projectData/name") or q.get("name") or pid,
            description=q.get("xnat:projectData/description") or q.get("description") or "",
            secondary_id=q.get("xnat:projectData/secondary_ID") or q.get("secondary_ID"),
            accessibility=q.get("accessibility", "private"), owner=access.caller.login)
        return text_response(pid, 201)

    def _put_resource(self, request: web.Request, access: Access,
                      path: ArchivePath) -> web.Response:
        res = self.resolve(access, path, for_write=True)
        self._require_edit(access, res)
        if res.resources:
            raise XnatHTTPError(409, "Specified resource already exists.")
        if res.experiment is None or res.scan_multi:
            raise XnatHTTPError(400, "Resources can only be created on a session or scan.")
        q = request.query
        self._new_resource(res, path, format=q.get("format", ""), content=q.get("content", ""),
                           tags=q.get("tags", ""))
        return text_response("", 200)

    def _new_resource(self, res: Resolved, path: ArchivePath, **fields: str) -> int:
        """The resource a PUT names, made on its session, scan or assessor."""
        if res.assessor is not None and res.assessor_kind == "in":
            raise XnatHTTPError(400, "This server keeps assessor output resources only.")
        scan_pk = res.scans[0]["pk"] if res.scans else None
        return self.store.add_resource(
            res.the_experiment["id"], scan_pk, path.ids["resource"],
            assessor_id=res.assessor["id"] if res.assessor is not None else None,
            format=fields.get("format", ""), content=fields.get("content", ""),
            tags=fields.get("tags", ""))

    @staticmethod
    def _shared_here(res: Resolved) -> sqlite3.Row | None:
        """The subject or experiment a path names, if it is only shared into the
        project of the path (another project owns it)."""
        owned = res.experiment if res.experiment is not None else res.subject
        if owned is None or res.project is None or owned["project"] == res.project["id"]:
            return None
        return owned

    def _require_edit(self, access: Access, res: Resolved, *, owner_too: bool = True) -> None:
        """Edit rights on the project of the path and, for data shared into it, on
        the project that owns the data (a sharing project only reads it)."""
        shared = self._shared_here(res) if owner_too else None
        owner = self.store.project(shared["project"]) if shared is not None else res.project
        if (res.project is None or not access.editable(res.project)
                or owner is None or not access.editable(owner)):
            raise XnatHTTPError(403, "User account doesn't have permission to edit this "
                                     "session.")

    async def _put_file(self, request: web.Request, access: Access,
                        path: ArchivePath) -> web.Response:
        request["route"] = "files.put"
        res = self.resolve(access, path, for_write=True)
        self._require_edit(access, res)
        if path.file_path is None and request.query.get("extract") != "true":
            raise XnatHTTPError(400, "You must specify a file name.")
        if res.experiment is None or res.scan_multi or res.resource_multi:
            raise XnatHTTPError(400, "Files can only be added to one resource.")
        if "resource" not in path.ids:
            raise XnatHTTPError(400, "You must specify a resource.")
        if path.file_path and not _safe_relpath(path.file_path):
            raise XnatHTTPError(400, f"Invalid file path: {path.file_path}")
        q = request.query
        spooled = await spool_body(request, self.store.tmp_dir, self.knobs)
        try:
            if spooled.size == 0:
                raise XnatHTTPError(400, "You tried to PUT to this service, but didn't provide "
                                         "any data (found 0 files). Please provide data and "
                                         "try again.")
            if res.resources:
                resource = res.resources[0]
            else:
                rid = self._new_resource(res, path)
                resource = self.store.aggregate("SELECT * FROM resources WHERE id = ?", (rid,))
            overwrite = q.get("overwrite") == "true"
            opts = {"format": q.get("format", ""), "content": q.get("content", ""),
                    "tags": q.get("tags", "")}
            if q.get("extract") == "true":
                items = await asyncio.to_thread(_extract_members, spooled.path, spooled.name,
                                                self.store.tmp_dir)
            else:
                assert path.file_path is not None  # checked above
                items = [(path.file_path, spooled.path)]
            duplicates = []
            for relpath, local in items:
                if self.store.file(resource["id"], relpath) and not overwrite:
                    duplicates.append(relpath)
                    continue
                blob, size, digest = await asyncio.to_thread(
                    self.store.store_blob_from_path, local, move=True)
                self.store.add_file(resource["id"], relpath, blob, size, digest,
                                    overwrite=overwrite, **opts)
        finally:
            spooled.cleanup()
        if duplicates:
            return web.Response(status=200, text=json.dumps({"duplicates": duplicates}),
                                content_type="text/html")
        return text_response("", 200)

    def _delete(self, request: web.Request, access: Access,
                path: ArchivePath) -> web.Response:
        res = self.resolve(access, path, flat_assessor=True)
        # /data/experiments/{ID} may name an assessor: then it is what goes.
        assessor_named = (res.assessor is not None and path.collection is None
                          and path.level in ("experiment", "assessor"))
        unshare = (self._shared_here(res) if path.collection is None and not assessor_named
                   and path.level in ("experiment", "subject") else None)
        self._require_edit(access, res, owner_too=unshare is None)
        request["route"] = f"{path.collection or path.level}.delete"
        if path.collection == "files":
            if path.file_path is None:
                raise XnatHTTPError(400, "You must specify a file.")
            matched = False
            for _scan, resource in self._file_sources(res):
                f = self.store.file(resource["id"], path.file_path)
                if f is not None:
                    self.store.delete_file(f)
                    matched = True
            if not matched:
                raise XnatHTTPError(404, "No matched files")
            return text_response("", 200)
        if path.collection is not None:
            raise XnatHTTPError(405, "Method Not Allowed")
        level = path.level
        if assessor_named:
            level = "assessor"
        if level == "resource":
            for r in res.resources or []:
                self.store.delete_resource(r["id"])
        elif level == "scan":
            for s in res.scans or []:
                for r in self.store.resources(res.the_experiment["id"], s["pk"]):
                    self.store.delete_resource(r["id"])
                self.store.execute("DELETE FROM scans WHERE pk = ?", (s["pk"],))
        elif level == "assessor":
            assert res.assessor is not None
            for r in self.store.resources(res.the_experiment["id"], None,
                                          assessor_id=res.assessor["id"]):
                self.store.delete_resource(r["id"])
            self.store.execute("DELETE FROM assessors WHERE id = ?", (res.assessor["id"],))
        elif unshare is not None:
            # Deleted through a project it is only shared into: XNAT removes the share.
            self.store.execute("DELETE FROM shares WHERE kind = ? AND id = ? AND project = ?",
                               (level, unshare["id"], res.the_project["id"]))
        elif level == "experiment":
            self._delete_experiment(res.the_experiment["id"])
        elif level == "subject":
            self._delete_subject(res.the_subject["id"])
        elif level == "project":
            project_id = res.the_project["id"]
            if not (access.caller.is_admin or access.role(project_id) == "owner"):
                raise XnatHTTPError(403, "Unable to delete project.")
            for s in self.store.query("SELECT id FROM subjects WHERE project = ?",
                                      (project_id,)):
                self._delete_subject(s["id"])
            self.store.execute("DELETE FROM projects WHERE id = ?", (project_id,))
        return text_response("", 200)

    def _delete_subject(self, subject_id: str) -> None:
        for e in self.store.query("SELECT id FROM experiments WHERE subject_id = ?",
                                  (subject_id,)):
            self._delete_experiment(e["id"])
        self.store.execute("DELETE FROM shares WHERE kind = 'subject' AND id = ?", (subject_id,))
        self.store.execute("DELETE FROM subjects WHERE id = ?", (subject_id,))

    def _delete_experiment(self, experiment_id: str) -> None:
        for r in self.store.query("SELECT id FROM resources WHERE experiment_id = ?",
                                  (experiment_id,)):
            self.store.delete_resource(r["id"])
        self.store.execute("DELETE FROM shares WHERE kind = 'experiment' AND id = ?",
                           (experiment_id,))
        self.store.execute("DELETE FROM experiments WHERE id = ?", (experiment_id,))

    def _prearchive_code(self, request: web.Request, access: Access,
                         path: ArchivePath) -> web.Response:
        request["route"] = "prearchive_code"
        project = self.resolve(access, ArchivePath(ids={"project": path.ids["project"]},
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
            self.store.execute("UPDATE projects SET prearchive_code = ? WHERE id = ?",
                               (code, project["id"]))
            return text_response("", 200)
        raise XnatHTTPError(405, "Method Not Allowed")


# ---------------------------------------------------------------- helpers
async def send_blob(request: web.Request, blob: Path, name: str, size: int, mtime: float,
                    knobs: Knobs) -> web.StreamResponse:
    """A single-file download with XNAT's headers; Range only when the knob allows it."""
    suffix = Path(name).suffix.lower()
    headers = {
        "Content-Disposition": f'attachment; filename="{name}";',
        "Cache-Control": "must-revalidate",
        "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
    }
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = _KNOWN_TYPES.get(suffix, "application/octet-stream")
    start, count = 0, size
    if knobs.range:
        response.headers["Accept-Ranges"] = "bytes"
        byte_range = _parse_range(request.headers.get("Range"), size)
        if isinstance(byte_range, str):  # "unsatisfiable"
            raise XnatHTTPError(416, "Requested Range Not Satisfiable",
                                {"Content-Range": f"bytes */{size}"})
        if byte_range is not None:
            start, end = byte_range
            count = end - start + 1
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            request["range"] = f"{start}-{end}"
    response.content_length = count
    await response.prepare(request)
    if request.method == "HEAD" or count == 0:
        return response
    with open(blob, "rb") as fobj:
        await send_file_body(request, response, fobj, start, count, knobs)
    request["bytes"] = count
    return response


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


def _safe_relpath(relpath: str) -> bool:
    parts = relpath.split("/")
    return all(p not in ("", ".", "..") and "\x00" not in p for p in parts)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """A single ``bytes=a-b`` range; multi-ranges are answered with the whole body."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    start_s, _, end_s = spec.partition("-")
    try:
        if start_s == "":
            length = int(end_s)
            if length == 0:
                return "unsatisfiable"
            return max(size - length, 0), size - 1
        start = int(start_s)
        end = int(end_s) if end_s else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def zip_entry_name(session_label: str, scan: sqlite3.Row | Mapping[str, str] | None,
                   resource_label: str,
                   relpath: str, structure: str = "default") -> str:
    """XNAT's archive layout (``RestFileUtils.buildRelativePath``)."""
    if scan is not None:
        stype = scan["type"] or ""
        if structure == "improved":
            folder = scan["scan_id"] + ("_" + re.sub(r'[/\\:*?"<>|]', "_", stype) if stype else "")
            return f"{session_label}/scans/{folder}/{resource_label}/{relpath}"
        folder = scan_folder_name(scan["scan_id"], stype)
        if structure == "simplified":
            return f"{session_label}/scans/{folder}/{resource_label}/{relpath}"
        return f"{session_label}/scans/{folder}/resources/{resource_label}/files/{relpath}"
    if structure in ("simplified", "improved"):
        return f"{session_label}/resources/{resource_label}/{relpath}"
    return f"{session_label}/resources/{resource_label}/files/{relpath}"


def scan_folder_name(scan_id: str, scan_type: str) -> str:
    """``{ID}-{type.replaceAll("\\W", "_")}``, or plain ``{ID}`` without a type."""
    if not scan_type:
        return scan_id
    return f"{scan_id}-{re.sub(r'[^A-Za-z0-9_]', '_', scan_type)}"


class _QueueWriter:
    """A file-like sink for zipfile/tarfile in a thread, feeding an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop = loop
        self.queue = queue
        self.buffer = bytearray()
        self.closed_by_reader = threading.Event()
        self.position = 0

    def write(self, data: bytes) -> int:
        if self.closed_by_reader.is_set():
            raise BrokenPipeError("client went away")
        self.buffer += data
        self.position += len(data)
        if len(self.buffer) >= 256 * 1024:
            self._push(bytes(self.buffer))
            self.buffer.clear()
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        if self.buffer:
            self._push(bytes(self.buffer))
            self.buffer.clear()

    def _push(self, chunk: bytes | None) -> None:
        asyncio.run_coroutine_threadsafe(self.queue.put(chunk), self.loop).result()


def _write_archive(sink: _QueueWriter, entries: list[tuple[str, Path, float]], fmt: str) -> None:
    import time as _time

    if fmt == "zip":
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED,  # type: ignore[call-overload]
                             allowZip64=True) as zf:
            for name, blob, mtime in entries:
                info = zipfile.ZipInfo(name, date_time=_time.localtime(mtime)[:6])
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(blob, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    else:
        mode = "w|gz" if fmt == "tar.gz" else "w|"
        with tarfile.open(fileobj=sink, mode=mode) as tf:  # type: ignore[call-overload]
            for name, blob, mtime in entries:
                entry = tarfile.TarInfo(name)
                entry.size = blob.stat().st_size
                entry.mtime = int(mtime)
                with open(blob, "rb") as src:
                    tf.addfile(entry, src)
    sink.flush()


_ARCHIVE_TYPES = {"zip": "application/zip", "tar.gz": "application/x-gzip",
                  "tar": "application/x-tar"}


async def archive_response(request: web.Request, entries: list[tuple[str, Path, float]],
                           fmt: str, name: str, knobs: Knobs) -> web.StreamResponse:
    """A zip/tar download as XNAT sends it: chunked, no Content-Length."""
    response = web.StreamResponse(headers={
        "Content-Disposition": f'attachment; filename="{name}.{fmt}";'})
    response.content_type = _ARCHIVE_TYPES[fmt]
    response.enable_chunked_encoding()
    await response.prepare(request)
    await stream_archive(response, entries, fmt, knobs)
    return response


async def stream_archive(response: web.StreamResponse, entries: list[tuple[str, Path, float]],
                         fmt: str, knobs: Knobs) -> None:
    from .knobs import Throttle

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
    sink = _QueueWriter(loop, queue)

    def produce() -> None:
        try:
            _write_archive(sink, entries, fmt)
        finally:
            if not sink.closed_by_reader.is_set():
                sink._push(None)

    worker = loop.run_in_executor(None, produce)
    throttle = Throttle(knobs.bandwidth_mb_s)
    try:
        while (chunk := await queue.get()) is not None:
            await response.write(chunk)
            await throttle.consumed(len(chunk))
    finally:
        sink.closed_by_reader.set()
        while not queue.empty():
            queue.get_nowait()
        try:
            await worker
        except BrokenPipeError:
            pass


@dataclass
class SpooledBody:
    path: Path
    size: int
    name: str
    content_type: str

    def cleanup(self) -> None:
        self.path.unlink(missing_ok=True)


async def spool_body(request: web.Request, tmp_dir: Path, knobs: Knobs) -> SpooledBody:
    """Write the request body (raw or the first multipart file) to a temp file.

    Uploads can be gigabytes, so the body is streamed to disk in chunks and the
    bandwidth cap applies as it does to downloads.
    """
    import uuid

    from .knobs import Throttle, received_body

    target = tmp_dir / f"upload-{uuid.uuid4().hex}"
    throttle = Throttle(knobs.bandwidth_mb_s)
    ctype = request.content_type or ""
    name = "upload"
    size = 0
    loop = asyncio.get_running_loop()
    try:
        with open(target, "wb") as out:
            if ctype.startswith("multipart/"):
                reader = await request.multipart()
                async for part in reader:
                    if not isinstance(part, BodyPartReader) or part.filename is None:
                        continue  # a plain form field (or a nested multipart)
                    name = part.filename
                    ctype = part.headers.get("Content-Type", "application/octet-stream")
                    while chunk := await part.read_chunk(1 << 20):
                        await loop.run_in_executor(None, out.write, chunk)
                        size += len(chunk)
                        await throttle.consumed(len(chunk))
                    break
            else:
                async for chunk in received_body(request, knobs):
                    await loop.run_in_executor(None, out.write, chunk)
                    size += len(chunk)
    except BaseException:
        # A client that hangs up mid-body leaves a partial spool; nothing will use it.
        target.unlink(missing_ok=True)
        raise
    return SpooledBody(target, size, name, ctype)


def _extract_members(archive: Path, name: str, tmp_dir: Path) -> list[tuple[str, Path]]:
    """Unpack a zip or tar for ``extract=true``; entries keep their inner paths."""
    import uuid

    out: list[tuple[str, Path]] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not _safe_relpath(info.filename):
                    continue
                dest = tmp_dir / f"extract-{uuid.uuid4().hex}"
                with zf.open(info) as src, open(dest, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                out.append((info.filename, dest))
        return out
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                if not member.isfile() or not _safe_relpath(member.name):
                    continue
                dest = tmp_dir / f"extract-{uuid.uuid4().hex}"
                data = tf.extractfile(member)
                assert data is not None  # a regular file
                with data, open(dest, "wb") as dst:
                    while chunk := data.read(1 << 20):
                        dst.write(chunk)
                out.append((member.name, dest))
    except tarfile.TarError:
        raise XnatHTTPError(400, f"Unable to extract {name}: not a zip or tar archive.") from None
    return out


def catalog_xml(store: Store, resource: sqlite3.Row) -> str:
    """A resource's catalog, as XNAT serves it for a plain GET of the resource."""
    from xml.sax.saxutils import quoteattr

    entries = "".join(
        f"<cat:entry URI={quoteattr(f.path)} ID={quoteattr(f.path)} name="
        f"{quoteattr(f.path.rsplit('/', 1)[-1])} digest={quoteattr(f.digest)} "
        f'xsi:type="cat:entry"/>' for f in store.files(resource["id"]))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog '
            'xmlns:cat="http://nrg.wustl.edu/catalog" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'ID={quoteattr(str(resource["id"]))}><cat:entries>{entries}</cat:entries>'
            "</cat:Catalog>")


def item_to_xml(item: dict[str, Any]) -> str:
    """A small XML rendering of an item for ``format=xml`` requests."""
    from xml.sax.saxutils import escape, quoteattr

    xsi_type = item["meta"]["xsi:type"]
    attrs = " ".join(f"{k}={quoteattr(str(v))}" for k, v in item["data_fields"].items()
                     if k in ("ID", "project", "label"))
    body = "".join(f"<xnat:{k}>{escape(str(v))}</xnat:{k}>"
                   for k, v in item["data_fields"].items()
                   if k not in ("ID", "project", "label", "id") and "/" not in k)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{xsi_type} {attrs} '
            'xmlns:xnat="http://nrg.wustl.edu/xnat" '
            f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">{body}</{xsi_type}>')


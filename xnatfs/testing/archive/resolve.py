"""Which rows an archive path names, and what the caller may do with them.

XNAT resolves a URL level by level with the caller's permissions: a project
the user may not see is a 404, one they may see but not read a 403
(reference section 8). :func:`resolve` does that for every family of archive
routes; :class:`Access` holds the project roles behind it, and the prearchive
routes check projects with it too.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TypeVar

from ..auth import Caller
from ..store import Store
from ..xnatformat import XnatHTTPError
from .paths import ArchivePath

T = TypeVar("T")


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
        return _named(self.project)

    @property
    def the_subject(self) -> sqlite3.Row:
        return _named(self.subject)

    @property
    def the_experiment(self) -> sqlite3.Row:
        return _named(self.experiment)

    @property
    def the_assessor(self) -> sqlite3.Row:
        return _named(self.assessor)

    @property
    def the_scan(self) -> sqlite3.Row:
        """The one scan the path names (callers check it names exactly one)."""
        return _named(self.scans)[0]

    @property
    def the_resource(self) -> sqlite3.Row:
        """The one resource the path names (callers check it names exactly one)."""
        return _named(self.resources)[0]


def _named(value: T | None) -> T:
    """A level the path names: resolve made it (None would be a bug)."""
    assert value, "resolved without this level"
    return value


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
        """``/data/projects`` lists the projects whose ``xnat:projectData`` the user
        may read: a protected one too, whose guest permission every user inherits
        (``ProjectListResource.DefaultProjectHandler``, ``Permissions.getAllowedValues``;
        its data, not its listing, is refused)."""
        return self.visible(project)


def resolve(store: Store, access: Access, path: ArchivePath, *, for_write: bool = False,
            flat_assessor: bool = False, get: bool = False) -> Resolved:
    """The rows ``path`` names, level by level. ``flat_assessor``: a GET of
    ``/data/experiments/{ID}`` may name an assessor (the URI its listing gives).
    ``get``: a GET, whose item resources look accession IDs up first."""
    out = Resolved()
    ids = path.ids
    if "project" in ids:
        project = store.project(ids["project"])
        if project is None or not access.visible(project):
            raise XnatHTTPError(404, f"Unable to find project {ids['project']}.")
        out.project = project
    # ExperimentResource, SubjectResource and SubjAssessmentResource (an item
    # GET, or its projects) try an accession ID anywhere first, then the label
    # in the project, and do not check the subject of the path.
    item_get = (get and path.collection in (None, "projects")
                and path.level in ("subject", "experiment") and out.project is not None)
    if "subject" in ids:
        subject = None
        if item_get:
            subject = _readable(store, access, store.subject(None, ids["subject"]))
        if subject is None and out.project is not None:
            subject = store.subject(out.project["id"], ids["subject"])
            if subject is None and not (item_get and path.level == "experiment"):
                raise XnatHTTPError(404, f"Unable to identify subject {ids['subject']}")
        elif subject is None:
            subject = store.subject(None, ids["subject"])
            if subject is None:
                raise XnatHTTPError(
                    404, "Unable to find the specified subject. When accessing a subject "
                    "directly, you must specify the accession number and not the subject "
                    "label.")
        out.subject = subject
    if "experiment" in ids:
        by_id = False
        experiment = None
        if out.project is None or (item_get and path.level == "experiment"):
            experiment = store.experiment(None, ids["experiment"])
            if out.project is not None:
                experiment = _readable(store, access, experiment)
            by_id = experiment is not None
            if experiment is None and (flat_assessor or item_get) \
                    and path.order[-1] == "experiment" and path.collection in (None, "projects"):
                out.assessor = store.query_one("SELECT * FROM assessors WHERE id = ?",
                                               (ids["experiment"],))
                if out.assessor is not None:
                    experiment = store.experiment(None, out.assessor["experiment_id"])
                    by_id = True
        if experiment is None and out.project is not None:
            experiment = store.experiment(out.project["id"], ids["experiment"])
        if experiment is None or (
                not by_id and out.subject is not None
                and experiment["subject_id"] != out.subject["id"]):
            raise XnatHTTPError(404, "Unable to find the specified experiment.")
        out.experiment = experiment
        if out.subject is None or by_id:
            out.subject = store.subject(None, experiment["subject_id"])
    owner_project_id = None
    if out.experiment is not None:
        owner_project_id = out.experiment["project"]
    elif out.subject is not None:
        owner_project_id = out.subject["project"]
    if owner_project_id is not None and out.project is None:
        project = store.project(owner_project_id)
        if project is None or not access.readable(project):
            # XNAT's lookup by ID is a secured search, which finds an object
            # through any project it is shared into that the user may read.
            project = _readable_share(store, access, out) or project
        # A secured search finds nothing in a project whose data the user may
        # not read: a protected one is a 404 here, not a 403 (ExperimentResource's
        # getXnatExperimentdatasById(id, user, ...) returns null).
        if project is None or not access.readable(project):
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
        out.scans, out.scan_multi = _select_scans(store, out.the_experiment, ids["scan"])
        if not out.scans and not out.scan_multi:
            raise XnatHTTPError(404, f"Unable to find scan {ids['scan']}.")
    if "resource" in ids:
        out.resources, out.resource_multi = _select_resources(store, out, ids["resource"])
        if not out.resources and not for_write:
            raise XnatHTTPError(404, f"Unable to find resource {ids['resource']}.")
    return out


def _readable(store: Store, access: Access, row: sqlite3.Row | None) -> sqlite3.Row | None:
    """A subject or experiment found by ID, if the user reads its project or one
    it is shared into (XFT loads by ID through the user's permissions)."""
    if row is None:
        return None
    project = store.project(row["project"])
    if project is not None and access.readable(project):
        return row
    kind = "experiment" if "subject_id" in row.keys() else "subject"
    return row if _first_readable_share(store, access, kind, row["id"]) else None


def _readable_share(store: Store, access: Access, out: Resolved) -> sqlite3.Row | None:
    """A project the object of a path without one is shared into, that the user
    may read (an experiment's, else its subject's)."""
    kind, owned = (("experiment", out.experiment) if out.experiment is not None
                   else ("subject", out.subject))
    assert owned is not None
    return _first_readable_share(store, access, kind, owned["id"])


def _first_readable_share(store: Store, access: Access, kind: str,
                          object_id: str) -> sqlite3.Row | None:
    for share in store.query("SELECT project FROM shares WHERE kind = ? AND id = ?"
                             " ORDER BY project", (kind, object_id)):
        project = store.project(share["project"])
        if project is not None and access.readable(project):
            return project
    return None


def _select_scans(store: Store, experiment: sqlite3.Row,
                  spec: str) -> tuple[list[sqlite3.Row], bool]:
    """Scans named by ``spec``: an ID, a comma list, ``ALL``/``*``, or a type."""
    spec = spec.replace("[SLASH]", "/")
    scans = store.scans(experiment["id"])
    if spec in ("ALL", "*"):
        return scans, True
    wanted = spec.split(",")
    chosen = [s for s in scans if s["scan_id"] in wanted or s["type"] in wanted]
    multi = len(wanted) > 1 or any(s["scan_id"] not in wanted for s in chosen)
    return chosen, multi


def _select_resources(store: Store, out: Resolved,
                      spec: str) -> tuple[list[sqlite3.Row], bool]:
    wanted = spec.split(",")
    chosen: list[sqlite3.Row] = []
    if out.experiment is None:
        owner, owner_id = resource_owner(out)
        for name in wanted:
            row = store.owned_resource(owner, owner_id, name)
            if row is not None and row not in chosen:
                chosen.append(row)
        return chosen, len(wanted) > 1
    if out.assessor is not None:
        chosen = [r for r in assessor_resources(store, out) if r["label"] in wanted
                  or str(r["id"]) in wanted]
        return chosen, len(wanted) > 1 or len(chosen) > 1
    for scan_pk in _scan_pks(out):
        for name in wanted:
            row = store.resource(out.experiment["id"], scan_pk, name)
            if row is not None and row not in chosen:
                chosen.append(row)
    return chosen, len(wanted) > 1 or len(chosen) > 1


def resource_owner(out: Resolved) -> tuple[str, str]:
    """Whose own resources a path without a session names: the subject's, else
    the project's (``/data/projects/P/resources``, ``.../subjects/S/resources``)."""
    if out.subject is not None:
        return "subject", out.subject["id"]
    return "project", out.the_project["id"]


def assessor_resources(store: Store, out: Resolved) -> list[sqlite3.Row]:
    """An assessor's output resources (``in`` ones are not modelled: none)."""
    assert out.assessor is not None
    if out.assessor_kind == "in":
        return []
    return store.resources(out.assessor["experiment_id"], None,
                           assessor_id=out.assessor["id"])


def _scan_pks(out: Resolved) -> list[int | None]:
    return [s["pk"] for s in out.scans] if out.scans is not None else [None]


def shared_here(res: Resolved) -> sqlite3.Row | None:
    """The subject or experiment a path names, if it is only shared into the
    project of the path (another project owns it)."""
    owned = res.experiment if res.experiment is not None else res.subject
    if owned is None or res.project is None or owned["project"] == res.project["id"]:
        return None
    return owned


def require_edit(store: Store, access: Access, res: Resolved, *, owner_too: bool = True) -> None:
    """Edit rights on the project of the path and, for data shared into it, on
    the project that owns the data (a sharing project only reads it)."""
    shared = shared_here(res) if owner_too else None
    owner = store.project(shared["project"]) if shared is not None else res.project
    if (res.project is None or not access.editable(res.project)
            or owner is None or not access.editable(owner)):
        raise XnatHTTPError(403, "User account doesn't have permission to edit this "
                                 "session.")

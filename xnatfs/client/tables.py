"""What XNAT holds about a project's subjects, sessions and scans, one listing
request each: the records behind the mount's CSV tables and the subjects' and
sessions' extended attributes (and what a spreadsheet dropped into the upload
area is compared with).

XNAT's query-organiser listings (``QueryOrganizerResource``) take a
``columns=`` list of shortcut names and xpaths. An xpath into a child list
(``.../fields/field/name``, ``.../scans/scan/ID``) joins the children: one row
per child, the same parent columns repeated, and ``""`` in the child columns
of a parent without children; the xpath columns come back lower-cased
(``xnat:mrsessiondata/fields/field/name``). The rows are grouped back into one
record per subject, session or scan here.

In XNAT 1.8's source: ``QueryOrganizerResource.populateQuery`` adds a column
with a ``/`` as the xpath given and any other through the shortcuts
(``XMLPathShortcuts``: the subject and experiment names used here);
``formatHeaders`` names each column by its shortcut, else by its xpath as the
query organiser lower-cased it; ``ProjectSubjectList`` and
``ProjSubExptList`` keep the subjects and experiments owned by or shared into
the project (with their labels there), and ``xsiType`` picks the root element
(``xnat:imageSessionData``: every kind of image session); cells are
``toString()`` of the database value, ``""`` for null
(``XFTTable.ValueParser``). The REST tests read the joined columns the same
way (``TestCustomVariables``, ``TestAdvancedSearch``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ServerError
from .connection import XnatConnection
from .items import as_text, malformed_rows

SUBJECT_FIELDS: tuple[str, ...] = (
    "group", "src", "gender", "handedness", "dob", "yob", "age", "education",
    "educationDesc", "ses", "race", "ethnicity", "weight", "height", "gestational_age",
    "post_menstrual_age", "birth_weight")
"""XNAT's subject shortcut names (``XMLPathShortcuts``) a subject record holds, in
the order of the subjects table's columns."""

SESSION_FIELDS: tuple[str, ...] = ("date", "modality", "scanner", "visit_id", "visit",
                                   "session_type")
"""XNAT's experiment shortcut names a session record holds, in table order."""

IMAGE_SESSIONS = "xnat:imageSessionData"  # every MR, CT, PET... session, not other assessors

_SUBJECT_CUSTOM = ("xnat:subjectData/fields/field/name", "xnat:subjectData/fields/field/field")
_SESSION_CUSTOM = ("xnat:experimentData/fields/field/name",
                   "xnat:experimentData/fields/field/field")
# The subjects' columns: ID, label and SUBJECT_FIELDS (XNAT keeps the order asked for).
_SUBJECT_COLUMNS = (
    "ID", "label", "group", "src", "dob", "yob", "age", "gender", "handedness", "ses",
    "education", "educationDesc", "race", "ethnicity", "weight", "height", "gestational_age",
    "post_menstrual_age", "birth_weight", *_SUBJECT_CUSTOM)
_SCAN_COLUMNS = {name: f"xnat:imageSessionData/scans/scan/{name}"
                 for name in ("ID", "type", "series_description", "quality", "frames")}
_SCAN_RESOURCE = "xnat:imageSessionData/scans/scan/file/label"


@dataclass(frozen=True)
class SubjectRecord:
    """A subject of a project: its label there, its fields (shortcut name ->
    value, non-empty only) and its custom variables (name -> value, as XNAT
    lists them)."""

    id: str
    label: str
    project: str
    fields: dict[str, str]
    custom: dict[str, str]


@dataclass(frozen=True)
class SessionRecord:
    """An image session of a project, with its subject, fields (``SESSION_FIELDS``,
    non-empty only) and custom variables."""

    id: str
    label: str
    project: str
    subject_id: str
    subject_label: str
    xsi_type: str
    fields: dict[str, str]
    custom: dict[str, str]


@dataclass(frozen=True)
class ScanRecord:
    """A scan of an image session; ``resources`` are its resource labels in
    listing order, each once. Empty strings where XNAT has no value."""

    session_id: str
    session_label: str
    subject_id: str
    subject_label: str
    scan_id: str
    type: str
    series_description: str
    quality: str
    frames: str
    resources: tuple[str, ...]


class TableCalls(XnatConnection):
    """A project's subjects, sessions and scans as records, one request each."""

    SUBJECT_FIELDS = SUBJECT_FIELDS
    SESSION_FIELDS = SESSION_FIELDS

    async def list_subject_records(self, project: str) -> list[SubjectRecord]:
        """Every subject of ``project`` with its demographics and custom variables."""
        path = f"/data/projects/{project}/subjects"
        rows = await self._get_rows(path, kind="subjects.records",
                                    params={"columns": ",".join(_SUBJECT_COLUMNS)})
        with malformed_rows(path):
            return subject_records(rows, project)

    async def list_session_records(self, project: str) -> list[SessionRecord]:
        """Every image session of ``project`` with its fields and custom variables."""
        path = f"/data/projects/{project}/experiments"
        columns = ("ID", "label", "subject_ID", "subject_label", "date", "xsiType",
                   *SESSION_FIELDS[1:], *_SESSION_CUSTOM)
        rows = await self._get_rows(path, kind="experiments.records", params={
            "xsiType": IMAGE_SESSIONS, "columns": ",".join(columns)})
        with malformed_rows(path):
            return session_records(rows, project)

    async def list_scan_records(self, project: str) -> list[ScanRecord]:
        """Every scan of every image session of ``project``, with its resources' labels."""
        path = f"/data/projects/{project}/experiments"
        columns = ("ID", "label", "subject_ID", "subject_label", *_SCAN_COLUMNS.values(),
                   _SCAN_RESOURCE)
        rows = await self._get_rows(path, kind="scans.records", params={
            "xsiType": IMAGE_SESSIONS, "columns": ",".join(columns)})
        with malformed_rows(path):
            return scan_records(rows, path)


# ------------------------------------------------------------------ parsing
def _cells(row: Mapping[str, Any]) -> dict[str, str]:
    """A row's cells by lower-cased column name, as text ("" for null): XNAT names
    xpath columns in lower case and shortcut columns as the shortcut is spelt."""
    return {str(key).lower(): as_text(value) or "" for key, value in row.items()}


def _present(cells: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    return {name: cells[name.lower()] for name in names if cells.get(name.lower())}


def _add_custom(custom: dict[str, str], cells: Mapping[str, str],
                columns: tuple[str, str]) -> None:
    """The custom variable a joined row carries, if any (a parent without any has
    one row with both cells empty). A variable without a name is left out."""
    name, value = (cells.get(column.lower(), "") for column in columns)
    if name:
        custom.setdefault(name, value)


def subject_records(rows: list[dict[str, Any]], project: str) -> list[SubjectRecord]:
    """One record per subject ID, in the listing's order, from rows joined with
    the subjects' custom variables. KeyError if a row has no ID or label."""
    records: dict[str, SubjectRecord] = {}
    for row in rows:
        cells = _cells(row)
        subject_id = cells["id"]
        record = records.get(subject_id)
        if record is None:
            record = records[subject_id] = SubjectRecord(
                id=subject_id, label=_required(cells, "label"), project=project,
                fields=_present(cells, SUBJECT_FIELDS), custom={})
        _add_custom(record.custom, cells, _SUBJECT_CUSTOM)
    return list(records.values())


def session_records(rows: list[dict[str, Any]], project: str) -> list[SessionRecord]:
    """One record per session ID, in the listing's order, from rows joined with
    the sessions' custom variables."""
    records: dict[str, SessionRecord] = {}
    for row in rows:
        cells = _cells(row)
        session_id = cells["id"]
        record = records.get(session_id)
        if record is None:
            record = records[session_id] = SessionRecord(
                id=session_id, label=_required(cells, "label"), project=project,
                subject_id=cells.get("subject_id", ""),
                subject_label=cells.get("subject_label", ""),
                xsi_type=cells.get("xsitype", ""),
                fields=_present(cells, SESSION_FIELDS), custom={})
        _add_custom(record.custom, cells, _SESSION_CUSTOM)
    return list(records.values())


def scan_records(rows: list[dict[str, Any]], path: str) -> list[ScanRecord]:
    """One record per (session, scan), in the listing's order, from rows joined
    with the scans and their resources (a scan with two resources comes twice;
    a session without scans once, with an empty scan ID)."""
    scan_key = _SCAN_COLUMNS["ID"].lower()
    if rows and not any(scan_key in _cells(row) for row in rows):
        # Without the joined column every session looks empty: say so, do
        # not show a table of no scans.
        raise ServerError("the scan listing has no scan column (joined columns "
                          "unsupported?)", path=path)
    records: dict[tuple[str, str], ScanRecord] = {}
    resources: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        cells = _cells(row)
        scan_id = cells.get(scan_key, "")
        if not scan_id:
            continue
        key = (cells["id"], scan_id)
        if key not in records:
            scan = {name: cells.get(column.lower(), "") for name, column in _SCAN_COLUMNS.items()}
            records[key] = ScanRecord(
                session_id=key[0], session_label=_required(cells, "label"),
                subject_id=cells.get("subject_id", ""),
                subject_label=cells.get("subject_label", ""), scan_id=scan_id,
                type=scan["type"], series_description=scan["series_description"],
                quality=scan["quality"], frames=scan["frames"], resources=())
            resources[key] = []
        label = cells.get(_SCAN_RESOURCE.lower(), "")
        if label and label not in resources[key]:
            resources[key].append(label)
    return [replace(record, resources=tuple(resources[key]))
            for key, record in records.items()]


def _required(cells: Mapping[str, str], name: str) -> str:
    """A column every row must have, non-empty (KeyError otherwise: a malformed row)."""
    value = cells.get(name)
    if not value:
        raise KeyError(name)
    return value

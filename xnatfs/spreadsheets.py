"""Upload Spreadsheet: a CSV dropped into ``uploads/<PROJECT>/`` sets subjects' and sessions' fields.

XNAT's own "Upload Spreadsheet" page, as a file: the same columns the
mount's ``subjects.csv`` and ``sessions.csv`` have, so a table downloaded,
edited and dropped back works.

* **Which CSV is a sheet.** Its header names a label column. A *subjects
  sheet* has ``label`` (or, alone, ``subject_label`` or ``subject``) and
  subject columns: ``ID``, ``group``, ``src``, the demographics
  (:data:`SUBJECT_FIELDS`), custom variables as ``field:NAME``, ``project``
  and ``sessions`` (read-only). A *sessions sheet* has ``label`` and a
  subject column (``subject_label``, ``subject_ID``) or a session column
  (:data:`SESSION_FIELDS`, ``xsiType``, ``scans``). Any other column is a
  problem of the sheet. A CSV without a label column is no sheet.
* **Checked whole before anything is sent** (:func:`check_subjects`,
  :func:`check_sessions`): labels XNAT would change, duplicates, values its
  schema refuses, an ``ID`` (``subject_ID``, ``xsiType``) that is not the
  one XNAT holds for the label, and for sessions a label XNAT does not
  have. One problem and nothing is sent.
* **Applied row by row** (:func:`apply_changes`; :func:`send_sheet` is all
  of it for a file dropped into the upload area): a subject that does not
  exist is created with its fields; of the others only the fields whose
  value differs from what XNAT holds now (one fresh listing, not the
  mount's cache) are sent, so the unchanged table sends nothing. An empty
  cell leaves a value alone; ``NULL`` clears a field (not a custom
  variable), as XNAT's own REST API does. Read-only columns are never sent.
  A row XNAT refuses is reported and the others go on.

Everything a user reads about a sheet names rows by line and label; it goes
to the status file only (:attr:`SheetOutcome.lines`), never to the log.
"""

from __future__ import annotations

import csv
import datetime
import enum
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from .client.tables import SESSION_FIELDS, SUBJECT_FIELDS, SessionRecord, SubjectRecord
from .errors import BadRequest, XnatError
from .naming import label_problem
from .spoolfiles import UploadRecord
from .tablecsv import CUSTOM_PREFIX

# xnat.xsd, xnat:demographicData (xnat-write-api.md 6.1): enumerations, and the
# dob | yob | age choice (one of them per subject).
GENDERS = ("male", "female", "other", "unknown", "M", "F")
HANDEDNESS = ("left", "right", "ambidextrous", "unknown")
AGE_CHOICE = ("dob", "yob", "age")
# A cell that clears the value XNAT holds in a field (not a custom variable):
# XNAT's DBAction.ValueParser writes "NULL" (any case) as SQL NULL.
CLEAR = "NULL"
INTEGER_FIELDS = frozenset({"yob", "education", "ses"})
NUMBER_FIELDS = frozenset({"age", "weight", "height", "gestational_age", "post_menstrual_age",
                           "birth_weight"})
DATE_FIELDS = frozenset({"dob", "date"})
# XNAT escapes every query value as XML (SecureResource.convertFormToMap ->
# TurbineUtils.escapeParam): O'Brien would be stored as O&apos;Brien.
ESCAPED_BY_XNAT = re.compile(r"[&<>'\"]")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CUSTOM_NAME = re.compile(r"[A-Za-z0-9_-]+")

SHEET_KIND = "sheet"            # an upload record's kind, once its file was read as one
SHEET_BYTES_MAX = 64 * 1024 * 1024

SUBJECT_READ_ONLY = ("ID", "project", "sessions")
SESSION_READ_ONLY = ("ID", "project", "subject_ID", "xsiType", "scans")
SUBJECT_LABEL_COLUMNS = ("label", "subject_label", "subject")


class SheetKind(str, enum.Enum):
    SUBJECTS = "subjects"
    SESSIONS = "sessions"


class NotASheet(Exception):
    """The CSV is no spreadsheet of subjects or sessions (why: the message)."""


@dataclass(frozen=True)
class Problem:
    """Why a row (or the header, line 1) cannot be applied."""

    line: int
    label: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}" + (f" {self.label}" if self.label else "") + \
            f": {self.reason}"


@dataclass(frozen=True)
class Row:
    """One row: its line in the file and its non-empty cells by column."""

    line: int
    label: str
    cells: dict[str, str]


@dataclass(frozen=True)
class Sheet:
    kind: SheetKind
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    problems: tuple[Problem, ...] = ()   # found reading it (header, row shapes)


@dataclass(frozen=True)
class Change:
    """What one row of a sheet that passed sends (nothing: unchanged)."""

    line: int
    label: str
    target: str                 # the path's name for it: a label to create, else the ID
    create: bool
    fields: dict[str, str]
    custom: dict[str, str]
    subject: str = ""           # sessions: the subject's ID
    xsi_type: str = ""          # sessions: its type

    def names(self, cleared: bool) -> list[str]:
        """The columns it sets (``cleared``: the ones it clears)."""
        return [name for name, value in (*self.fields.items(),
                                         *((CUSTOM_PREFIX + n, v) for n, v in self.custom.items()))
                if (value == CLEAR) == cleared]


# ------------------------------------------------------------------ reading
def read_sheet(data: bytes) -> Sheet:
    """The sheet in a CSV file (UTF-8, with or without Excel's byte-order mark;
    comma, semicolon or tab separated).

    Raises:
        NotASheet: not UTF-8 text, or no label column.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NotASheet("not UTF-8 text (save it as \"CSV UTF-8\")") from None
    first = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise NotASheet("empty")
    names = [h.strip() for h in header]
    kind = _kind(names)
    columns, problems = _columns(names, kind)
    rows: list[Row] = []
    line = reader.line_num + 1
    for cells in reader:
        start, line = line, reader.line_num + 1
        values = [c.strip() for c in cells]
        if not any(values):
            continue  # spreadsheet programs end with blank rows
        extra = values[len(columns):]
        row = {col: v for col, v in zip(columns, values, strict=False) if v and col}
        label = row.get("label", "")
        if any(extra):
            problems.append(Problem(start, label, "more cells than the header has columns"))
        rows.append(Row(start, label, row))
    return Sheet(kind, tuple(columns), tuple(rows), tuple(problems))


def _kind(names: Sequence[str]) -> SheetKind:
    lowered = {n.lower() for n in names}
    session_marks = {"subject_label", "subject_id", "xsitype", "scans",
                     *(f.lower() for f in SESSION_FIELDS)}
    if "label" in lowered and lowered & session_marks:
        return SheetKind.SESSIONS
    if lowered & set(SUBJECT_LABEL_COLUMNS):
        return SheetKind.SUBJECTS
    raise NotASheet("its header has no label column (label, subject_label or subject)")


def _columns(names: Sequence[str], kind: SheetKind) -> tuple[list[str], list[Problem]]:
    """Each header cell's column by its canonical name ("" for a bad one), and
    the header's problems (line 1)."""
    known: tuple[str, ...]
    if kind is SheetKind.SUBJECTS:
        known = (*SUBJECT_READ_ONLY, *SUBJECT_FIELDS)
        aliases = [n for n in names if n.lower() in SUBJECT_LABEL_COLUMNS]
        label_aliases = {aliases[0].lower()} if len(aliases) == 1 else {"label"}
    else:
        known = (*SESSION_READ_ONLY, "subject_label", *SESSION_FIELDS)
        label_aliases = {"label"}
        aliases = []
    by_lower = {k.lower(): k for k in known}
    columns: list[str] = []
    problems: list[Problem] = []
    unknown: list[str] = []
    if len(aliases) > 1:
        problems.append(Problem(1, "", f"two label columns ({', '.join(aliases)}): keep one"))
    for name in names:
        lower = name.lower()
        if lower in label_aliases:
            column = "label"
        elif kind is SheetKind.SESSIONS and lower == "subject":
            column = "subject_label"
        elif lower.startswith(CUSTOM_PREFIX):
            custom = name[len(CUSTOM_PREFIX):]
            column = CUSTOM_PREFIX + custom
            if not CUSTOM_NAME.fullmatch(custom):
                problems.append(Problem(1, "", f"column {name!r}: a custom variable's name is "
                                               "letters, digits, '_' and '-'"))
                column = ""
        elif lower in by_lower:
            column = by_lower[lower]
        else:
            unknown.append(name)
            column = ""
        if column and column in columns:
            problems.append(Problem(1, "", f"column {name!r} twice"))
            column = ""
        columns.append(column)
    if unknown:
        problems.append(Problem(1, "", f"unknown column{'s' if len(unknown) > 1 else ''} "
                                       f"{', '.join(map(repr, unknown))} (a {kind.value} sheet "
                                       f"takes {', '.join(('label', *known))} and field:NAME)"))
    return columns, problems


# ------------------------------------------------------------------ checking
def value_problem(name: str, value: str) -> str | None:
    """Why XNAT would refuse (or change) ``value`` for field ``name``, or None."""
    if CONTROL.search(value):
        return f"{name}: a value on more than one line"
    if ESCAPED_BY_XNAT.search(value):
        return (f"{name} {value!r}: XNAT would store & < > ' \" as XML entities "
                "(&amp; ...)")
    if value.upper() == CLEAR:
        # XNAT keeps a custom variable's value as text (LONGVARCHAR), where
        # "NULL" is no SQL NULL (DBAction.ValueParser).
        return (f"{name} NULL: a custom variable cannot be cleared here"
                if name.startswith(CUSTOM_PREFIX) else None)
    # XFTValidator compares an enumeration trimmed and ignoring case.
    if name == "gender" and value.lower() not in {g.lower() for g in GENDERS}:
        return f"gender {value!r}: XNAT takes {', '.join(GENDERS)}"
    if name == "handedness" and value.lower() not in HANDEDNESS:
        return f"handedness {value!r}: XNAT takes {', '.join(HANDEDNESS)}"
    if name in DATE_FIELDS and not _is_date(value):
        return f"{name} {value!r}: not a date (YYYY-MM-DD)"
    if name in INTEGER_FIELDS and not re.fullmatch(r"[+-]?\d+", value):
        return f"{name} {value!r}: not a whole number"
    if name in NUMBER_FIELDS and not _is_number(value):
        return f"{name} {value!r}: not a number"
    return None


def _is_date(value: str) -> bool:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return False
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _same(name: str, held: str | None, value: str) -> bool:
    """Whether XNAT holds ``value`` already (numbers by value: 23 is 23.0)."""
    if held is None:
        return False
    if name in NUMBER_FIELDS or name in INTEGER_FIELDS:
        try:
            return float(held) == float(value)
        except ValueError:
            pass
    return held == value


def _to_send(cells: Mapping[str, str], writable: Iterable[str],
             held: SubjectRecord | SessionRecord | None) -> tuple[dict[str, str],
                                                                 dict[str, str]]:
    """A row's writable fields and custom variables whose values XNAT does not
    hold already (all of them for a new subject), and ``NULL`` for those it
    holds and the row clears (not custom variables: see :func:`value_problem`)."""
    names = set(writable)
    held_fields = held.fields if held is not None else {}
    held_custom = {k.lower(): v for k, v in held.custom.items()} if held is not None else {}

    def differs(value: str, held_value: str | None, name: str) -> bool:
        if value.upper() == CLEAR:
            return bool(held_value)
        return not _same(name, held_value, value)

    fields = {k: v.upper() if v.upper() == CLEAR else v for k, v in cells.items()
              if k in names and differs(v, held_fields.get(k), k)}
    custom = {k[len(CUSTOM_PREFIX):]: v for k, v in cells.items() if k.startswith(CUSTOM_PREFIX)
              and held_custom.get(k[len(CUSTOM_PREFIX):].lower()) != v}
    return fields, custom


def _row_problems(row: Row, seen: dict[str, int], project: str) -> list[str]:
    """What is wrong with a row whatever XNAT holds: no label, a label twice."""
    if not row.label:
        return ["no label"]
    out: list[str] = []
    first = seen.setdefault(row.label, row.line)
    if first != row.line:
        out.append(f"the label of line {first} again")
    if row.cells.get("project", project) != project:
        out.append(f"project {row.cells['project']!r}: this is {project}'s folder")
    return out


def _value_problems(fields: Mapping[str, str], custom: Mapping[str, str]) -> list[str]:
    """Why XNAT would refuse values to be sent (values it holds are not judged:
    the unchanged table goes back as it came)."""
    sent = [*fields.items(), *((CUSTOM_PREFIX + k, v) for k, v in custom.items())]
    return [reason for name, value in sent if (reason := value_problem(name, value))]


def check_subjects(sheet: Sheet, project: str,
                   records: Sequence[SubjectRecord]) -> tuple[list[Change], list[Problem]]:
    """What each row of a subjects sheet sends, and every problem of the sheet."""
    by_label = {r.label: r for r in records}
    by_id = {r.id: r for r in records}
    problems = list(sheet.problems)
    changes: list[Change] = []
    seen: dict[str, int] = {}
    for row in sheet.rows:
        reasons = _row_problems(row, seen, project)
        held = by_label.get(row.label)
        if held is None and row.label and (bad := label_problem(row.label, "subject")):
            reasons.append(bad)
        given_id = row.cells.get("ID")
        if given_id is not None and (held is None or held.id != given_id):
            other = by_id.get(given_id)
            reasons.append(f"ID {given_id} is subject {other.label}'s: a label cannot be "
                           "changed here" if other is not None else
                           f"ID {given_id}: no such subject in {project} (XNAT chooses the IDs "
                           "of new subjects: leave it empty)")
        fields, custom = _to_send(row.cells, SUBJECT_FIELDS, held)
        reasons += _value_problems(fields, custom)
        ages = [f for f in AGE_CHOICE if fields.get(f, CLEAR) != CLEAR]
        if len(ages) > 1:
            reasons.append(f"{' and '.join(ages)}: XNAT keeps one of dob, yob, age")
        elif ages and held is not None:
            kept = [f for f in AGE_CHOICE if f != ages[0] and held.fields.get(f)
                    and fields.get(f) != CLEAR]
            if kept:
                reasons.append(f"{ages[0]}: XNAT holds {kept[0]} for this subject and keeps "
                               f"one of dob, yob, age (clear it: {kept[0]} NULL)")
        if reasons:
            problems += [Problem(row.line, row.label, reason) for reason in reasons]
            continue
        changes.append(Change(row.line, row.label, row.label if held is None else held.id,
                              held is None, fields, custom))
    return changes, problems


def check_sessions(sheet: Sheet, project: str,
                   records: Sequence[SessionRecord]) -> tuple[list[Change], list[Problem]]:
    """What each row of a sessions sheet sends (it creates none), and every problem."""
    by_label = {r.label: r for r in records}
    problems = list(sheet.problems)
    changes: list[Change] = []
    seen: dict[str, int] = {}
    for row in sheet.rows:
        reasons = _row_problems(row, seen, project)
        held = by_label.get(row.label)
        if held is None:
            if row.label:
                reasons.append(f"no session labelled so in {project} (a sheet creates no "
                               "sessions)")
            problems += [Problem(row.line, row.label, reason) for reason in reasons]
            continue
        for column, value in (("ID", held.id), ("subject_label", held.subject_label),
                              ("subject_ID", held.subject_id), ("xsiType", held.xsi_type)):
            given = row.cells.get(column)
            if given is not None and given != value:
                reasons.append(f"{column} {given}: XNAT has {value} for this session")
        fields, custom = _to_send(row.cells, SESSION_FIELDS, held)
        reasons += _value_problems(fields, custom)
        if reasons:
            problems += [Problem(row.line, row.label, reason) for reason in reasons]
            continue
        changes.append(Change(row.line, row.label, held.id, False, fields, custom,
                              subject=held.subject_id, xsi_type=held.xsi_type))
    return changes, problems


# ------------------------------------------------------------------ applying
class SheetClient(Protocol):
    """What a sheet needs of :class:`~xnatfs.client.XnatClient`."""

    async def list_subject_records(self, project: str) -> Sequence[SubjectRecord]: ...

    async def list_session_records(self, project: str) -> Sequence[SessionRecord]: ...

    async def put_subject(self, project: str, subject: str, fields: dict[str, str],
                          custom: dict[str, str]) -> bool: ...

    async def put_session_fields(self, project: str, subject: str, session: str,
                                 xsi_type: str, fields: dict[str, str],
                                 custom: dict[str, str]) -> None: ...


@dataclass
class SheetOutcome:
    """What a sheet did: a summary free of identifiers (for the log and the
    entry's attributes), the rows' lines (status file only), and the first
    refusal of a row, if any."""

    kind: SheetKind
    counts: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    failure: XnatError | None = None

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    @property
    def summary(self) -> str:
        done = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        return f"{self.kind.value} sheet: {done or 'no rows'}"


async def plan_sheet(client: SheetClient, project: str,
                     sheet: Sheet) -> tuple[list[Change], list[Problem]]:
    """Check ``sheet`` against what XNAT holds now (one listing, fresh)."""
    if sheet.kind is SheetKind.SUBJECTS:
        return check_subjects(sheet, project, await client.list_subject_records(project))
    return check_sessions(sheet, project, await client.list_session_records(project))


def refusal_summary(sheet: Sheet, problems: Sequence[Problem]) -> str:
    """Why a sheet was not applied, without naming a row's label or values."""
    bad_rows = len({p.line for p in problems if p.line > 1})
    parts = (["its header has problems"] if any(p.line == 1 for p in problems) else []) + (
        [f"{bad_rows} of {len(sheet.rows)} rows have problems"] if bad_rows else [])
    return (f"{sheet.kind.value} sheet not applied, nothing sent: {' and '.join(parts)} "
            "(listed below)")


async def apply_changes(client: SheetClient, project: str, kind: SheetKind,
                        changes: Sequence[Change]) -> SheetOutcome:
    """Send a checked sheet's rows, one at a time (XNAT makes new subjects' IDs
    one by one); a row XNAT refuses is reported and the others go on."""
    outcome = SheetOutcome(kind)
    for change in changes:
        await _apply_row(client, project, change, outcome)
    return outcome


async def _apply_row(client: SheetClient, project: str, change: Change,
                     outcome: SheetOutcome) -> None:
    where = f"line {change.line} {change.label}"
    if not change.create and not change.fields and not change.custom:
        outcome.count("unchanged")
        outcome.lines.append(f"{where}: unchanged")
        return
    created = False
    try:
        if change.xsi_type:
            await client.put_session_fields(project, change.subject, change.target,
                                            change.xsi_type, change.fields, change.custom)
        else:
            created = await client.put_subject(project, change.target, change.fields,
                                               change.custom)
    except XnatError as exc:
        outcome.failure = outcome.failure or exc
        outcome.count("refused")
        outcome.lines.append(f"{where}: refused by XNAT: {exc}")
        return
    names, cleared = ", ".join(change.names(False)), ", ".join(change.names(True))
    if created:
        outcome.count("created")
        outcome.lines.append(f"{where}: created" + (f" with {names}" if names else ""))
    elif change.create:  # made by someone else since the listing: XNAT found it (200)
        outcome.count("updated")
        outcome.lines.append(f"{where}: made meanwhile by someone else; set {names or 'nothing'}")
    else:
        outcome.count("updated")
        outcome.lines.append(f"{where}: " + "; ".join(
            ([f"updated {names}"] if names else []) + ([f"cleared {cleared}"] if cleared else [])))


# ------------------------------------------------------------- as an upload
async def send_sheet(client: SheetClient, record: UploadRecord, data: Path,
                     not_importable: str) -> list[str]:
    """One attempt at a text file dropped into the upload area (``data``: its
    local copy): a ``.csv`` directly in a project's folder that reads as a
    sheet is checked and applied; the rows' outcomes go to ``record.details``
    (the status file, never the log). Anything else is refused with
    ``not_importable`` or the reason it is no sheet.

    Raises:
        BadRequest: not a sheet, or a sheet with problems (nothing sent).
        XnatError: rows XNAT refused (the first one's kind of error); the
            others were applied. Sending it again is safe: what XNAT holds
            then is sent no more.
    """
    if not record.name.lower().endswith(".csv"):
        raise BadRequest(not_importable)
    if "/" in record.relpath:
        raise BadRequest(f"a spreadsheet goes directly into uploads/{record.project}/, "
                         "not into a folder below it")
    if record.size > SHEET_BYTES_MAX:
        raise BadRequest(f"{not_importable} (and too large for a spreadsheet)")
    try:
        sheet = read_sheet(await trio.to_thread.run_sync(data.read_bytes))
    except NotASheet as exc:
        raise BadRequest(f"{not_importable}; nor is it a spreadsheet of subjects or sessions: "
                         f"{exc}") from None
    record.kind = SHEET_KIND
    record.details = []
    changes, problems = await plan_sheet(client, record.project, sheet)
    if problems:
        record.details = [str(p) for p in problems]
        raise BadRequest(refusal_summary(sheet, problems))
    outcome = await apply_changes(client, record.project, sheet.kind, changes)
    record.details = outcome.lines
    if outcome.failure is not None:
        raise type(outcome.failure)(f"{outcome.summary} (listed below)")
    return [outcome.summary]

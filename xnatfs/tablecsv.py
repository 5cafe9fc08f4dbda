"""A project's subjects, sessions and scans as CSV text: the tables the mount
shows in each project folder (``subjects.csv``, ``sessions.csv``, ``scans.csv``).

Pure: records in, bytes out. The text is what pandas, R, LibreOffice and
Excel open as it is: a header row, the ``csv`` module's minimal quoting,
UTF-8 without a byte-order mark, and ``\\n`` line ends (every one of them reads
them, and ``cut``, ``awk`` or ``sort`` on the mount then see no stray ``\\r`` in
the last column). Values are XNAT's text, never converted: an ID or label
``001`` stays ``001`` (that a reader may take it for a number is the reader's
choice, ``dtype=str`` in pandas).

Custom variables get one column each, headed ``field:NAME`` (a custom
variable may be named like a demographic field), sorted by name; the upload
area reads the same convention back from a dropped sheet.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Sequence

from .client.tables import SESSION_FIELDS, SUBJECT_FIELDS, ScanRecord, SessionRecord, SubjectRecord

CUSTOM_PREFIX = "field:"
RESOURCE_SEPARATOR = " "  # resource labels in one cell: "DICOM NIFTI SNAPSHOTS"

SUBJECTS_NAME = "subjects.csv"
SESSIONS_NAME = "sessions.csv"
SCANS_NAME = "scans.csv"

SESSION_COLUMNS = ("ID", "label", "subject_label", "subject_ID", "date", "xsiType",
                   *SESSION_FIELDS[1:])
SCAN_COLUMNS = ("session_label", "session_ID", "subject_label", "ID", "type",
                "series_description", "quality", "frames", "resources")


def custom_column(name: str) -> str:
    return CUSTOM_PREFIX + name


def _custom_names(records: Iterable[SubjectRecord | SessionRecord]) -> list[str]:
    return sorted({name for record in records for name in record.custom})


def _text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # QUOTE_MINIMAL
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8", "replace")  # a lone surrogate: "?"


def subjects_csv(subjects: Sequence[SubjectRecord], sessions: Sequence[SessionRecord]) -> bytes:
    """ID, label, group, the other fields any subject has (``SUBJECT_FIELDS``
    order), the custom variables, and the number of image sessions."""
    fields = ["group"] + [name for name in SUBJECT_FIELDS[1:]
                          if any(name in s.fields for s in subjects)]
    custom = _custom_names(subjects)
    counts = Counter(session.subject_id for session in sessions)
    header = ["ID", "label", *fields, *map(custom_column, custom), "sessions"]
    return _text(header, ([s.id, s.label, *(s.fields.get(f, "") for f in fields),
                           *(s.custom.get(c, "") for c in custom), str(counts[s.id])]
                          for s in subjects))


def sessions_csv(sessions: Sequence[SessionRecord], scans: Sequence[ScanRecord]) -> bytes:
    """ID, label, subject label and ID, the session fields, the number of scans,
    and the custom variables."""
    custom = _custom_names(sessions)
    counts = Counter(scan.session_id for scan in scans)
    header = [*SESSION_COLUMNS, "scans", *map(custom_column, custom)]
    return _text(header, ([s.id, s.label, s.subject_label, s.subject_id,
                           s.fields.get("date", ""), s.xsi_type,
                           *(s.fields.get(f, "") for f in SESSION_FIELDS[1:]),
                           str(counts[s.id]), *(s.custom.get(c, "") for c in custom)]
                          for s in sessions))


def scans_csv(scans: Sequence[ScanRecord]) -> bytes:
    """One row per scan: its session and subject, its fields, and its resources'
    labels separated by spaces."""
    return _text(SCAN_COLUMNS, ([s.session_label, s.session_id, s.subject_label, s.scan_id,
                                 s.type, s.series_description, s.quality, s.frames,
                                 RESOURCE_SEPARATOR.join(s.resources)] for s in scans))

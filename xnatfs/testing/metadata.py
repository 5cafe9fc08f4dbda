"""Subject demographics, experiment fields and custom variables: which XNAT
shortcut lives in which store column, and how XNAT validates a value.

The shortcut names are XNAT's own (``XMLPathShortcuts.java``:142-164 for
subjects, :79-103 for experiments); the demographic order is the schema's
(``xnat:demographicData``), which item XML and JSON keep. Validation copies
``XFTValidator``'s messages as ``ValidationResults.addError`` words them
(docs/xnat-verified.md, "Subject and session metadata").
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

DEMOGRAPHIC_XPATH = "xnat:subjectData/demographics[@xsi:type=xnat:demographicData]/"


@dataclass(frozen=True)
class Field:
    """One stored field: its XNAT shortcut, its store column, its schema type
    (``string``, ``integer``, ``double``, ``float``, ``date``) and, for an
    enumeration, the values XNAT's schema allows."""

    shortcut: str
    column: str
    kind: str = "string"
    allowed: tuple[str, ...] = ()


# xnat:demographicData in schema order: dob | yob | age (a choice), then the rest.
DEMOGRAPHICS = (
    Field("dob", "dob", "date"),
    Field("yob", "yob", "integer"),
    Field("age", "age", "double"),
    Field("gender", "gender", "string", ("male", "female", "other", "unknown", "M", "F")),
    Field("handedness", "handedness", "string", ("left", "right", "ambidextrous", "unknown")),
    Field("ses", "ses", "integer"),
    Field("education", "education", "integer"),
    Field("educationDesc", "education_desc"),
    Field("race", "race"),
    Field("ethnicity", "ethnicity"),
    Field("weight", "weight", "float"),
    Field("height", "height", "float"),
    Field("gestational_age", "gestational_age", "double"),
    Field("post_menstrual_age", "post_menstrual_age", "double"),
    Field("birth_weight", "birth_weight", "double"),
)
# Attributes of xnat:subjectData itself.
SUBJECT_ATTRIBUTES = (Field("group", "subject_group"), Field("src", "src"))
SUBJECT_FIELDS = SUBJECT_ATTRIBUTES + DEMOGRAPHICS

# experimentData's and imageSessionData's fields the store holds beyond the
# ones it always had (date, time, modality, UID, session_type...).
EXPERIMENT_FIELDS = (
    Field("visit_id", "visit_id"), Field("visit", "visit"), Field("note", "note"),
    Field("scanner", "scanner"), Field("operator", "operator"),
)
# Which element each experiment field belongs to (the xpath a client may send).
EXPERIMENT_FIELD_OWNER = {"visit_id": "experimentData", "visit": "experimentData",
                          "note": "experimentData", "scanner": "imageSessionData",
                          "operator": "imageSessionData"}


def subject_xpath(f: Field) -> str:
    """The full xpath of a subject shortcut (XMLPathShortcuts SUBJECT_DATA)."""
    if f in SUBJECT_ATTRIBUTES:
        return f"xnat:subjectData/{f.shortcut}"
    return DEMOGRAPHIC_XPATH + f.shortcut


class ValidationFailure(Exception):
    """A value XNAT's ``validate()`` refuses: 400 with ``toFullString()``."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.body = "".join(m + "\n" for m in messages)


_INTEGER = re.compile(r"^[+-]?\d+$")


def validation_error(element: str, f: Field, value: str) -> str | None:
    """XFTValidator's complaint about ``value`` for field ``f`` of ``element``
    (``xnat:demographicData``...), or None when it passes. Empty values pass
    (nothing here is required)."""
    if value == "":
        return None
    problem = None
    exempt = value.upper() in ("INF", "NAN", "NULL")  # never refused by a type check
    if f.kind == "integer" and not _INTEGER.match(value) and not exempt:
        problem = "Must Be A Valid Integer"
    elif f.kind in ("double", "float") and not exempt:
        try:
            float(value)
        except ValueError:
            problem = f"Must Be A Valid {f.kind.capitalize()}"
    elif f.kind == "date" and not exempt and not _valid_date(value):
        problem = "Must Be A Valid Date"
    # The enumeration compares trimmed and ignoring case (XFTValidator:238-243).
    if (problem is None and f.allowed
            and value.strip().lower() not in {a.lower() for a in f.allowed}):
        problem = f"'{value}' Must Match Pre-Defined Values...({','.join(f.allowed)})"
    if problem is None:
        return None
    return (f"The content of element '{element}' is not complete. "
            f"'{{\"http://nrg.wustl.edu/xnat\":{f.shortcut}}}' {problem}")


# DateUtils' date formats (xft/utils/DateUtils.java:64-68).
_DATE_FORMATS = ("%Y-%m-%d", "%m/%d/%Y", "%m.%d.%Y", "%Y%m%d")


def _valid_date(value: str) -> bool:
    return iso_date(value) is not None


def iso_date(value: str) -> str | None:
    """A date in one of DateUtils' formats as the database keeps it
    (``yyyy-MM-dd``), or None. (Java's lenient parsing, which also takes
    ``2020-13-45``, is not copied.)"""
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(value, fmt).strftime("%Y-%m-%d")
        except ValueError:
            continue
    return None

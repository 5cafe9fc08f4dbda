"""Which stored fields a PUT of a subject or experiment changes, read from its
parameters as XNAT's ``SecureResource.loadItem`` reads them.

* The body (an urlencoded form) is read first, then the query, whose values win.
* Shortcut keys (``gender``, ``visit``...) are mapped to their xpaths only
  where the resource registers them: ``SubjectResource`` (SUBJECT_DATA) and
  ``SubjAssessmentResource`` (EXPERIMENT_DATA), not ``ExperimentResource``
  (``/data/experiments/{ID}``, ``/data/projects/P/experiments/{E}``).
* An xpath applies when its root element is the object's type or one it
  extends (``GenericItemObject.setProperties``); others are ignored, and so
  are paths the store does not model.
* A custom variable's name keeps its case (``[name=Foo]`` and ``[name=foo]``
  are two variables); quotes around it are dropped.
* ``NULL`` (any case) empties a value (``DBAction`` writes SQL NULL): a custom
  variable keeps its row with no value (xnatpy's delete sends ``.../field``
  as ``NULL``); one whose ``name`` is set to ``NULL`` is removed here (XNAT
  would keep a nameless row no document can show).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..metadata import (
    DEMOGRAPHICS,
    EXPERIMENT_FIELD_OWNER,
    EXPERIMENT_FIELDS,
    SUBJECT_ATTRIBUTES,
    Field,
    ValidationFailure,
    iso_date,
    validation_error,
)

_DEMOGRAPHIC = re.compile(r"^demographics(\[@xsi:type=[^\]]*\])?/(?P<leaf>[A-Za-z_]+)$")
_CUSTOM = re.compile(r"^fields/field\[name=(?P<name>[^\]]*)\]/(?P<part>field|name)$")
# Experiment columns with a shortcut and an xpath leaf of the same name.
_EXPERIMENT_BASE = {"date": "date", "time": "time", "modality": "modality", "UID": "uid",
                    "session_type": "session_type"}


@dataclass
class FieldChanges:
    """Column values and custom variables (None: remove) a PUT sets."""

    values: dict[str, str] = field(default_factory=dict)
    custom: dict[str, str | None] = field(default_factory=dict)
    # The raw values as sent, for validation (XNAT validates "NULL" too).
    sent: dict[str, str] = field(default_factory=dict)


def _roots(xsi_type: str) -> set[str]:
    """The element names (lower-cased) an object of ``xsi_type`` is an instance of."""
    lowered = xsi_type.lower()
    if lowered == "xnat:subjectdata":
        return {lowered}
    roots = {lowered, "xnat:experimentdata", "xnat:subjectassessordata"}
    if lowered.endswith("sessiondata"):
        roots.add("xnat:imagesessiondata")
    return roots


def _declares(root: str, f: Field) -> bool:
    """Whether element ``root`` has field ``f`` (imageSessionData's fields are
    not experimentData's)."""
    owner = EXPERIMENT_FIELD_OWNER.get(f.shortcut)
    return owner != "imageSessionData" or root.lower() not in (
        "xnat:experimentdata", "xnat:subjectassessordata")


def read_changes(params: Mapping[str, str], xsi_type: str, *,
                 shortcuts: bool) -> FieldChanges:
    """The stored fields ``params`` change on an object of ``xsi_type``."""
    subject = xsi_type.lower() == "xnat:subjectdata"
    fields: tuple[Field, ...] = ((*SUBJECT_ATTRIBUTES, *DEMOGRAPHICS) if subject
                                 else EXPERIMENT_FIELDS)
    by_shortcut = {f.shortcut: f for f in fields}
    by_leaf = {f.shortcut.lower(): f for f in (SUBJECT_ATTRIBUTES if subject else fields)}
    demographic = {f.shortcut.lower(): f for f in DEMOGRAPHICS}
    roots = _roots(xsi_type)
    changes = FieldChanges()

    def put(f: Field, value: str) -> None:
        changes.sent[f.column] = value
        changes.values[f.column] = "" if value.upper() == "NULL" else value

    for key, value in params.items():
        if shortcuts and key in by_shortcut:
            put(by_shortcut[key], value)
            continue
        if shortcuts and not subject and key in _EXPERIMENT_BASE:
            changes.values[_EXPERIMENT_BASE[key]] = value
            continue
        root, slash, tail = key.partition("/")
        if not slash or ":" not in root or root.lower() not in roots:
            continue
        custom = _CUSTOM.match(tail)
        if custom:
            # XFTItem.GetFilterOptions drops quotes and keeps the case.
            name = custom["name"].replace("'", "").strip()
            if value.upper() == "NULL":
                if custom["part"] == "name":
                    changes.custom[name] = None
                elif changes.custom.get(name, "") is not None:
                    changes.custom[name] = ""
            elif custom["part"] == "field":
                changes.custom[name] = value
            continue
        leaf_match = _DEMOGRAPHIC.match(tail)
        if subject and leaf_match and leaf_match["leaf"].lower() in demographic:
            put(demographic[leaf_match["leaf"].lower()], value)
        elif tail.lower() in by_leaf and _declares(root, by_leaf[tail.lower()]):
            put(by_leaf[tail.lower()], value)
        elif not subject and tail in _EXPERIMENT_BASE:
            changes.values[_EXPERIMENT_BASE[tail]] = value
    return changes


def check(changes: FieldChanges, xsi_type: str) -> None:
    """Refuse what ``validate()`` refuses (ValidationFailure, nothing stored);
    dates are kept as the database keeps them."""
    subject = xsi_type.lower() == "xnat:subjectdata"
    fields = (*SUBJECT_ATTRIBUTES, *DEMOGRAPHICS) if subject else EXPERIMENT_FIELDS
    element = "xnat:demographicData"
    problems = [message for f in fields if f.column in changes.sent
                for message in [validation_error(element, f, changes.sent[f.column])]
                if message]
    if problems:
        raise ValidationFailure(problems)
    for f in fields:
        if f.kind == "date" and changes.values.get(f.column):
            changes.values[f.column] = iso_date(changes.values[f.column]) or ""

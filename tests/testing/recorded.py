"""Answers recorded from real XNAT servers, and comparing ours with them by shape.

A recording is a file in ``tests/testing/recorded/``::

    # source: <repository/path@commit, or the page> — <server, version>
    # request: GET /data/experiments/XNAT_E00001/files?format=json
    # note: <what was trimmed>
    Content-Type: application/json      (headers, only if the source recorded them)

    <body, verbatim>

Real servers hold other data than ours, so answers are compared by shape: the
envelope, the keys and their order, the type of each value, and the form of
strings that have one (URIs with their IDs taken out, dates, times, numbers).
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).parent / "recorded"


@dataclass
class Recording:
    name: str
    source: str
    method: str
    path: str
    notes: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body's value: JSON, or the Python literal a test or docstring
        pasted it as (``... == [{...}]``, ``>>> print(row)`` then the row)."""
        text = self.body.decode("utf-8")
        try:
            return json.loads(text)
        except ValueError:
            pass
        marker = text.rfind("==")
        if marker >= 0:  # a test's expectation: the literal after ==
            start = min(i for i in (text.find("{", marker), text.find("[", marker)) if i >= 0)
        else:  # a docstring: the first line that opens a literal
            opening = re.search(r"^\s*[\[{]", text, re.MULTILINE)
            if opening is None:
                raise ValueError(f"{self.name}: no JSON or Python literal in the body")
            start = opening.end() - 1
        literal = text[start:]
        while literal:  # cut trailing text until what is left is one literal
            try:
                return ast.literal_eval(literal)
            except (SyntaxError, ValueError):
                literal = literal[:literal.rstrip().rfind("\n")] if "\n" in literal \
                    else ""
        raise ValueError(f"{self.name}: no JSON or Python literal in the body")


def load(name: str) -> Recording:
    """The recording ``tests/testing/recorded/<name>``."""
    raw = (RECORDED / name).read_bytes()
    head, _, body = raw.partition(b"\n\n")
    lines = head.decode("utf-8").splitlines()
    source = method = path = ""
    notes: list[str] = []
    headers: dict[str, str] = {}
    for line in lines:
        if line.startswith("# source:"):
            source = line.split(":", 1)[1].strip()
        elif line.startswith("# request:"):
            method, _, path = line.split(":", 1)[1].strip().partition(" ")
        elif line.startswith("#"):
            notes.append(line[1:].strip())
        elif ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    if not source or not method:
        raise ValueError(f"{name}: a recording starts with '# source:' and '# request:' lines")
    return Recording(name, source, method, path, notes, headers, body)


def recordings(pattern: str = "*") -> list[str]:
    return sorted(p.name for p in RECORDED.glob(pattern) if p.suffix == ".http")


# ------------------------------------------------------------------ shapes
_FORMS = [  # the first that matches names a string's form
    ("timestamp-ms", re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{1,3}")),
    ("timestamp-us", re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{4,6}")),
    ("timestamp", re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")),
    ("date", re.compile(r"\d{4}-\d\d-\d\d")),
    ("time-ms", re.compile(r"\d\d:\d\d:\d\d\.\d{1,3}")),
    ("time", re.compile(r"\d\d:\d\d:\d\d")),
    ("prearchive-timestamp", re.compile(r"\d{8}_\d{9}")),
    ("integer", re.compile(r"-?\d+")),
    ("decimal", re.compile(r"-?\d+\.\d+(E-?\d+)?")),
    ("md5", re.compile(r"[0-9a-f]{32}")),
]
# URI segments that are names of things, kept; every other segment is an ID or label.
_URI_WORDS = {"data", "archive", "projects", "subjects", "experiments", "scans", "resources",
              "files", "assessors", "reconstructions", "out", "in", "prearchive", "services",
              "ALL"}


def string_form(value: str) -> str:
    """What kind of string ``value`` is: ``uri:/data/experiments/*/files/*``, a
    date form, ``integer``..., or ``text``."""
    if value == "":
        return "empty"
    if value.startswith("/"):
        parts = value.split("/")
        # A file's path inside its resource is one "*" however deep it is.
        if "files" in parts:
            parts = parts[:parts.index("files") + 2]
        return "uri:" + "/".join(p if p in _URI_WORDS or p == "" else "*" for p in parts)
    for form, pattern in _FORMS:
        if pattern.fullmatch(value):
            return form
    return "text"


def shape(value: Any) -> Any:
    """``value`` with its data taken out: keys in order, value types, string forms."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, str):
        return string_form(value)
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return type(value).__name__
    return "null" if value is None else type(value).__name__


def key_order(value: Any) -> list[str]:
    """The keys of the first row of a table answer, in order (``[]`` if no rows)."""
    rows = value["ResultSet"]["Result"]
    return list(rows[0]) if rows else []


def xml_outline(body: bytes) -> dict[str, Any]:
    """The root element's name, its namespace declarations and the names of its
    children in order: the outline of an item document."""
    declared = re.findall(rb'xmlns:(\w+)="([^"]+)"', body)
    root = ET.fromstring(body)
    return {"root": root.tag,
            "namespaces": sorted(prefix.decode() for prefix, _ in declared),
            "children": [child.tag for child in root]}

"""``columns=``, filters and paging for XNAT's query-organiser listings.

Projects, subjects, experiments and scans go through XNAT's
``QueryOrganizerResource``: ``columns`` picks aliases (unknown ones are
silently dropped, ``DEFAULT`` keeps the defaults), ``URI`` and the root
element's primary-key column are always added, xpath columns come back
lower-cased, any alias used as a query parameter filters (``*``/``%`` mean
LIKE, a comma means OR), and ``limit``/``offset`` page (dropping
``totalRecords``). Resources and files ignore all of this.

An xpath into a repeated child (``xnat:mrSessionData/scans/scan/ID``,
``xnat:subjectData/fields/field/name``) joins that child: QueryOrganizer
left-joins its table, so a row comes back per child, and one row with
blanks for an object without any (docs/xnat-verified.md, "Subject and
session metadata"). Rows carry their children under :func:`join_key`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .xnatformat import cell, table_response

# Query parameters that are never filters.
_CONTROL_PARAMS = {"format", "columns", "limit", "offset", "sortBy", "sortOrder", "xsiType",
                   "accessible", "owner", "member", "collaborator", "recent", "favorite",
                   "activeSince", "admin", "prearc_code", "all", "includeHistory", "_",
                   "structure", "inbody", "handler", "req_format"}


@dataclass(frozen=True)
class ListingSpec:
    """How one listing behaves: its defaults, its key column, and its aliases.

    ``aliases`` maps alias → row key; the row dictionaries handed to
    :func:`render` hold every alias's value under its row key.
    """

    defaults: Sequence[str]
    aliases: Mapping[str, str]
    pk_column: str | None = None
    title: str | None = None
    # Aliases the resource adds after the requested columns whatever they are
    # (ExperimentListResource/ProjSubExptList add xsiType and project when the
    # root element is not a secured one: ``xnat:subjectAssessorData``).
    always: Sequence[str] = ()
    # Joined child columns: lower-cased xpath below the root element
    # (``scans/scan/id``) -> (child path, row key), e.g. (("scans",), "scan_id")
    # or (("scans", "files"), "file_label") for a child of a child.
    joins: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    # Which root elements each top-level join accepts (``xnat:mrSessionData``
    # for ``scans``), as a regular expression matched against the lower-cased root.
    join_roots: Mapping[str, str] = field(default_factory=dict)
    # Child elements named as roots of their own (``xnat:imageScanData/ID``, as
    # pyxnat's ``Interface.array.scans`` asks): a regular expression for the
    # lower-cased root -> (child path, lower-cased leaf -> row key).
    child_elements: Mapping[str, tuple[tuple[str, ...], Mapping[str, str]]] = field(
        default_factory=dict)


def join_key(child: str) -> str:
    """Where a row dictionary holds its children of one kind (a list of dicts)."""
    return f"\x00join:{child}"


def _joined_column(spec: ListingSpec, name: str) -> tuple[tuple[str, ...], str] | None:
    """The child path and row key of an xpath column that joins a child, or None."""
    root, _, tail = name.lower().partition("/")
    for pattern, (path, leaves) in spec.child_elements.items():
        if re.fullmatch(pattern, root) and tail in leaves:
            return path, leaves[tail]
    found = spec.joins.get(tail)
    if found is None:
        return None
    root_pattern = spec.join_roots.get(found[0][0])
    if root_pattern is not None and not re.fullmatch(root_pattern, root):
        return None
    return found


def choose_columns(request: web.Request, spec: ListingSpec) -> list[tuple[str, str]]:
    """(output column, row key) pairs for this request."""
    wanted = request.query.get("columns")
    names = list(spec.defaults) if not wanted else []
    if wanted:
        lower_aliases = {a.lower(): a for a in spec.aliases}
        for raw in wanted.split(","):
            name = raw.strip()
            if not name:
                continue
            if name == "DEFAULT":
                names.extend(spec.defaults)
            elif name in spec.aliases:
                names.append(name)
            elif "/" in name and (joined := _joined_column(spec, name)) is not None:
                names.append(f"\x00{name.lower()}\x00\x01{joined[1]}")
            elif "/" in name:
                # An xpath such as xnat:mrSessionData/label: known leaf, lower-cased name.
                leaf = name.rsplit("/", 1)[1]
                alias = lower_aliases.get(leaf.lower())
                if alias:
                    names.append(f"\x00{name.lower()}\x00{alias}")
            elif name.lower() in lower_aliases and name != "URI":
                names.append(lower_aliases[name.lower()])
    columns: list[tuple[str, str]] = []
    seen = set()
    for name in names:
        if name.startswith("\x00"):
            _, out, alias = name.split("\x00")
            pair = (out, alias[1:] if alias.startswith("\x01") else spec.aliases[alias])
        else:
            if name == "URI":
                continue
            pair = (name, spec.aliases[name])
        if pair[0] not in seen:
            seen.add(pair[0])
            columns.append(pair)
    for name in spec.always:
        if name not in seen:
            seen.add(name)
            columns.append((name, spec.aliases[name]))
    if spec.pk_column and spec.pk_column not in seen:
        columns.append((spec.pk_column, spec.aliases.get(spec.pk_column, "ID")))
        seen.add(spec.pk_column)
    columns.append(("URI", "URI"))
    return columns


def apply_filters(request: web.Request, spec: ListingSpec,
                  rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for param, value in request.query.items():
        if param in _CONTROL_PARAMS:
            continue
        key = spec.aliases.get(param)
        if key is None:
            lowered = {a.lower(): k for a, k in spec.aliases.items()}
            key = lowered.get(param.lower())
        if key is None:
            continue
        patterns = [p.replace("%", "*") for p in value.split(",")]
        rows = [r for r in rows
                if any(fnmatch.fnmatchcase(cell(r.get(key)).lower(), p.lower()) for p in patterns)]
    return rows


def render(request: web.Request, spec: ListingSpec, rows: list[dict[str, Any]],
           extra_envelope: Mapping[str, Any] | None = None) -> web.Response:
    """Filter, page and render rows through ``spec``."""
    rows = apply_filters(request, spec, rows)
    columns = choose_columns(request, spec)
    envelope: dict[str, Any] = {}
    limit = request.query.get("limit")
    offset = request.query.get("offset")
    if limit is not None or offset is not None:
        start = int(offset or 0)
        rows = rows[start:start + int(limit)] if limit is not None else rows[start:]
    else:
        envelope["totalRecords"] = str(len(rows))
    if spec.title:
        envelope["title"] = spec.title
    envelope.update(extra_envelope or {})
    paths = _requested_joins(request, spec)
    if paths:
        rows = [joined for row in rows for joined in _expand(row, paths)]
        if "totalRecords" in envelope:
            envelope["totalRecords"] = str(len(rows))
    out_rows = [{out: row.get(key) for out, key in columns} for row in rows]
    return table_response(request, out_rows, [out for out, _ in columns], envelope=envelope)


def _requested_joins(request: web.Request, spec: ListingSpec) -> set[tuple[str, ...]]:
    """The child paths the requested columns join."""
    wanted = request.query.get("columns") or ""
    paths = set()
    for raw in wanted.split(","):
        joined = _joined_column(spec, raw.strip()) if "/" in raw else None
        if joined is not None:
            paths.add(joined[0])
    return paths


def _expand(row: dict[str, Any], paths: set[tuple[str, ...]]) -> list[dict[str, Any]]:
    """One row per joined child (a product when several kinds are joined, as
    SQL left joins give), and the row alone, blank there, without children."""
    results = [row]
    for top in sorted({p[0] for p in paths}):
        nested = sorted({p[1] for p in paths if p[0] == top and len(p) > 1})
        children: list[dict[str, Any]] = []
        for child in row.get(join_key(top)) or []:
            grandchildren: list[dict[str, Any]] = [{}]
            for sub in nested:
                grandchildren = [{**g, **c} for g in grandchildren
                                 for c in (child.get(join_key(sub)) or [{}])]
            children.extend({**child, **g} for g in grandchildren)
        if not children:
            children = [{}]
        results = [{**r, **c} for r in results for c in children]
    return results

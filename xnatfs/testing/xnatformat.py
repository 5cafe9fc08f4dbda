"""XNAT's response shapes: table envelopes (JSON and CSV), item JSON, error pages.

Everything here follows ``shared/reference/xnat-rest-api.md`` section 0: all
table cells are strings, errors are Restlet's HTML status page, and a 2xx
never carries HTML.

XNAT builds its JSON with org.json's ``JSONObject``, whose keys live in a
``java.util.HashMap``: a row's keys come out in the order that map iterates
them (:func:`java_hash_order`), which is why every real server lists a
subject's keys as ``insert_date, project, ID, label, insert_user, URI``
(``docs/xnat-verified.md``). JSON is written compactly, and listings are
sent chunked, without ``Content-Length``, as Restlet streams them.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

# Restlet's status-page anchors into RFC 2616 section 10.
_RFC_ANCHORS = {
    400: "10.4.1", 401: "10.4.2", 403: "10.4.4", 404: "10.4.5", 405: "10.4.6",
    406: "10.4.7", 409: "10.4.10", 417: "10.4.18", 422: "10.4.1",
    500: "10.5.1", 502: "10.5.3", 503: "10.5.4",
}
_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 409: "Conflict",
    417: "Expectation Failed", 422: "Unprocessable Entity", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable",
}

REALM = 'Basic realm="XNAT Protected Area"'


class XnatHTTPError(Exception):
    """Raised by handlers; rendered as XNAT's HTML status page."""

    def __init__(self, status: int, message: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message or _REASONS.get(status, "Error"))
        self.status = status
        self.message = message or _REASONS.get(status, "Error")
        self.headers = dict(headers or {})


def status_page(status: int, message: str) -> str:
    anchor = _RFC_ANCHORS.get(status, "10.4.1")
    return (
        "<html>\n<head>\n   <title>Status page</title>\n</head>\n<body>\n"
        f"<h3>{_html_escape(message)}</h3><p>You can get technical details <a href="
        f'"http://www.w3.org/Protocols/rfc2616/rfc2616-sec10.html#sec{anchor}">here</a>.<br>\n'
        'Please continue your visit at our <a href="/">home page</a>.\n</p>\n</body>\n</html>\n'
    )


def error_response(status: int, message: str,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=status_page(status, message),
                        content_type="text/html", charset="UTF-8", headers=headers)


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def cell(value: Any) -> str:
    """XNAT renders every table cell as a string; null is the empty string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def requested_format(request: web.Request, default: str = "json") -> str:
    return (request.query.get("format") or default).lower()


def table_response(request: web.Request, rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[str], *, envelope: Mapping[str, Any] | None = None,
                   json_columns_header: list[dict[str, str]] | None = None,
                   default_format: str = "json") -> web.Response:
    """Render a listing as XNAT does (``JSONTableRepresentation``/``toCSV``).

    ``envelope`` holds the extras next to ``Result`` (``totalRecords``, ``title``);
    ``json_columns_header`` is the ``Columns`` list some listings carry.
    """
    fmt = requested_format(request, default_format)
    table = [{col: cell(row.get(col)) for col in columns} for row in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in table:
            writer.writerow([row[c] for c in columns])
        return listing_response(buf.getvalue(), "text/csv")
    if fmt in ("json", "jsonp"):
        return listing_response(_table_json(table, columns, envelope, json_columns_header),
                                "application/json")
    if fmt in ("xml", "html", "txt"):
        return _xml_table(table, columns) if fmt == "xml" else _text_table(table, columns, fmt)
    raise XnatHTTPError(400, f"Unsupported format: {fmt}")


def _table_json(table: list[dict[str, str]], columns: Sequence[str],
                envelope: Mapping[str, Any] | None,
                json_columns_header: list[dict[str, str]] | None) -> str:
    """``JSONTableRepresentation``: rows as compact ``JSONObject``s, the extras
    after them (``{"ResultSet":{"Result":[...], "totalRecords": "1"}}``)."""
    order = java_hash_order(list(columns))
    rows = ",".join(compact_json({key: row[key] for key in order}) for row in table)
    head = (f'"Columns":{compact_json(json_columns_header)},'
            if json_columns_header is not None else "")
    extras = "".join(f", {json.dumps(key)}: {json.dumps(cell(value))}"
                     for key, value in (envelope or {}).items())
    return f'{{"ResultSet":{{{head}"Result":[{rows}]{extras}}}}}'


def _xml_table(table: list[dict[str, str]], columns: Sequence[str]) -> web.Response:
    from xml.sax.saxutils import escape, quoteattr

    out = ['<?xml version="1.0" encoding="UTF-8"?>\n<results xmlns="http://nrg.wustl.edu/xe">'
           "<columns>"]
    out += [f"<column>{escape(c)}</column>" for c in columns]
    out.append("</columns><rows>")
    for row in table:
        out.append("<row>" + "".join(f"<cell name={quoteattr(c)}>{escape(row[c])}</cell>"
                                     for c in columns) + "</row>")
    out.append("</rows></results>")
    return web.Response(text="".join(out), content_type="text/xml", charset="UTF-8")


def _text_table(table: list[dict[str, str]], columns: Sequence[str], fmt: str) -> web.Response:
    # HTML tables are what XNAT's browser view serves; keep them out of the JSON paths.
    if fmt == "html":
        head = "".join(f"<th>{_html_escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_html_escape(r[c])}</td>" for c in columns)
                       + "</tr>" for r in table)
        return web.Response(text=f"<html><body><table><tr>{head}</tr>{body}</table></body></html>",
                            content_type="text/html", charset="UTF-8")
    lines = ["\t".join(columns)] + ["\t".join(r[c] for c in columns) for r in table]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="UTF-8")


def java_hash_order(keys: Sequence[str]) -> list[str]:
    """``keys`` (in the order they were put) in the order a ``java.util.HashMap``
    iterates them: by bucket, the bucket being the spread ``String.hashCode``
    masked by the table's size (16, doubled whenever the map is over 3/4
    full); keys of one bucket in the order they were put."""
    capacity = 16
    while len(keys) > capacity * 3 // 4:
        capacity *= 2
    put_order = {key: index for index, key in enumerate(keys)}
    return sorted(keys, key=lambda key: (_bucket(key, capacity), put_order[key]))


def _string_hash(key: str) -> int:
    units = key.encode("utf-16-be")
    code = 0
    for i in range(0, len(units), 2):  # String.hashCode: over UTF-16 code units
        code = (31 * code + int.from_bytes(units[i:i + 2], "big")) & 0xFFFFFFFF
    return code


def _bucket(key: str, capacity: int) -> int:
    code = _string_hash(key)
    return (code ^ (code >> 16)) & (capacity - 1)


def java_hashtable_order(keys: Sequence[str]) -> list[str]:
    """``keys`` (in the order they were put) in the order a ``java.util.Hashtable``
    iterates them: 11 buckets (``hash & 0x7FFFFFFF`` modulo the size), grown to
    ``2n+1`` when a put finds it holding ``0.75 n`` keys, re-chained from the
    last bucket down; read from the last bucket down, each chain newest first.
    XFT keeps an item's fields and child collections in ``Hashtable``s
    (``FlattenedItemA``), which ``ItemJSONBuilder`` then copies out in this order."""
    capacity, count = 11, 0
    table: list[list[str]] = [[] for _ in range(capacity)]
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        if count >= int(capacity * 0.75):
            old, capacity = table, capacity * 2 + 1
            table = [[] for _ in range(capacity)]
            for chain in reversed(old):
                for moved in chain:
                    table[(_string_hash(moved) & 0x7FFFFFFF) % capacity].insert(0, moved)
        table[(_string_hash(key) & 0x7FFFFFFF) % capacity].insert(0, key)
        count += 1
    return [key for chain in reversed(table) for key in chain]


def java_object(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` as a ``JSONObject`` would write them: keys in HashMap order."""
    return {key: fields[key] for key in java_hash_order(list(fields))}


def xft_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """An item's ``data_fields`` as ``ItemJSONBuilder`` writes them: XFT's
    ``Hashtable`` of fields copied, in its order, into a ``JSONObject``. This
    model gives both recorded experiment items' key order exactly, whatever
    order the fields were put in (``tests/testing/test_recorded.py``)."""
    present = [key for key in fields if fields[key] is not None]  # putValue skips nulls
    return {key: _json_number(fields[key])
            for key in java_hash_order(java_hashtable_order(present))}


def _json_number(value: Any) -> Any:
    """A ``Double`` as org.json writes it: ``numberToString`` shaves trailing
    zeros and the point (``80.0`` → ``80``, ``83.91`` stays). Fields typed as
    strings in the schema keep their text (``fieldStrength`` ``"3.0"``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def java_date(stamp: str) -> str:
    """A stored ``2023-09-27 17:31:21.352`` as ``java.util.Date.toString()``
    prints it (``Wed Sep 27 17:31:21 CDT 2023``, the server's zone): how a
    ``JSONObject`` writes a date it holds (``meta.start_date``)."""
    if not stamp:
        return ""
    when = dt.datetime.fromisoformat(stamp).astimezone()
    return when.strftime("%a %b %d %H:%M:%S ") + (when.tzname() or "UTC") \
        + when.strftime(" %Y")


def compact_json(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"))


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=compact_json(payload),
                        content_type="application/json", charset="UTF-8")


def listing_response(text: str, content_type: str) -> web.Response:
    """A listing as Restlet sends it: chunked, no ``Content-Length``."""
    response = web.Response(text=text, content_type=content_type, charset="UTF-8")
    response.enable_chunked_encoding()
    return response


def text_response(text: str, status: int = 200, content_type: str = "text/plain") -> web.Response:
    return web.Response(status=status, text=text, content_type=content_type, charset="UTF-8")


def item_json(xsi_type: str, data_fields: Mapping[str, Any],
              children: Sequence[Mapping[str, Any]] = (),
              meta_extra: Mapping[str, Any] | None = None, *,
              last_modified: str = "") -> dict[str, Any]:
    """One ``ItemJSONBuilder`` item; ``data_fields`` keep their Java types.

    ``meta`` holds ``isHistory``, ``create_event_id``, ``xsi:type`` and, when
    the row has a modification time, ``start_date`` as a ``Date`` prints
    (``FlattenedItemA.getStartDate`` is the row's ``last_modified``). The item,
    its ``meta`` and each child are ``JSONObject``s (HashMap order); children
    come in the order of XFT's ``Hashtable`` of collections, ``children`` being
    given in schema order (the order ``renderChildren`` puts them)."""
    meta: dict[str, Any] = {"isHistory": False, "create_event_id": 1}
    if last_modified:
        meta["start_date"] = java_date(last_modified)
    meta["xsi:type"] = xsi_type
    meta.update(meta_extra or {})
    by_field = {child["field"]: child for child in children}
    ordered = [by_field[name] for name in java_hashtable_order(list(by_field))]
    return java_object({"meta": java_object(meta), "data_fields": xft_fields(data_fields),
                        "children": ordered})


def child_field(field: str, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One child collection: ``convert`` of its items, then ``field`` put in."""
    return java_object({"items": list(items), "field": field})

"""What XNAT's answers mean, as pure functions of their text: the error a
status stands for, the message of a status page, JSON that may turn out to
be a login page, the rows of a table listing. :mod:`.connection` reads the
answers and applies these; keeping them apart keeps it about HTTP."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from ..errors import (
    AuthenticationFailed,
    BadRequest,
    Conflict,
    Forbidden,
    HtmlAnswer,
    NotFound,
    ServerError,
    XnatError,
)

_STATUS_PAGE_MESSAGE = re.compile(r"<h3>(.*?)</h3>", re.DOTALL | re.IGNORECASE)


def status_page_message(text: str) -> str | None:
    """``<h3>message</h3>`` of Restlet's status page, or a short plain-text body."""
    match = _STATUS_PAGE_MESSAGE.search(text)
    if match:
        return html.unescape(match.group(1)).strip() or None
    text = text.strip()
    if text and "<" not in text and len(text) <= 500:
        return text
    return None


def error_class(status: int) -> type[XnatError]:
    if status == 401:
        return AuthenticationFailed
    if status == 403:
        return Forbidden
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if 400 <= status < 500 and status != 429:
        return BadRequest
    return ServerError  # 5xx and 429 after retries, or a status we do not handle (3xx)


def parse_json(body: bytes, path: str) -> Any:
    if body.lstrip()[:1] == b"<":
        raise HtmlAnswer("XNAT answered HTML where JSON was expected", path=path)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ServerError(f"malformed JSON: {exc}", path=path) from exc


def table_rows(payload: Any, path: str) -> list[dict[str, Any]]:
    """The ``ResultSet.Result`` rows of an XNAT table listing."""
    try:
        rows = payload["ResultSet"]["Result"]
    except (KeyError, TypeError):
        raise ServerError("a listing without ResultSet.Result", path=path) from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ServerError("a listing whose rows are not objects", path=path)
    return rows

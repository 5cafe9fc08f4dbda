"""What XNAT's listings and items describe, as frozen dataclasses named as XNAT
names things, and the parsing of its JSON rows and items into them.

Pure: nothing here sends a request. A row or item that does not have the
shape XNAT gives is the server's fault, a :class:`~xnatfs.errors.ServerError`
(EIO with the reason in the log), never a traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import ServerError

log = logging.getLogger("xnatfs.client")  # one logger for the package, as before the split

MAX_FILE_SIZE = 2**44  # 16 TiB: a listed size beyond it is the server's error, not a file
# ".../resources/{R}/files/{path}": the first such pair, so a resource may be called "files".
_FILE_URI = re.compile(r"^(?P<owner>.*?)/resources/(?P<resource>[^/]+)/files/(?P<path>.+)$",
                       re.DOTALL)  # a file name may hold a newline; safe_name shows it
_SCAN_OWNER = re.compile(r"/experiments/[^/]+/scans/(?P<scan>[^/]+)$")
_SESSION_OWNER = re.compile(r"/experiments/[^/]+$")
_ASSESSOR_OWNER = re.compile(r"/experiments/[^/]+/assessors/(?P<assessor>[^/]+)/out$")


@dataclass(frozen=True)
class Project:
    id: str
    name: str | None
    secondary_id: str | None
    description: str | None


@dataclass(frozen=True)
class Subject:
    """``insert_date`` is XNAT's server-local ``2023-09-27 17:31:21.352``, kept as given."""

    id: str
    label: str
    project: str
    insert_date: str | None


@dataclass(frozen=True)
class Experiment:
    """An imaging session (or other subject assessor). Dates are XNAT's strings."""

    id: str
    label: str
    project: str
    subject_id: str | None
    xsi_type: str
    date: str | None
    insert_date: str | None


@dataclass(frozen=True)
class Resource:
    """A resource (catalog) of a scan or session; ``id`` is XNAT's numeric id as text."""

    id: str
    label: str
    format: str | None
    content: str | None
    file_count: int | None
    file_size: int | None


@dataclass(frozen=True)
class Scan:
    id: str
    type: str | None
    series_description: str | None
    xsi_type: str
    quality: str | None
    resources: tuple[Resource, ...]


@dataclass(frozen=True)
class Assessor:
    """An image assessor of a session (QC, FreeSurfer...), with its output resources."""

    id: str
    label: str
    xsi_type: str
    resources: tuple[Resource, ...]


@dataclass(frozen=True)
class ExperimentDetail(Experiment):
    """An experiment with its scans, session-level resources and assessors (one
    item request: XNAT nests them all in the session's item)."""

    scans: tuple[Scan, ...]
    resources: tuple[Resource, ...]
    assessors: tuple[Assessor, ...] = ()
    session_id: str | None = None              # an image assessor's session (imageSession_ID)
    shares: tuple[tuple[str, str], ...] = ()   # (project, label there) of each share


@dataclass(frozen=True)
class RemoteFile:
    """One file of a resource, as a file listing describes it.

    Attributes:
        path: path inside the resource (what follows ``/files/``), may contain ``/``.
        size: bytes, as XNAT's catalog records them.
        digest: MD5 hex from the catalog, or None when XNAT has none.
        uri: download path, ``/data/...``, unencoded.
        resource_label, resource_id: the resource holding it.
        scan_id: its scan, or None for a session-level resource.
        assessor_id: its assessor, for an assessor's output resource.
        owner_kind: what holds the resource: ``scan``, ``session``, ``assessor``
            (an output resource), or ``other`` (a reconstruction, an assessor's
            own resource, a subject or project).
    """

    path: str
    size: int
    digest: str | None
    uri: str
    resource_label: str
    resource_id: str
    scan_id: str | None
    owner_kind: str = "session"
    assessor_id: str | None = None


@dataclass(frozen=True)
class PrearchiveSession:
    """A prearchive entry; ``uri`` is ``/data/prearchive/projects/P/TIMESTAMP/FOLDER``."""

    project: str
    timestamp: str
    folder_name: str
    name: str
    subject: str | None
    status: str
    uri: str
    uploaded: str | None
    lastmod: str | None
    scan_date: str | None
    tag: str | None
    autoarchive: str | None


@contextmanager
def malformed_rows(path: str) -> Iterator[None]:
    """A listing row without a column we need, or with a value of the wrong kind
    (a size that is not a number, a row that is not an object), is the server's
    fault, not a bug here: EIO with the reason in the log, no traceback."""
    try:
        yield
    except KeyError as exc:
        raise ServerError(f"a listing row without {exc}", path=path) from exc
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ServerError(f"a malformed listing row: {exc}", path=path) from exc


def as_text(value: Any) -> str | None:
    """XNAT's cell or field as text; its empty string means null."""
    if value is None or value == "":
        return None
    return str(value)


def _count(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def data_path(path: str) -> str:
    """Some XNAT listings give paths without the ``/data`` prefix; add it."""
    return path if path.startswith("/data/") else "/data" + path


def experiment_detail(payload: Any, path: str) -> ExperimentDetail:
    """The experiment item of ``GET /data/experiments/{id}``, scans, resources and
    assessors included."""
    try:
        item = _current_items(payload["items"])[0]
        fields = item["data_fields"]
        return ExperimentDetail(
            id=str(fields["ID"]), label=str(fields["label"]), project=str(fields["project"]),
            subject_id=as_text(fields.get("subject_ID")), xsi_type=item["meta"]["xsi:type"],
            date=as_text(fields.get("date")), insert_date=as_text(fields.get("insert_date")),
            scans=tuple(_scan(scan) for scan in _child_items(item, "scans/scan")),
            resources=tuple(_resource(r) for r in _child_items(item, "resources/resource")),
            assessors=_assessors(_child_items(item, "assessors/assessor"), path),
            session_id=as_text(fields.get("imageSession_ID")),
            shares=tuple((str(share["data_fields"]["project"]),
                          str(share["data_fields"].get("label") or fields["ID"]))
                         for share in _child_items(item, "sharing/share")))
    except (KeyError, IndexError, TypeError) as exc:
        raise ServerError(f"an experiment item without {exc}", path=path) from exc


def _current_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for item in items if not item.get("meta", {}).get("isHistory", False)]


def _child_items(item: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    for child in item.get("children", []):
        if child.get("field") == field:
            return _current_items(child.get("items", []))
    return []


def _scan(item: Mapping[str, Any]) -> Scan:
    fields = item["data_fields"]
    return Scan(id=str(fields["ID"]), type=as_text(fields.get("type")),
                series_description=as_text(fields.get("series_description")),
                xsi_type=item["meta"]["xsi:type"], quality=as_text(fields.get("quality")),
                resources=tuple(_resource(r) for r in _child_items(item, "file")))


def _assessors(items: list[dict[str, Any]], path: str) -> tuple[Assessor, ...]:
    """The assessors a session item names; one in a shape we do not know is left
    out (with a log line), not the session with it."""
    out = []
    for item in items:
        try:
            fields = item["data_fields"]
            out.append(Assessor(
                id=str(fields["ID"]), label=str(fields.get("label") or fields["ID"]),
                xsi_type=item["meta"]["xsi:type"],
                resources=tuple(_resource(r) for r in _child_items(item, "out/file"))))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            log.warning("%s: an assessor without %s; not shown", path, exc)
    return tuple(out)


def _resource(item: Mapping[str, Any]) -> Resource:
    """A resource child of an item."""
    return resource_from_fields(item["data_fields"])


def resource_from_fields(fields: Mapping[str, Any]) -> Resource:
    """A resource from an item's ``data_fields`` or a resource listing's row (the
    same names). XNAT leaves out null fields, so a resource created by an upload
    without a label has none (it is then named by its number), and the number
    may come under abstractResource's own key ``xnat_abstractResource_id``."""
    number = fields.get("xnat_abstractresource_id", fields.get("xnat_abstractResource_id"))
    if number is None:
        raise KeyError("xnat_abstractresource_id")
    return Resource(id=str(number), label=str(fields.get("label") or number),
                    format=as_text(fields.get("format")), content=as_text(fields.get("content")),
                    file_count=_count(fields.get("file_count")),
                    file_size=_count(fields.get("file_size")))


def remote_files(rows: list[dict[str, Any]], listing: str) -> list[RemoteFile]:
    with malformed_rows(listing):
        return [remote_file(row, listing) for row in rows]


def _relative_path(path: str, uri: str, listing: str) -> str:
    """A file's path in its resource, without empty components: a leading ``/``
    would make a folder named like the resource's ``files/`` itself."""
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ServerError(f"a file without a name: {uri}", path=listing)
    return "/".join(parts)


def file_size(value: Any, uri: str) -> int:
    """A listed size, which must be one a file can have (ValueError if not): the
    block cache sizes its bookkeeping by it."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = -1
    if not 0 <= size <= MAX_FILE_SIZE:
        raise ValueError(f"unexpected size {value!r} of {uri}")
    return size


def remote_file(row: Mapping[str, Any], listing: str) -> RemoteFile:
    """A file listing row. Its URI names the scan, resource and path; multi-resource
    listings build it from SQL and leave out ``/data``."""
    uri = row.get("URI") or ""
    match = _FILE_URI.match(uri)
    if match is None:
        raise ServerError(f"unexpected file URI {uri!r}", path=listing)
    owner = match.group("owner")
    scan = _SCAN_OWNER.search(owner)
    assessor = _ASSESSOR_OWNER.search(owner)
    owner_kind = ("scan" if scan else "session" if _SESSION_OWNER.search(owner)
                  else "assessor" if assessor else "other")
    try:
        size = file_size(row.get("Size") or 0, uri)
    except ValueError as exc:
        raise ServerError(str(exc), path=listing) from None
    return RemoteFile(path=_relative_path(match.group("path"), uri, listing), size=size,
                      digest=as_text(row.get("digest")),
                      uri=data_path(uri),
                      resource_label=row.get("collection") or match.group("resource"),
                      resource_id=row.get("cat_ID") or match.group("resource"),
                      scan_id=scan.group("scan") if scan else None, owner_kind=owner_kind,
                      assessor_id=assessor.group("assessor") if assessor else None)

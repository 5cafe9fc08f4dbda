"""What XNAT knows about a project's subjects, sessions and scans, in the mount:
the tables ``subjects.csv``, ``sessions.csv`` and ``scans.csv`` in each project
folder, and the demographics, fields and custom variables of each subject and
session folder as extended attributes (``user.xnat.gender``,
``user.xnat.field.NAME``).

Not an area: the tables are generated files (:mod:`.generated`) that the
archive lists in its project folders, and the attributes are the archive's
nodes'. Both come from the same three listings per project (subjects,
sessions, scans: :mod:`xnatfs.client.tables`), each cached for the metadata
lifetime, so a table costs its requests once however often it is stat'ed and
read, and every subject's attributes together cost one request, every
session's one. A walk that only lists names asks for none of them: a listing
does not refresh its generated files (only ``stat``, ``open`` and the
attributes do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..client.tables import (
    SESSION_FIELDS,
    SUBJECT_FIELDS,
    ScanRecord,
    SessionRecord,
    SubjectRecord,
)
from ..naming import NAME_MAX
from ..tablecsv import SCANS_NAME, SESSIONS_NAME, SUBJECTS_NAME, scans_csv, sessions_csv, subjects_csv
from ..tree import Node, Tree
from .generated import generated_file

log = logging.getLogger(__name__)

XATTR_PREFIX = "user.xnat."
CUSTOM_XATTR_PREFIX = "user.xnat.field."
# What the archive's listings already put on subject and session folders: the
# records never replace these (a session's date is both).
_LISTED = frozenset(XATTR_PREFIX + name
                    for name in ("id", "label", "project", "uri", "xsi_type", "date"))

R = TypeVar("R")


@dataclass(frozen=True)
class Table:
    """One table file of a project folder: what it is made from."""

    name: str
    render: Callable[[ProjectTables, str], Awaitable[bytes]]
    sources: tuple[str, ...]  # the records it is made of (their cache keys' first part)


class TableFile:
    """The :class:`~.generated.Generator` of a table: its text is made from the
    cached records at ``stat`` (so the size shown is the true one) and at open."""

    def __init__(self, tables: ProjectTables, table: Table) -> None:
        self.tables = tables
        self.table = table

    def size(self, node: Node) -> int:
        return len(node.text)

    async def refresh(self, node: Node) -> None:
        node.text = await self.table.render(self.tables, node.project)
        node.mtime_ns = self.tables.fetched_ns(node.project, self.table.sources, node.mtime_ns)

    async def content(self, node: Node) -> bytes:
        await self.refresh(node)
        return node.text


async def _subjects_table(tables: ProjectTables, project: str) -> bytes:
    return subjects_csv(await tables.subjects(project), await tables.sessions(project))


async def _sessions_table(tables: ProjectTables, project: str) -> bytes:
    return sessions_csv(await tables.sessions(project), await tables.scans(project))


async def _scans_table(tables: ProjectTables, project: str) -> bytes:
    return scans_csv(await tables.scans(project))


SUBJECTS, SESSIONS, SCANS = RECORDS = ("subject-records", "session-records", "scan-records")
TABLES = (Table(SUBJECTS_NAME, _subjects_table, (SUBJECTS, SESSIONS)),
          Table(SESSIONS_NAME, _sessions_table, (SESSIONS, SCANS)),
          Table(SCANS_NAME, _scans_table, (SCANS,)))


class ProjectTables:
    """The records of each project, cached in the tree, and what is made of them."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.client = tree.client
        self.generators = [TableFile(self, table) for table in TABLES]
        self._fetched: dict[tuple[str, str], int] = {}  # when each cached listing came
        # The last records list of each kind and project, by ID (a subject's
        # attributes are looked up among thousands).
        self._by_id: dict[Hashable, tuple[Sequence[Any], dict[str, Any]]] = {}

    # ------------------------------------------------------------- records
    async def subjects(self, project: str) -> list[SubjectRecord]:
        return await self._records((SUBJECTS, project),
                                   lambda: self.client.list_subject_records(project))

    async def sessions(self, project: str) -> list[SessionRecord]:
        return await self._records((SESSIONS, project),
                                   lambda: self.client.list_session_records(project))

    async def scans(self, project: str) -> list[ScanRecord]:
        return await self._records((SCANS, project),
                                   lambda: self.client.list_scan_records(project))

    async def _records(self, key: tuple[str, str], fetch: Callable[[], Awaitable[R]]) -> R:
        async def fetched() -> R:
            records = await fetch()
            self._fetched[key] = time.time_ns()
            return records

        records: R = await self.tree.cached(key, fetched)
        return records

    def fetched_ns(self, project: str, sources: Sequence[str], default: int) -> int:
        """When XNAT was last asked for these records of ``project`` (a table's
        mtime: read again after that, it may differ)."""
        return max((self._fetched.get((source, project), default) for source in sources),
                   default=default)

    def _record(self, key: Hashable, records: Sequence[Any], record_id: str) -> Any:
        known = self._by_id.get(key)
        if known is None or known[0] is not records:
            known = self._by_id[key] = (records, {r.id: r for r in records})
        return known[1].get(record_id)

    # ------------------------------------------------------------- the files
    def files(self, project_folder: Node) -> list[Node]:
        """The table files of a project folder (their text is made when stat'ed
        or opened, never when listed)."""
        project = project_folder.project
        return [generated_file(self.tree, project_folder, generator.table.name,
                               ("table", project, generator.table.name), generator,
                               project=project,
                               mtime_ns=self.fetched_ns(project, generator.table.sources,
                                                        project_folder.mtime_ns))
                for generator in self.generators]

    # ---------------------------------------------------- extended attributes
    async def subject_xattrs(self, node: Node) -> None:
        """Add the subject's fields and custom variables to ``node.xattrs``."""
        # A failure fails the read: answering without the fields (or with those
        # of an earlier listing) would say XNAT holds none (or old ones).
        records = await self.subjects(node.project)
        record = self._record((SUBJECTS, node.project), records, node.subject_id)
        node.xattrs = with_metadata(node.xattrs, SUBJECT_FIELDS, record)

    async def session_xattrs(self, node: Node) -> None:
        """Add the session's fields and custom variables to ``node.xattrs``."""
        records = await self.sessions(node.project)
        record = self._record((SESSIONS, node.project), records, node.experiment_id)
        node.xattrs = with_metadata(node.xattrs, SESSION_FIELDS, record)


def metadata_xattrs(record: SubjectRecord | SessionRecord) -> dict[str, str]:
    """``user.xnat.<field>`` for each field the record has, ``user.xnat.field.<name>``
    for each custom variable (one whose name cannot be an attribute name, with a
    NUL or too long, is left out)."""
    out = {XATTR_PREFIX + name: value for name, value in record.fields.items()}
    for name, value in record.custom.items():
        key = CUSTOM_XATTR_PREFIX + name
        if "\x00" in name or len(key.encode("utf-8", "surrogateescape")) > NAME_MAX:
            log.debug("custom variable %r of %s has no attribute name", name, record.id)
            continue
        out[key] = value
    return out


def with_metadata(xattrs: dict[str, str], fields: Sequence[str],
                  record: SubjectRecord | SessionRecord | None) -> dict[str, str]:
    """``xattrs`` with the record's attributes in place of those it gave before
    (a field emptied since is gone); the listing's own attributes stay as they are."""
    owned = {XATTR_PREFIX + name for name in fields} - _LISTED
    kept = {key: value for key, value in xattrs.items()
            if key not in owned and not key.startswith(CUSTOM_XATTR_PREFIX)}
    if record is not None:
        for key, value in metadata_xattrs(record).items():
            kept.setdefault(key, value)
    return kept

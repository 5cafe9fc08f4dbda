"""The test server's database: the schema, migrations of older data sets, and
the primitives the stores build on.

Metadata lives in SQLite (``DIR/xnat.sqlite``); file contents live as blobs
under ``DIR/blobs/`` (:mod:`.storefiles`). The store is used from the
server's event loop and from worker threads (DICOM import), so every method
takes ``self._lock``; SQLite itself is opened with ``check_same_thread=False``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from .metadata import EXPERIMENT_FIELDS, SUBJECT_FIELDS


SCHEMA = """
CREATE TABLE IF NOT EXISTS site (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    login TEXT PRIMARY KEY, password TEXT NOT NULL, is_admin INTEGER NOT NULL DEFAULT 0,
    firstname TEXT NOT NULL DEFAULT '', lastname TEXT NOT NULL DEFAULT '',
    email TEXT NOT NULL DEFAULT '', xdat_user_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
    id TEXT PRIMARY KEY, secondary_id TEXT NOT NULL, name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', pi_firstname TEXT NOT NULL DEFAULT '',
    pi_lastname TEXT NOT NULL DEFAULT '', accessibility TEXT NOT NULL DEFAULT 'private',
    prearchive_code INTEGER NOT NULL DEFAULT 0,
    insert_date TEXT NOT NULL, insert_user TEXT NOT NULL,
    last_modified TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS roles (
    project TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    login TEXT NOT NULL REFERENCES users(login) ON DELETE CASCADE,
    role TEXT NOT NULL, PRIMARY KEY (project, login));
CREATE TABLE IF NOT EXISTS subjects (
    id TEXT PRIMARY KEY, project TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    label TEXT NOT NULL, insert_date TEXT NOT NULL, insert_user TEXT NOT NULL,
    gender TEXT NOT NULL DEFAULT '', yob TEXT NOT NULL DEFAULT '',
    last_modified TEXT NOT NULL DEFAULT '', UNIQUE (project, label));
CREATE TABLE IF NOT EXISTS custom_fields (
    kind TEXT NOT NULL CHECK (kind IN ('subject', 'experiment')), owner_id TEXT NOT NULL,
    name TEXT NOT NULL, value TEXT NOT NULL DEFAULT '', PRIMARY KEY (kind, owner_id, name));
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY, project TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    subject_id TEXT NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    label TEXT NOT NULL, xsi_type TEXT NOT NULL, date TEXT NOT NULL DEFAULT '',
    time TEXT NOT NULL DEFAULT '', modality TEXT NOT NULL DEFAULT '', uid TEXT NOT NULL DEFAULT '',
    session_type TEXT NOT NULL DEFAULT '', scanner_manufacturer TEXT NOT NULL DEFAULT '',
    scanner_model TEXT NOT NULL DEFAULT '', field_strength TEXT NOT NULL DEFAULT '',
    insert_date TEXT NOT NULL, insert_user TEXT NOT NULL,
    last_modified TEXT NOT NULL DEFAULT '', UNIQUE (project, label));
CREATE TABLE IF NOT EXISTS scans (
    pk INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    scan_id TEXT NOT NULL, type TEXT NOT NULL DEFAULT '', quality TEXT NOT NULL DEFAULT 'usable',
    xsi_type TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', series_description TEXT NOT NULL DEFAULT '',
    uid TEXT NOT NULL DEFAULT '', frames TEXT NOT NULL DEFAULT '', modality TEXT NOT NULL DEFAULT '',
    insert_date TEXT NOT NULL DEFAULT '', insert_user TEXT NOT NULL DEFAULT '',
    last_modified TEXT NOT NULL DEFAULT '', UNIQUE (experiment_id, scan_id));
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id TEXT REFERENCES experiments(id) ON DELETE CASCADE,
    scan_pk INTEGER REFERENCES scans(pk) ON DELETE CASCADE,
    label TEXT NOT NULL, format TEXT NOT NULL DEFAULT '', content TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '', last_modified TEXT NOT NULL DEFAULT '',
    assessor_id TEXT REFERENCES assessors(id) ON DELETE CASCADE,
    project_id TEXT REFERENCES projects(id) ON DELETE CASCADE,
    subject_id TEXT REFERENCES subjects(id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS assessors (
    id TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    label TEXT NOT NULL, xsi_type TEXT NOT NULL, date TEXT NOT NULL DEFAULT '',
    insert_date TEXT NOT NULL, insert_user TEXT NOT NULL,
    last_modified TEXT NOT NULL DEFAULT '', UNIQUE (experiment_id, label));
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    resource_id INTEGER NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    path TEXT NOT NULL, size INTEGER NOT NULL, digest TEXT NOT NULL, mtime REAL NOT NULL,
    blob TEXT NOT NULL, format TEXT NOT NULL DEFAULT '', content TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '', UNIQUE (resource_id, path));
CREATE TABLE IF NOT EXISTS strays (
    resource_id INTEGER NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    path TEXT NOT NULL, blob TEXT NOT NULL, PRIMARY KEY (resource_id, path));
CREATE TABLE IF NOT EXISTS shares (
    kind TEXT NOT NULL CHECK (kind IN ('subject', 'experiment')), id TEXT NOT NULL,
    project TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE, label TEXT NOT NULL,
    PRIMARY KEY (kind, id, project), UNIQUE (kind, project, label));
CREATE TABLE IF NOT EXISTS tokens (
    alias TEXT PRIMARY KEY, secret TEXT NOT NULL, login TEXT NOT NULL,
    id INTEGER NOT NULL, created INTEGER NOT NULL, expires INTEGER NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS prearc_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL, timestamp TEXT NOT NULL, folder TEXT NOT NULL,
    name TEXT NOT NULL, subject TEXT NOT NULL DEFAULT '', tag TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL, uploaded TEXT NOT NULL, lastmod TEXT NOT NULL,
    scan_date TEXT NOT NULL DEFAULT '', scan_time TEXT NOT NULL DEFAULT '',
    autoarchive TEXT NOT NULL DEFAULT 'Manual', modality TEXT NOT NULL DEFAULT '',
    visit TEXT NOT NULL DEFAULT '', protocol TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '', locked INTEGER NOT NULL DEFAULT 0,
    UNIQUE (project, timestamp, folder));
CREATE TABLE IF NOT EXISTS prearc_files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id INTEGER NOT NULL REFERENCES prearc_sessions(id) ON DELETE CASCADE,
    scan_id TEXT NOT NULL, series_description TEXT NOT NULL DEFAULT '',
    xsi_type TEXT NOT NULL DEFAULT '', series_uid TEXT NOT NULL DEFAULT '',
    resource TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, digest TEXT NOT NULL,
    mtime REAL NOT NULL, blob TEXT NOT NULL, sop_uid TEXT NOT NULL DEFAULT '',
    UNIQUE (session_id, scan_id, resource, path));
"""


def now_stamp() -> str:
    """XNAT's timestamp format for insert dates: ``2023-09-27 17:31:21.352``."""
    return java_timestamp(dt.datetime.now())


def java_timestamp(moment: dt.datetime) -> str:
    """``moment`` as ``java.sql.Timestamp.toString`` prints a database time, which
    is how XNAT's tables show it: milliseconds without trailing zeros, at
    least one digit (``...:21.352``, ``...:21.35``, ``...:25.0``)."""
    fraction = f"{moment.microsecond // 1000:03d}".rstrip("0") or "0"
    return f"{moment:%Y-%m-%d %H:%M:%S}.{fraction}"


def modified_stamp() -> str:
    """A ``last_modified``: a PostgreSQL timestamp as ``java.sql.Timestamp``
    prints it, microseconds with trailing zeros dropped (``...21.35212``)."""
    when = dt.datetime.now()
    return when.strftime("%Y-%m-%d %H:%M:%S.") + (f"{when.microsecond:06d}".rstrip("0") or "0")


# Tables whose rows are XNAT items with a modification time (``meta/last_modified``).
_MODIFIED_TABLES = ("projects", "subjects", "experiments", "scans", "resources", "assessors")


class StoreError(Exception):
    """A refused store operation; the server maps ``status`` onto HTTP."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Database:
    """SQLite metadata plus a blob directory, and the statements every store runs."""

    def __init__(self, root: Path, site_id: str = "XNAT") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(exist_ok=True)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._catalog_versions: dict[int, int] = {}
        self._db = sqlite3.connect(
            self.root / "xnat.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        if self.get_setting("site_id") is None:
            self.set_setting("site_id", site_id)
        self.site_id = self.get_setting("site_id") or site_id

    def _migrate(self) -> None:
        """Data sets made before assessors: their resources gain an owner column.
        Data sets made before modification times: every item row gains
        ``last_modified`` (its insert date, or its session's), scans their
        session's ``insert_date``/``insert_user``. Data sets made before
        demographics and session fields: subjects and experiments gain their
        columns (:mod:`.metadata`), empty; custom variables live in their own
        table, which the schema creates."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(resources)")}
        if "assessor_id" not in columns:
            self._db.execute("ALTER TABLE resources ADD COLUMN assessor_id TEXT"
                             " REFERENCES assessors(id) ON DELETE CASCADE")
        self._migrate_resource_owners()
        scan_columns = {row["name"] for row in self._db.execute("PRAGMA table_info(scans)")}
        for column in ("insert_date", "insert_user"):
            if column not in scan_columns:
                self._db.execute(f"ALTER TABLE scans ADD COLUMN {column} TEXT NOT NULL"
                                 " DEFAULT ''")
                self._db.execute(f"UPDATE scans SET {column} = (SELECT e.{column} FROM"
                                 " experiments e WHERE e.id = scans.experiment_id)")
        for table in _MODIFIED_TABLES:
            names = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if "last_modified" not in names:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN last_modified TEXT"
                                 " NOT NULL DEFAULT ''")
        for table in ("projects", "subjects", "experiments", "scans", "assessors"):
            self._db.execute(f"UPDATE {table} SET last_modified = insert_date"
                             " WHERE last_modified = ''")
        self._db.execute("UPDATE resources SET last_modified = (SELECT e.insert_date FROM"
                         " experiments e WHERE e.id = resources.experiment_id)"
                         " WHERE last_modified = ''")
        for table, fields in (("subjects", SUBJECT_FIELDS), ("experiments", EXPERIMENT_FIELDS)):
            names = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for f in fields:
                if f.column not in names:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {f.column} TEXT"
                                     " NOT NULL DEFAULT ''")
        self._db.execute("DROP INDEX IF EXISTS resources_label")
        self._db.execute("DROP INDEX IF EXISTS resources_owner_label")
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS resources_owner_label2 ON resources"
                         " (IFNULL(project_id, ''), IFNULL(subject_id, ''),"
                         " IFNULL(experiment_id, ''), IFNULL(scan_pk, -1),"
                         " IFNULL(assessor_id, ''), label)")

    def _migrate_resource_owners(self) -> None:
        """Data sets made before project and subject resources: ``resources`` is
        rebuilt in place with a nullable ``experiment_id`` and the owner columns
        ``project_id`` and ``subject_id`` (SQLite cannot drop NOT NULL)."""
        info = {row["name"]: row for row in self._db.execute("PRAGMA table_info(resources)")}
        if "project_id" in info and not info["experiment_id"]["notnull"]:
            return
        old = ", ".join(name for name in info if name not in ("project_id", "subject_id"))
        self._db.execute("PRAGMA foreign_keys = OFF")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DROP TABLE IF EXISTS resources_new")
            create = SCHEMA.split("CREATE TABLE IF NOT EXISTS resources (", 1)[1]
            create = "CREATE TABLE resources_new (" + create.split(";", 1)[0]
            self._db.execute(create)
            self._db.execute(f"INSERT INTO resources_new ({old}) SELECT {old} FROM resources")
            self._db.execute("DROP TABLE resources")
            self._db.execute("ALTER TABLE resources_new RENAME TO resources")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._db.execute("PRAGMA foreign_keys = ON")

    # ------------------------------------------------------------------ basics
    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run several statements atomically (re-entrant under ``_lock``)."""
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def query_one(self, sql: str, args: tuple | list = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def aggregate(self, sql: str, args: tuple | list = ()) -> sqlite3.Row:
        """The row of an aggregate query (COUNT, MAX...), which always has one."""
        row = self.query_one(sql, args)
        assert row is not None, sql
        return row

    def execute(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def insert(self, sql: str, args: tuple | list = ()) -> int:
        """Run an INSERT; the new row's id."""
        rowid = self.execute(sql, args).lastrowid
        assert rowid is not None, sql
        return rowid

    def get_setting(self, key: str) -> str | None:
        row = self.query_one("SELECT value FROM site WHERE key = ?", (key,))
        return row["value"] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.execute("INSERT OR REPLACE INTO site (key, value) VALUES (?, ?)", (key, value))

    def touch(self, table: str, key: str | int) -> None:
        """Record that an item row changed now (its ``meta/last_modified``)."""
        if table not in _MODIFIED_TABLES:
            raise ValueError(table)
        column = {"scans": "pk"}.get(table, "id")
        self.execute(f"UPDATE {table} SET last_modified = ? WHERE {column} = ?",
                     (modified_stamp(), key))

"""Persistent storage for the XNAT-compatible test server.

Metadata lives in SQLite (``DIR/xnat.sqlite``); file contents live as blobs
under ``DIR/blobs/``, named by an opaque id so that nothing the client sends
is ever used as a path on disk. The store knows nothing about HTTP: the
server layer turns its rows into XNAT's response shapes.

The store is used from the server's event loop and from worker threads
(DICOM import), so every method takes ``self._lock``; SQLite itself is opened
with ``check_same_thread=False``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import secrets
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROLES = ("owner", "member", "collaborator")
ACCESSIBILITY = ("public", "protected", "private")

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


@dataclass(frozen=True)
class FileRow:
    id: int
    resource_id: int
    path: str
    size: int
    digest: str
    mtime: float
    blob: str
    format: str = ""
    content: str = ""
    tags: str = ""


class Store:
    """SQLite metadata plus a blob directory; one instance per server."""

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
        session's ``insert_date``/``insert_user``."""
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

    def _next_accession(self, kind: str) -> str:
        """Site-wide accession numbers, ``XNAT_S00001`` / ``XNAT_E00001``."""
        with self.transaction():
            key = f"next_{kind}"
            n = int(self.get_setting(key) or "1")
            self.set_setting(key, str(n + 1))
        return f"{self.site_id}_{kind}{n:05d}"

    # ------------------------------------------------------------------- users
    def add_user(self, login: str, password: str, *, admin: bool = False,
                 firstname: str = "", lastname: str = "") -> None:
        with self.transaction():
            row = self.query_one("SELECT xdat_user_id FROM users WHERE login = ?", (login,))
            if row:
                self.execute("UPDATE users SET password = ?, is_admin = ? WHERE login = ?",
                             (password, int(admin), login))
                return
            n = self.aggregate("SELECT IFNULL(MAX(xdat_user_id), 0) + 1 AS n FROM users")["n"]
            self.execute(
                "INSERT INTO users (login, password, is_admin, firstname, lastname, xdat_user_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (login, password, int(admin), firstname, lastname, n),
            )

    def user(self, login: str) -> sqlite3.Row | None:
        return self.query_one("SELECT * FROM users WHERE login = ?", (login,))

    def check_password(self, login: str, password: str) -> bool:
        row = self.user(login)
        return row is not None and secrets.compare_digest(row["password"], password)

    # ------------------------------------------------------------------ tokens
    def issue_token(self, login: str, lifetime_ms: int = 2 * 24 * 3600 * 1000) -> sqlite3.Row:
        import time

        now = int(time.time() * 1000)
        alias = str(uuid.uuid4())
        secret = secrets.token_urlsafe(48).replace("-", "A").replace("_", "b")[:64]
        with self.transaction():
            n = self.aggregate("SELECT IFNULL(MAX(id), 0) + 1 AS n FROM tokens")["n"]
            self.execute(
                "INSERT INTO tokens (alias, secret, login, id, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (alias, secret, login, n, now, now + lifetime_ms),
            )
        return self.token(alias)  # type: ignore[return-value]

    def token(self, alias: str) -> sqlite3.Row | None:
        return self.query_one("SELECT * FROM tokens WHERE alias = ?", (alias,))

    def check_token(self, alias: str, secret: str) -> str | None:
        """The login an alias:secret pair stands for, or None."""
        import time

        row = self.token(alias)
        if row is None or not row["enabled"] or row["expires"] < time.time() * 1000:
            return None
        if not secrets.compare_digest(row["secret"], secret):
            return None
        return row["login"]

    def invalidate_token(self, alias: str) -> bool:
        return self.execute("UPDATE tokens SET enabled = 0 WHERE alias = ?", (alias,)).rowcount > 0

    # ---------------------------------------------------------------- projects
    def add_project(self, project_id: str, *, name: str | None = None, description: str = "",
                    accessibility: str = "private", owner: str = "admin",
                    secondary_id: str | None = None, pi: tuple[str, str] = ("", "")) -> None:
        if accessibility not in ACCESSIBILITY:
            raise ValueError(accessibility)
        with self.transaction():
            if self.project(project_id):
                raise StoreError(409, "Project already exists.")
            self.execute(
                "INSERT INTO projects (id, secondary_id, name, description, pi_firstname,"
                " pi_lastname, accessibility, insert_date, insert_user, last_modified)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (project_id, secondary_id or project_id, name or project_id, description,
                 pi[0], pi[1], accessibility, now_stamp(), owner, modified_stamp()),
            )
            self.set_role(project_id, owner, "owner")

    def project(self, project_id: str) -> sqlite3.Row | None:
        """A project by ID or secondary ID (XNAT accepts aliases in URLs)."""
        return self.query_one(
            "SELECT * FROM projects WHERE id = ? OR (secondary_id = ? AND id NOT IN"
            " (SELECT id FROM projects WHERE id = ?)) ORDER BY id = ? DESC LIMIT 1",
            (project_id, project_id, project_id, project_id),
        )

    def projects(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM projects ORDER BY id")

    def set_role(self, project_id: str, login: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(role)
        self.execute("INSERT OR REPLACE INTO roles (project, login, role) VALUES (?, ?, ?)",
                     (project_id, login, role))

    def role(self, project_id: str, login: str) -> str | None:
        row = self.query_one("SELECT role FROM roles WHERE project = ? AND login = ?",
                             (project_id, login))
        return row["role"] if row else None

    # ---------------------------------------------------------------- subjects
    def add_subject(self, project_id: str, label: str, *, user: str = "admin",
                    gender: str = "", yob: str = "") -> str:
        with self.transaction():
            if self.subject(project_id, label):
                raise StoreError(409, "Subject already exists.")
            sid = self._next_accession("S")
            self.execute(
                "INSERT INTO subjects (id, project, label, insert_date, insert_user, gender, yob,"
                " last_modified) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, project_id, label, now_stamp(), user, gender, yob, modified_stamp()),
            )
        return sid

    def subject(self, project_id: str | None, id_or_label: str) -> sqlite3.Row | None:
        """By accession ID anywhere, or by ID or label within a project (its own
        subjects, and those shared into it under their label there)."""
        if project_id is None:
            return self.query_one("SELECT * FROM subjects WHERE id = ?", (id_or_label,))
        return self.query_one(
            "SELECT s.* FROM subjects s LEFT JOIN shares h"
            " ON h.kind = 'subject' AND h.id = s.id AND h.project = ?"
            " WHERE (s.project = ? AND (s.id = ? OR s.label = ?))"
            " OR (h.id IS NOT NULL AND (s.id = ? OR h.label = ?))"
            " ORDER BY s.id = ? DESC LIMIT 1",
            (project_id, project_id, *([id_or_label] * 5)),
        )

    def share(self, kind: str, object_id: str, project_id: str, label: str) -> None:
        """Share a subject or experiment into another project, under ``label`` there
        (XNAT's ``xnat:projectParticipant`` / ``xnat:experimentData_share``)."""
        table = {"subject": "subjects", "experiment": "experiments"}[kind]
        with self.transaction():
            row = self.query_one(f"SELECT project FROM {table} WHERE id = ?", (object_id,))
            if row is None:
                raise StoreError(404, f"Unable to find {kind} {object_id}.")
            if row["project"] == project_id:
                raise StoreError(409, f"Already owned by project {project_id}.")
            taken = getattr(self, kind)(project_id, label)
            if taken is not None and taken["id"] != object_id:
                raise StoreError(409, f"Label {label} is already used in {project_id}.")
            self.execute("INSERT OR REPLACE INTO shares (kind, id, project, label)"
                         " VALUES (?, ?, ?, ?)", (kind, object_id, project_id, label))
            self.touch(table, object_id)

    # ------------------------------------------------------------- experiments
    def add_experiment(self, project_id: str, subject_id: str, label: str, xsi_type: str, *,
                       user: str = "admin", **fields: str) -> str:
        allowed = {"date", "time", "modality", "uid", "session_type", "scanner_manufacturer",
                   "scanner_model", "field_strength"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown experiment fields {unknown}")
        with self.transaction():
            if self.experiment(project_id, label):
                raise StoreError(409, "Specified experiment already exists.")
            eid = self._next_accession("E")
            cols = ["id", "project", "subject_id", "label", "xsi_type", "insert_date",
                    "insert_user", "last_modified", *fields]
            vals = [eid, project_id, subject_id, label, xsi_type, now_stamp(), user,
                    modified_stamp(), *fields.values()]
            self.execute(
                f"INSERT INTO experiments ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                vals,
            )
        return eid

    def experiment(self, project_id: str | None, id_or_label: str) -> sqlite3.Row | None:
        if project_id is None:
            return self.query_one("SELECT * FROM experiments WHERE id = ?", (id_or_label,))
        return self.query_one(
            "SELECT e.* FROM experiments e LEFT JOIN shares h"
            " ON h.kind = 'experiment' AND h.id = e.id AND h.project = ?"
            " WHERE (e.project = ? AND (e.id = ? OR e.label = ?))"
            " OR (h.id IS NOT NULL AND (e.id = ? OR h.label = ?))"
            " ORDER BY e.id = ? DESC LIMIT 1",
            (project_id, project_id, *([id_or_label] * 5)),
        )

    # ------------------------------------------------------------------- scans
    def add_scan(self, experiment_id: str, scan_id: str, xsi_type: str, *, user: str = "admin",
                 **fields: str) -> int:
        allowed = {"type", "quality", "note", "series_description", "uid", "frames", "modality"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown scan fields {unknown}")
        with self.transaction():
            if self.scan(experiment_id, scan_id):
                raise StoreError(409, "Specified scan already exists.")
            cols = ["experiment_id", "scan_id", "xsi_type", "insert_date", "insert_user",
                    "last_modified", *fields]
            return self.insert(
                f"INSERT INTO scans ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [experiment_id, scan_id, xsi_type, now_stamp(), user, modified_stamp(),
                 *fields.values()],
            )

    def scan(self, experiment_id: str, scan_id: str) -> sqlite3.Row | None:
        return self.query_one("SELECT * FROM scans WHERE experiment_id = ? AND scan_id = ?",
                              (experiment_id, scan_id))

    def scans(self, experiment_id: str) -> list[sqlite3.Row]:
        return self.query(
            "SELECT * FROM scans WHERE experiment_id = ? ORDER BY "
            "CAST(scan_id AS INTEGER), scan_id", (experiment_id,))

    # --------------------------------------------------------------- resources
    def add_resource(self, experiment_id: str, scan_pk: int | None, label: str, *,
                     format: str = "", content: str = "", tags: str = "",
                     assessor_id: str | None = None) -> int:
        """A resource of a session (``scan_pk`` and ``assessor_id`` None), of one of
        its scans, or an output resource of one of its assessors."""
        with self.transaction():
            if self.resource(experiment_id, scan_pk, label, assessor_id=assessor_id):
                raise StoreError(409, "Specified resource already exists.")
            return self.insert(
                "INSERT INTO resources (experiment_id, scan_pk, assessor_id, label, format,"
                " content, tags, last_modified) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, scan_pk, assessor_id, label, format, content, tags,
                 modified_stamp()),
            )

    def resource(self, experiment_id: str, scan_pk: int | None, label_or_id: str, *,
                 assessor_id: str | None = None) -> sqlite3.Row | None:
        """A resource by label, or by its numeric id, at one level."""
        rows = self.query(
            "SELECT * FROM resources WHERE experiment_id = ? AND scan_pk IS ?"
            " AND assessor_id IS ? AND (label = ? OR CAST(id AS TEXT) = ?)"
            " ORDER BY label = ? DESC",
            (experiment_id, scan_pk, assessor_id, label_or_id, label_or_id, label_or_id),
        )
        return rows[0] if rows else None

    def resources(self, experiment_id: str, scan_pk: int | None, *,
                  assessor_id: str | None = None) -> list[sqlite3.Row]:
        return self.query(
            "SELECT * FROM resources WHERE experiment_id = ? AND scan_pk IS ?"
            " AND assessor_id IS ? ORDER BY id", (experiment_id, scan_pk, assessor_id))

    # A project's or a subject's own resources (``owner`` "project" or "subject").
    def add_owned_resource(self, owner: str, owner_id: str, label: str, *, format: str = "",
                           content: str = "", tags: str = "") -> int:
        column = _owner_column(owner)
        with self.transaction():
            if self.owned_resource(owner, owner_id, label):
                raise StoreError(409, "Specified resource already exists.")
            return self.insert(
                f"INSERT INTO resources ({column}, label, format, content, tags,"
                " last_modified) VALUES (?, ?, ?, ?, ?, ?)",
                (owner_id, label, format, content, tags, modified_stamp()))

    def owned_resource(self, owner: str, owner_id: str, label_or_id: str) -> sqlite3.Row | None:
        rows = self.query(
            f"SELECT * FROM resources WHERE {_owner_column(owner)} = ?"
            " AND (label = ? OR CAST(id AS TEXT) = ?) ORDER BY label = ? DESC",
            (owner_id, label_or_id, label_or_id, label_or_id))
        return rows[0] if rows else None

    def owned_resources(self, owner: str, owner_id: str) -> list[sqlite3.Row]:
        return self.query(f"SELECT * FROM resources WHERE {_owner_column(owner)} = ?"
                          " ORDER BY id", (owner_id,))

    def catalog_version(self, resource_id: int) -> int:
        """How many times a resource's catalog has been written since the server
        started: what XNAT's catalog checksum tells a writer (see ``filewrites``)."""
        return self._catalog_versions.get(resource_id, 0)

    def _catalog_written(self, resource_id: int) -> None:
        self._catalog_versions[resource_id] = self.catalog_version(resource_id) + 1

    # A file on the resource's disk that its catalog does not list (an upload
    # whose catalog write failed): XNAT still sees it as a duplicate.
    def add_stray(self, resource_id: int, path: str, blob: str) -> None:
        old = self.stray(resource_id, path)
        self.execute("INSERT OR REPLACE INTO strays (resource_id, path, blob) VALUES (?, ?, ?)",
                     (resource_id, path, blob))
        if old is not None:
            self._drop_blob(old)

    def stray(self, resource_id: int, path: str) -> str | None:
        row = self.query_one("SELECT blob FROM strays WHERE resource_id = ? AND path = ?",
                             (resource_id, path))
        return row["blob"] if row else None

    def drop_stray(self, resource_id: int, path: str) -> None:
        blob = self.stray(resource_id, path)
        if blob is not None:
            self.execute("DELETE FROM strays WHERE resource_id = ? AND path = ?",
                         (resource_id, path))
            self._drop_blob(blob)

    def on_disk(self, resource_id: int, path: str) -> bool:
        """Whether ``path`` exists in the resource's folder, catalogued or not."""
        return self.file(resource_id, path) is not None or self.stray(resource_id, path) \
            is not None

    def assessor_resources(self, experiment_id: str) -> list[sqlite3.Row]:
        """The output resources of every assessor of a session, assessor by assessor."""
        return self.query(
            "SELECT * FROM resources WHERE experiment_id = ? AND assessor_id IS NOT NULL"
            " ORDER BY assessor_id, id", (experiment_id,))

    # --------------------------------------------------------------- assessors
    def add_assessor(self, experiment_id: str, label: str, xsi_type: str, *,
                     date: str = "", user: str = "admin") -> str:
        """An image assessor of a session (QC, FreeSurfer...): an experiment of its
        own in XNAT, numbered as experiments are."""
        with self.transaction():
            if self.assessor(experiment_id, label):
                raise StoreError(409, "Specified assessor already exists.")
            assessor_id = self._next_accession("E")
            self.execute("INSERT INTO assessors (id, experiment_id, label, xsi_type, date,"
                         " insert_date, insert_user, last_modified)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (assessor_id, experiment_id, label, xsi_type, date, now_stamp(), user,
                          modified_stamp()))
        return assessor_id

    def assessor(self, experiment_id: str, id_or_label: str) -> sqlite3.Row | None:
        return self.query_one(
            "SELECT * FROM assessors WHERE experiment_id = ? AND (id = ? OR label = ?)"
            " ORDER BY id = ? DESC LIMIT 1", (experiment_id, *([id_or_label] * 3)))

    def assessors(self, experiment_id: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM assessors WHERE experiment_id = ? ORDER BY id",
                          (experiment_id,))

    def resource_totals(self, resource_id: int) -> tuple[int, int]:
        row = self.aggregate(
            "SELECT COUNT(*) AS n, IFNULL(SUM(size), 0) AS s FROM files WHERE resource_id = ?",
            (resource_id,))
        return int(row["n"]), int(row["s"])

    def delete_resource(self, resource_id: int) -> None:
        blobs = [r["blob"] for r in self.query(
            "SELECT blob FROM files WHERE resource_id = ?"
            " UNION ALL SELECT blob FROM strays WHERE resource_id = ?",
            (resource_id, resource_id))]
        self.execute("DELETE FROM resources WHERE id = ?", (resource_id,))
        for blob in blobs:
            self._drop_blob(blob)

    # ------------------------------------------------------------------- files
    def files(self, resource_id: int) -> list[FileRow]:
        return [self._file_row(r) for r in self.query(
            "SELECT * FROM files WHERE resource_id = ? ORDER BY path", (resource_id,))]

    def file(self, resource_id: int, path: str) -> FileRow | None:
        row = self.query_one("SELECT * FROM files WHERE resource_id = ? AND path = ?",
                             (resource_id, path))
        return self._file_row(row) if row else None

    @staticmethod
    def _file_row(row: sqlite3.Row) -> FileRow:
        return FileRow(**{k: row[k] for k in row.keys()})

    def blob_path(self, blob: str) -> Path:
        return self.blob_dir / blob[:2] / blob

    def new_blob_file(self) -> tuple[str, Path]:
        """A fresh blob id and the path to write it to (directories made)."""
        blob = uuid.uuid4().hex
        path = self.blob_path(blob)
        path.parent.mkdir(exist_ok=True)
        return blob, path

    def store_blob_from_path(self, source: Path, *, move: bool = False) -> tuple[str, int, str]:
        """Copy (or move) a local file into the blob store: (blob, size, md5)."""
        blob, dest = self.new_blob_file()
        if move:
            os.replace(source, dest)
        else:
            shutil.copyfile(source, dest)
        return blob, dest.stat().st_size, md5_file(dest)

    def store_blob_bytes(self, data: bytes) -> tuple[str, int, str]:
        blob, dest = self.new_blob_file()
        dest.write_bytes(data)
        return blob, len(data), hashlib.md5(data).hexdigest()

    def add_file(self, resource_id: int, path: str, blob: str, size: int, digest: str, *,
                 format: str = "", content: str = "", tags: str = "",
                 overwrite: bool = False) -> bool:
        """Attach a blob as ``path`` in a resource. False if it exists and not overwrite."""
        with self.transaction():
            old = self.file(resource_id, path)
            if old and not overwrite:
                return False
            mtime = self.blob_path(blob).stat().st_mtime
            if old:
                self.execute("DELETE FROM files WHERE id = ?", (old.id,))
            self.execute(
                "INSERT INTO files (resource_id, path, size, digest, mtime, blob, format,"
                " content, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (resource_id, path, size, digest, mtime, blob, format, content, tags),
            )
            self.touch("resources", resource_id)  # its file_count and file_size change
            self._catalog_written(resource_id)
        if old:
            self._drop_blob(old.blob)
        return True

    def delete_file(self, file: FileRow) -> None:
        with self.transaction():
            self.execute("DELETE FROM files WHERE id = ?", (file.id,))
            self.touch("resources", file.resource_id)
            self._catalog_written(file.resource_id)
        self._drop_blob(file.blob)

    def touch(self, table: str, key: str | int) -> None:
        """Record that an item row changed now (its ``meta/last_modified``)."""
        if table not in _MODIFIED_TABLES:
            raise ValueError(table)
        column = {"scans": "pk"}.get(table, "id")
        self.execute(f"UPDATE {table} SET last_modified = ? WHERE {column} = ?",
                     (modified_stamp(), key))

    def _drop_blob(self, blob: str) -> None:
        # Blobs may be shared after a prearchive session is archived by reference.
        still_used = self.query_one(
            "SELECT 1 FROM files WHERE blob = ? UNION SELECT 1 FROM prearc_files WHERE blob = ?"
            " UNION SELECT 1 FROM strays WHERE blob = ?", (blob, blob, blob))
        if not still_used:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(blob).unlink()


def _owner_column(owner: str) -> str:
    return {"project": "project_id", "subject": "subject_id"}[owner]


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

"""Persistent storage for the XNAT-compatible test server.

The store knows nothing about HTTP: the server layer turns its rows into
XNAT's response shapes. It is built in three layers: :mod:`.storedb` (the
schema, migrations, the SQL primitives), :mod:`.storefiles` (resources,
files and blobs) and this module (users, tokens, projects, subjects,
experiments, scans, assessors and sharing).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
import sqlite3
import uuid

from .metadata import EXPERIMENT_FIELDS, SUBJECT_FIELDS
from .storedb import StoreError, modified_stamp, now_stamp
from .storefiles import ResourceFiles

ROLES = ("owner", "member", "collaborator")
ACCESSIBILITY = ("public", "protected", "private")


class _Column:
    """A store column with no XNAT shortcut of its own here."""

    def __init__(self, column: str) -> None:
        self.column = column


# The experiment columns the store always had.
_EXPERIMENT_BASE = tuple(_Column(c) for c in (
    "date", "time", "modality", "uid", "session_type", "scanner_manufacturer",
    "scanner_model", "field_strength"))


def _check_columns(values: dict, fields: tuple) -> None:
    """Column names come from code, never from a request: refuse strays."""
    known = {f.column for f in fields}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")


class Store(ResourceFiles):
    """The test server's data: one instance per server."""

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
                    custom: dict[str, str] | None = None, **values: str) -> str:
        """A new subject; ``values`` are metadata columns (``gender``,
        ``subject_group``...: :data:`.metadata.SUBJECT_FIELDS`), ``custom`` its
        custom variables."""
        _check_columns(values, SUBJECT_FIELDS)
        with self.transaction():
            if self.subject(project_id, label):
                raise StoreError(409, "Subject already exists.")
            sid = self._next_accession("S")
            cols = ["id", "project", "label", "insert_date", "insert_user", "last_modified",
                    *values]
            self.execute(
                f"INSERT INTO subjects ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [sid, project_id, label, now_stamp(), user, modified_stamp(), *values.values()])
            self.set_custom_fields("subject", sid, dict(custom or {}))
        return sid

    def update_subject(self, subject_id: str, values: dict[str, str],
                       custom: dict[str, str | None] | None = None) -> None:
        """Change a subject's metadata columns and custom variables (a None
        value removes that variable)."""
        self._update("subjects", "subject", subject_id, values, SUBJECT_FIELDS, custom)

    def update_experiment(self, experiment_id: str, values: dict[str, str],
                          custom: dict[str, str | None] | None = None) -> None:
        """Change an experiment's columns and custom variables."""
        self._update("experiments", "experiment", experiment_id, values,
                     (*EXPERIMENT_FIELDS, *_EXPERIMENT_BASE), custom)

    def _update(self, table: str, kind: str, key: str, values: dict[str, str],
                fields: tuple, custom: dict[str, str | None] | None) -> None:
        _check_columns(values, fields)
        with self.transaction():
            if values:
                sets = ", ".join(f"{column} = ?" for column in values)
                self.execute(f"UPDATE {table} SET {sets} WHERE id = ?", [*values.values(), key])
            self.set_custom_fields(kind, key, custom or {})
            if values or custom:
                self.touch(table, key)

    # ------------------------------------------------------- custom variables
    def set_custom_fields(self, kind: str, owner_id: str,
                          fields: Mapping[str, str | None]) -> None:
        """Set (or, for None, remove) custom variables of a subject or experiment."""
        for name, value in fields.items():
            if value is None:
                self.execute("DELETE FROM custom_fields WHERE kind = ? AND owner_id = ?"
                             " AND name = ?", (kind, owner_id, name))
            else:
                self.execute("INSERT INTO custom_fields (kind, owner_id, name, value)"
                             " VALUES (?, ?, ?, ?) ON CONFLICT (kind, owner_id, name)"
                             " DO UPDATE SET value = excluded.value",
                             (kind, owner_id, name, value))

    def custom_fields(self, kind: str, owner_id: str) -> list[sqlite3.Row]:
        """A subject's or experiment's custom variables (rowid, name, value),
        in the order they were first set."""
        return self.query("SELECT rowid, name, value FROM custom_fields WHERE kind = ?"
                          " AND owner_id = ? ORDER BY rowid", (kind, owner_id))

    def custom_fields_of(self, kind: str, owner_ids: list[str]) -> dict[str, list[sqlite3.Row]]:
        """Custom variables of many owners at once (one query for a listing)."""
        out: dict[str, list[sqlite3.Row]] = {i: [] for i in owner_ids}
        for row in self.query("SELECT rowid, owner_id, name, value FROM custom_fields"
                              " WHERE kind = ? ORDER BY rowid", (kind,)):
            if row["owner_id"] in out:
                out[row["owner_id"]].append(row)
        return out

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
                       user: str = "admin", custom: dict[str, str] | None = None,
                       **fields: str) -> str:
        _check_columns(fields, (*EXPERIMENT_FIELDS, *_EXPERIMENT_BASE))
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
            self.set_custom_fields("experiment", eid, dict(custom or {}))
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

"""Resources, their files and the blobs behind them, at every level XNAT has
resources (project, subject, session, scan, assessor).

Blobs are named by an opaque id, so that nothing a client sends is ever used
as a path on disk. XNAT's catalog quirks live here too: its catalog version
(concurrent writers of one catalog fail), and files on disk but not in the
catalog (strays).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from .storedb import Database, StoreError, modified_stamp


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


class ResourceFiles(Database):
    """Resources and files; :class:`~.store.Store` adds the objects that own them."""

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

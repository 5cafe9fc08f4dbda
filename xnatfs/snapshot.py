"""Pinned listings for reproducible runs: the snapshot file, taken from a
folder of a running mount (``xnatfs snapshot PATH``) and read back for
``xnatfs mount --snapshot FILE``.

A snapshot is one JSON document, keys sorted, so that two snapshots of the
same data differ only in ``taken_at``::

    {
      "format": "xnatfs-snapshot",
      "version": 1,
      "site": "https://xnat.example.org",     # the mount's site
      "taken_at": "2026-12-07T05:40:00Z",     # UTC
      "xnatfs_version": "0.1.0",
      "path": "NEURO_PUB/NP001/NP001_MR1",    # what was recorded, below the mount root
      "folders": {                            # every folder on the way and below it
        "NEURO_PUB": {"xnat": {"id": "NEURO_PUB", "uri": "/data/projects/NEURO_PUB", ...}},
        ...
      },
      "files": {                              # every file XNAT lists below it
        "NEURO_PUB/.../files/1.dcm": {"size": 1234, "md5": "9e10..." or null,
                                      "uri": "/data/experiments/.../files/1.dcm",
                                      "xnat": {"resource": "DICOM", ...}},
        ...
      }
    }

Paths are names as the mount shows them, joined with ``/``. Only files that
XNAT lists are recorded (they carry ``user.xnat.uri``); the documents and
tables the mount makes (``session.xml``, ``subjects.csv``), links and files
not yet sent are not, since nothing pins their content. Taking a snapshot
needs no credentials: everything comes from the mount, its attributes
(``user.xnat.uri``, ``user.xnat.digest``) and its status file (the site).

Pure file I/O, no HTTP: the CLI takes snapshots, the mount reads them.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "xnatfs-snapshot"
VERSION = 1
# The attributes of folders kept in a snapshot: what says which object a folder
# is; never a subject's or session's fields, nor a session's date (they may
# identify a patient).
FOLDER_XATTRS = ("id", "label", "uri", "xsi_type", "type", "format",
                 "series_description", "quality", "name")
FILE_XATTRS = ("resource", "resource_id")
PROJECT_TYPE = "xnat:projectData"


class SnapshotError(Exception):
    """A snapshot cannot be taken or read; the message says why, for the user."""


@dataclass(frozen=True)
class SnapshotFile:
    size: int
    md5: str | None
    uri: str
    xnat: dict[str, str] = field(default_factory=dict)


@dataclass
class Snapshot:
    """A snapshot as the mount serves it."""

    site: str
    taken_at_ns: int
    files: dict[str, SnapshotFile]
    folder_xattrs: dict[str, dict[str, str]]
    children: dict[str, list[str]]  # folder path ("" for the root) -> its sorted names

    def is_file(self, path: str) -> bool:
        return path in self.files


# ------------------------------------------------------------------ taking
def mount_root(path: Path) -> Path:
    """The xnatfs mount ``path`` is in (the nearest mount point above it)."""
    here = path
    while not os.path.ismount(here):
        if here.parent == here:
            break
        here = here.parent
    return here


def take(path: Path, *, site: str, version: str, root: Path | None = None) -> dict[str, Any]:
    """The snapshot of ``path``, a project folder of a mount or a folder below
    one, as a JSON-ready document. Runs outside the mount (the CLI)."""
    path = Path(os.path.abspath(path))
    root = mount_root(path) if root is None else root
    relative = path.relative_to(root).parts
    if not relative or not path.is_dir():
        raise SnapshotError(f"{path} is not a folder below a project of the mount at {root}")
    if _xattr(root / relative[0], "xsi_type") != PROJECT_TYPE:
        raise SnapshotError(f"{root / relative[0]} is not a project folder of the mount")
    folders: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, Any]] = {}
    for depth in range(1, len(relative) + 1):  # the folders on the way down to PATH
        folders["/".join(relative[:depth])] = {"xnat": _folder_xattrs(root.joinpath(
            *relative[:depth]))}
    _walk(path, "/".join(relative), folders, files)
    return {
        "format": FORMAT, "version": VERSION, "site": site,
        "taken_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "xnatfs_version": version, "path": "/".join(relative),
        "folders": folders, "files": files,
    }


def _walk(folder: Path, shown: str, folders: dict[str, dict[str, Any]],
          files: dict[str, dict[str, Any]]) -> None:
    with os.scandir(folder) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        path = f"{shown}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            folders[path] = {"xnat": _folder_xattrs(Path(entry.path))}
            _walk(Path(entry.path), path, folders, files)
        elif entry.is_file(follow_symlinks=False):
            uri = _xattr(Path(entry.path), "uri")
            if uri is None:  # made by the mount (a document, a table), or not sent yet
                continue
            files[path] = {
                "size": entry.stat(follow_symlinks=False).st_size,
                "md5": _xattr(Path(entry.path), "digest"), "uri": uri,
                "xnat": {k: v for k in FILE_XATTRS
                         if (v := _xattr(Path(entry.path), k)) is not None}}


def _folder_xattrs(path: Path) -> dict[str, str]:
    return {k: v for k in FOLDER_XATTRS if (v := _xattr(path, k)) is not None}


def _xattr(path: Path, key: str) -> str | None:
    try:
        return os.getxattr(path, f"user.xnat.{key}", follow_symlinks=False).decode(
            "utf-8", "surrogateescape")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def dumps(document: dict[str, Any]) -> str:
    """The document as written: sorted keys, one entry per line."""
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


# ----------------------------------------------------------------- reading
def load(path: Path) -> Snapshot:
    """Read and check a snapshot file (names in it are never trusted as paths)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SnapshotError(f"{path} is not a snapshot (not JSON: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not an xnatfs snapshot")
    if document.get("version") != VERSION:
        raise SnapshotError(f"{path} is a snapshot of version {document.get('version')!r}; "
                            f"this xnatfs reads version {VERSION}")
    try:
        return _parse(document)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"{path} is a damaged snapshot: {exc!r}") from None


def _parse(document: dict[str, Any]) -> Snapshot:
    taken = dt.datetime.strptime(document["taken_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc)
    files: dict[str, SnapshotFile] = {}
    for path, entry in document["files"].items():
        _check_path(path)
        uri, size, md5 = entry["uri"], entry["size"], entry.get("md5")
        if not isinstance(uri, str) or not uri.startswith("/data/") \
                or ".." in uri.split("/") or "?" in uri or "#" in uri:
            raise ValueError(f"not a file's URI in XNAT: {uri!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"not a size: {size!r}")
        if md5 is not None and not (isinstance(md5, str) and len(md5) == 32
                                    and all(c in "0123456789abcdef" for c in md5.lower())):
            raise ValueError(f"not an MD5 digest: {md5!r}")
        files[path] = SnapshotFile(size, md5.lower() if md5 else None, uri,
                                   _strings(entry.get("xnat", {})))
    folder_xattrs = {}
    for path, entry in document["folders"].items():
        _check_path(path)
        folder_xattrs[path] = _strings(entry.get("xnat", {}))
    children: dict[str, set[str]] = {"": set()}
    for path in [*folder_xattrs, *files]:  # every folder on the way has its entries
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            if parent in files:
                raise ValueError(f"{parent!r} is both a file and a folder")
            children.setdefault(parent, set()).add(parts[depth])
    for path in files:
        if path in children:
            raise ValueError(f"{path!r} is both a file and a folder")
    return Snapshot(site=str(document["site"]), taken_at_ns=int(taken.timestamp()) * 10**9,
                    files=files, folder_xattrs=folder_xattrs,
                    children={k: sorted(v) for k, v in children.items()})


def _check_path(path: str) -> None:
    if not isinstance(path, str) or not path or any(
            part in ("", ".", "..") or "\0" in part for part in path.split("/")):
        raise ValueError(f"not a path in the mount: {path!r}")


def _strings(values: Any) -> dict[str, str]:
    if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise ValueError(f"not a table of attributes: {values!r}")
    return dict(values)

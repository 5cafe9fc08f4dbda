"""The snapshot file read back (xnatfs.snapshot.load): what a mount serves from
it, and what it refuses (names in it are never trusted as paths). Taking
snapshots and serving them are tested through real mounts in
tests/mount/test_snapshot.py."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from xnatfs.snapshot import SnapshotError, dumps, load

MD5 = "0123456789abcdef0123456789abcdef"


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": "xnatfs-snapshot", "version": 1, "site": "https://xnat.example.org",
        "taken_at": "2026-12-07T05:40:00Z", "xnatfs_version": "0.1.0", "path": "P/S",
        "folders": {"P": {"xnat": {"id": "P"}}, "P/S": {"xnat": {}},
                    "P/S/empty": {"xnat": {}}},
        "files": {"P/S/r/files/a.dcm": {"size": 3, "md5": MD5, "uri": "/data/x/files/a.dcm",
                                        "xnat": {"resource": "r"}},
                  "P/S/r/files/b": {"size": 0, "md5": None, "uri": "/data/x/files/b"}},
    }
    doc.update(changes)
    return doc


def written(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "snap.json"
    path.write_text(dumps(doc))
    return path


def test_folders_and_files_as_the_mount_serves_them(tmp_path: Path) -> None:
    snap = load(written(tmp_path, document()))
    assert snap.site == "https://xnat.example.org"
    taken = dt.datetime(2026, 12, 7, 5, 40, tzinfo=dt.timezone.utc)
    assert snap.taken_at_ns == int(taken.timestamp()) * 10**9
    assert snap.children[""] == ["P"]
    assert snap.children["P/S"] == ["empty", "r"]  # folders on the way are implied
    assert snap.children["P/S/r/files"] == ["a.dcm", "b"]
    assert snap.children.get("P/S/empty", []) == []
    assert snap.files["P/S/r/files/a.dcm"].md5 == MD5
    assert snap.files["P/S/r/files/b"].md5 is None
    assert snap.folder_xattrs["P"] == {"id": "P"}


def test_output_is_sorted_and_stable() -> None:
    doc = document()
    text = dumps(doc)
    assert text == dumps(json.loads(text))
    assert list(json.loads(text)) == sorted(doc)


@pytest.mark.parametrize("change", [
    {"version": 2},
    {"format": "something-else"},
    {"files": {"P/../etc/passwd": {"size": 1, "md5": None, "uri": "/data/x"}}},
    {"files": {"/P/a": {"size": 1, "md5": None, "uri": "/data/x"}}},
    {"files": {"P//a": {"size": 1, "md5": None, "uri": "/data/x"}}},
    {"files": {"P/a": {"size": 1, "md5": None, "uri": "https://elsewhere/x"}}},
    {"files": {"P/a": {"size": 1, "md5": None, "uri": "/data/../x"}}},
    {"files": {"P/a": {"size": -1, "md5": None, "uri": "/data/x"}}},
    {"files": {"P/a": {"size": 1, "md5": "nothex", "uri": "/data/x"}}},
    {"files": {"P/a": {"size": 1, "md5": None, "uri": "/data/x"},
               "P/a/b": {"size": 1, "md5": None, "uri": "/data/y"}}},
    {"folders": {"P": {"xnat": {"id": 3}}}},
    {"taken_at": "yesterday"},
])
def test_damaged_or_foreign_snapshots_are_refused(tmp_path: Path,
                                                  change: dict[str, Any]) -> None:
    with pytest.raises(SnapshotError):
        load(written(tmp_path, document(**change)))


def test_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    path.write_text("{")
    with pytest.raises(SnapshotError, match="not JSON"):
        load(path)

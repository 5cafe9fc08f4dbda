"""The spool's records on disk: kept uploads outlive an upgrade both ways, and a
destination's own details survive a round trip."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from xnatfs.imports import UploadManager, import_local_copy
from xnatfs.spoolfiles import UploadRecord, kept_uploads, read_record, write_record

# A failed upload's meta.json as xnatfs wrote it before the spool was split out
# of xnatfs/uploads.py (direct_archive among the record's own fields).
EARLIER_RECORD = {
    "id": "0123abcd", "project": "NEURO_PUB", "relpath": "subject=S01/scan.dcm",
    "kind": "dicom", "state": "failed", "size": 1234, "message": "HTTP 500", "result": [],
    "created": 1700000000.5, "finished": 1700000001.25, "direct_archive": True,
    "site": "https://xnat.example.org", "mtime_ns": None, "incomplete": False}
SITE = "https://xnat.example.org"


def keep(spool_root: Path, record: dict) -> Path:
    spool_dir = spool_root / record["id"]
    spool_dir.mkdir(parents=True)
    (spool_dir / "meta.json").write_text(json.dumps(record))
    (spool_dir / "data").write_bytes(b"\0" * 128 + b"DICM")
    return spool_dir


class _Importer:
    """Records what an import was asked for."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def import_archive(self, body: Path | AsyncIterator[bytes], **kwargs: object) -> list[str]:
        self.calls.append(kwargs)
        return ["/data/prearchive/projects/P/T/S"]

    async def import_dicom_file(self, path: Path, **kwargs: object) -> str:
        self.calls.append(kwargs)
        return "/data/prearchive/projects/P/T/S"


async def test_an_earlier_versions_kept_upload_is_listed_and_retried_as_it_was(
        tmp_path: Path) -> None:
    spool_dir = keep(tmp_path, EARLIER_RECORD)
    [(record, where)] = kept_uploads(tmp_path)
    assert where == spool_dir and record.destination == {"direct_archive": True}
    assert (record.id, record.state, record.relpath, record.site) == (
        "0123abcd", "failed", "subject=S01/scan.dcm", SITE)
    importer = _Importer()
    await import_local_copy(importer, record, spool_dir / "data", b"")  # type: ignore[arg-type]
    assert importer.calls == [{"project": "NEURO_PUB", "subject": "S01", "session": None,
                               "direct_archive": True}]


async def test_an_earlier_versions_failed_upload_is_shown_again_by_a_mount(
        tmp_path: Path) -> None:
    keep(tmp_path, EARLIER_RECORD)
    async with trio.open_nursery() as nursery:
        manager = UploadManager(_Importer(), tmp_path, nursery, site=SITE)  # type: ignore[arg-type]
        assert list(manager.uploads) == ["0123abcd"]
        assert "failed    NEURO_PUB/subject=S01/scan.dcm  HTTP 500" in manager.status_text()


def test_records_written_now_hold_what_earlier_versions_read(tmp_path: Path) -> None:
    """An earlier version builds its record from exactly these keys (any other
    makes it skip the record): the destination's details are stored flat."""
    record = read_record(keep(tmp_path, EARLIER_RECORD))
    write_record(tmp_path / record.id, record)
    assert json.loads((tmp_path / record.id / "meta.json").read_text()) == EARLIER_RECORD


def test_another_destinations_details_survive_a_round_trip(tmp_path: Path) -> None:
    record = UploadRecord("feed", "P", "a/b.txt", destination={
        "experiment": "XNAT_E00001", "resource": "NOTES", "path": "a/b.txt"})
    (tmp_path / "feed").mkdir()
    write_record(tmp_path / "feed", record)
    assert read_record(tmp_path / "feed") == record


def test_a_record_that_is_no_record_is_passed_over(tmp_path: Path) -> None:
    for name, text in (("list", "[1, 2]"), ("text", '"abc"'), ("partial", '{"id": "x"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(text)
    assert kept_uploads(tmp_path) == []

"""The sender of files written into resources, against a fake XNAT with its quirks:
what counts as stored, one writer per catalog, batches, empty files, strays.
(The mount's side, through the kernel: tests/mount/test_resources.py.)"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import trio

from xnatfs.client import RemoteFile
from xnatfs.errors import Conflict, Forbidden, XnatError
from xnatfs.results import ResourceSender, resource_destination
from xnatfs.spoolfiles import UploadRecord

RESOURCE = "/data/experiments/XNAT_E00001/resources/OUT"


class FakeXnat:
    """One resource as XNAT keeps it: duplicates are answered 200 and not
    written, a reader's upload is answered 200 and dropped, an empty body is
    refused, ``extract`` unpacks a zip into the root."""

    def __init__(self, *, may_edit: bool = True, latency: float = 0.01) -> None:
        self.files: dict[str, bytes] = {}
        self.strays: dict[str, bytes] = {}   # on disk, not in the catalog
        self.may_edit = may_edit
        self.latency = latency
        self.requests: list[str] = []
        self.writers = 0
        self.max_writers = 0

    async def put_file(self, resource_uri: str, path: str, data: Path, size: int, *,
                       overwrite: bool = False, extract: bool = False,
                       content_type: str = "application/octet-stream") -> list[str]:
        assert resource_uri == RESOURCE
        body = data.read_bytes()
        assert len(body) == size
        if not body:
            raise XnatError("400 didn't provide any data")
        self.requests.append(f"PUT {path}")
        self.writers += 1
        self.max_writers = max(self.max_writers, self.writers)
        try:
            await trio.sleep(self.latency)
            if extract:
                with zipfile.ZipFile(data) as zf:
                    members = [(i.filename, zf.read(i)) for i in zf.infolist()]
            else:
                members = [(path, body)]
            duplicates = []
            for name, content in members:
                if not self.may_edit:
                    continue
                if (name in self.files or name in self.strays) and not overwrite:
                    duplicates.append(name)
                    continue
                self.strays.pop(name, None)
                self.files[name] = content
            return duplicates
        finally:
            self.writers -= 1

    async def list_resource_files(self, resource_uri: str) -> list[RemoteFile]:
        self.requests.append("GET files")
        return [RemoteFile(path=p, size=len(b), digest=hashlib.md5(b).hexdigest(),
                           uri=f"{RESOURCE}/files/{p}", resource_label="OUT",
                           resource_id="1", scan_id=None) for p, b in self.files.items()]


def record(path: str, *, overwrite: bool = False) -> UploadRecord:
    return UploadRecord(id=path, project="P", relpath=path,
                        destination=resource_destination(RESOURCE, path, overwrite=overwrite))


async def send_all(xnat: FakeXnat, tmp_path: Path, contents: dict[str, bytes],
                   **flags: bool) -> dict[str, list[str] | XnatError]:
    """Send every file at once, as write-behind does; each one's outcome."""
    outcomes: dict[str, list[str] | XnatError] = {}
    async with trio.open_nursery() as nursery:
        sender = ResourceSender(xnat, nursery, tmp_path / "batches")

        async def send(path: str, data: Path) -> None:
            try:
                outcomes[path] = await sender.send_local_copy(record(path, **flags), data, b"")
            except XnatError as exc:
                outcomes[path] = exc

        for i, (path, content) in enumerate(contents.items()):
            local = tmp_path / f"copy{i}"
            local.write_bytes(content)
            nursery.start_soon(send, path, local)
    return outcomes


def test_many_files_go_as_few_batches_and_one_writer_at_a_time(tmp_path: Path) -> None:
    xnat = FakeXnat()
    contents = {f"surf/lh.{i}": bytes([i]) * (i + 1) for i in range(50)}
    outcomes = trio.run(send_all, xnat, tmp_path, contents)
    assert outcomes == {p: [f"{RESOURCE}/files/{p}"] for p in contents}
    assert xnat.files == contents
    assert xnat.max_writers == 1
    puts = [r for r in xnat.requests if r.startswith("PUT")]
    assert len(puts) <= 3, xnat.requests  # the first alone, then the rest together
    assert not list((tmp_path / "batches").iterdir())  # no zip left behind


def test_a_silent_200_is_a_refusal(tmp_path: Path) -> None:
    """XNAT answers a reader's upload 200 and stores nothing."""
    outcomes = trio.run(send_all, FakeXnat(may_edit=False), tmp_path, {"a.txt": b"a"})
    assert isinstance(outcomes["a.txt"], Forbidden)


def test_a_duplicate_with_other_bytes_is_a_conflict_and_is_left_alone(tmp_path: Path) -> None:
    xnat = FakeXnat()
    xnat.files["a.txt"] = b"the scanner's"
    outcomes = trio.run(send_all, xnat, tmp_path, {"a.txt": b"ours"})
    assert isinstance(outcomes["a.txt"], Conflict)
    assert xnat.files["a.txt"] == b"the scanner's"


def test_a_duplicate_with_our_bytes_is_stored(tmp_path: Path) -> None:
    """A retry of a file XNAT got before the answer was lost: sent once."""
    xnat = FakeXnat()
    xnat.files["a.txt"] = b"ours"
    assert trio.run(send_all, xnat, tmp_path, {"a.txt": b"ours"})["a.txt"] == [
        f"{RESOURCE}/files/a.txt"]


def test_overwrite_replaces(tmp_path: Path) -> None:
    xnat = FakeXnat()
    xnat.files["a.txt"] = b"old"
    outcomes = trio.run(lambda: send_all(xnat, tmp_path, {"a.txt": b"new"}, overwrite=True))
    assert outcomes["a.txt"] == [f"{RESOURCE}/files/a.txt"]
    assert xnat.files["a.txt"] == b"new"


def test_a_stray_left_by_a_failed_catalog_write_is_replaced(tmp_path: Path) -> None:
    """On disk but not listed (another writer's 500): a duplicate of nothing."""
    xnat = FakeXnat()
    xnat.strays["a.txt"] = b"half"
    assert trio.run(send_all, xnat, tmp_path, {"a.txt": b"whole"})["a.txt"] == [
        f"{RESOURCE}/files/a.txt"]
    assert xnat.files["a.txt"] == b"whole"


@pytest.mark.parametrize("others", [0, 3])
def test_empty_files_are_stored(tmp_path: Path, others: int) -> None:
    """XNAT refuses an empty body; an empty file goes in a zip, alone or not."""
    xnat = FakeXnat()
    contents = {"done": b"", **{f"f{i}": b"x" for i in range(others)}}
    outcomes = trio.run(send_all, xnat, tmp_path, contents)
    assert outcomes["done"] == [f"{RESOURCE}/files/done"]
    assert xnat.files == contents

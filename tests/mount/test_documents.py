"""Each object's XML document (project.xml, subject.xml, session.xml, scan.xml,
assessor.xml) through a real mount: XNAT's own bytes, their true size for
every reader, and what walks cost in requests."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.harness import TestServer

from .conftest import Mount, module_mount

PROJECT = Path("NEURO_PUB")
SUBJECT = PROJECT / "NP001"
SESSION = SUBJECT / "NP001_MR2"
SCAN = SESSION / "scans" / "2-T1_MPRAGE_2"
ASSESSOR = SESSION / "assessors" / "NP001_MR2_QC"


@pytest.fixture(scope="module")
def docs_mount(demo_server: TestServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Mount]:
    """One mount of the shared demo server for the tests that only read."""
    with module_mount(demo_server, tmp_path_factory.mktemp("documents")) as mount:
        yield mount


def document_urls(mount: Mount) -> dict[Path, str]:
    """Each document's path in the mount, and the URL of the object it describes."""
    with httpx.Client(base_url=mount.server.url, auth=("admin", "admin")) as c:
        def item_id(url: str) -> str:
            return c.get(url, params={"format": "json"}).json()["items"][0]["data_fields"]["ID"]

        subject = item_id("/data/projects/NEURO_PUB/subjects/NP001")
        session = item_id("/data/projects/NEURO_PUB/experiments/NP001_MR2")
        assessor = item_id("/data/projects/NEURO_PUB/experiments/NP001_MR2/assessors/NP001_MR2_QC")
    return {PROJECT / "project.xml": "/data/projects/NEURO_PUB",
            SUBJECT / "subject.xml": f"/data/projects/NEURO_PUB/subjects/{subject}",
            SESSION / "session.xml": f"/data/experiments/{session}",
            SCAN / "scan.xml": f"/data/experiments/{session}/scans/2",
            ASSESSOR / "assessor.xml": f"/data/experiments/{assessor}"}


def test_each_document_is_xnats_own_and_every_reader_gets_all_of_it(
        docs_mount: Mount, tmp_path: Path) -> None:
    """All five kinds equal a direct ``format=xml`` download byte for byte; the
    size ``stat`` and ``ls -l`` show is what cat, cp, rsync and Python read."""
    urls = document_urls(docs_mount)
    with httpx.Client(base_url=docs_mount.server.url, auth=("admin", "admin")) as c:
        expected = {rel: c.get(url, params={"format": "xml"}).content
                    for rel, url in urls.items()}
    for rel, body in expected.items():
        path = docs_mount.path / rel
        assert body.startswith(b"<?xml"), rel
        st = os.stat(path)
        assert st.st_mode & 0o777 == 0o444
        assert st.st_size == len(body), rel
        listed = subprocess.run(["ls", "-l", str(path)], check=True, capture_output=True,
                                text=True).stdout.split()
        assert int(listed[4]) == len(body), rel
        assert path.read_bytes() == body, rel
        cat = subprocess.run(["cat", str(path)], check=True, capture_output=True).stdout
        assert cat == body, rel
        copy = tmp_path / f"cp-{path.name}"
        subprocess.run(["cp", str(path), str(copy)], check=True)
        assert copy.read_bytes() == body, rel
        if shutil.which("rsync"):  # copies st_size bytes
            synced = tmp_path / f"rsync-{path.name}"
            subprocess.run(["rsync", str(path), str(synced)], check=True)
            assert synced.read_bytes() == body, rel
        if shutil.which("xmllint"):
            subprocess.run(["xmllint", "--noout", str(path)], check=True)


def test_stat_then_read_costs_one_request(demo_server: TestServer,
                                          mount_factory) -> None:  # noqa: ANN001
    """On a mount that has seen no walk (one of its own: the shared one has,
    and then fetches documents ahead), a stat and a read cost one request."""
    mount = mount_factory(demo_server, name="stat")
    path = mount.path / "NEURO_PUB" / "NP002" / "subject.xml"
    os.listdir(path.parent)
    mark = demo_server.log_mark()
    size = os.stat(path).st_size
    assert len(path.read_bytes()) == size
    documents = [e for e in demo_server.requests_since(mark) if "format=xml" in e["query"]]
    assert [e["path"] for e in documents] == [
        os.getxattr(path.parent, "user.xnat.uri").decode()], documents


def test_a_walk_fetches_documents_ahead(demo_server: TestServer,
                                        mount_factory) -> None:  # noqa: ANN001
    """Once a second object's document is stat'ed, the documents below the ones
    stat'ed are fetched ahead (several at once), each still once."""
    mount = mount_factory(demo_server, name="ahead")
    session = mount.path / SESSION
    os.stat(session.parents[1] / "project.xml")
    mark = demo_server.log_mark()
    os.stat(session / "session.xml")  # the second: a walk
    scans = list((session / "scans").iterdir())
    deadline = time.monotonic() + 10
    assessors = (list((session / "assessors").iterdir())
                 if (session / "assessors").exists() else [])
    uris = ({os.getxattr(p, "user.xnat.uri").decode() for p in scans}
            | {"/data/experiments/" + os.getxattr(p, "user.xnat.id").decode()
               for p in assessors})
    while time.monotonic() < deadline:
        fetched = [e["path"] for e in demo_server.requests_since(mark)
                   if "format=xml" in e["query"]]
        if uris <= set(fetched):
            break
        time.sleep(0.05)
    assert uris <= set(fetched), (uris, fetched)  # before any scan.xml was stat'ed
    mark = demo_server.log_mark()
    for scan in scans:
        assert os.stat(scan / "scan.xml").st_size == len((scan / "scan.xml").read_bytes())
    assert [e for e in demo_server.requests_since(mark) if "format=xml" in e["query"]] == []
    assert len(fetched) == len(set(fetched)), fetched  # each once


def test_documents_are_read_only(docs_mount: Mount) -> None:
    path = docs_mount.path / SESSION / "session.xml"
    with pytest.raises(OSError) as refused:
        path.write_bytes(b"<x/>")
    assert refused.value.errno in (errno.EACCES, errno.EROFS)
    with pytest.raises(OSError):
        path.unlink()


def test_a_names_only_walk_costs_no_document_request_and_find_ls_one_each(
        demo_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """``ls -R`` and ``find`` list the documents without fetching them; ``find -ls``
    fetches each once (the README's price), and a second one nothing."""
    mount = mount_factory(demo_server, name="walk")
    project = mount.path / "NEURO_PUB"
    mark = demo_server.log_mark()
    listed = subprocess.run(["ls", "-R", str(project)], check=True, capture_output=True,
                            text=True).stdout
    found = subprocess.run(["find", str(project)], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    names = [Path(p).name for p in found]
    kinds = ("project.xml", "subject.xml", "session.xml", "scan.xml", "assessor.xml")
    assert set(kinds) <= set(names), sorted(set(names))
    assert all(kind in listed for kind in kinds)
    walk = demo_server.requests_since(mark)
    assert walk, "the walk went to the server"
    assert [e for e in walk if "format=xml" in e["query"]] == []
    documents = [p for p in found if Path(p).name in kinds]
    mark = demo_server.log_mark()
    out = subprocess.run(["find", str(project), "-ls"], check=True, capture_output=True,
                         text=True).stdout
    fetched = [e["path"] for e in demo_server.requests_since(mark) if "format=xml" in e["query"]]
    assert len(fetched) == len(set(fetched)) == len(documents), fetched
    with httpx.Client(base_url=demo_server.url, auth=("admin", "admin")) as c:
        sizes = {p: len(c.get(os.getxattr(Path(p).parent, "user.xnat.uri").decode(),
                              params={"format": "xml"}).content) for p in documents}
    rows = {parts[10].replace("\\ ", " "): int(parts[6]) for parts in (line.split(None, 10)
                                                   for line in out.splitlines())}
    for path, size in sizes.items():
        assert rows[path] == size, path
    mark = demo_server.log_mark()
    subprocess.run(["find", str(project), "-ls"], check=True, capture_output=True)
    assert [e for e in demo_server.requests_since(mark) if "format=xml" in e["query"]] == []


def test_a_document_of_an_object_gone_is_enoent_and_a_failing_server_eio(
        fresh_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    with httpx.Client(base_url=fresh_server.url, auth=("admin", "admin")) as c:
        for url in ("/data/projects/P", "/data/projects/P/subjects/S",
                    "/data/projects/P/subjects/S/experiments/E?xsiType=xnat:mrSessionData",
                    "/data/projects/P/subjects/S/experiments/E/scans/1"
                    "?xsiType=xnat:mrScanData&type=T1"):
            assert c.put(url).status_code in (200, 201), url
    mount = mount_factory(fresh_server, "--timeout", "2")
    scan = mount.path / "P" / "S" / "E" / "scans" / "1-T1"
    assert sorted(os.listdir(scan)) == ["resources", "scan.xml"]
    with httpx.Client(base_url=fresh_server.url, auth=("admin", "admin")) as c:
        assert c.delete("/data/projects/P/subjects/S/experiments/E/scans/1").status_code == 200
    with pytest.raises(FileNotFoundError):
        os.stat(scan / "scan.xml")
    with pytest.raises(FileNotFoundError):
        (scan / "scan.xml").read_bytes()
    fresh_server.set_knobs(fail_rate=1.0, fault_path=r"^/data/projects/P$")
    try:
        with pytest.raises(OSError) as failed:
            os.stat(mount.path / "P" / "project.xml")
        assert failed.value.errno in (errno.EIO, errno.ETIMEDOUT)
    finally:
        fresh_server.set_knobs(fail_rate=0.0, fault_path="")
    assert (mount.path / "P" / "project.xml").read_bytes() == httpx.get(
        f"{fresh_server.url}/data/projects/P", params={"format": "xml"},
        auth=("admin", "admin")).content

"""Import, prearchive and archive services over a real socket, statuses included."""

from __future__ import annotations

import base64
import io
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.imaging import synthetic_study, write_dicom_archive, write_dicom_series
from xnatfs.testing.harness import TestServer

ADMIN = ("admin", "admin")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_copy) -> Iterator[TestServer]:  # noqa: ANN001
    srv = TestServer(demo_copy(tmp_path_factory.mktemp("import") / "data"), dataset="demo",
                     args=["--prearchive-settle", "0.5"])
    with srv:
        yield srv


@pytest.fixture
def admin(server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=ADMIN, timeout=60) as c:
        yield c


def h3(response: httpx.Response) -> str:
    match = re.search(r"<h3>(.*)</h3>", response.text)
    assert match, response.text
    return match.group(1)


def study_zip(tmp_path: Path, patient: str, seed: int, suffix: str = ".zip") -> bytes:
    path = tmp_path / f"{patient}{suffix}"
    write_dicom_archive(path, synthetic_study(f"{patient}^Test", patient, slices=3, rows=16,
                                              cols=16, seed=seed))
    return path.read_bytes()


def test_dicom_zip_import_lands_in_prearchive(admin: httpx.Client, tmp_path: Path) -> None:
    body = study_zip(tmp_path, "ZIP001", 1)
    r = admin.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB&inbody=true",
                   content=body, headers={"Content-Type": "application/zip"})
    assert r.status_code == 200, r.text
    assert re.fullmatch(r"/data/prearchive/projects/NEURO_PUB/\d{8}_\d{9}/ZIP001", r.text)
    row = admin.get(r.text + "?format=json").json()["ResultSet"]["Result"][0]
    assert row["status"] == "READY" and row["url"] == r.text.removeprefix("/data")
    scans = admin.get(r.text + "/scans").json()["ResultSet"]["Result"]
    assert scans and {"ID", "xsiType", "series_description"} == set(scans[0])
    files = admin.get(f"{r.text}/scans/{scans[0]['ID']}/resources/DICOM/files").json()
    first = files["ResultSet"]["Result"][0]
    assert set(first) == {"Name", "Size", "URI"}
    assert len(admin.get(first["URI"]).content) == int(first["Size"])


def test_zip_is_imported_while_the_body_is_still_arriving(
        admin: httpx.Client, server: TestServer, tmp_path: Path) -> None:
    """XNAT reads a DICOM-zip body with a ZipInputStream: objects land in the
    prearchive (RECEIVING) before the client has sent the rest."""
    body = study_zip(tmp_path, "STREAM001", 5)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        last_entry = archive.infolist()[-1].header_offset

    def sessions() -> list[dict[str, str]]:
        with httpx.Client(base_url=server.url, auth=ADMIN, timeout=30) as other:
            rows = other.get("/data/prearchive/projects/NEURO_PUB?format=json").json()
        return [r for r in rows["ResultSet"]["Result"] if r["name"] == "STREAM001"]

    seen_while_sending: list[dict[str, str]] = []

    def chunks() -> Iterator[bytes]:
        yield body[:last_entry]  # every object but the last
        deadline = time.monotonic() + 30
        while not (rows := sessions()) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen_while_sending.extend(rows)
        yield body[last_entry:]

    r = admin.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB&inbody=true",
                   content=chunks(), headers={"Content-Type": "application/zip"})
    assert r.status_code == 200, r.text
    assert [row["status"] for row in seen_while_sending] == ["RECEIVING"]
    (row,) = sessions()
    assert row["status"] == "READY" and r.text.strip().endswith("/STREAM001")
    scans = admin.get(r.text.strip() + "/scans?format=json").json()["ResultSet"]["Result"]
    received = sum(len(admin.get(f"{r.text.strip()}/scans/{scan['ID']}/resources/DICOM/files")
                       .json()["ResultSet"]["Result"]) for scan in scans)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert received == len(archive.infolist())


def test_a_body_that_breaks_off_keeps_the_objects_already_read(
        admin: httpx.Client, server: TestServer, tmp_path: Path) -> None:
    """As XNAT's ZipInputStream import: what was filed before the connection
    broke stays in the prearchive, and the session settles like any other."""
    body = study_zip(tmp_path, "BROKEN001", 6)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        entries = archive.infolist()
    url = httpx.URL(server.url)
    head = (f"POST /data/services/import?import-handler=DICOM-zip&project=NEURO_PUB&inbody=true "
            f"HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"Authorization: Basic {base64.b64encode(b'admin:admin').decode()}\r\n"
            f"Content-Type: application/zip\r\nContent-Length: {len(body)}\r\n\r\n")

    def sessions() -> list[dict[str, str]]:
        rows = admin.get("/data/prearchive/projects/NEURO_PUB?format=json").json()
        return [r for r in rows["ResultSet"]["Result"] if r["name"] == "BROKEN001"]

    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(head.encode() + body[:entries[-1].header_offset])
        deadline = time.monotonic() + 30
        while not sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
    # The connection is gone with one object unsent.
    deadline = time.monotonic() + 30
    while (rows := sessions()) and rows[0]["status"] != "READY" and time.monotonic() < deadline:
        time.sleep(0.1)
    (row,) = rows
    assert row["status"] == "READY"
    uri = "/data" + row["url"]
    scans = admin.get(uri + "/scans?format=json").json()["ResultSet"]["Result"]
    received = sum(len(admin.get(f"{uri}/scans/{scan['ID']}/resources/DICOM/files")
                       .json()["ResultSet"]["Result"]) for scan in scans)
    assert received == len(entries) - 1


def test_tar_gz_import(admin: httpx.Client, tmp_path: Path) -> None:
    body = study_zip(tmp_path, "TGZ001", 2, ".tar.gz")
    r = admin.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB",
                   content=body, headers={"Content-Type": "application/x-gzip"})
    assert r.status_code == 200 and r.text.endswith("/TGZ001")


def test_gradual_dicom_is_receiving_then_ready(admin: httpx.Client, tmp_path: Path) -> None:
    files = write_dicom_series(tmp_path, patient_name="Grad^Ual", patient_id="GRAD001",
                               series_number=5, series_description="gradual", slices=3,
                               rows=16, cols=16, seed=3)
    uris = set()
    for f in files:
        r = admin.post("/data/services/import?import-handler=gradual-DICOM"
                       "&PROJECT_ID=NEURO_PUB&SUBJECT_ID=GSUBJ&EXPT_LABEL=GRAD_MR",
                       content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
        uris.add(r.text)
    assert len(uris) == 1
    uri = uris.pop()
    assert uri.endswith("/GRAD_MR")
    status = admin.get(uri + "?format=json").json()["ResultSet"]["Result"][0]["status"]
    assert status == "RECEIVING"
    deadline = time.monotonic() + 30
    while status != "READY" and time.monotonic() < deadline:
        time.sleep(0.2)  # the server settles sessions after 0.5 s without new files
        status = admin.get(uri + "?format=json").json()["ResultSet"]["Result"][0]["status"]
    assert status == "READY"


def test_import_errors(admin: httpx.Client, tmp_path: Path) -> None:
    r = admin.post("/data/services/import?import-handler=NOPE", content=b"x")
    assert r.status_code == 404 and h3(r) == "Unknown importer implementation specified: NOPE"
    r = admin.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB",
                   content=b"", headers={"Content-Type": "application/zip"})
    assert r.status_code == 400 and h3(r) == "Unable to identify upload format."
    r = admin.post("/data/services/import?import-handler=gradual-DICOM&PROJECT_ID=NEURO_PUB",
                   content=b"not dicom at all" * 20,
                   headers={"Content-Type": "application/dicom"})
    assert r.status_code == 400 and "unable to read DICOM object" in h3(r)
    r = admin.post("/data/services/import?import-handler=DICOM-zip&inbody=true",
                   files={"file": ("a.zip", io.BytesIO(b"PK"))})
    assert r.status_code == 406


def test_archive_move_delete_and_their_errors(admin: httpx.Client, tmp_path: Path) -> None:
    body = study_zip(tmp_path, "ARC001", 4)
    uri = admin.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB",
                     content=body, headers={"Content-Type": "application/zip"}).text
    src = uri.removeprefix("/data")
    r = admin.post(f"{uri}?action=rebuild")
    assert r.status_code == 400 and "unsupported action on prearchive session: rebuild" in h3(r)
    r = admin.post(f"{uri}?action=move&newProject=ALICE_LAB")
    assert r.status_code == 301 and "/prearchive/projects/ALICE_LAB/" in r.text
    moved = r.text if r.text.startswith("/data") else "/data" + r.text
    r = admin.post("/data/services/archive", data={"src": moved, "subject": "ARCSUBJ",
                                                   "session": "ARC001_MR"})
    assert r.status_code == 200
    assert r.text == "/data/archive/projects/ALICE_LAB/subjects/ARCSUBJ/experiments/ARC001_MR\r\n"
    assert admin.get("/data/projects/ALICE_LAB/experiments/ARC001_MR/scans").status_code == 200
    r = admin.post("/data/services/archive", data={"src": moved})
    assert r.status_code == 404 and h3(r).endswith("not found.")
    r = admin.post("/data/services/archive")
    assert r.status_code == 404 and h3(r) == "Unknown prearchive session."
    r = admin.post("/data/services/archive",
                   data={"src": "/archive/projects/NEURO_PUB/subjects/X"})
    assert r.status_code == 400 and h3(r).startswith("Invalid src URI")
    # delete
    again = admin.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB",
                       content=study_zip(tmp_path, "DEL001", 5),
                       headers={"Content-Type": "application/zip"}).text
    assert admin.delete(again).status_code == 200
    assert admin.get(again + "?format=json").status_code == 404
    assert src  # the original location is gone after the move
    assert admin.get(uri + "?format=json").status_code == 404


def test_archiving_into_a_project_needs_edit_rights_there(server: TestServer,
                                                          tmp_path: Path) -> None:
    """A collaborator may read a project, not add sessions to it: archiving a
    session of a project she may edit into one she only reads is refused."""
    with httpx.Client(base_url=server.url, auth=("alice", "alice")) as alice:
        uri = alice.post("/data/services/import?import-handler=DICOM-zip&project=NEURO_PUB",
                         content=study_zip(tmp_path, "COL001", 7),
                         headers={"Content-Type": "application/zip"}).text
        assert "/prearchive/projects/NEURO_PUB/" in uri
        for target in ({"project": "ONC-PROT"}, {"dest": "/archive/projects/ONC-PROT"}):
            r = alice.post("/data/services/archive", data={"src": uri, **target})
            assert r.status_code == 403, (target, r.text)
        r = alice.post("/data/services/archive", data={"src": uri, "subject": "COLSUBJ"})
        assert r.status_code == 200 and "/archive/projects/NEURO_PUB/" in r.text


def test_prearchive_listing_envelope_and_permissions(admin: httpx.Client,
                                                     server: TestServer) -> None:
    body = admin.get("/data/prearchive/projects?format=json").json()
    assert set(body) == {"ResultSet"} and set(body["ResultSet"]) == {"Result"}
    assert admin.get("/data/prearchive?format=json").json() == body
    with httpx.Client(base_url=server.url, auth=("bob", "bob")) as bob:
        r = bob.get("/data/prearchive/projects/NEURO_PUB?format=json")
        assert r.status_code == 403
        assert h3(r) == ("The current user does not have access to the requested project: "
                         "NEURO_PUB")


def test_unassigned_archive_is_refused(admin: httpx.Client, tmp_path: Path) -> None:
    uri = admin.post("/data/services/import?import-handler=DICOM-zip",
                     content=study_zip(tmp_path, "UNA001", 6),
                     headers={"Content-Type": "application/zip"}).text
    assert "/prearchive/projects/Unassigned/" in uri
    r = admin.post("/data/services/archive", data={"src": uri})
    assert r.status_code == 400

"""Resources and file writes against the test server, quirk by quirk as XNAT 1.8
answers them (/work/shared/reference/xnat-write-api.md sections 2-4 and 10,
docs/xnat-verified.md), and xnatpy's and pyxnat's upload calls byte-checked."""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import tarfile
import time
import zipfile
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.harness import TestServer

SESSION = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1"
LEVELS = {
    "project": "/data/projects/PUBP",
    "subject": "/data/projects/PUBP/subjects/SUBJ1",
    "session": SESSION,
    "scan": f"{SESSION}/scans/3",
    "assessor": f"{SESSION}/assessors/SESS1_QC",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    with TestServer(tmp_path_factory.mktemp("writes") / "data", dataset="none") as srv:
        with httpx.Client(base_url=srv.url, auth=("admin", "admin"), timeout=60) as c:
            assert c.put("/data/projects/PUBP?accessibility=public").status_code == 201
            assert c.put("/data/projects/PUBP/subjects/SUBJ1").status_code == 201
            assert c.put(f"{SESSION}?xsiType=xnat:mrSessionData").status_code == 201
            assert c.put(f"{SESSION}/scans/3?xsiType=xnat:mrScanData&type=T1").status_code \
                == 201
            assert c.put(f"{SESSION}/assessors/SESS1_QC",
                         params={"xsiType": "xnat:qcAssessmentData"}).status_code == 201
        yield srv


@pytest.fixture(scope="module")
def admin(server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=("admin", "admin"), timeout=60) as c:
        yield c


def files_of(client: httpx.Client, resource_url: str) -> dict[str, dict[str, str]]:
    rows = client.get(f"{resource_url}/files", params={"format": "json"}).json()
    return {r["URI"].split("/files/", 1)[1]: r for r in rows["ResultSet"]["Result"]}


@pytest.mark.parametrize("level", list(LEVELS))
def test_resource_put_post_and_conflict_at_every_level(admin: httpx.Client, level: str) -> None:
    url = f"{LEVELS[level]}/resources/OUT_{level}"
    r = admin.put(url, params={"format": "NIFTI", "content": "derived"})
    assert r.status_code == 200 and r.text == ""
    r = admin.post(url)  # POST is PUT (CatalogResource.handlePut calls handlePost)
    assert r.status_code == 409 and "Specified resource already exists." in r.text
    rows = admin.get(f"{LEVELS[level]}/resources", params={"format": "json"}).json()
    [row] = [x for x in rows["ResultSet"]["Result"] if x["label"] == f"OUT_{level}"]
    assert (row["format"], row["content"], row["file_count"]) == ("NIFTI", "derived", "0")
    assert admin.delete(url).status_code == 200


@pytest.mark.parametrize("level", list(LEVELS))
def test_upload_creates_the_resource_and_lists_digest_at_once(admin: httpx.Client,
                                                             level: str) -> None:
    url = f"{LEVELS[level]}/resources/IMPLICIT_{level}"
    body = f"result at {level}".encode()
    r = admin.put(f"{url}/files/sub/r.txt", content=body,
                  headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and r.text == ""
    listed = files_of(admin, url)
    assert listed["sub/r.txt"]["digest"] == hashlib.md5(body).hexdigest()
    assert listed["sub/r.txt"]["Size"] == str(len(body))
    assert admin.get(f"{url}/files/sub/r.txt").content == body
    uri = listed["sub/r.txt"]["URI"]
    assert admin.get(uri).content == body  # the listing's URI (numeric resource ID) works
    assert admin.delete(url).status_code == 200


def test_project_and_subject_resources_in_items(admin: httpx.Client) -> None:
    for level in ("project", "subject"):
        url = f"{LEVELS[level]}/resources/ITEMS"
        admin.put(f"{url}/files/a.txt", content=b"a", headers={"Content-Type": "text/plain"})
        item = admin.get(LEVELS[level], params={"format": "json"}).json()["items"][0]
        [resources] = [c["items"] for c in item["children"]
                       if c["field"] == "resources/resource"]
        [mine] = [r for r in resources if r["data_fields"]["label"] == "ITEMS"]
        assert mine["data_fields"]["file_count"] == 1
        xml = admin.get(LEVELS[level], params={"format": "xml"}).text
        assert 'label="ITEMS"' in xml and "<xnat:resources>" in xml
        assert admin.delete(url).status_code == 200


def test_project_resource_uri_and_download(admin: httpx.Client) -> None:
    url = "/data/projects/PUBP/resources/PDOC"
    admin.put(f"{url}/files/doc.txt", content=b"doc", headers={"Content-Type": "text/plain"})
    row = files_of(admin, url)["doc.txt"]
    rid = row["cat_ID"]
    assert row["URI"] == f"/data/projects/PUBP/resources/{rid}/files/doc.txt"
    zipped = admin.get(f"{url}/files", params={"format": "zip"})
    assert zipped.status_code == 200
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf:
        assert [zf.read(n) for n in zf.namelist()] == [b"doc"]
    admin.delete(url)


def test_duplicate_is_200_with_the_list_and_keeps_the_file(admin: httpx.Client) -> None:
    url = f"{SESSION}/resources/DUP/files/d.txt"
    assert admin.put(url, content=b"one", headers={"Content-Type": "text/plain"}).text == ""
    r = admin.post(url, content=b"two", headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and r.json() == {"duplicates": ["d.txt"]}
    assert r.headers["Content-Type"].startswith("text/html")
    assert admin.get(url).content == b"one"
    r = admin.put(url, params={"overwrite": "yes"}, content=b"two",
                  headers={"Content-Type": "text/plain"})  # any value but false/0 is true
    assert r.status_code == 200 and admin.get(url).content == b"two"
    admin.delete(f"{SESSION}/resources/DUP")


def raw_socket(server: TestServer, method: str, target: str, headers: dict[str, str],
               body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    auth = b64encode(b"admin:admin").decode()
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Basic {auth}",
             "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def test_raw_body_needs_a_length_unless_zip(server: TestServer, admin: httpx.Client) -> None:
    target = f"{SESSION}/resources/CHUNKED/files/c.txt"
    sock = raw_socket(server, "PUT", target, {"Content-Type": "text/plain",
                                              "Transfer-Encoding": "chunked"},
                      b"3\r\nabc\r\n0\r\n\r\n")
    status, body = answer(sock)
    assert status == 500 and b"request entity size is -1" in body
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as zf:
        zf.writestr("z/inner.txt", b"inner")
    data = payload.getvalue()
    chunked = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    sock = raw_socket(server, "PUT", f"{SESSION}/resources/CHUNKED/files/a.zip?extract=true",
                      {"Content-Type": "application/zip", "Transfer-Encoding": "chunked"},
                      chunked)
    assert answer(sock)[0] == 200
    assert admin.get(f"{SESSION}/resources/CHUNKED/files/z/inner.txt").content == b"inner"
    admin.delete(f"{SESSION}/resources/CHUNKED")


def test_multipart_fields_are_ignored(admin: httpx.Client) -> None:
    url = f"{SESSION}/resources/FORM/files/f.txt"
    r = admin.put(url, files={"file": ("f.txt", b"form")},
                  data={"format": "FIELD", "overwrite": "true"})
    assert r.status_code == 200
    assert files_of(admin, f"{SESSION}/resources/FORM")["f.txt"]["file_format"] == ""
    r = admin.put(url, files={"file": ("f.txt", b"again")}, data={"overwrite": "true"})
    assert r.json() == {"duplicates": ["f.txt"]}  # overwrite in the form: ignored
    r = admin.put(url, params={"format": "QUERY", "overwrite": "true"},
                  files={"file": ("f.txt", b"again")})
    assert r.status_code == 200 and admin.get(url).content == b"again"
    assert files_of(admin, f"{SESSION}/resources/FORM")["f.txt"]["file_format"] == "QUERY"
    admin.delete(f"{SESSION}/resources/FORM")


def test_extract_into_the_resource_root_by_suffix(admin: httpx.Client) -> None:
    base = f"{SESSION}/resources/EXT"
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tf:
        info = tarfile.TarInfo("t/one.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"one"))
    r = admin.put(f"{base}/files/ignored/dir/x.tgz", params={"extract": "true"},
                  content=tgz.getvalue(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    listed = files_of(admin, base)
    assert "t/one.txt" in listed and not any(p.endswith(".tgz") for p in listed)
    gz = gzip.compress(b"volume")
    admin.put(f"{base}/files/brain.nii.gz", params={"extract": "1"}, content=gz,
              headers={"Content-Type": "application/octet-stream"})
    assert admin.get(f"{base}/files/brain.nii").content == b"volume"
    # Suffixes are case-sensitive: X.ZIP is stored as it is.
    admin.put(f"{base}/files/X.ZIP", params={"extract": "true"}, content=b"PK-not-really",
              headers={"Content-Type": "application/octet-stream"})
    assert admin.get(f"{base}/files/X.ZIP").content == b"PK-not-really"
    admin.delete(base)


def test_delete_matches_by_prefix_and_empty_path_takes_all(admin: httpx.Client) -> None:
    base = f"{SESSION}/resources/PFX"
    for name in ("a", "a.txt", "ab/c.txt", "b.txt", "scan1", "scan10"):
        admin.put(f"{base}/files/{name}", content=b"x", headers={"Content-Type": "text/plain"})
    assert admin.delete(f"{base}/files/a").status_code == 200
    assert sorted(files_of(admin, base)) == ["b.txt", "scan1", "scan10"]
    assert admin.delete(f"{base}/files/scan1").status_code == 200
    assert sorted(files_of(admin, base)) == ["b.txt"]
    r = admin.delete(f"{base}/files/nothing")
    assert r.status_code == 404 and "No matched files" in r.text
    assert admin.delete(f"{base}/files").status_code == 200
    assert files_of(admin, base) == {}
    admin.delete(base)


def test_resource_delete_of_a_missing_label_is_200(admin: httpx.Client) -> None:
    for url in LEVELS.values():
        r = admin.delete(f"{url}/resources/NEVER_THERE")
        assert r.status_code == 200 and r.text == ""


def test_reader_upload_is_a_silent_no_op(server: TestServer) -> None:
    with httpx.Client(base_url=server.url, auth=("alice", "alice"), timeout=30) as alice:
        for url in (f"{SESSION}/resources/NOPE/files/x.txt",
                    "/data/projects/PUBP/resources/NOPE/files/x.txt"):
            r = alice.put(url, content=b"x", headers={"Content-Type": "text/plain"})
            assert r.status_code == 200 and r.text == ""
            assert alice.get(url).status_code == 404


def test_concurrent_writers_of_one_catalog(server: TestServer, admin: httpx.Client) -> None:
    """XNAT reads the catalog, writes the (raw, streamed) file, then writes the
    catalog only if its checksum is unchanged: the slower of two uploads into
    one resource gets a 500, its file on disk but not catalogued."""
    base = f"{SESSION}/resources/RACE"
    admin.put(base)
    slow = raw_socket(server, "PUT", f"{base}/files/slow.txt",
                      {"Content-Type": "text/plain", "Content-Length": "8"}, b"slow")
    time.sleep(0.5)
    fast = admin.put(f"{base}/files/fast.txt", content=b"fast",
                     headers={"Content-Type": "text/plain"})
    assert fast.status_code == 200
    slow.sendall(b"body")
    status, body = answer(slow)
    assert status == 500 and b"Another thread or process modified" in body
    assert sorted(files_of(admin, base)) == ["fast.txt"]
    # The loser's file is on disk: sent again, it is a duplicate.
    r = admin.put(f"{base}/files/slow.txt", content=b"slowbody",
                  headers={"Content-Type": "text/plain"})
    assert r.json() == {"duplicates": ["slow.txt"]}
    r = admin.put(f"{base}/files/slow.txt", params={"overwrite": "true"}, content=b"slowbody",
                  headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and sorted(files_of(admin, base)) == ["fast.txt", "slow.txt"]
    # Two writers one after the other never collide.
    for i in range(3):
        assert admin.put(f"{base}/files/n{i}", content=b"n",
                         headers={"Content-Type": "text/plain"}).text == ""
    admin.delete(base)


def test_concurrent_writers_knob_off(server: TestServer, admin: httpx.Client) -> None:
    base = f"{SESSION}/resources/RACE_OFF"
    admin.put(base)
    server.set_knobs(catalog_conflicts=False)
    try:
        slow = raw_socket(server, "PUT", f"{base}/files/slow.txt",
                          {"Content-Type": "text/plain", "Content-Length": "4"}, b"sl")
        time.sleep(0.3)
        assert admin.put(f"{base}/files/fast.txt", content=b"fast",
                         headers={"Content-Type": "text/plain"}).status_code == 200
        slow.sendall(b"ow")
        assert answer(slow)[0] == 200
    finally:
        server.set_knobs(catalog_conflicts=True)
    assert sorted(files_of(admin, base)) == ["fast.txt", "slow.txt"]
    admin.delete(base)


# --------------------------------------------------------------- clients
def test_xnatpy_uploads(server: TestServer, admin: httpx.Client, tmp_path: Path) -> None:
    xnat = pytest.importorskip("xnat")
    src = tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    with xnat.connect(server.url, user="admin", password="admin") as session:
        project = session.projects["PUBP"]
        subject = project.subjects["SUBJ1"]
        for owner in (project, subject, subject.experiments["SESS1"]):
            resource = session.classes.ResourceCatalog(parent=owner, label="XNATPY")
            resource.upload(src / "a.txt", "single/a.txt")
            resource.upload_dir(src)
            owner.clearcache()
            listed = files_of(admin, resource.uri)
            assert sorted(listed) == ["a.txt", "single/a.txt", "sub/b.bin"]
            assert admin.get(f"{resource.uri}/files/sub/b.bin").content == \
                (src / "sub" / "b.bin").read_bytes()
            assert listed["sub/b.bin"]["digest"] == hashlib.md5(
                (src / "sub" / "b.bin").read_bytes()).hexdigest()
            assert "XNATPY" in owner.resources
            admin.delete(resource.uri)


def test_pyxnat_uploads(server: TestServer, admin: httpx.Client, tmp_path: Path) -> None:
    pyxnat = pytest.importorskip("pyxnat")
    src = tmp_path / "in"
    (src / "d").mkdir(parents=True)
    (src / "one.txt").write_bytes(b"one")
    (src / "d" / "two.txt").write_bytes(b"two")
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("z/three.txt", b"three")
    interface = pyxnat.Interface(server=server.url, user="admin", password="admin")
    try:
        for owner in (interface.select.project("PUBP"),
                      interface.select.project("PUBP").subject("SUBJ1"),
                      interface.select.project("PUBP").subject("SUBJ1").experiment("SESS1")):
            resource = owner.resource("PYXNAT")
            resource.file("one.txt").put(str(src / "one.txt"))
            resource.put_dir(str(src))
            resource.put_zip(str(archive), extract=True)
            url = resource._uri
            listed = files_of(admin, url)
            assert {"one.txt", "z/three.txt"} <= set(listed)
            assert admin.get(f"{url}/files/z/three.txt").content == b"three"
            assert admin.get(f"{url}/files/one.txt").content == b"one"
            assert any(p.endswith("two.txt") for p in listed)
            assert listed["one.txt"]["digest"] == hashlib.md5(b"one").hexdigest()
            admin.delete(url)
    finally:
        interface.disconnect()

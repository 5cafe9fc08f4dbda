"""The test server over a real socket: auth, listings, writes and error statuses.

Each status XNAT answers (reference section 7) has a test here; data is made
through the REST API itself, as a client would.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from xnatfs.testing.harness import TestServer, share_session
from xnatfs.testing.store import Store, StoreError

ADMIN = ("admin", "admin")
ALICE = ("alice", "alice")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    srv = TestServer(tmp_path_factory.mktemp("rest") / "data", dataset="none")
    with srv:
        with httpx.Client(base_url=srv.url, auth=ADMIN) as c:
            for pid, access in (("PUBP", "public"), ("PROTP", "protected"), ("PRIVP", "private")):
                assert c.put(f"/data/projects/{pid}?accessibility={access}").status_code == 201
            assert c.put("/data/projects/PUBP/subjects/SUBJ1").status_code == 201
            r = c.put("/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1"
                      "?xsiType=xnat:mrSessionData&date=2020-02-03")
            assert r.status_code == 201
            r = c.put("/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/scans/3"
                      "?xsiType=xnat:mrScanData&type=T1 MPRAGE/2&series_description=t1")
            assert r.status_code == 201
            base = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1"
            assert c.put(f"{base}/scans/3/resources/DICOM/files/a.dcm",
                         content=b"A" * 1000).status_code == 200
            assert c.put(f"{base}/scans/3/resources/DICOM/files/sub/dir/b.dcm",
                         content=b"B" * 10).status_code == 200
            assert c.put(f"{base}/resources/NOTES/files/n.txt",
                         content=b"notes").status_code == 200
        yield srv


@pytest.fixture
def admin(server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=ADMIN) as c:
        yield c


@pytest.fixture
def alice(server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=ALICE) as c:
        yield c


def h3(response: httpx.Response) -> str:
    match = re.search(r"<h3>(.*)</h3>", response.text)
    assert match, response.text
    return match.group(1)


# ------------------------------------------------------------------- auth
def test_jsession_login_sets_cookie_and_body(server: TestServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/data/JSESSION", auth=ADMIN)
        assert r.status_code == 200
        assert re.fullmatch(r"[0-9A-F]{32}", r.text)
        assert r.cookies["JSESSIONID"] == r.text
        expiry = [v for k, v in r.headers.multi_items()
                  if k == "set-cookie" and v.startswith("SESSION_EXPIRATION_TIME")]
        assert re.match(r'SESSION_EXPIRATION_TIME="\d+,900000"', expiry[0])
        # Later requests carry the cookie and no Basic header.
        assert c.get("/data/auth").text == "User 'admin' is logged in"
        assert c.delete("/data/JSESSION").status_code == 200
        r = c.get("/data/projects")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Basic realm=")


def test_services_auth_password_login(server: TestServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        r = c.put("/data/services/auth", data={"username": "alice", "password": "alice"})
        assert r.status_code == 200 and r.cookies["JSESSIONID"] == r.text
        assert c.get("/xapi/users/username").text == "alice"
        bad = c.put("/data/services/auth", data={"username": "alice", "password": "nope"})
        assert bad.status_code == 401
        assert c.get("/data/services/auth").status_code == 405


def test_bad_basic_credentials_are_401(server: TestServer) -> None:
    r = httpx.get(f"{server.url}/data/projects", auth=("admin", "wrong"))
    assert r.status_code == 401
    assert h3(r) == "Login attempt failed. Please try again."


def test_browser_agents_are_redirected_to_login(server: TestServer) -> None:
    r = httpx.get(f"{server.url}/data/projects", headers={"User-Agent": "Mozilla/5.0"})
    assert r.status_code == 302


def test_session_expires_after_inactivity(server: TestServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/data/JSESSION", auth=ADMIN).status_code == 200
        assert c.get("/data/projects").status_code == 200
        server.expire_sessions()
        r = c.get("/data/projects")
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers


def test_alias_token_works_as_basic_credentials(admin: httpx.Client, server: TestServer) -> None:
    token = admin.get("/data/services/tokens/issue").json()
    assert re.fullmatch(r"[0-9a-f-]{36}", token["alias"]) and token["xdatUserId"] == "admin"
    r = httpx.get(f"{server.url}/data/auth", auth=(token["alias"], token["secret"]))
    assert r.text == "User 'admin' is logged in"
    valid = admin.get(f"/data/services/tokens/validate/{token['alias']}/{token['secret']}")
    assert valid.json() == {"valid": "admin"}
    assert admin.get(f"/data/services/tokens/invalidate/{token['alias']}").json() == {
        "result": "OK"}
    r = httpx.get(f"{server.url}/data/auth", auth=(token["alias"], token["secret"]))
    assert r.status_code == 401


def test_non_admin_cannot_issue_tokens_for_others(alice: httpx.Client) -> None:
    assert alice.get("/data/services/tokens/issue/user/admin").status_code == 403
    assert alice.get("/data/services/tokens/issue").status_code == 200


def test_version_is_404_and_build_info_answers(admin: httpx.Client) -> None:
    assert admin.get("/data/version").status_code == 404
    info = admin.get("/xapi/siteConfig/buildInfo").json()
    assert info["version"].startswith("1.8")
    assert admin.get("/xapi/siteConfig/buildInfo/version").text == info["version"]
    assert set(admin.get("/xapi/schemas?format=json").json()) >= {"xnat", "xdat"}
    assert "schema" in admin.get("/xapi/schemas/xnat").text


# --------------------------------------------------------------- listings
def test_project_listing_envelope_and_csv(admin: httpx.Client) -> None:
    body = admin.get("/data/projects?format=json").json()
    rows = body["ResultSet"]["Result"]
    assert body["ResultSet"]["totalRecords"] == str(len(rows))
    assert {"PUBP", "PROTP", "PRIVP"} <= {r["ID"] for r in rows}
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert rows[0]["URI"] == f"/data/projects/{rows[0]['ID']}"
    csv = admin.get("/data/projects?format=csv").text.splitlines()
    assert csv[0] == "ID,secondary_ID,name,description,pi_firstname,pi_lastname,URI"


def test_archive_alias_and_columns(admin: httpx.Client) -> None:
    plain = admin.get("/data/projects/PUBP/experiments").json()
    alias = admin.get("/data/archive/projects/PUBP/experiments").json()
    assert plain == alias
    row = plain["ResultSet"]["Result"][0]
    assert row["xnat:subjectassessordata/id"] == row["ID"]
    assert row["URI"] == f"/data/experiments/{row['ID']}"
    picked = admin.get("/data/projects/PUBP/experiments?columns=ID,label,bogus").json()
    # The columns in their order (CSV), their keys in a HashMap's order (JSON).
    # XNAT adds xsiType and project whatever was asked, the root element
    # xnat:subjectAssessorData not being a secured one (ProjSubExptList.java:325-328).
    assert set(picked["ResultSet"]["Result"][0]) == {"ID", "label", "xsiType", "project",
                                                     "xnat:subjectassessordata/id", "URI"}
    picked_csv = admin.get("/data/projects/PUBP/experiments?columns=ID,label,bogus&format=csv")
    assert picked_csv.text.splitlines()[0] == \
        "ID,label,xsiType,project,xnat:subjectassessordata/id,URI"
    filtered = admin.get("/data/projects/PUBP/experiments?label=SES*").json()
    assert len(filtered["ResultSet"]["Result"]) == 1
    none = admin.get("/data/projects/PUBP/experiments?label=nothing*").json()
    assert none["ResultSet"]["Result"] == []
    paged = admin.get("/data/projects/PUBP/experiments?limit=1&offset=0").json()
    assert "totalRecords" not in paged["ResultSet"]


def test_labels_resolve_under_projects_but_not_at_top_level(admin: httpx.Client) -> None:
    eid = admin.get("/data/projects/PUBP/experiments").json()["ResultSet"]["Result"][0]["ID"]
    assert admin.get("/data/projects/PUBP/experiments/SESS1?format=json").status_code == 200
    assert admin.get(f"/data/experiments/{eid}?format=json").status_code == 200
    r = admin.get("/data/experiments/SESS1?format=json")
    assert r.status_code == 404 and h3(r) == "Unable to find the specified experiment."
    assert admin.get("/data/subjects/SUBJ1").status_code == 404
    item = admin.get(f"/data/experiments/{eid}?format=json").json()["items"][0]
    assert item["meta"]["xsi:type"] == "xnat:mrSessionData"
    assert item["data_fields"]["ID"] == eid and item["data_fields"]["date"] == "2020-02-03"


def test_projects_of_a_subject_or_experiment(admin: httpx.Client) -> None:
    """``.../projects`` after a subject or experiment: its project with its label
    there (then its shares), XNAT's four columns and no ``totalRecords``."""
    eid = admin.get("/data/projects/PUBP/experiments").json()["ResultSet"]["Result"][0]["ID"]
    for path in (f"/data/experiments/{eid}/projects",
                 "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/projects"):
        body = admin.get(f"{path}?format=json").json()
        assert body == {"ResultSet": {"Result": [
            {"label": "SESS1", "ID": "PUBP", "Secondary_ID": "PUBP", "Name": "PUBP"}]}}
    csv = admin.get("/data/projects/PUBP/subjects/SUBJ1/projects?format=csv").text
    assert csv == "label,ID,Secondary_ID,Name\nSUBJ1,PUBP,PUBP,PUBP\n"
    # XNAT matches the remaining part with startsWith("projects"): the same table.
    assert admin.get(f"/data/experiments/{eid}/projects/PRIVP?format=json").json() == body


def test_scan_resource_and_file_listings(admin: httpx.Client) -> None:
    base = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1"
    scans = admin.get(f"{base}/scans").json()["ResultSet"]["Result"]
    assert scans[0]["ID"] == "3" and scans[0]["type"] == "T1 MPRAGE/2"
    res = admin.get(f"{base}/scans/3/resources").json()["ResultSet"]
    assert res["title"] == "Resources" and "URI" not in res["Result"][0]
    assert res["Result"][0]["file_count"] == "2" and res["Result"][0]["file_size"] == "1010"
    files = admin.get(f"{base}/scans/3/resources/DICOM/files").json()["ResultSet"]
    assert "totalRecords" not in files
    by_name = {f["Name"]: f for f in files["Result"]}
    rid = res["Result"][0]["xnat_abstractresource_id"]
    assert by_name["b.dcm"]["URI"].endswith(f"/resources/{rid}/files/sub/dir/b.dcm")
    assert by_name["a.dcm"]["URI"].startswith("/data/projects/PUBP/subjects/")
    assert by_name["a.dcm"]["digest"] == "e8c6f8d08b3a22553f63bd7feb7d4d77" or len(
        by_name["a.dcm"]["digest"]) == 32
    # Multi-resource forms: URIs built from resource_path lack /data.
    multi = admin.get(f"{base}/scans/ALL/files").json()["ResultSet"]["Result"]
    assert {f["Name"] for f in multi} == {"a.dcm", "b.dcm"}
    assert all(f["URI"].startswith("/experiments/") for f in multi)
    by_type = admin.get(f"{base}/scans/T1 MPRAGE[SLASH]2/files").json()["ResultSet"]["Result"]
    assert len(by_type) == 2
    session = admin.get(f"{base}/files").json()["ResultSet"]["Result"]
    assert [f["Name"] for f in session] == ["n.txt"]


@pytest.mark.parametrize("locator, where", [
    ("absolutePath", "/data/xnat/archive/PUBP/arc001/SESS1/SCANS/3/DICOM/sub/dir/b.dcm"),
    ("projectPath", "arc001/SESS1/SCANS/3/DICOM/sub/dir/b.dcm")])
def test_a_locator_gives_where_files_are_instead_of_uris(admin: httpx.Client, locator: str,
                                                         where: str) -> None:
    """``locator=`` (xnat2bids) renames the URI column and fills it with the file's
    place on the server's disk (FileList, CatalogUtils: docs/xnat-verified.md)."""
    base = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1"
    for listing in (f"{base}/scans/3/resources/DICOM/files", f"{base}/scans/ALL/files"):
        answer = admin.get(listing, params={"locator": locator}).json()["ResultSet"]
        rows = {row["Name"]: row for row in answer["Result"]}
        assert "URI" not in rows["b.dcm"] and rows["b.dcm"][locator] == where
        assert answer["Columns"] == [{"key": locator, "serverRoot": ""}]
    csv_header = admin.get(f"{base}/files", params={"locator": locator, "format": "csv"}).text
    assert csv_header.splitlines()[0].split(",")[2] == locator


def test_listings_are_sent_as_xnat_sends_them(admin: httpx.Client) -> None:
    """Chunked, without Content-Length (Restlet streams them), compact JSON, and
    each row's keys in the order org.json's HashMap gives them."""
    answer = admin.get("/data/projects/PUBP/subjects", params={"format": "json"})
    assert "content-length" not in answer.headers
    assert answer.headers.get("transfer-encoding") == "chunked"
    assert answer.text.startswith('{"ResultSet":{"Result":[{"insert_date":"')
    assert list(answer.json()["ResultSet"]["Result"][0]) == [
        "insert_date", "project", "ID", "label", "insert_user", "URI"]


def test_downloads_file_and_zip_layout(admin: httpx.Client) -> None:
    import io
    import zipfile

    base = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1"
    r = admin.get(f"{base}/scans/3/resources/DICOM/files/a.dcm")
    assert r.content == b"A" * 1000
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["Content-Disposition"] == 'attachment; filename="a.dcm";'
    assert "Last-Modified" in r.headers and "Accept-Ranges" not in r.headers
    # Range is ignored by default, as XNAT 1.8 does.
    ranged = admin.get(f"{base}/scans/3/resources/DICOM/files/a.dcm",
                       headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 200 and len(ranged.content) == 1000
    z = admin.get(f"{base}/scans/ALL/files?format=zip")
    assert z.headers["Content-Type"] == "application/zip" and "Content-Length" not in z.headers
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert sorted(names) == ["SESS1/scans/3-T1_MPRAGE_2/resources/DICOM/files/a.dcm",
                             "SESS1/scans/3-T1_MPRAGE_2/resources/DICOM/files/sub/dir/b.dcm"]
    missing = admin.get(f"{base}/scans/3/resources/DICOM/files/nope.dcm")
    assert missing.status_code == 404 and h3(missing) == "Unable to find file."


def test_range_on_when_enabled(admin: httpx.Client, server: TestServer) -> None:
    url = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/scans/3/resources/DICOM/files/a.dcm"
    server.set_knobs(range=True)
    try:
        r = admin.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == b"A" * 10
        assert r.headers["Content-Range"] == "bytes 10-19/1000"
    finally:
        server.set_knobs(range=False)


# ------------------------------------------------------- statuses, writes
def test_private_project_is_invisible_and_protected_is_forbidden(alice: httpx.Client) -> None:
    """A protected project is listed to every user (XNAT's guest may read its
    ``xnat:projectData``, and users inherit the guest's permissions:
    ``DefaultGroupsAndPermissionsCache.getPermissionCriteria``), its item is
    readable, its data refused."""
    ids = {r["ID"] for r in alice.get("/data/projects").json()["ResultSet"]["Result"]}
    assert "PRIVP" not in ids and {"PUBP", "PROTP"} <= ids
    shown = alice.get("/data/projects", params={"format": "json", "accessible": "true"})
    assert {"PUBP", "PROTP"} <= {r["id"] for r in shown.json()["ResultSet"]["Result"]}
    assert alice.get("/data/projects/PROTP?format=json").status_code == 200
    assert alice.get("/data/projects/PRIVP/subjects").status_code == 404
    r = alice.get("/data/projects/PROTP/subjects")
    assert r.status_code == 403 and h3(r) == "Unable to read subjects for Project: PROTP"
    assert "#sec10.4.4" in r.text
    r = alice.get("/data/projects/PROTP/experiments")
    assert r.status_code == 403 and h3(r) == "Unable to read experiments for Project: PROTP"


def test_reader_cannot_write(alice: httpx.Client) -> None:
    # Was 403. XNAT's FileList.handlePost wraps the upload in
    # ``if (Permissions.canEdit(user, security)) {...}`` with no else branch: a
    # reader's upload is a 200 with an empty body and nothing is written
    # (xnat-write-api.md 3.1 and 10.17; docs/xnat-verified.md).
    url = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/resources/X/files/x.txt"
    r = alice.put(url, content=b"x")
    assert r.status_code == 200 and r.text == ""
    assert alice.get(url).status_code == 404


def test_duplicate_file_put_is_200_and_keeps_the_file(admin: httpx.Client) -> None:
    url = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/resources/NOTES/files/n.txt"
    r = admin.put(url, content=b"changed")
    assert r.status_code == 200 and r.json() == {"duplicates": ["n.txt"]}
    assert admin.get(url).content == b"notes"
    assert admin.put(url + "?overwrite=true", content=b"changed").status_code == 200
    assert admin.get(url).content == b"changed"
    assert admin.put(url + "?overwrite=true", content=b"notes").status_code == 200


def test_empty_put_is_400(admin: httpx.Client) -> None:
    r = admin.put("/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/resources/NOTES/files/e",
                  content=b"")
    assert r.status_code == 400 and "didn't provide any data" in h3(r)


def test_resource_creation_and_conflict(admin: httpx.Client) -> None:
    url = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/resources/QC"
    assert admin.put(url + "?format=JSON").status_code == 200
    r = admin.put(url)
    assert r.status_code == 409 and h3(r) == "Specified resource already exists."
    assert admin.delete(url).status_code == 200


def test_object_creation_statuses(admin: httpx.Client) -> None:
    r = admin.put("/data/archive/projects/PUBP/subjects/NEWSUB?xsiType=xnat:subjectData"
                  "&req_format=qs&xnat:subjectData/label=NEWSUB")
    assert r.status_code == 201 and re.fullmatch(r"XNAT_S\d{5}", r.text)
    again = admin.put("/data/archive/projects/PUBP/subjects/NEWSUB")
    assert again.status_code == 200 and again.text == r.text
    assert admin.delete("/data/projects/PUBP/subjects/NEWSUB").status_code == 200
    bad = admin.put("/data/projects/bad%20id")
    assert bad.status_code == 417 and h3(bad) == "Invalid character in project ID."


def test_file_delete(admin: httpx.Client) -> None:
    url = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/resources/NOTES/files/tmp.txt"
    assert admin.put(url, content=b"t").status_code == 200
    assert admin.delete(url).status_code == 200
    r = admin.delete(url)
    assert r.status_code == 404 and h3(r) == "No matched files"


def test_request_log_counts_routes(admin: httpx.Client, server: TestServer) -> None:
    mark = server.log_mark()
    admin.get("/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/scans")
    admin.get("/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/scans/3/resources/DICOM/files")
    routes = [e["route"] for e in server.requests_since(mark)]
    assert routes == ["scans.list", "files.list"]


def test_injected_faults(admin: httpx.Client, server: TestServer) -> None:
    url = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1/scans/3/resources/DICOM/files/a.dcm"
    server.set_knobs(fail_rate=1.0)
    try:
        assert admin.get(url).status_code == 503
    finally:
        server.set_knobs(fail_rate=0.0)
    server.set_knobs(truncate_rate=1.0)
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            admin.get(url)
    finally:
        server.set_knobs(truncate_rate=0.0)
    server.set_knobs(hang=True)
    try:
        with pytest.raises(httpx.ReadTimeout):
            admin.get(url, timeout=0.5)
    finally:
        server.set_knobs(hang=False)
    assert admin.get(url).status_code == 200


def test_shared_subjects_and_experiments_appear_under_their_label_there(
        admin: httpx.Client, alice: httpx.Client, server: TestServer) -> None:
    """Sharing (XNAT's projectParticipant / experimentData_share): the other project
    lists the shared objects under its own label and resolves that label."""
    subject = admin.get("/data/projects/PUBP/subjects").json()["ResultSet"]["Result"][0]
    session = admin.get("/data/projects/PUBP/experiments").json()["ResultSet"]["Result"][0]
    store = Store(server.data_dir)
    try:
        store.share("subject", subject["ID"], "PROTP", "SHARED_SUBJ")
        store.share("experiment", session["ID"], "PROTP", "SHARED_SESS")
        store.set_role("PROTP", "alice", "owner")  # owns the sharing project only
        with pytest.raises(StoreError):
            store.share("subject", subject["ID"], "PUBP", "AGAIN")  # its own project
    finally:
        store.close()
    [row] = admin.get("/data/projects/PROTP/subjects").json()["ResultSet"]["Result"]
    assert (row["ID"], row["label"], row["project"]) == (subject["ID"], "SHARED_SUBJ", "PUBP")
    assert [r["label"] for r in admin.get("/data/projects/PUBP/subjects").json()[
        "ResultSet"]["Result"]] == ["SUBJ1"]  # the owner still sees its own label
    item = admin.get("/data/projects/PROTP/subjects/SHARED_SUBJ?format=json")
    assert item.status_code == 200
    assert item.json()["items"][0]["data_fields"]["ID"] == subject["ID"]
    for listing in ("/data/projects/PROTP/experiments",
                    "/data/projects/PROTP/subjects/SHARED_SUBJ/experiments",
                    f"/data/projects/PROTP/subjects/{subject['ID']}/experiments"):
        rows = admin.get(listing, params={"columns": "ID,label,subject_ID,subject_label"}
                         ).json()["ResultSet"]["Result"]
        assert [(r["ID"], r["label"], r["subject_ID"]) for r in rows] == [
            (session["ID"], "SHARED_SESS", subject["ID"])], listing
    files = admin.get("/data/projects/PROTP/subjects/SHARED_SUBJ/experiments/SHARED_SESS"
                      "/scans/3/resources/DICOM/files")
    assert files.status_code == 200 and len(files.json()["ResultSet"]["Result"]) == 2
    assert admin.get("/data/projects/PROTP/subjects/SUBJ1").status_code == 404
    children = admin.get(f"/data/experiments/{session['ID']}?format=json").json()[
        "items"][0]["children"]
    [sharing] = [c["items"] for c in children if c["field"] == "sharing/share"]
    # A share row also carries its own key, xnat_experimentData_share_id (XFT's
    # default key, GenericWrapperElement.getDefaultKey; FlattenedItem adds every PK).
    assert [(i["meta"]["xsi:type"], i["data_fields"]["label"], i["data_fields"]["project"],
             type(i["data_fields"]["xnat_experimentData_share_id"])) for i in sharing] == [
        ("xnat:experimentData_share", "SHARED_SESS", "PROTP", int)]
    # Shared data is read-only in the sharing project; deleting it there removes
    # the share, not the data.
    shared_session = "/data/projects/PROTP/subjects/SHARED_SUBJ/experiments/SHARED_SESS"
    assert alice.get(f"{shared_session}/scans/3/resources/DICOM/files").status_code == 200
    # Was 403: a file PUT without edit rights is a silent 200 in XNAT (FileList's
    # canEdit check has no else; xnat-write-api.md 10.17), and nothing is written.
    r = alice.put(f"{shared_session}/resources/NOTES/files/x.txt", content=b"x")
    assert r.status_code == 200 and r.text == ""
    assert alice.get(f"{shared_session}/resources/NOTES/files/x.txt").status_code == 404
    assert alice.delete(shared_session).status_code == 200
    assert admin.get("/data/projects/PROTP/experiments").json()["ResultSet"]["Result"] == []
    assert admin.get(f"/data/experiments/{session['ID']}?format=json").status_code == 200
    assert admin.delete("/data/projects/PROTP/subjects/SHARED_SUBJ").status_code == 200
    assert admin.get("/data/projects/PROTP/subjects").json()["ResultSet"]["Result"] == []
    assert [r["label"] for r in admin.get("/data/projects/PUBP/subjects").json()[
        "ResultSet"]["Result"]] == ["SUBJ1"]
    store = Store(server.data_dir)
    try:
        store.execute("DELETE FROM roles WHERE project = 'PROTP' AND login = 'alice'")
    finally:
        store.close()


def test_assessors_as_xnat_lists_nests_and_serves_them(admin: httpx.Client) -> None:
    """Image assessors (QC, FreeSurfer...): their own accession ID and flat URI,
    nested in the session item with their output resources (``out/file``), those
    resources' files listed with ``/out/`` and IDs whatever the request named,
    and included in the session's ``files?all=true`` (without ``/data``)."""
    base = "/data/projects/PUBP/subjects/SUBJ1/experiments/SESS1"
    made = admin.put(f"{base}/assessors/SESS1_QC?xsiType=xnat:qcAssessmentData")
    assert made.status_code == 201
    assessor_id = made.text
    assert admin.put(f"{base}/assessors/SESS1_QC?xsiType=xnat:qcAssessmentData").text == \
        assessor_id  # exists: 200 with its ID
    assert admin.put(f"{base}/assessors/SESS1_QC/out/resources/QC/files/r/report.json",
                     content=b"{}").status_code == 200
    session_id = admin.get(f"{base}?format=json").json()["items"][0]["data_fields"]["ID"]
    [row] = admin.get(f"/data/experiments/{session_id}/assessors").json()["ResultSet"]["Result"]
    assert (row["ID"], row["label"], row["URI"]) == (assessor_id, "SESS1_QC",
                                                     f"/data/experiments/{assessor_id}")
    assert row["xnat:imageassessordata/id"] == assessor_id
    assert row["session_ID"] == session_id and row["xsiType"] == "xnat:qcAssessmentData"
    children = admin.get(f"{base}?format=json").json()["items"][0]["children"]
    [assessors] = [c["items"] for c in children if c["field"] == "assessors/assessor"]
    assert assessors[0]["data_fields"]["imageSession_ID"] == session_id
    [outputs] = [c["items"] for c in assessors[0]["children"] if c["field"] == "out/file"]
    assert outputs[0]["data_fields"]["label"] == "QC"
    by_label = f"/data/experiments/{session_id}/assessors/SESS1_QC"
    [resource] = admin.get(f"{by_label}/resources").json()["ResultSet"]["Result"]
    assert (resource["category"], resource["cat_id"]) == ("assessors", assessor_id)
    assert admin.get(f"{by_label}/in/resources").json()["ResultSet"]["Result"] == []
    rid = resource["xnat_abstractresource_id"]
    [f] = admin.get(f"{by_label}/resources/QC/files").json()["ResultSet"]["Result"]
    uri = f"/data/experiments/{session_id}/assessors/{assessor_id}/out/resources/{rid}/files/"
    assert f["URI"] == uri + "r/report.json"
    assert admin.get(f["URI"]).content == b"{}"
    every = admin.get(f"/data/experiments/{session_id}/files?all=true").json()
    assert uri[len("/data"):] + "r/report.json" in {r["URI"] for r in every["ResultSet"]["Result"]}
    # The item: by ID at the top level (also at the listing's flat URI), by label
    # only under a project.
    assert admin.get(f"{by_label}?format=json").status_code == 404
    assert admin.delete(by_label).status_code == 404
    for url in (f"{base}/assessors/SESS1_QC", row["URI"],
                f"/data/experiments/{session_id}/assessors/{assessor_id}"):
        item = admin.get(f"{url}?format=json").json()["items"][0]
        assert item["meta"]["xsi:type"] == "xnat:qcAssessmentData"
        assert item["data_fields"]["ID"] == assessor_id
    # Deleting one of its resources leaves it; DELETE of its flat URI removes it.
    assert admin.delete(f"{base}/assessors/SESS1_QC/resources/QC").status_code == 200
    assert admin.get(f"{base}/assessors/SESS1_QC?format=json").status_code == 200
    assert admin.get(f"/data/experiments/{session_id}?format=json").status_code == 200
    assert admin.delete(row["URI"]).status_code == 200
    assert admin.get(f"/data/experiments/{session_id}?format=json").status_code == 200
    assert admin.get(f"/data/experiments/{session_id}/assessors").json()["ResultSet"][
        "Result"] == []
    assert admin.get(f["URI"]).status_code == 404


def test_projects_by_permission_as_the_upload_pages_ask(admin: httpx.Client, alice: httpx.Client,
                                                       server: TestServer) -> None:
    """``?permissions=edit&dataType=xnat:subjectData``: owners and members of a
    project, and a data admin everywhere; lower-case SQL columns only."""
    query = "/data/projects?permissions=edit&dataType=xnat:subjectData&format=json"
    rows = admin.get(query).json()["ResultSet"]["Result"]
    assert {r["id"] for r in rows} == {"PUBP", "PROTP", "PRIVP"}
    assert set(rows[0]) == {"id", "secondary_id"}
    store = Store(server.data_dir)
    try:
        store.set_role("PROTP", "alice", "member")
        store.set_role("PUBP", "alice", "collaborator")
    finally:
        store.close()
    try:
        assert [r["id"] for r in alice.get(query).json()["ResultSet"]["Result"]] == ["PROTP"]
        readable = alice.get(query.replace("=edit", "=read")).json()["ResultSet"]["Result"]
        assert {r["id"] for r in readable} == {"PUBP", "PROTP"}
    finally:
        store = Store(server.data_dir)
        try:
            store.execute("DELETE FROM roles WHERE login = 'alice' AND project IN "
                          "('PROTP', 'PUBP')")
        finally:
            store.close()
    assert admin.get(query.replace("=edit", "=bogus")).status_code == 500


def test_an_object_by_id_is_found_through_a_share_the_user_reads(
        admin: httpx.Client, alice: httpx.Client, server: TestServer) -> None:
    """XNAT looks IDs up with a secured search: an object of a private project is
    found through a project it is shared into that the user reads, and is a 404
    for a user who reads neither."""
    for url in ("/data/projects/HIDDEN_OWN", "/data/projects/ALICE_SHR",
                "/data/projects/HIDDEN_OWN/subjects/H1",
                "/data/projects/HIDDEN_OWN/subjects/H1/experiments/H1_MR"
                "?xsiType=xnat:mrSessionData",
                "/data/projects/HIDDEN_OWN/subjects/H1/experiments/H1_MR2"
                "?xsiType=xnat:mrSessionData"):
        assert admin.put(url).status_code == 201, url
    subject = admin.get("/data/projects/HIDDEN_OWN/subjects/H1?format=json").json()[
        "items"][0]["data_fields"]["ID"]
    shared, unshared = (admin.get(f"/data/projects/HIDDEN_OWN/experiments/{label}?format=json"
                                  ).json()["items"][0]["data_fields"]["ID"]
                        for label in ("H1_MR", "H1_MR2"))
    assert alice.get(f"/data/experiments/{shared}?format=json").status_code == 404
    store = Store(server.data_dir)
    try:
        store.set_role("ALICE_SHR", "alice", "member")
    finally:
        store.close()
    share_session(server, "HIDDEN_OWN", subject, shared, into="ALICE_SHR",
                  subject_label="SHR1", session_label="SHR1_MR")
    item = alice.get(f"/data/experiments/{shared}?format=json")
    assert item.status_code == 200
    assert item.json()["items"][0]["data_fields"]["project"] == "HIDDEN_OWN"
    assert alice.get(f"/data/experiments/{shared}?format=xml").status_code == 200
    assert alice.get(f"/data/experiments/{unshared}?format=json").status_code == 404
    rows = alice.get(f"/data/subjects/{subject}/projects?format=json").json()["ResultSet"]["Result"]
    assert [(r["ID"], r["label"]) for r in rows] == [("HIDDEN_OWN", "H1"), ("ALICE_SHR", "SHR1")]


def test_an_object_by_id_in_a_protected_project_is_not_found(admin: httpx.Client,
                                                              alice: httpx.Client) -> None:
    """An ID is looked up with a secured search (``ExperimentResource.represent``:
    ``getXnatExperimentdatasById(id, user, false)``), which finds nothing the user
    may not read: 404, as in a private project, where the project's own listing
    is 403. (Last in the module: the tests above count the projects.)"""
    for url in ("/data/projects/PROT_IDS?accessibility=protected",
                "/data/projects/PROT_IDS/subjects/PS1",
                "/data/projects/PROT_IDS/subjects/PS1/experiments/PS1_MR"
                "?xsiType=xnat:mrSessionData"):
        assert admin.put(url).status_code in (200, 201), url
    subject = admin.get("/data/projects/PROT_IDS/subjects/PS1?format=json").json()[
        "items"][0]["data_fields"]["ID"]
    session = admin.get("/data/projects/PROT_IDS/experiments/PS1_MR?format=json").json()[
        "items"][0]["data_fields"]["ID"]
    r = alice.get("/data/projects/PROT_IDS/subjects")
    assert r.status_code == 403, r.status_code
    for url in (f"/data/experiments/{session}?format=json", f"/data/subjects/{subject}/projects",
                f"/data/experiments/{session}/scans"):
        assert alice.get(url).status_code == 404, url
        assert admin.get(url).status_code == 200, url

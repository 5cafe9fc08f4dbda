"""Subject demographics, session fields and custom variables on the test
server, as XNAT 1.8 serves them (docs/xnat-verified.md, "Subject and session
metadata"): listing ``columns=`` with joined child rows, item XML and JSON,
and field updates by PUT."""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from xnatfs.testing.harness import TestServer
from xnatfs.testing.store import Store

SCHEMA = Path(__file__).parents[2] / "xnatfs" / "testing" / "schemas" / "xnat.xsd"
XNAT = "{http://nrg.wustl.edu/xnat}"
SUBJECT_COLUMNS = (
    "ID,label,group,src,dob,yob,age,gender,handedness,ses,education,educationDesc,race,"
    "ethnicity,weight,height,gestational_age,post_menstrual_age,birth_weight,"
    "xnat:subjectData/fields/field/name,xnat:subjectData/fields/field/field")
SESSION_COLUMNS = (
    "ID,label,subject_ID,subject_label,date,xsiType,modality,scanner,visit_id,visit,"
    "session_type,xnat:experimentData/fields/field/name,xnat:experimentData/fields/field/field")
SCAN_COLUMNS = (
    "ID,label,subject_ID,subject_label,xnat:imageSessionData/scans/scan/ID,"
    "xnat:imageSessionData/scans/scan/type,xnat:imageSessionData/scans/scan/series_description,"
    "xnat:imageSessionData/scans/scan/quality,xnat:imageSessionData/scans/scan/frames,"
    "xnat:imageSessionData/scans/scan/file/label")


def _fill(store: Store) -> None:
    """P: S1 (demographics, two variables) with an MR session (two scans, one
    with two resources) and a CT session without scans; S2 without anything."""
    store.add_user("admin", "admin", admin=True)
    store.add_project("P", owner="admin")
    s1 = store.add_subject("P", "S1", gender="male", yob="1970", subject_group="control",
                           handedness="left", education="12",
                           custom={"diagnosis": "ADHD", "site": "A"})
    store.add_subject("P", "S2")
    mr = store.add_experiment("P", s1, "S1_MR1", "xnat:mrSessionData", visit="v1",
                              scanner="Prisma", date="2024-01-02", custom={"x": "y"})
    store.add_experiment("P", s1, "S1_CT1", "xnat:ctSessionData")
    store.add_scan(mr, "1", "xnat:mrScanData", type="T1", frames="176")
    pk = store.add_scan(mr, "2", "xnat:mrScanData", type="T2", quality="questionable")
    store.add_resource(mr, pk, "DICOM")
    store.add_resource(mr, pk, "NIFTI")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    data = tmp_path_factory.mktemp("metadata") / "data"
    store = Store(data)
    _fill(store)
    store.close()
    with TestServer(data, dataset="none") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=("admin", "admin"), timeout=60) as client:
        yield client


def rows(http: httpx.Client, url: str) -> list[dict[str, str]]:
    response = http.get(url)
    assert response.status_code == 200, response.text
    return response.json()["ResultSet"]["Result"]


def test_subject_listing_has_every_shortcut_and_a_row_per_custom_variable(
        http: httpx.Client) -> None:
    result = rows(http, f"/data/projects/P/subjects?format=json&columns={SUBJECT_COLUMNS}")
    name, value = "xnat:subjectdata/fields/field/name", "xnat:subjectdata/fields/field/field"
    assert [(r["label"], r[name], r[value]) for r in result] == [
        ("S1", "diagnosis", "ADHD"), ("S1", "site", "A"), ("S2", "", "")]
    s1 = result[0]
    assert (s1["gender"], s1["yob"], s1["group"], s1["handedness"], s1["education"]) == (
        "male", "1970", "control", "left", "12")
    assert s1["dob"] == s1["age"] == s1["birth_weight"] == ""
    assert set(SUBJECT_COLUMNS.lower().split(",")) <= {k.lower() for k in s1}


def test_subject_listing_without_join_has_one_row_per_subject(http: httpx.Client) -> None:
    result = rows(http, "/data/subjects?format=json&columns=ID,label,gender,yob")
    assert [(r["label"], r["gender"], r["yob"]) for r in result] == [
        ("S1", "male", "1970"), ("S2", "", "")]


def test_session_listing_fields_and_image_session_hierarchy(http: httpx.Client) -> None:
    result = rows(http, "/data/projects/P/experiments?format=json"
                        f"&xsiType=xnat:imageSessionData&columns={SESSION_COLUMNS}")
    name = "xnat:experimentdata/fields/field/name"
    value = "xnat:experimentdata/fields/field/field"
    assert [(r["label"], r["xsiType"], r["visit"], r["scanner"], r[name], r[value])
            for r in result] == [
        ("S1_CT1", "xnat:ctSessionData", "", "", "", ""),
        ("S1_MR1", "xnat:mrSessionData", "v1", "Prisma", "x", "y")]


def test_exact_xsi_type_still_filters(http: httpx.Client) -> None:
    result = rows(http, "/data/projects/P/experiments?format=json&xsiType=xnat:ctSessionData")
    assert [r["label"] for r in result] == ["S1_CT1"]


def test_scan_join_gives_a_row_per_scan_and_resource(http: httpx.Client) -> None:
    result = rows(http, "/data/projects/P/experiments?format=json"
                        f"&xsiType=xnat:imageSessionData&columns={SCAN_COLUMNS}")
    prefix = "xnat:imagesessiondata/scans/scan/"
    got = [(r["label"], r[prefix + "id"], r[prefix + "type"], r[prefix + "quality"],
            r[prefix + "frames"], r[prefix + "file/label"]) for r in result]
    assert got == [
        ("S1_CT1", "", "", "", "", ""),
        ("S1_MR1", "1", "T1", "usable", "176", ""),
        ("S1_MR1", "2", "T2", "questionable", "", "DICOM"),
        ("S1_MR1", "2", "T2", "questionable", "", "NIFTI")]


def test_xnat_rest_test_scan_count_request(http: httpx.Client) -> None:
    """TestAdvancedSearch.getScanCountFromDataApi: an mrSessionData prefix, the
    key read back lower-cased."""
    result = rows(http, "/data/experiments?format=json&columns=xnat:mrSessionData/scans/scan/ID")
    key = "xnat:mrsessiondata/scans/scan/id"
    assert sorted(r[key] for r in result) == ["", "1", "2"]  # one row per scan


def test_subject_xml_carries_group_demographics_and_fields(http: httpx.Client) -> None:
    text = http.get("/data/projects/P/subjects/S1?format=xml").text
    root = ET.fromstring(text)
    assert root.attrib["group"] == "control"
    demo = root.find(f"{XNAT}demographics")
    assert demo is not None
    assert [(c.tag.removeprefix(XNAT), c.text) for c in demo] == [
        ("yob", "1970"), ("gender", "male"), ("handedness", "left"), ("education", "12")]
    fields = root.findall(f"{XNAT}fields/{XNAT}field")
    assert [(f.attrib["name"], f.text) for f in fields] == [("diagnosis", "ADHD"), ("site", "A")]


def test_session_xml_carries_visit_scanner_and_fields(http: httpx.Client) -> None:
    root = ET.fromstring(http.get("/data/projects/P/experiments/S1_MR1?format=xml").text)
    assert root.findtext(f"{XNAT}visit") == "v1"
    assert root.findtext(f"{XNAT}scanner") == "Prisma"
    fields = root.findall(f"{XNAT}fields/{XNAT}field")
    assert [(f.attrib["name"], f.text) for f in fields] == [("x", "y")]


def test_documents_validate_against_the_served_schema(http: httpx.Client) -> None:
    import xmlschema  # a test dependency (pyproject.toml)
    schema = xmlschema.XMLSchema(str(SCHEMA), validation="lax")
    for path in ("/data/projects/P/subjects/S1", "/data/projects/P/subjects/S2",
                 "/data/projects/P/experiments/S1_MR1", "/data/projects/P/experiments/S1_CT1"):
        errors = list(schema.iter_errors(http.get(f"{path}?format=xml").text))
        assert not errors, (path, [str(e).splitlines()[0] for e in errors[:3]])


def test_item_json_carries_demographics_and_fields(http: httpx.Client) -> None:
    item = http.get("/data/projects/P/subjects/S1?format=json").json()["items"][0]
    assert item["data_fields"]["group"] == "control"
    children = {c["field"]: c["items"] for c in item["children"]}
    demo = children["demographics"][0]["data_fields"]
    assert (demo["gender"], demo["yob"], demo["handedness"]) == ("male", 1970, "left")
    assert [(f["data_fields"]["name"], f["data_fields"]["field"])
            for f in children["fields/field"]] == [("diagnosis", "ADHD"), ("site", "A")]
    session = http.get("/data/projects/P/experiments/S1_MR1?format=json").json()["items"][0]
    assert (session["data_fields"]["visit"], session["data_fields"]["scanner"]) == (
        "v1", "Prisma")


def test_old_database_gains_the_metadata_columns(tmp_path: Path) -> None:
    """A data set made before demographics opens, its subjects keep theirs."""
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "xnat.sqlite")
    db.executescript(
        "CREATE TABLE projects (id TEXT PRIMARY KEY, secondary_id TEXT NOT NULL,"
        " name TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',"
        " pi_firstname TEXT NOT NULL DEFAULT '', pi_lastname TEXT NOT NULL DEFAULT '',"
        " accessibility TEXT NOT NULL DEFAULT 'private',"
        " prearchive_code INTEGER NOT NULL DEFAULT 0, insert_date TEXT NOT NULL,"
        " insert_user TEXT NOT NULL, last_modified TEXT NOT NULL DEFAULT '');"
        "CREATE TABLE subjects (id TEXT PRIMARY KEY, project TEXT NOT NULL,"
        " label TEXT NOT NULL, insert_date TEXT NOT NULL, insert_user TEXT NOT NULL,"
        " gender TEXT NOT NULL DEFAULT '', yob TEXT NOT NULL DEFAULT '',"
        " last_modified TEXT NOT NULL DEFAULT '', UNIQUE (project, label));"
        "INSERT INTO projects (id, secondary_id, name, insert_date, insert_user)"
        " VALUES ('P', 'P', 'P', '2020-01-01 00:00:00.0', 'admin');"
        "INSERT INTO subjects (id, project, label, insert_date, insert_user, gender)"
        " VALUES ('X_S00001', 'P', 'OLD', '2020-01-01 00:00:00.0', 'admin', 'female');")
    db.close()
    store = Store(data)
    try:
        subject = store.subject("P", "OLD")
        assert subject is not None
        assert (subject["gender"], subject["handedness"], subject["subject_group"]) == (
            "female", "", "")
        store.update_subject("X_S00001", {"handedness": "right"}, {"site": "B"})
        assert [(f["name"], f["value"]) for f in store.custom_fields("subject", "X_S00001")] \
            == [("site", "B")]
    finally:
        store.close()

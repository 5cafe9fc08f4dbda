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


# PUT updates ------------------------------------------------------------------
def _subject(http: httpx.Client, project: str, label: str) -> dict[str, str]:
    """A subject's listing row with every metadata column."""
    result = rows(http, f"/data/projects/{project}/subjects?format=json&label={label}"
                        "&columns=ID,label,group,src,dob,yob,age,gender,handedness,education")
    assert len(result) == 1, result
    return result[0]


def _fields(http: httpx.Client, url: str) -> dict[str, str]:
    item = http.get(f"{url}?format=json").json()["items"][0]
    children = {c["field"]: c["items"] for c in item["children"]}
    return {f["data_fields"]["name"]: f["data_fields"].get("field", "")
            for f in children.get("fields/field", [])}


@pytest.fixture(scope="module")
def writable(http: httpx.Client) -> str:
    """Project W, where the write tests make their own subjects."""
    assert http.put("/data/projects/W").status_code == 201
    return "W"


def test_put_creates_a_subject_with_shortcut_and_custom_field(http: httpx.Client,
                                                              writable: str) -> None:
    url = f"/data/projects/{writable}/subjects/NEW1"
    field = "xnat:subjectData/fields/field[name=diagnosis]/field"
    # The "=" inside the key is percent-encoded (pyxnat quotes it, xnatpy's
    # requests does): a raw one ends the parameter name, in Restlet as here.
    response = http.put(url, params={"xsiType": "xnat:subjectData", "gender": "female",
                                     field: "ADHD"})
    assert response.status_code == 201
    assert response.text.startswith("XNAT_S")
    assert _subject(http, writable, "NEW1")["gender"] == "female"
    assert _fields(http, url) == {"diagnosis": "ADHD"}
    again = http.put(url, params={"xsiType": "xnat:subjectData", "gender": "male",
                                  field: "none"})
    assert (again.status_code, again.text) == (200, response.text)
    assert _subject(http, writable, "NEW1")["gender"] == "male"
    assert _fields(http, url) == {"diagnosis": "none"}


def test_put_updates_with_shortcuts_and_xpaths(http: httpx.Client, writable: str) -> None:
    url = f"/data/projects/{writable}/subjects/UPD1"
    assert http.put(url).status_code == 201
    assert http.put(f"{url}?yob=1970&group=control&handedness=right&src=referral"
                    ).status_code == 200
    row = _subject(http, writable, "UPD1")
    assert (row["yob"], row["group"], row["handedness"], row["src"]) == (
        "1970", "control", "right", "referral")
    demo = "xnat:subjectData/demographics[@xsi:type=xnat:demographicData]"
    assert http.put(url, params={f"{demo}/education": "16", f"{demo}/dob": "03/04/1970"}
                    ).status_code == 200
    row = _subject(http, writable, "UPD1")
    assert (row["education"], row["dob"]) == ("16", "1970-03-04")
    # A form body, as XNAT's TestCustomVariables sends one.
    response = http.put(url, data={"xnat:subjectData/fields/field[name=site]/field": "B"})
    assert response.status_code == 200
    assert _fields(http, url) == {"site": "B"}


@pytest.mark.parametrize("query,message", [
    ("gender=maybe", "'{\"http://nrg.wustl.edu/xnat\":gender}' 'maybe' Must Match "
                     "Pre-Defined Values...(male,female,other,unknown,M,F)"),
    ("handedness=both", "'both' Must Match Pre-Defined Values..."),
    ("yob=nineteen", "'{\"http://nrg.wustl.edu/xnat\":yob}' Must Be A Valid Integer"),
    ("education=1.5", "Must Be A Valid Integer"),
    ("dob=1970-31-31", "'{\"http://nrg.wustl.edu/xnat\":dob}' Must Be A Valid Date"),
    ("age=old", "Must Be A Valid Double"),
])
def test_refused_values_change_nothing(http: httpx.Client, writable: str, query: str,
                                       message: str) -> None:
    url = f"/data/projects/{writable}/subjects/REF1"
    assert http.put(f"{url}?gender=male&yob=1980&handedness=left").status_code in (200, 201)
    before = _subject(http, writable, "REF1")
    key, _, value = query.partition("=")
    response = http.put(url, params={key: value, "group": "changed",
                                     "xnat:subjectData/fields/field[name=f]/field": "v"})
    assert response.status_code == 400
    assert "The content of element 'xnat:demographicData' is not complete." in response.text
    assert message in response.text
    assert _subject(http, writable, "REF1") == before
    assert _fields(http, url) == {}
    # Creation is refused the same way: no subject appears.
    assert http.put(f"/data/projects/{writable}/subjects/REF_NEW?{query}").status_code == 400
    assert rows(http, f"/data/projects/{writable}/subjects?format=json&label=REF_NEW") == []


def test_enumeration_ignores_case_and_null_empties(http: httpx.Client, writable: str) -> None:
    url = f"/data/projects/{writable}/subjects/CASE1"
    assert http.put(f"{url}?gender=Female&yob=1990").status_code == 201
    assert _subject(http, writable, "CASE1")["gender"] == "Female"
    assert http.put(f"{url}?yob=NULL").status_code == 200
    assert _subject(http, writable, "CASE1")["yob"] == ""


def test_put_updates_a_session_visit_and_custom_field(http: httpx.Client,
                                                       writable: str) -> None:
    subject = f"/data/projects/{writable}/subjects/SES1"
    assert http.put(subject).status_code == 201
    session = f"{subject}/experiments/SES1_MR1"
    created = http.put(f"{session}?xsiType=xnat:mrSessionData&visit=v1&scanner=Prisma")
    assert created.status_code == 201
    response = http.put(session, params={
        "xsiType": "xnat:mrSessionData", "visit": "v2",
        "xnat:mrSessionData/fields/field[name=x]/field": "y"})
    assert (response.status_code, response.text) == (200, created.text)
    item = http.get(f"{session}?format=json").json()["items"][0]
    assert (item["data_fields"]["visit"], item["data_fields"]["scanner"]) == ("v2", "Prisma")
    assert _fields(http, session) == {"x": "y"}
    # Without xsiType, and through xnat:experimentData: the same.
    assert http.put(session, params={"xnat:experimentData/fields/field[name=x]/field": "z",
                                     "note": "n"}).status_code == 200
    item = http.get(f"{session}?format=json").json()["items"][0]
    assert item["data_fields"]["note"] == "n"
    assert _fields(http, session) == {"x": "z"}


def test_experiment_resource_takes_xpaths_not_shortcuts(http: httpx.Client,
                                                        writable: str) -> None:
    """/data/experiments/{ID} is ExperimentResource, which registers no shortcuts."""
    subject = f"/data/projects/{writable}/subjects/SES2"
    assert http.put(subject).status_code == 201
    eid = http.put(f"{subject}/experiments/SES2_MR1?xsiType=xnat:mrSessionData").text
    assert http.put(f"/data/experiments/{eid}?visit=ignored"
                    "&xnat:mrSessionData/visit_id=V7").status_code == 200
    item = http.get(f"/data/experiments/{eid}?format=json").json()["items"][0]
    assert item["data_fields"].get("visit") is None
    assert item["data_fields"]["visit_id"] == "V7"


def test_xnatpy_reads_and_sets_demographics_and_fields(server: TestServer,
                                                      writable: str) -> None:
    import xnat  # a test dependency (pyproject.toml)
    with xnat.connect(server.url, user="admin", password="admin", loglevel="ERROR") as session:
        subject = session.projects["P"].subjects["S1"]
        assert subject.demographics.gender == "male"
        assert subject.demographics.yob == 1970
        assert subject.group == "control"
        assert {k: v.value if hasattr(v, "value") else v for k, v in subject.fields.items()
                } == {"diagnosis": "ADHD", "site": "A"}
        created = session.classes.SubjectData(parent=session.projects[writable], label="PY1")
        created.fields["cohort"] = "one"
        created.demographics.gender = "other"
        created.clearcache()
    with httpx.Client(base_url=server.url, auth=("admin", "admin")) as http:
        url = f"/data/projects/{writable}/subjects/PY1"
        assert _fields(http, url) == {"cohort": "one"}
        assert _subject(http, writable, "PY1")["gender"] == "other"


def test_pyxnat_arrays_read_joined_scans(server: TestServer) -> None:
    import pyxnat  # a test dependency (pyproject.toml)
    interface = pyxnat.Interface(server=server.url, user="admin", password="admin")
    try:
        scans = interface.array.scans(project_id="P")
        assert sorted(scans.get("xnat:imagescandata/id")) == ["1", "2"]
        experiments = interface.array.experiments(project_id="P",
                                                  experiment_type="xnat:imageSessionData")
        assert sorted(experiments.get("ID")) == sorted(
            r["ID"] for r in interface._get_json(
                "/data/projects/P/experiments?format=json&xsiType=xnat:imageSessionData"))
    finally:
        interface.disconnect()


# Accession IDs (reference section 7) -------------------------------------------
def test_project_paths_take_an_id_from_another_project(http: httpx.Client,
                                                      writable: str) -> None:
    """ExperimentResource and SubjectResource look an ID up anywhere first."""
    eid = rows(http, "/data/projects/P/experiments?format=json&label=S1_MR1")[0]["ID"]
    sid = rows(http, "/data/projects/P/subjects?format=json&label=S1")[0]["ID"]
    item = http.get(f"/data/projects/{writable}/experiments/{eid}?format=json")
    assert item.status_code == 200
    assert item.json()["items"][0]["data_fields"]["label"] == "S1_MR1"
    item = http.get(f"/data/projects/{writable}/subjects/{sid}?format=json")
    assert item.json()["items"][0]["data_fields"]["label"] == "S1"
    # SubjAssessmentResource does not check the subject of the path on GET.
    item = http.get(f"/data/projects/P/subjects/S2/experiments/{eid}?format=json")
    assert item.json()["items"][0]["data_fields"]["ID"] == eid
    # /data/experiments/{X} takes IDs only.
    assert http.get("/data/experiments/S1_MR1?format=json").status_code == 404
    # A label, unlike an ID, is looked up in the project of the path only.
    assert http.get(f"/data/projects/{writable}/experiments/S1_MR1?format=json"
                    ).status_code == 404


def test_assessor_ids_resolve_with_their_projects(server: TestServer) -> None:
    data = server.data_dir
    with httpx.Client(base_url=server.url, auth=("admin", "admin")) as http:
        session = http.get("/data/projects/P/subjects/S1/experiments/S1_MR1"
                           "/assessors/S1_MR1_QC?xsiType=xnat:qcManualAssessorData")
        assert session.status_code == 404
        created = http.put("/data/projects/P/subjects/S1/experiments/S1_MR1"
                           "/assessors/S1_MR1_QC?xsiType=xnat:qcManualAssessorData")
        assert created.status_code == 201, created.text
        aid = created.text
        projects = http.get(f"/data/experiments/{aid}/projects?format=json")
        assert projects.status_code == 200, (data, projects.text)
        assert [(r["ID"], r["label"]) for r in projects.json()["ResultSet"]["Result"]] == [
            ("P", "S1_MR1_QC")]
        item = http.get(f"/data/projects/P/experiments/{aid}?format=json")
        assert item.json()["items"][0]["meta"]["xsi:type"] == "xnat:qcManualAssessorData"


# The demo data set ---------------------------------------------------------------
def test_demo_subjects_and_sessions_carry_metadata(demo_server: TestServer) -> None:
    with httpx.Client(base_url=demo_server.url, auth=("admin", "admin"), timeout=60) as http:
        subjects = rows(http, f"/data/projects/NEURO_PUB/subjects?format=json"
                              f"&columns={SUBJECT_COLUMNS}")
        sessions = rows(http, "/data/projects/NEURO_PUB/experiments?format=json"
                              f"&xsiType=xnat:imageSessionData&columns={SESSION_COLUMNS}")
    name = "xnat:subjectdata/fields/field/name"
    by_subject: dict[str, dict[str, str]] = {}
    for row in subjects:
        by_subject.setdefault(row["label"], {})[row[name]] = row[
            "xnat:subjectdata/fields/field/field"]
    assert set(by_subject) == {"NP001", "NP002", "NP 003"}
    assert all(set(fields) == {"diagnosis", "site"} for fields in by_subject.values())
    first = {r["label"]: r for r in subjects}
    # Age is recorded three ways across the subjects, one each.
    assert [bool(first[s]["yob"]) for s in ("NP001", "NP002", "NP 003")] == [True, False, False]
    assert first["NP002"]["dob"].startswith("1975-") and first["NP 003"]["age"]
    assert {first[s]["group"] for s in first} == {"control", "patient"}
    assert all(first[s]["gender"] and first[s]["handedness"] for s in first)
    assert [(r["label"], r["visit_id"], r["xnat:experimentdata/fields/field/name"])
            for r in sessions] == [
        ("NP 003_MR1", "v1", "protocol_version"), ("NP001_MR1", "v1", "protocol_version"),
        ("NP001_MR2", "v2", "protocol_version"), ("NP002_MR1", "v1", "protocol_version")]
    assert all(r["scanner"] for r in sessions)


def test_custom_field_names_keep_case_and_null_empties(http: httpx.Client,
                                                       writable: str) -> None:
    url = f"/data/projects/{writable}/subjects/NAMES1"
    key = "xnat:subjectData/fields/field[name={}]/field"
    assert http.put(url, params={key.format("Site"): "a", key.format("'site'"): "b"}
                    ).status_code == 201
    assert _fields(http, url) == {"Site": "a", "site": "b"}
    assert http.put(url, params={key.format("site"): "NULL"}).status_code == 200
    item = http.get(f"{url}?format=json").json()["items"][0]
    fields = next(c["items"] for c in item["children"] if c["field"] == "fields/field")
    assert [f["data_fields"] for f in fields] == [
        {"name": "Site", "field": "a", "xnat_subjectData_field_id": fields[0]["data_fields"][
            "xnat_subjectData_field_id"]},
        {"name": "site", "xnat_subjectData_field_id": fields[1]["data_fields"][
            "xnat_subjectData_field_id"]}]

"""The project tables without a mount: the records made of XNAT's joined listing
rows (one request each), their CSV text as pandas and the csv module read it,
and the subjects' and sessions' metadata attributes."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

import httpx
import pandas as pd
import pytest

from xnatfs.areas.tables import with_metadata
from xnatfs.client import ClientSettings, XnatClient
from xnatfs.client.tables import (
    SESSION_FIELDS,
    SUBJECT_FIELDS,
    ScanRecord,
    SessionRecord,
    SubjectRecord,
    scan_records,
    session_records,
    subject_records,
)
from xnatfs.credentials import Credentials
from xnatfs.errors import ServerError
from xnatfs.tablecsv import scans_csv, sessions_csv, subjects_csv

FAST = ClientSettings(connect_timeout=2.0, read_timeout=2.0, deadline=5.0, max_attempts=2,
                      backoff_initial=0.02, backoff_max=0.2)

# Rows as XNAT 1.8 gives them: the joined xpath columns lower-cased, one row per
# child, "" where a parent has none (TestCustomVariables, TestAdvancedSearch).
SUBJECT_NAME = "xnat:subjectdata/fields/field/name"
SUBJECT_VALUE = "xnat:subjectdata/fields/field/field"
SESSION_NAME = "xnat:experimentdata/fields/field/name"
SESSION_VALUE = "xnat:experimentdata/fields/field/field"
SCAN = "xnat:imagesessiondata/scans/scan/"


def subject_row(sid: str, label: str, name: str = "", value: str = "", **fields: str
                ) -> dict[str, str]:
    row = {"ID": sid, "label": label, **{f: "" for f in SUBJECT_FIELDS}, **fields,
           SUBJECT_NAME: name, SUBJECT_VALUE: value,
           "URI": f"/data/subjects/{sid}"}
    return row


SUBJECT_ROWS = [
    subject_row("XNAT_S1", "001", "iq", "112", group="control", gender="female", yob="1970"),
    subject_row("XNAT_S1", "001", "site", "Leeds, UK", group="control", gender="female",
                yob="1970"),
    subject_row("XNAT_S2", "002", group="patient", handedness="left"),
    subject_row("XNAT_S3", "NP 003", "gender", "self-described \"x\""),
]


def session_row(eid: str, label: str, subject: str, name: str = "", value: str = "",
                **fields: str) -> dict[str, str]:
    return {"ID": eid, "label": label, "subject_ID": subject, "subject_label": subject[-1] * 3,
            "date": "", "xsiType": "xnat:mrSessionData",
            **{f: "" for f in SESSION_FIELDS[1:]}, **fields, SESSION_NAME: name,
            SESSION_VALUE: value, "project": "P", "URI": f"/data/experiments/{eid}"}


SESSION_ROWS = [
    session_row("XNAT_E1", "001_MR1", "XNAT_S1", "run", "1", date="2023-01-02",
                scanner="Prisma", visit="v1"),
    session_row("XNAT_E1", "001_MR1", "XNAT_S1", "tired", "yes", date="2023-01-02",
                scanner="Prisma", visit="v1"),
    session_row("XNAT_E2", "001_MR2", "XNAT_S1"),
    session_row("XNAT_E3", "002_MR1", "XNAT_S2", modality="MR"),
]


def scan_row(eid: str, label: str, scan: str, resource: str, **fields: str) -> dict[str, str]:
    row = {"ID": eid, "label": label, "subject_ID": "XNAT_S1", "subject_label": "001",
           SCAN + "id": scan, SCAN + "type": "", SCAN + "series_description": "",
           SCAN + "quality": "", SCAN + "frames": "", SCAN + "file/label": resource,
           "xsiType": "xnat:mrSessionData", "project": "P", "URI": f"/data/experiments/{eid}"}
    row.update({SCAN + k: v for k, v in fields.items()})
    return row


SCAN_ROWS = [
    scan_row("XNAT_E1", "001_MR1", "1", "DICOM", type="T1 MPRAGE/2", quality="usable",
             frames="176", series_description="t1_mprage, sag"),
    scan_row("XNAT_E1", "001_MR1", "1", "NIFTI", type="T1 MPRAGE/2", quality="usable",
             frames="176", series_description="t1_mprage, sag"),
    scan_row("XNAT_E1", "001_MR1", "1", "DICOM", type="T1 MPRAGE/2", quality="usable",
             frames="176", series_description="t1_mprage, sag"),
    scan_row("XNAT_E1", "001_MR1", "2", "", type="rest", quality="unusable"),
    scan_row("XNAT_E2", "001_MR2", "", ""),  # a session without scans
    scan_row("XNAT_E3", "002_MR1", "1", "DICOM", type="T2"),
]


# ------------------------------------------------------------------ records
def test_subject_rows_are_grouped_into_records() -> None:
    records = subject_records(SUBJECT_ROWS, "P")
    assert [r.id for r in records] == ["XNAT_S1", "XNAT_S2", "XNAT_S3"]
    first = records[0]
    assert (first.label, first.project) == ("001", "P")
    assert first.fields == {"group": "control", "gender": "female", "yob": "1970"}
    assert first.custom == {"iq": "112", "site": "Leeds, UK"}
    assert records[1].fields == {"group": "patient", "handedness": "left"} and not records[1].custom
    assert records[2].fields == {} and records[2].custom == {"gender": "self-described \"x\""}


def test_session_rows_are_grouped_into_records() -> None:
    records = session_records(SESSION_ROWS, "P")
    assert [r.id for r in records] == ["XNAT_E1", "XNAT_E2", "XNAT_E3"]
    assert records[0] == SessionRecord(
        id="XNAT_E1", label="001_MR1", project="P", subject_id="XNAT_S1", subject_label="111",
        xsi_type="xnat:mrSessionData",
        fields={"date": "2023-01-02", "scanner": "Prisma", "visit": "v1"},
        custom={"run": "1", "tired": "yes"})
    assert records[1].fields == {} and records[2].fields == {"modality": "MR"}


def test_scan_rows_are_grouped_by_session_and_scan() -> None:
    records = scan_records(SCAN_ROWS, "/data/projects/P/experiments")
    assert [(r.session_id, r.scan_id) for r in records] == [
        ("XNAT_E1", "1"), ("XNAT_E1", "2"), ("XNAT_E3", "1")]
    assert records[0].resources == ("DICOM", "NIFTI")  # in listing order, each once
    assert records[0].type == "T1 MPRAGE/2" and records[0].frames == "176"
    assert records[1].resources == () and records[1].quality == "unusable"


def test_a_listing_without_the_joined_scan_column_is_an_error() -> None:
    rows = [{k: v for k, v in row.items() if not k.startswith(SCAN)} for row in SCAN_ROWS]
    with pytest.raises(ServerError):
        scan_records(rows, "/data/projects/P/experiments")
    assert scan_records([], "/data/projects/P/experiments") == []  # no sessions at all


def test_column_case_does_not_matter() -> None:
    """XNAT spells shortcut columns as asked and xpath ones in lower case; a
    server that keeps the xpath's case is read the same."""
    rows = [{("xnat:subjectData/fields/field/name" if k == SUBJECT_NAME else
              "xnat:subjectData/fields/field/field" if k == SUBJECT_VALUE else k): v
             for k, v in row.items()} for row in SUBJECT_ROWS]
    assert subject_records(rows, "P") == subject_records(SUBJECT_ROWS, "P")


async def test_each_kind_of_record_is_one_request() -> None:
    """The exact requests: one listing each, with the joined columns."""
    seen: list[httpx.URL] = []
    answers: dict[str, list[dict[str, Any]]] = {"subjects": SUBJECT_ROWS,
                                                "experiments": SESSION_ROWS}

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/data/JSESSION":
            return httpx.Response(200, text="ABCDEF0123456789ABCDEF0123456789", headers={
                "Set-Cookie": "JSESSIONID=ABCDEF0123456789ABCDEF0123456789; Path=/"})
        seen.append(request.url)
        columns = request.url.params["columns"]
        rows = SCAN_ROWS if "scans/scan" in columns else answers[request.url.path.split("/")[-1]]
        return httpx.Response(200, json={"ResultSet": {"Result": rows}})

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    async with http, XnatClient(Credentials("http://xnat.test", "u", "p"), settings=FAST,
                                http=http) as client:
        subjects = await client.list_subject_records("P")
        sessions = await client.list_session_records("P")
        scans = await client.list_scan_records("P")
    assert (len(subjects), len(sessions), len(scans)) == (3, 3, 3)
    assert [(u.path, dict(u.params)) for u in seen] == [
        ("/data/projects/P/subjects", {"format": "json", "columns": (
            "ID,label,group,src,dob,yob,age,gender,handedness,ses,education,educationDesc,race,"
            "ethnicity,weight,height,gestational_age,post_menstrual_age,birth_weight,"
            "xnat:subjectData/fields/field/name,xnat:subjectData/fields/field/field")}),
        ("/data/projects/P/experiments", {
            "format": "json", "xsiType": "xnat:imageSessionData", "columns": (
                "ID,label,subject_ID,subject_label,date,xsiType,modality,scanner,visit_id,"
                "visit,session_type,xnat:experimentData/fields/field/name,"
                "xnat:experimentData/fields/field/field")}),
        ("/data/projects/P/experiments", {
            "format": "json", "xsiType": "xnat:imageSessionData", "columns": (
                "ID,label,subject_ID,subject_label,xnat:imageSessionData/scans/scan/ID,"
                "xnat:imageSessionData/scans/scan/type,"
                "xnat:imageSessionData/scans/scan/series_description,"
                "xnat:imageSessionData/scans/scan/quality,"
                "xnat:imageSessionData/scans/scan/frames,"
                "xnat:imageSessionData/scans/scan/file/label")})]
    assert XnatClient.SUBJECT_FIELDS == SUBJECT_FIELDS


# ---------------------------------------------------------------------- CSV
def read(text: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(text), dtype=str, keep_default_na=False)


def test_subjects_csv() -> None:
    subjects = subject_records(SUBJECT_ROWS, "P")
    text = subjects_csv(subjects, session_records(SESSION_ROWS, "P"))
    table = read(text)
    # Only the fields some subject has; custom variables by name, after them.
    assert list(table.columns) == ["ID", "label", "group", "gender", "handedness", "yob",
                                   "field:gender", "field:iq", "field:site", "sessions"]
    assert table.to_dict("records")[0] == {
        "ID": "XNAT_S1", "label": "001", "group": "control", "gender": "female",
        "handedness": "", "yob": "1970", "field:gender": "", "field:iq": "112",
        "field:site": "Leeds, UK", "sessions": "2"}
    assert list(table["sessions"]) == ["2", "1", "0"]
    assert list(table["field:gender"]) == ["", "", "self-described \"x\""]
    assert text.startswith(b"ID,label,group,") and b"\r" not in text
    # The csv module reads the same, quotes and commas included.
    rows = list(csv.reader(io.StringIO(text.decode("utf-8"))))
    assert rows[1][1] == "001" and rows[1][-2] == "Leeds, UK"


def test_a_project_without_subjects_has_a_header_only() -> None:
    assert subjects_csv([], []) == b"ID,label,group,sessions\n"


def test_sessions_csv() -> None:
    text = sessions_csv(session_records(SESSION_ROWS, "P"),
                        scan_records(SCAN_ROWS, "/data/projects/P/experiments"))
    table = read(text)
    assert list(table.columns) == ["ID", "label", "subject_label", "subject_ID", "date",
                                   "xsiType", "modality", "scanner", "visit_id", "visit",
                                   "session_type", "scans", "field:run", "field:tired"]
    assert table.to_dict("records")[0] == {
        "ID": "XNAT_E1", "label": "001_MR1", "subject_label": "111", "subject_ID": "XNAT_S1",
        "date": "2023-01-02", "xsiType": "xnat:mrSessionData", "modality": "",
        "scanner": "Prisma", "visit_id": "", "visit": "v1", "session_type": "", "scans": "2",
        "field:run": "1", "field:tired": "yes"}
    assert list(table["scans"]) == ["2", "0", "1"]


def test_scans_csv() -> None:
    table = read(scans_csv(scan_records(SCAN_ROWS, "/data/projects/P/experiments")))
    assert list(table.columns) == ["session_label", "session_ID", "subject_label", "ID",
                                   "type", "series_description", "quality", "frames",
                                   "resources"]
    assert table.to_dict("records")[0] == {
        "session_label": "001_MR1", "session_ID": "XNAT_E1", "subject_label": "001", "ID": "1",
        "type": "T1 MPRAGE/2", "series_description": "t1_mprage, sag", "quality": "usable",
        "frames": "176", "resources": "DICOM NIFTI"}
    usable_t1 = table[(table.quality == "usable") & table.type.str.contains("T1")]
    assert list(usable_t1.session_label) == ["001_MR1"]
    assert table.resources.str.split().tolist() == [["DICOM", "NIFTI"], [], ["DICOM"]]


def test_values_are_never_altered() -> None:
    """Leading zeros, formulas' first characters, newlines, non-ASCII: as XNAT has them."""
    odd = ["007", "=1+1", "two\nlines", "Zoë, \"ß\"", " padded "]
    subjects = [SubjectRecord(id=f"S{i}", label=value, project="P", fields={"group": value},
                              custom={"note": value}) for i, value in enumerate(odd)]
    table = read(subjects_csv(subjects, []))
    assert list(table["label"]) == odd and list(table["field:note"]) == odd


# ------------------------------------------------------------------- xattrs
def test_metadata_attributes_join_the_listed_ones() -> None:
    listed = {"user.xnat.id": "XNAT_E1", "user.xnat.date": "2023-01-02",
              "user.xnat.uri": "/data/experiments/XNAT_E1"}
    record = session_records(SESSION_ROWS, "P")[0]
    attrs = with_metadata(listed, SESSION_FIELDS, record)
    assert attrs == {**listed, "user.xnat.scanner": "Prisma", "user.xnat.visit": "v1",
                     "user.xnat.field.run": "1", "user.xnat.field.tired": "yes"}
    # A field or custom variable gone since is gone; the listed ones stay.
    emptied = dataclasses.replace(record, fields={"scanner": "Skyra"}, custom={})
    assert with_metadata(attrs, SESSION_FIELDS, emptied) == {**listed,
                                                             "user.xnat.scanner": "Skyra"}
    assert with_metadata(attrs, SESSION_FIELDS, None) == listed


def test_custom_variables_that_cannot_be_attribute_names_are_left_out() -> None:
    record = SubjectRecord(id="S", label="s", project="P", fields={"gender": "male"},
                           custom={"ok": "1", "x" * 250: "2", "nul\x00": "3"})
    assert with_metadata({}, SUBJECT_FIELDS, record) == {"user.xnat.gender": "male",
                                                         "user.xnat.field.ok": "1"}


def test_scan_record_is_what_the_spreadsheet_side_expects() -> None:
    """The record fields other modules code against (issue 22's upload area)."""
    assert list(ScanRecord.__dataclass_fields__) == [
        "session_id", "session_label", "subject_id", "subject_label", "scan_id", "type",
        "series_description", "quality", "frames", "resources"]
    assert list(SubjectRecord.__dataclass_fields__) == ["id", "label", "project", "fields",
                                                        "custom"]

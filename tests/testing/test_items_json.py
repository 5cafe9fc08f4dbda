"""Item JSON (``format=json``) and ``columns=`` against XNAT 1.8's source and recordings.

What each rule rests on (xdat ``org/nrg/xft/presentation``):

- ``ItemJSONBuilder.convert``: each item is a ``JSONObject`` of ``meta``,
  ``data_fields`` and ``children``; ``meta`` holds ``isHistory``,
  ``create_event_id``, ``start_date`` (a ``Date``, written by its
  ``toString()``) and ``xsi:type``; ``data_fields`` is copied from XFT's
  ``Hashtable`` of fields, ``children`` from its ``Hashtable`` of collections.
- ``FlattenedItem.renderChildren`` loads every exposed reference from the
  database, so a subject nests ``experiments/experiment`` and each of those its
  ``scans/scan`` (with ``file``) and ``resources/resource``.
- ``FlattenedItem.getFlattenedSingleParams`` adds every primary key, the
  extension's (``xnat_imagescandata_id``) and the base element's default key
  (``getSQLName() + "_id"``: ``xnat_imageScanData_id``); ``putValue`` skips nulls.
- ``QueryOrganizerResource``/``XMLPathShortcuts``: ``insert_user`` and
  ``last_modified`` are aliases of experiments, subjects and scans;
  ``ProjSubExptList``/``ExperimentListResource`` add ``xsiType`` and ``project``
  when the root element is ``xnat:subjectAssessorData``.
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from xnatfs.testing.harness import TestServer
from xnatfs.testing.store import Store
from xnatfs.testing.xnatformat import java_object, xft_fields

from .recorded import load, recordings, string_form

SESSION = "/data/archive/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR1"
# java.util.Date.toString(): "Thu Apr 08 19:28:45 UTC 2021"
JAVA_DATE = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d \S+ \d{4}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_copy) -> Iterator[TestServer]:  # noqa: ANN001
    with TestServer(demo_copy(tmp_path_factory.mktemp("items") / "data"), dataset="demo") as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=("admin", "admin"), timeout=30) as client:
        yield client


def item(admin: httpx.Client, path: str) -> dict[str, Any]:
    answer = admin.get(path, params={"format": "json"})
    answer.raise_for_status()
    [first] = answer.json()["items"]
    return dict(first)


def walk(node: dict[str, Any], depth: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    yield depth, node
    for child in node["children"]:
        for sub in child["items"]:
            yield from walk(sub, depth + 1)


def children(node: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {child["field"]: child["items"] for child in node["children"]}


# ----------------------------------------------------------------- key order
@pytest.mark.parametrize("name", recordings("experiment-json__*"))
def test_hashtable_then_hashmap_gives_each_recorded_item_order(name: str) -> None:
    """XFT's fields live in a Hashtable; ItemJSONBuilder copies them into a
    JSONObject: that gives each recorded item's key order, whatever order the
    fields were put in."""
    recorded = dict(load(name).json())
    keys = list(recorded)
    for seed in range(10):
        shuffled = keys[:]
        random.Random(seed).shuffle(shuffled)
        assert list(xft_fields({k: recorded[k] for k in shuffled})) == keys


def test_our_items_are_written_in_that_order(admin: httpx.Client) -> None:
    subject = item(admin, "/data/archive/projects/NEURO_PUB/subjects/NP001")
    for _, node in walk(subject):
        assert list(node) == list(java_object(node))
        assert list(node["meta"]) == list(java_object(node["meta"]))
        assert list(node["data_fields"]) == list(xft_fields(node["data_fields"]))
        for child in node["children"]:
            assert list(child) == ["items", "field"] or list(child) == list(java_object(child))


def test_doubles_are_written_as_org_json_writes_them() -> None:
    """``JSONObject.numberToString`` shaves a Double's trailing zeros; a field
    typed as a string in the schema keeps its text (``fieldStrength`` "3.0")."""
    written = xft_fields({"dcmPatientWeight": 80.0, "x": 83.91, "fieldStrength": "3.0"})
    assert written["dcmPatientWeight"] == 80 and isinstance(written["dcmPatientWeight"], int)
    assert written["x"] == 83.91 and written["fieldStrength"] == "3.0"
    assert "absent" not in xft_fields({"absent": None, "x": 1})  # putValue skips nulls


# ----------------------------------------------------------------- the tree
def test_a_subject_nests_its_experiments_scans_files_and_resources(admin: httpx.Client) -> None:
    subject = item(admin, "/data/archive/projects/NEURO_PUB/subjects/NP001")
    assert subject["meta"]["xsi:type"] == "xnat:subjectData"
    experiments = children(subject)["experiments/experiment"]
    session = next(e for e in experiments if e["data_fields"]["label"] == "NP001_MR1")
    assert session == item(admin, SESSION)  # the same item as the session's own
    below = children(session)
    assert below["scans/scan"] and below["resources/resource"]
    scan_files = [f for s in below["scans/scan"] for f in children(s).get("file", [])]
    assert scan_files and all(f["meta"]["xsi:type"] == "xnat:resourceCatalog"
                              for f in scan_files)


def test_every_item_has_meta_start_date_and_no_insert_fields(admin: httpx.Client) -> None:
    subject = item(admin, "/data/archive/projects/NEURO_PUB/subjects/NP001")
    seen = 0
    for _, node in walk(subject):
        meta = node["meta"]
        assert set(meta) == {"isHistory", "create_event_id", "start_date", "xsi:type"}
        assert meta["isHistory"] is False and isinstance(meta["create_event_id"], int)
        assert JAVA_DATE.fullmatch(meta["start_date"]), meta["start_date"]
        assert not {"insert_date", "insert_user"} & set(node["data_fields"])
        seen += 1
    assert seen > 5
    project = item(admin, "/data/projects/NEURO_PUB")
    assert JAVA_DATE.fullmatch(project["meta"]["start_date"])


def test_scans_and_resources_carry_both_id_keys(admin: httpx.Client) -> None:
    session = item(admin, SESSION)
    scan = children(session)["scans/scan"][0]["data_fields"]
    assert isinstance(scan["xnat_imagescandata_id"], int)
    assert scan["xnat_imageScanData_id"] == scan["xnat_imagescandata_id"]
    for resource in children(session)["resources/resource"]:
        fields = resource["data_fields"]
        assert isinstance(fields["xnat_abstractresource_id"], int)
        assert fields["xnat_abstractResource_id"] == fields["xnat_abstractresource_id"]
        assert isinstance(fields["file_count"], int) and isinstance(fields["file_size"], int)


def test_a_resource_uri_is_its_catalog_on_the_server(admin: httpx.Client) -> None:
    session = item(admin, SESSION)
    own = children(session)["resources/resource"][0]
    label = own["data_fields"]["label"]
    assert own["data_fields"]["URI"] == (f"/data/xnat/archive/NEURO_PUB/arc001/NP001_MR1/"
                                         f"RESOURCES/{label}/{label}_catalog.xml")
    scan = children(session)["scans/scan"][0]
    scan_id = scan["data_fields"]["ID"]
    resource = children(scan)["file"][0]["data_fields"]
    assert resource["URI"] == (f"/data/xnat/archive/NEURO_PUB/arc001/NP001_MR1/SCANS/"
                               f"{scan_id}/{resource['label']}/{scan_id}_catalog.xml")
    alone = item(admin, f"{SESSION}/scans/{scan_id}/resources/{resource['label']}")
    assert alone["data_fields"]["URI"] == resource["URI"]


def test_resource_tags_are_tag_children(admin: httpx.Client) -> None:
    put = admin.put(f"{SESSION}/resources/TAGGED", params={"tags": "qc,site=MCW"})
    assert put.status_code in (200, 201)
    resource = item(admin, f"{SESSION}/resources/TAGGED")
    tags = children(resource)["tags/tag"]
    assert [t["meta"]["xsi:type"] for t in tags] == ["xnat:abstractResource_tag"] * 2
    assert sorted((t["data_fields"]["tag"], t["data_fields"].get("name")) for t in tags) \
        == [("MCW", "site"), ("qc", None)]
    assert all(isinstance(t["data_fields"]["xnat_abstractResource_tag_id"], int) for t in tags)


# ----------------------------------------------------------------- columns=
def test_experiment_columns_always_bring_xsitype_and_project(admin: httpx.Client) -> None:
    listing = "/data/projects/NEURO_PUB/experiments"
    rows = admin.get(listing, params={"columns": "ID,label"}).json()["ResultSet"]["Result"]
    assert {"xsiType", "project"} <= set(rows[0])
    secured = admin.get(listing, params={"columns": "ID,label", "xsiType": "xnat:mrSessionData"})
    assert not {"xsiType", "project"} & set(secured.json()["ResultSet"]["Result"][0])


@pytest.mark.parametrize("listing", [
    "/data/projects/NEURO_PUB/subjects",
    "/data/projects/NEURO_PUB/experiments",
    f"{SESSION}/scans",
])
def test_insert_user_and_last_modified_are_listed(admin: httpx.Client, listing: str) -> None:
    rows = admin.get(listing, params={"columns": "ID,insert_user,last_modified"}).json()[
        "ResultSet"]["Result"]
    assert rows and all(row["insert_user"] for row in rows)
    assert all(string_form(row["last_modified"]).startswith("timestamp") for row in rows)
    # PostgreSQL keeps microseconds; Timestamp.toString() shows them (zeros shaved).
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{1,6}", rows[0]["last_modified"])


# ----------------------------------------------------------------- the store
def test_last_modified_is_set_on_change_and_migrated_in_place(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.add_user("admin", "admin", admin=True)
    store.add_project("P")
    sid = store.add_subject("P", "S1")
    eid = store.add_experiment("P", sid, "E1", "xnat:mrSessionData")
    pk = store.add_scan(eid, "1", "xnat:mrScanData", user="alice")
    rid = store.add_resource(eid, pk, "DICOM")
    before = store.query_one("SELECT last_modified FROM resources WHERE id = ?", (rid,))[0]
    assert before
    blob, size, digest = store.store_blob_bytes(b"x")
    store.add_file(rid, "a.dcm", blob, size, digest)
    after = store.query_one("SELECT last_modified FROM resources WHERE id = ?", (rid,))[0]
    assert after >= before
    scan = store.scan(eid, "1")
    assert scan is not None and scan["insert_user"] == "alice" and scan["insert_date"]
    store.close()
    # A data set from before modification times: the columns are added and filled.
    db = sqlite3.connect(tmp_path / "db" / "xnat.sqlite")
    for table in ("projects", "subjects", "experiments", "scans", "resources", "assessors"):
        db.execute(f"ALTER TABLE {table} DROP COLUMN last_modified")
    db.execute("ALTER TABLE scans DROP COLUMN insert_date")
    db.execute("ALTER TABLE scans DROP COLUMN insert_user")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    subject = store.subject("P", "S1")
    assert subject is not None and subject["last_modified"] == subject["insert_date"]
    experiment = store.experiment("P", "E1")
    scan = store.scan(eid, "1")
    assert experiment is not None and scan is not None
    assert (scan["insert_date"], scan["insert_user"], scan["last_modified"]) == (
        experiment["insert_date"], experiment["insert_user"], experiment["insert_date"])
    resource = store.resource(eid, pk, "DICOM")
    assert resource is not None and resource["last_modified"] == experiment["insert_date"]
    store.close()


def test_an_item_without_format_is_the_html_page_unless_xml_is_asked_for(
        started_demo_server: TestServer) -> None:
    """XNAT's item resources offer HTML, then XML, and Restlet keeps the first
    on a tie: no ``format`` and ``Accept: */*`` gives the report page, never
    JSON (docs/xnat-verified.md, "Item GET without format"). Listings answer
    JSON without ``format``."""
    server = started_demo_server
    with httpx.Client(base_url=server.url, auth=("admin", "admin"), timeout=30) as c:
        item = "/data/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR1"
        for accept in (None, "*/*", "text/html"):
            answer = c.get(item, headers={"Accept": accept} if accept else {})
            assert answer.headers["content-type"].startswith("text/html"), accept
            assert answer.text.lstrip().lower().startswith(("<!doctype html", "<html"))
        for accept in ("text/xml", "application/xml", "text/html;q=0.5, text/xml"):
            answer = c.get(item, headers={"Accept": accept})
            assert answer.headers["content-type"].startswith("text/xml"), accept
            assert "<xnat:MRSession" in answer.text
        assert c.get(item, params={"format": "json"}).json()["items"]
        assert c.get("/data/projects/NEURO_PUB/subjects").json()["ResultSet"]["Result"]

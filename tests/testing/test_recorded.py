"""Our server against answers recorded from real XNAT servers (``recorded/``).

Real servers hold other data, so the comparison is by shape: the keys of a
row and their order, and the form of values that have one (dates, times,
URIs). Key order is not arbitrary: XNAT writes JSON through a
``java.util.HashMap``, and the model of its order (:func:`java_hash_order`)
must explain every recording before our answers are held to it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from xnatfs.testing.harness import TestServer
from xnatfs.testing.imaging import synthetic_study, write_dicom_archive
from xnatfs.testing.storedb import java_timestamp
from xnatfs.testing.xnatformat import _bucket, java_hash_order

from .recorded import load, recordings, shape, string_form

# The request each recorded listing answered, asked of our demo data.
OURS = {
    "subjects-list": "/data/archive/projects/NEURO_PUB/subjects?format=json",
    "experiments-list": "/data/archive/projects/NEURO_PUB/subjects/NP001/experiments"
                        "?format=json",
    "scans-list": "/data/archive/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR1"
                  "/scans?format=json",
    "experiment-json": "/data/archive/projects/NEURO_PUB/subjects/NP001/experiments/NP001_MR1"
                       "?format=json",
}
# Forms that say how XNAT writes a value, not what the value is.
FORMATTED = ("timestamp", "date", "time", "uri:")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_copy) -> Iterator[TestServer]:  # noqa: ANN001
    with TestServer(demo_copy(tmp_path_factory.mktemp("recorded") / "data"),
                    dataset="demo") as srv:
        yield srv


def recorded_row(name: str) -> dict[str, Any]:
    """The first row (or the item's fields) a recording holds."""
    value = load(name).json()
    return dict(value[0] if isinstance(value, (list, tuple)) else value)


def our_row(server: TestServer, endpoint: str) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, auth=("admin", "admin"), timeout=30) as c:
        answer = c.get(OURS[endpoint])
    answer.raise_for_status()
    body = answer.json()
    if "items" in body:
        return dict(body["items"][0]["data_fields"])
    return dict(body["ResultSet"]["Result"][0])


def in_hash_order(keys: list[str]) -> bool:
    """Whether a HashMap could iterate ``keys`` in this order (put in some order)."""
    capacity = 16
    while len(keys) > capacity * 3 // 4:
        capacity *= 2
    buckets = [_bucket(key, capacity) for key in keys]
    return buckets == sorted(buckets)


def endpoint_of(name: str) -> str:
    return name.split("__", 1)[0]


def recorded_by_a_server(name: str) -> bool:
    """Not a mock someone wrote by hand (its key order is theirs, not XNAT's)."""
    return not any("hand-written" in note for note in load(name).notes)


JSON_RECORDINGS = [n for n in recordings()
                   if endpoint_of(n) in OURS and recorded_by_a_server(n)]


def test_every_recording_says_where_it_comes_from() -> None:
    assert recordings(), "no recordings"
    for name in recordings():
        recording = load(name)
        assert recording.source and recording.method == "GET" and recording.path, name


@pytest.mark.parametrize("name", JSON_RECORDINGS)
def test_the_hashmap_model_explains_every_recorded_key_order(name: str) -> None:
    assert in_hash_order(list(recorded_row(name))), list(recorded_row(name))


@pytest.mark.parametrize("name", [n for n in JSON_RECORDINGS if endpoint_of(n).endswith("-list")])
def test_listings_have_the_recorded_keys_order_and_forms(server: TestServer, name: str) -> None:
    theirs, ours = recorded_row(name), our_row(server, endpoint_of(name))
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        form = string_form(value)
        if form.startswith(FORMATTED) and ours[key]:
            assert string_form(ours[key]) == form, (key, value, ours[key])


@pytest.mark.parametrize("name", [n for n in JSON_RECORDINGS
                                  if endpoint_of(n) == "experiment-json"])
def test_an_experiment_item_has_the_recorded_fields_and_forms(server: TestServer,
                                                              name: str) -> None:
    theirs, ours = recorded_row(name), our_row(server, "experiment-json")
    assert in_hash_order(list(ours))
    assert not {"insert_date", "insert_user"} & set(ours)  # not fields of the item
    common = [key for key in theirs if key in ours]
    assert len(common) >= 8, common
    for key in common:
        assert shape(ours[key]) == shape(theirs[key]) or not str(ours[key]).strip(), key
    # Keys that share a bucket come out in the order XNAT puts them.
    capacity = 32 if len(ours) > 12 else 16
    if (len(theirs) > 12) == (len(ours) > 12):
        by_bucket = [k for k in theirs if k in ours]
        assert sorted(by_bucket, key=lambda k: (_bucket(k, capacity), list(ours).index(k))) \
            == [k for k in ours if k in theirs]


def test_timestamps_are_printed_as_java_prints_them() -> None:
    """``java.sql.Timestamp.toString``: no trailing zeros, ``.0`` on a whole second
    (the recorded prearchive row's ``lastmod`` is ``2022-01-18 16:41:25.0``)."""
    moment = dt.datetime(2023, 9, 27, 17, 31, 21, 352000)
    assert java_timestamp(moment) == "2023-09-27 17:31:21.352"
    assert java_timestamp(moment.replace(microsecond=350000)) == "2023-09-27 17:31:21.35"
    assert java_timestamp(moment.replace(microsecond=0)) == "2023-09-27 17:31:21.0"
    recorded = recorded_row("prearchive-projects__xnatpy-ais-mock.http")
    assert string_form(recorded["lastmod"]) == string_form(java_timestamp(moment.replace(
        microsecond=0)))


def test_prearchive_rows_have_the_recorded_forms(tmp_path: Path) -> None:
    """The forms of a prearchive row's times (the recording is a mock, but its
    forms were copied from a real answer): ``scan_time`` as ``HH:mm:ss.SSS``."""
    recorded = recorded_row("prearchive-projects__xnatpy-ais-mock.http")
    with TestServer(tmp_path / "data", dataset="none") as server:
        archive = tmp_path / "study.zip"
        write_dicom_archive(archive, synthetic_study("Re^Corded", "REC1", slices=1, rows=8,
                                                     cols=8, seed=3))
        with httpx.Client(base_url=server.url, auth=("admin", "admin"), timeout=60) as c:
            assert c.put("/data/projects/RECP").status_code == 201
            c.post("/data/services/import?import-handler=DICOM-zip&project=RECP",
                   content=archive.read_bytes(),
                   headers={"Content-Type": "application/zip"}).raise_for_status()
            ours = c.get("/data/prearchive/projects/RECP?format=json").json()[
                "ResultSet"]["Result"][0]
    for key in ("scan_time", "scan_date", "uploaded", "lastmod", "timestamp"):
        assert string_form(ours[key]) == string_form(recorded[key]), (key, ours[key])

"""Upload Spreadsheet through a real mount: a CSV copied into ``uploads/P/``
creates and updates subjects, or updates sessions, as XNAT's own page does;
checked through xnatpy and the server's request log."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import xnat

from xnatfs.testing.harness import TestServer
from xnatfs.testing.store import Store

from .conftest import Mount, module_mount

PROJECT = "SHEETS"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    """SHEETS: S01 (demographics, a custom variable) with MR session S01_MR1, S02
    with S02_MR1, and S03 without anything."""
    data = tmp_path_factory.mktemp("sheets") / "data"
    store = Store(data)
    store.add_user("admin", "admin", admin=True)
    store.add_project(PROJECT, owner="admin")
    s01 = store.add_subject(PROJECT, "S01", gender="male", yob="1970", subject_group="control",
                            custom={"site": "A"})
    s02 = store.add_subject(PROJECT, "S02", gender="female")
    store.add_subject(PROJECT, "S03")
    store.add_experiment(PROJECT, s01, "S01_MR1", "xnat:mrSessionData", visit="v1",
                         date="2024-01-02", custom={"qc": "pending"})
    store.add_experiment(PROJECT, s02, "S02_MR1", "xnat:mrSessionData")
    store.close()
    with TestServer(data, dataset="none") as srv:
        yield srv


@pytest.fixture(scope="module")
def mount(server: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with module_mount(server, tmp_path_factory.mktemp("sheets-home")) as m:
        yield m


def drop(mount: Mount, tmp_path: Path, name: str, text: str) -> subprocess.CompletedProcess:
    """``cp`` a sheet into ``uploads/SHEETS/``."""
    source = tmp_path / name
    source.write_text(text)
    return subprocess.run(["cp", str(source), str(mount.path / "uploads" / PROJECT)],
                          capture_output=True, text=True, timeout=120)


def status_of(mount: Mount, name: str) -> list[str]:
    """The sheet's entry in the project's UPLOAD_STATUS.txt and its lines below."""
    lines = (mount.path / "uploads" / PROJECT / "UPLOAD_STATUS.txt").read_text().splitlines()
    at = max(i for i, line in enumerate(lines) if line.split()[1:2] == [f"{PROJECT}/{name}"])
    out = [lines[at]]
    for line in lines[at + 1:]:
        if not line.startswith("    "):
            break
        out.append(line.strip())
    return out


def puts(server: TestServer, mark: int) -> list[dict]:
    return [e for e in server.requests_since(mark) if e["method"] == "PUT"]


def connect(server: TestServer):  # noqa: ANN201
    return xnat.connect(server.url, user="admin", password="admin", extension_types=False)


def test_a_sheet_creates_two_subjects_and_updates_a_third(mount: Mount, tmp_path: Path) -> None:
    project = mount.path / PROJECT
    assert "S10" not in os.listdir(project)  # the listing is cached now
    mark = mount.server.log_mark()
    result = drop(mount, tmp_path, "new.csv",
                  "label,gender,yob,handedness,group,field:site\n"
                  "S10,female,1985,left,,B\n"
                  "S11,male,,,,C\n"
                  "S03,other,1990,,,A\n"
                  "S01,,,,NULL,\n")
    assert result.returncode == 0, result.stderr
    assert status_of(mount, "new.csv") == [
        f"done      {PROJECT}/new.csv  subjects sheet: 2 created, 2 updated",
        "line 2 S10: created with gender, yob, handedness, field:site",
        "line 3 S11: created with gender, field:site",
        "line 4 S03: updated gender, yob, field:site",
        "line 5 S01: cleared group"]
    assert len(puts(mount.server, mark)) == 4
    with connect(mount.server) as session:
        subjects = session.projects[PROJECT].subjects
        s10, s11, s03 = subjects["S10"], subjects["S11"], subjects["S03"]
        assert (s10.demographics.gender, s10.demographics.yob,
                s10.demographics.handedness) == ("female", 1985, "left")
        assert s11.demographics.gender == "male"
        assert (s03.demographics.gender, s03.demographics.yob) == ("other", 1990)
        assert (s10.fields["site"], s11.fields["site"], s03.fields["site"]) == ("B", "C", "A")
        assert subjects["S01"].group is None and subjects["S01"].demographics.gender == "male"
    # The mount's listings of the project were dropped: the new subjects show.
    assert {"S10", "S11"} <= set(os.listdir(project))
    table = list(csv.DictReader(io.StringIO((project / "subjects.csv").read_text())))
    assert {r["label"]: r["field:site"] for r in table} == {
        "S01": "A", "S02": "", "S03": "A", "S10": "B", "S11": "C"}


def test_a_sheet_with_one_bad_row_changes_nothing(mount: Mount, tmp_path: Path) -> None:
    mark = mount.server.log_mark()
    result = drop(mount, tmp_path, "bad.csv",
                  "label,gender,field:site\nS20,female,D\nS21,maybe,E\nS01,female,\n")
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert puts(mount.server, mark) == []
    entry = status_of(mount, "bad.csv")
    assert entry[0].startswith(f"failed    {PROJECT}/bad.csv  subjects sheet not applied, "
                               "nothing sent: 1 of 3 rows have problems")
    assert entry[1:] == ["line 3 S21: gender 'maybe': XNAT takes male, female, other, "
                         "unknown, M, F"]
    with connect(mount.server) as session:
        subjects = session.projects[PROJECT].subjects
        assert "S20" not in subjects and subjects["S01"].demographics.gender == "male"
    # Kept, like every refused upload: listed, and in `xnatfs uploads list`.
    assert "bad.csv" in os.listdir(mount.path / "uploads" / PROJECT)
    kept = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "list",
                           "--cache-dir", str(mount.cache_dir)], env=mount.env,
                          capture_output=True, text=True, check=True).stdout
    assert f"{PROJECT}/bad.csv" in kept
    # The log names no subject (it may be read by others than the sheet's owner).
    log = (mount.cache_dir.parent / "mount.log").read_text()
    assert "bad.csv" in log and "S21" not in log and "maybe" not in log
    # A CSV that is no sheet (someone's results) is refused as before.
    result = drop(mount, tmp_path, "scores.csv", "value,score\n1,2\n")
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert "nor is it a spreadsheet" in status_of(mount, "scores.csv")[0]


def test_the_unchanged_subjects_table_sends_no_update(mount: Mount, tmp_path: Path) -> None:
    table = (mount.path / PROJECT / "subjects.csv").read_text()
    assert "field:site" in table and "ID" in table.splitlines()[0]
    mark = mount.server.log_mark()
    result = drop(mount, tmp_path, "subjects.csv", table)
    assert result.returncode == 0, result.stderr
    assert puts(mount.server, mark) == []
    entry = status_of(mount, "subjects.csv")
    rows = len(table.splitlines()) - 1
    assert entry[0].endswith(f"subjects sheet: {rows} unchanged")
    assert all(line.endswith(": unchanged") for line in entry[1:]) and len(entry) == rows + 1


def test_a_sessions_sheet_updates_a_visit_and_a_custom_field(mount: Mount,
                                                             tmp_path: Path) -> None:
    table = list(csv.DictReader(io.StringIO((mount.path / PROJECT / "sessions.csv").read_text())))
    [row] = [r for r in table if r["label"] == "S01_MR1"]
    assert (row["visit"], row["field:qc"]) == ("v1", "pending")
    mark = mount.server.log_mark()
    result = drop(mount, tmp_path, "visits.csv",
                  "label,subject_label,visit,field:qc\nS01_MR1,S01,v2,passed\nS02_MR1,S02,,\n")
    assert result.returncode == 0, result.stderr
    assert status_of(mount, "visits.csv")[1:] == ["line 2 S01_MR1: updated visit, field:qc",
                                                 "line 3 S02_MR1: unchanged"]
    [put] = puts(mount.server, mark)
    assert put["path"].endswith(f"/experiments/{row['ID']}")
    with connect(mount.server) as session:
        experiment = session.projects[PROJECT].experiments["S01_MR1"]
        assert (experiment.visit, experiment.fields["qc"]) == ("v2", "passed")


def test_a_row_the_server_refuses_leaves_the_others_applied(mount: Mount,
                                                            tmp_path: Path) -> None:
    with connect(mount.server) as session:
        s02 = session.projects[PROJECT].subjects["S02"].id
    # XNAT refuses S02 (its PUT goes by accession ID): 403, as to a user who may
    # not edit it.
    mount.server.set_knobs(fail_rate=1.0, fault_path=f"/subjects/{s02}$", fault_status=403)
    try:
        result = drop(mount, tmp_path, "partly.csv",
                      "label,handedness\nS02,right\nS30,left\nS01,\n")
    finally:
        mount.server.set_knobs(fail_rate=0.0, fault_path="", fault_status=503)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    entry = status_of(mount, "partly.csv")
    assert entry[0].startswith(f"failed    {PROJECT}/partly.csv  subjects sheet: 1 refused, "
                               "1 created, 1 unchanged")
    assert entry[1].startswith("line 2 S02: refused by XNAT: 403")
    assert entry[2:] == ["line 3 S30: created with handedness", "line 4 S01: unchanged"]
    with connect(mount.server) as session:
        subjects = session.projects[PROJECT].subjects
        assert subjects["S30"].demographics.handedness == "left"
        assert subjects["S02"].demographics.handedness is None
    # Kept; sent again once XNAT takes it, only what XNAT still lacks goes.
    kept = subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "list",
                           "--cache-dir", str(mount.cache_dir)], env=mount.env,
                          capture_output=True, text=True, check=True).stdout
    [upload_id] = [line.split()[0] for line in kept.splitlines() if "partly.csv" in line]
    mark = mount.server.log_mark()
    subprocess.run([sys.executable, "-m", "xnatfs.cli", "uploads", "retry", upload_id,
                    "--cache-dir", str(mount.cache_dir)], env=mount.env, check=True,
                   capture_output=True, timeout=120)
    [put] = puts(mount.server, mark)
    assert put["path"].endswith(f"/subjects/{s02}")
    with connect(mount.server) as session:
        assert session.projects[PROJECT].subjects["S02"].demographics.handedness == "right"


def test_the_demo_projects_tables_go_back_unchanged(demo_mount: Mount, tmp_path: Path) -> None:
    """The demo data's demographics (dob, yob or age in turn) and custom
    variables, read from the mount's tables and dropped back: no PUT."""
    for project in ("NEURO_PUB", "ONC-PROT"):
        for table in ("subjects.csv", "sessions.csv"):
            text = (demo_mount.path / project / table).read_text()
            assert "field:" in text.splitlines()[0], (project, table)
            source = tmp_path / f"{project}-{table}"
            source.write_text(text)
            mark = demo_mount.server.log_mark()
            subprocess.run(["cp", str(source), str(demo_mount.path / "uploads" / project)],
                           check=True, timeout=120)
            assert puts(demo_mount.server, mark) == [], (project, table)
            result = os.getxattr(demo_mount.path / "uploads" / project / source.name,
                                 "user.xnatfs.upload.result").decode()
            assert result.endswith(f"{len(text.splitlines()) - 1} unchanged"), result

"""The project tables (``subjects.csv``, ``sessions.csv``, ``scans.csv``) and the
subjects' and sessions' metadata attributes through a real mount: read with
pandas and getfattr, held against what xnatpy reports for the same objects,
and what each costs in requests (the server's request log).

The suite's demo server and one mount for the tests that only read; the
tests that count requests mount afresh, so that nothing an earlier test
cached hides a cost; the one that changes data has a server of its own.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import xnat

from xnatfs.client.tables import SESSION_FIELDS, SUBJECT_FIELDS
from xnatfs.testing.harness import TestServer
from xnatfs.testing.store import Store

from .conftest import Mount, module_mount

PROJECTS = ("NEURO_PUB", "ONC-PROT", "SAMPLES")
TABLES = ("subjects.csv", "sessions.csv", "scans.csv")


@pytest.fixture(scope="module")
def server(demo_server: TestServer) -> TestServer:
    return demo_server


@pytest.fixture(scope="module")
def mounted(server: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with module_mount(server, tmp_path_factory.mktemp("tables-home")) as mount:
        yield mount


@pytest.fixture(scope="module")
def xnatpy(server: TestServer) -> Iterator[xnat.session.XNATSession]:
    with xnat.connect(server.url, user="admin", password="admin",
                      extension_types=False) as connection:
        yield connection


def read_table(path: Path) -> pd.DataFrame:
    """As a user reads it, but every cell as text (pandas' own guesses would turn
    ``001`` into 1: the reader's choice, not the mount's)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


Value = str | float
# Numbers in XNAT's schema: xnatpy gives some as numbers (yob 1961), and an
# item and a listing may print a decimal differently (35.0, 35), so these are
# compared by value; every other value as text.
NUMBERS = {"yob", "age", "education", "ses", "weight", "height", "gestational_age",
           "post_menstrual_age", "birth_weight", "frames"}


def reported(value: Any) -> str:
    return "" if value is None else str(value)


def comparable(row: dict[str, Any]) -> dict[str, Value]:
    return {k: float(v) if k.removeprefix("user.xnat.") in NUMBERS and v != "" else v
            for k, v in row.items()}


def custom_columns(fields: dict[str, Any]) -> dict[str, str]:
    return {f"field:{name}": reported(value) for name, value in fields.items()}


# ------------------------------------------------------- what xnatpy reports
def xnatpy_subjects(connection: xnat.session.XNATSession, project: str) -> list[dict[str, str]]:
    rows = []
    for subject in connection.projects[project].subjects.values():
        demographics = subject.demographics.data if subject.demographics is not None else {}
        fields = {"group": reported(subject.data.get("group")), "src": reported(subject.data.get("src")),
                  **{name: reported(demographics.get(name)) for name in SUBJECT_FIELDS[2:]}}
        sessions = [e for e in subject.experiments.values()
                    if e.__xsi_type__.endswith("SessionData")]
        rows.append({"ID": subject.id, "label": subject.label,
                     **{name: value for name, value in fields.items() if value},
                     **custom_columns(dict(subject.fields)), "sessions": str(len(sessions))})
    return rows


def xnatpy_sessions(connection: xnat.session.XNATSession, project: str
                    ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The project's image sessions, and their scans."""
    sessions, scans = [], []
    for subject in connection.projects[project].subjects.values():
        for e in subject.experiments.values():
            if not e.__xsi_type__.endswith("SessionData"):
                continue
            sessions.append({
                "ID": e.id, "label": e.label, "subject_label": subject.label,
                "subject_ID": subject.id, "xsiType": e.__xsi_type__,
                **{name: reported(e.data.get(name)) for name in SESSION_FIELDS},
                "scans": str(len(e.scans)), **custom_columns(dict(e.fields))})
            for scan in e.scans.values():
                scans.append({
                    "session_label": e.label, "session_ID": e.id,
                    "subject_label": subject.label, "ID": scan.id,
                    **{name: reported(scan.data.get(name))
                       for name in ("type", "series_description", "quality", "frames")},
                    "resources": sorted(r.label for r in scan.resources.values())})
    return sessions, scans


def assert_same_rows(table: pd.DataFrame, expected: list[dict[str, Any]],
                     key: tuple[str, ...] = ("ID",)) -> None:
    """The table's rows are xnatpy's, by ``key``, empty cells left out (xnatpy
    has no value there)."""
    def by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, Any]]:
        return {tuple(row[k] for k in key): {k: v for k, v in row.items() if v != ""}
                for row in rows}

    want = by_key(expected)
    got = by_key(table.to_dict("records"))
    assert sorted(got) == sorted(want)
    for row_key, row in got.items():
        assert comparable(row) == comparable(want[row_key]), row_key


# ------------------------------------------------------------------- tables
@pytest.mark.parametrize("project", PROJECTS)
def test_tables_equal_what_xnatpy_reports(mounted: Mount, xnatpy: xnat.session.XNATSession,
                                          project: str) -> None:
    folder = mounted.path / project
    assert set(TABLES) <= set(os.listdir(folder))
    subjects = read_table(folder / "subjects.csv")
    expected_subjects = xnatpy_subjects(xnatpy, project)
    assert_same_rows(subjects, expected_subjects)
    # The columns: ID, label, group, the fields some subject has (in XNAT's
    # shortcut order), custom variables by name, the number of sessions.
    present = {k for row in expected_subjects for k in row}
    assert list(subjects.columns) == (
        ["ID", "label", "group"] + [f for f in SUBJECT_FIELDS[1:] if f in present]
        + sorted(k for k in present if k.startswith("field:")) + ["sessions"])

    sessions = read_table(folder / "sessions.csv")
    expected_sessions, expected_scans = xnatpy_sessions(xnatpy, project)
    assert_same_rows(sessions, expected_sessions)
    assert list(sessions.columns)[:12] == ["ID", "label", "subject_label", "subject_ID",
                                           "date", "xsiType", "modality", "scanner",
                                           "visit_id", "visit", "session_type", "scans"]

    scans = read_table(folder / "scans.csv")
    scans["resources"] = [sorted(cell.split()) for cell in scans["resources"]]
    key = ("session_ID", "ID")
    assert_same_rows(scans, expected_scans, key)
    assert list(scans.columns) == ["session_label", "session_ID", "subject_label", "ID", "type",
                                   "series_description", "quality", "frames", "resources"]


def test_the_demo_data_has_demographics_and_custom_variables(mounted: Mount) -> None:
    """What the comparisons above cover: a table without them would compare
    equal without testing anything of the kind."""
    subjects = read_table(mounted.path / "NEURO_PUB" / "subjects.csv")
    assert {"gender", "yob"} <= set(subjects.columns)
    assert any(c.startswith("field:") for c in subjects.columns)
    sessions = pd.concat([read_table(mounted.path / p / "sessions.csv") for p in PROJECTS])
    assert any(c.startswith("field:") for c in sessions.columns)
    scans = read_table(mounted.path / "NEURO_PUB" / "scans.csv")
    usable_t1 = scans[(scans.quality == "usable") & scans.type.str.contains("T1")
                      & scans.resources.str.split().map(lambda labels: "NIFTI" in labels)]
    assert len(usable_t1) >= 1


def test_tables_are_read_only_and_stat_gives_their_true_size(mounted: Mount,
                                                             tmp_path: Path) -> None:
    for name in TABLES:
        path = mounted.path / "ONC-PROT" / name
        data = path.read_bytes()
        assert os.stat(path).st_size == len(data) > 0
        assert data.endswith(b"\n") and b"\r" not in data
        assert os.stat(path).st_mode & 0o222 == 0
        with pytest.raises(OSError):
            path.write_text("ID\n")
    # rsync copies st_size bytes
    target = tmp_path / "copied.csv"
    subprocess.run(["rsync", str(mounted.path / "ONC-PROT" / "scans.csv"), str(target)],
                   check=True)
    assert target.read_bytes() == (mounted.path / "ONC-PROT" / "scans.csv").read_bytes()


# -------------------------------------------------------------------- costs
def table_requests(server: TestServer, mark: int) -> list[str]:
    """The records listings since ``mark``, by what they list."""
    out = []
    for entry in server.requests_since(mark):
        query = entry.get("query") or ""
        if "fields/field" in query and entry["path"].endswith("/subjects"):
            out.append("subjects")
        elif "fields/field" in query:
            out.append("sessions")
        elif "scans/scan" in query:
            out.append("scans")
    return out


def test_each_table_costs_its_listings_once(server: TestServer, mount_factory) -> None:  # noqa: ANN001
    mount = mount_factory(server, name="counting")
    for project in ("ONC-PROT", "NEURO_PUB", "SAMPLES"):
        os.listdir(mount.path / project)  # the project's own listing, not counted

    def cost(path: Path) -> list[str]:
        mark = server.log_mark()
        size = os.stat(path).st_size
        assert len(path.read_bytes()) == size
        subprocess.run(["cat", str(path)], check=True, capture_output=True)
        all_requests = server.requests_since(mark)
        found = table_requests(server, mark)
        assert len(found) == len(all_requests), all_requests  # nothing else
        return found

    assert cost(mount.path / "ONC-PROT" / "subjects.csv") == ["subjects", "sessions"]
    assert cost(mount.path / "ONC-PROT" / "sessions.csv") == ["scans"]  # sessions: cached
    assert cost(mount.path / "ONC-PROT" / "scans.csv") == []
    assert sorted(cost(mount.path / "NEURO_PUB" / "sessions.csv")) == ["scans", "sessions"]
    assert cost(mount.path / "SAMPLES" / "scans.csv") == ["scans"]
    # Every subject's attributes of a project: one listing (cached: none here).
    mark = server.log_mark()
    with os.scandir(mount.path / "NEURO_PUB") as entries:  # d_type: no stat of the tables
        subjects = [Path(e.path) for e in entries if e.is_dir() and e.name != "resources"]
    assert len(subjects) == 3
    for subject in subjects:
        os.listxattr(subject)
        os.getxattr(subject, "user.xnat.label")
    assert table_requests(server, mark) == ["subjects"]


def test_a_names_only_walk_costs_no_table_request(server: TestServer,
                                                  mount_factory) -> None:  # noqa: ANN001
    """``ls`` and ``find`` list the tables without making them (a listing does not
    refresh generated files); ``ls -l`` stats them, and costs their listings."""
    mount = mount_factory(server, name="walking")
    mark = server.log_mark()
    found = subprocess.run(["find", str(mount.path / "NEURO_PUB")], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    names = subprocess.run(["ls", "-R", str(mount.path / "ONC-PROT")], check=True,
                           capture_output=True, text=True).stdout.split()
    assert {f"{mount.path}/NEURO_PUB/{t}" for t in TABLES} <= set(found)
    assert set(TABLES) <= set(names)
    assert server.requests_since(mark) and table_requests(server, mark) == []
    mark = server.log_mark()
    listed = subprocess.run(["ls", "-l", str(mount.path / "SAMPLES")], check=True,
                            capture_output=True, text=True).stdout
    assert "subjects.csv" in listed
    assert sorted(table_requests(server, mark)) == ["scans", "sessions", "subjects"]


# ------------------------------------------------------------------- xattrs
def getfattr(path: Path) -> dict[str, str]:
    out = subprocess.run(["getfattr", "-d", "--absolute-names", str(path)], check=True,
                         capture_output=True, text=True).stdout
    attrs = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            attrs[name] = value.strip('"')
    return attrs


def test_subject_and_session_attributes(mounted: Mount,
                                        xnatpy: xnat.session.XNATSession) -> None:
    seen_custom = False
    for subject in xnatpy.projects["NEURO_PUB"].subjects.values():
        folder = mounted.path / "NEURO_PUB" / subject.label
        attrs = getfattr(folder)
        assert attrs["user.xnat.id"] == subject.id  # the listing's stay
        demographics = subject.demographics.data if subject.demographics is not None else {}
        holder = {name: demographics if name in demographics else subject.data
                  for name in SUBJECT_FIELDS}
        expected = {f"user.xnat.{name}": reported(holder[name].get(name))
                    for name in SUBJECT_FIELDS}
        expected.update({f"user.xnat.field.{k}": reported(v) for k, v in subject.fields.items()})
        expected = {k: v for k, v in expected.items() if v}
        metadata = {k: v for k, v in attrs.items() if k.startswith("user.xnat.field.")
                    or k[len("user.xnat."):] in SUBJECT_FIELDS}
        assert comparable(metadata) == comparable(expected)
        assert set(expected) <= set(os.listxattr(folder))
        for name, value in metadata.items():
            assert os.getxattr(folder, name) == value.encode()
        seen_custom |= any(k.startswith("user.xnat.field.") for k in expected)
        for e in subject.experiments.values():
            attrs = getfattr(folder / e.label)
            assert attrs["user.xnat.id"] == e.id
            wanted = {f"user.xnat.{name}": reported(e.data.get(name)) for name in SESSION_FIELDS}
            wanted.update({f"user.xnat.field.{k}": reported(v) for k, v in e.fields.items()})
            wanted = {k: v for k, v in wanted.items() if v}
            metadata = {k: v for k, v in attrs.items() if k.startswith("user.xnat.field.")
                        or k[len("user.xnat."):] in SESSION_FIELDS}
            assert comparable(metadata) == comparable(wanted)
            seen_custom |= any(k.startswith("user.xnat.field.") for k in wanted)
    assert seen_custom
    assert "user.xnat.gender" in getfattr(mounted.path / "NEURO_PUB" / "NP001")


# ------------------------------------------------------------------ changes
def test_a_change_through_xnatpy_shows_after_the_metadata_lifetime(
        fresh_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    store = Store(fresh_server.data_dir)
    try:
        store.add_project("TABLES", accessibility="private")
    finally:
        store.close()
    with httpx.Client(base_url=fresh_server.url, auth=("admin", "admin")) as c:
        for label, gender in (("S01", "female"), ("S02", "male")):
            c.put(f"/data/projects/TABLES/subjects/{label}",
                  params={"gender": gender}).raise_for_status()
    mount = mount_factory(fresh_server, "--metadata-ttl", "1", name="short-ttl")
    table = mount.path / "TABLES" / "subjects.csv"
    before = read_table(table)
    assert list(before.columns) == ["ID", "label", "group", "gender", "sessions"]
    with xnat.connect(fresh_server.url, user="admin", password="admin",
                      extension_types=False) as connection:
        subject = connection.projects["TABLES"].subjects["S02"]
        subject.fields["mood"] = "calm"
        subject.demographics.handedness = "ambidextrous"
    deadline = time.monotonic() + 15
    while True:
        after = read_table(table)
        if "field:mood" in after.columns or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # polling for the mount's 1 s lifetime to pass
    rows = after.set_index("label")
    assert (rows.loc["S02", "field:mood"], rows.loc["S02", "handedness"]) == (
        "calm", "ambidextrous")
    assert (rows.loc["S01", "field:mood"], rows.loc["S01", "handedness"]) == ("", "")
    folder = mount.path / "TABLES" / "S02"
    assert os.getxattr(folder, "user.xnat.field.mood") == b"calm"
    assert os.getxattr(folder, "user.xnat.handedness") == b"ambidextrous"


def test_a_failing_server_fails_a_subjects_fields_rather_than_hiding_them(
        started_demo_server: TestServer, mount_factory) -> None:  # noqa: ANN001
    """Found by the model test (seed 9): with the subjects' listing failing,
    ``getxattr user.xnat.group`` answered "No such attribute", as if XNAT held
    no group. Now it fails (EIO), and answers again once the server does."""
    import errno

    server = started_demo_server
    mount = mount_factory(server, "--metadata-ttl", "1", "--timeout", "1", name="failing")
    # An open folder needs no lookup (which would fail first) to read its attributes.
    fd = os.open(mount.path / "NEURO_PUB" / "NP001", os.O_RDONLY | os.O_DIRECTORY)
    try:
        group = os.getxattr(fd, "user.xnat.group")
        assert group
        server.set_knobs(fail_rate=1.0, fault_path=r"/projects/NEURO_PUB/subjects$")
        try:
            time.sleep(1.2)  # the cached listing outlives its metadata lifetime
            for read in (lambda: os.getxattr(fd, "user.xnat.group"),
                         lambda: os.listxattr(fd)):
                with pytest.raises(OSError) as failed:
                    read()
                assert failed.value.errno in (errno.EIO, errno.ETIMEDOUT)
        finally:
            server.set_knobs(fail_rate=0.0, fault_path="")
        assert os.getxattr(fd, "user.xnat.group") == group
    finally:
        os.close(fd)

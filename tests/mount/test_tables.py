"""The project tables (``subjects.csv``, ``sessions.csv``, ``scans.csv``) and the
subjects' and sessions' metadata attributes through a real mount: read with
pandas and getfattr, held against what xnatpy reports for the same objects,
and what each costs in requests (the server's request log).

One server and one mount for the tests that only read; the tests that count
requests mount afresh, so that nothing an earlier test cached hides a cost.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import xnat

from xnatfs.client.tables import SESSION_FIELDS, SUBJECT_FIELDS
from xnatfs.testing.harness import TestServer

from .conftest import Mount, make_env, mount_xnatfs, unmount

PROJECTS = ("NEURO_PUB", "ONC-PROT", "SAMPLES")
TABLES = ("subjects.csv", "sessions.csv", "scans.csv")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    with TestServer(tmp_path_factory.mktemp("tables") / "data", dataset="demo") as srv:
        yield srv


@pytest.fixture(scope="module")
def mounted(server: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    home = tmp_path_factory.mktemp("tables-home")
    mount = Mount(home / "mnt", server, home / "blocks", make_env(home), [])
    mount_xnatfs(server, mount.path, mount.cache_dir, mount.env, mount.options)
    yield mount
    unmount(mount.path)


@pytest.fixture(scope="module")
def xnatpy(server: TestServer) -> Iterator[xnat.session.XNATSession]:
    with xnat.connect(server.url, user="admin", password="admin",
                      extension_types=False) as connection:
        yield connection


def read_table(path: Path) -> pd.DataFrame:
    """As a user reads it, but every cell as text (pandas' own guesses would turn
    ``001`` into 1: the reader's choice, not the mount's)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def text(value: Any) -> str:
    return "" if value is None else str(value)


def custom_columns(fields: dict[str, Any]) -> dict[str, str]:
    return {f"field:{name}": text(value) for name, value in fields.items()}


# ------------------------------------------------------- what xnatpy reports
def xnatpy_subjects(connection: xnat.session.XNATSession, project: str) -> list[dict[str, str]]:
    rows = []
    for subject in connection.projects[project].subjects.values():
        demographics = subject.demographics.data if subject.demographics is not None else {}
        fields = {"group": text(subject.data.get("group")), "src": text(subject.data.get("src")),
                  **{name: text(demographics.get(name)) for name in SUBJECT_FIELDS[2:]}}
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
                **{name: text(e.data.get(name)) for name in SESSION_FIELDS},
                "scans": str(len(e.scans)), **custom_columns(dict(e.fields))})
            for scan in e.scans.values():
                scans.append({
                    "session_label": e.label, "session_ID": e.id,
                    "subject_label": subject.label, "ID": scan.id,
                    **{name: text(scan.data.get(name))
                       for name in ("type", "series_description", "quality", "frames")},
                    "resources": sorted(r.label for r in scan.resources.values())})
    return sessions, scans


def records(table: pd.DataFrame, key: tuple[str, ...] = ("ID",)) -> list[dict[str, str]]:
    """The table's rows without empty cells (xnatpy leaves missing fields out), in
    key order."""
    rows = [{k: v for k, v in row.items() if v != "" or k in key}
            for row in table.to_dict("records")]
    return sorted(rows, key=lambda row: tuple(row[k] for k in key))


def without_empty(rows: list[dict[str, Any]], key: tuple[str, ...] = ("ID",)
                  ) -> list[dict[str, Any]]:
    return sorted(({k: v for k, v in row.items() if v != "" or k in key} for row in rows),
                  key=lambda row: tuple(row[k] for k in key))


# ------------------------------------------------------------------- tables
@pytest.mark.parametrize("project", PROJECTS)
def test_tables_equal_what_xnatpy_reports(mounted: Mount, xnatpy: xnat.session.XNATSession,
                                          project: str) -> None:
    folder = mounted.path / project
    assert set(TABLES) <= set(os.listdir(folder))
    subjects = read_table(folder / "subjects.csv")
    expected_subjects = xnatpy_subjects(xnatpy, project)
    assert records(subjects) == without_empty(expected_subjects)
    # The columns: ID, label, group, the fields some subject has (in XNAT's
    # shortcut order), custom variables by name, the number of sessions.
    present = {k for row in expected_subjects for k in row}
    assert list(subjects.columns) == (
        ["ID", "label", "group"] + [f for f in SUBJECT_FIELDS[1:] if f in present]
        + sorted(k for k in present if k.startswith("field:")) + ["sessions"])

    sessions = read_table(folder / "sessions.csv")
    expected_sessions, expected_scans = xnatpy_sessions(xnatpy, project)
    assert records(sessions) == without_empty(expected_sessions)
    assert list(sessions.columns)[:12] == ["ID", "label", "subject_label", "subject_ID",
                                           "date", "xsiType", "modality", "scanner",
                                           "visit_id", "visit", "session_type", "scans"]

    scans = read_table(folder / "scans.csv")
    scans["resources"] = [sorted(cell.split()) for cell in scans["resources"]]
    key = ("session_ID", "ID")
    assert records(scans, key) == without_empty(expected_scans, key)
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
        expected = {f"user.xnat.{name}": text(demographics.get(name) or subject.data.get(name))
                    for name in SUBJECT_FIELDS}
        expected.update({f"user.xnat.field.{k}": text(v) for k, v in subject.fields.items()})
        expected = {k: v for k, v in expected.items() if v}
        assert {k: v for k, v in attrs.items() if k in expected or k.startswith(
            "user.xnat.field.") or k[len("user.xnat."):] in SUBJECT_FIELDS} == expected
        assert set(expected) <= set(os.listxattr(folder))
        for name, value in expected.items():
            assert os.getxattr(folder, name) == value.encode()
        seen_custom |= any(k.startswith("user.xnat.field.") for k in expected)
        for e in subject.experiments.values():
            attrs = getfattr(folder / e.label)
            assert attrs["user.xnat.id"] == e.id
            wanted = {f"user.xnat.{name}": text(e.data.get(name)) for name in SESSION_FIELDS}
            wanted.update({f"user.xnat.field.{k}": text(v) for k, v in e.fields.items()})
            wanted = {k: v for k, v in wanted.items() if v}
            assert {k: v for k, v in attrs.items() if k in wanted or k.startswith(
                "user.xnat.field.") or k[len("user.xnat."):] in SESSION_FIELDS} == wanted
            seen_custom |= any(k.startswith("user.xnat.field.") for k in wanted)
    assert seen_custom
    assert "user.xnat.gender" in getfattr(mounted.path / "NEURO_PUB" / "NP001")


# ------------------------------------------------------------------ changes
def test_a_change_through_xnatpy_shows_after_the_metadata_lifetime(
        server: TestServer, xnatpy: xnat.session.XNATSession, mount_factory) -> None:  # noqa: ANN001
    mount = mount_factory(server, "--metadata-ttl", "1", name="short-ttl")
    table = mount.path / "ALICE_LAB" / "subjects.csv"
    before = read_table(table)
    assert "field:tables_test" not in before.columns
    subject = xnatpy.projects["ALICE_LAB"].subjects[before["label"][0]]
    subject.fields["tables_test"] = "changed"
    subject.demographics.handedness = "ambidextrous"
    deadline = time.monotonic() + 15
    while True:
        after = read_table(table)
        if "field:tables_test" in after.columns or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # polling for the mount's 1 s lifetime to pass
    row = after.set_index("label").loc[before["label"][0]]
    assert (row["field:tables_test"], row["handedness"]) == ("changed", "ambidextrous")
    folder = mount.path / "ALICE_LAB" / before["label"][0]
    assert os.getxattr(folder, "user.xnat.field.tables_test") == b"changed"
    assert os.getxattr(folder, "user.xnat.handedness") == b"ambidextrous"

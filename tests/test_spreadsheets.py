"""Spreadsheets without a mount: reading a CSV as a sheet, checking it against
what XNAT holds, and what each row would send (xnatfs.spreadsheets)."""

from __future__ import annotations

import pytest
import trio

from xnatfs.client.tables import SessionRecord, SubjectRecord
from xnatfs.errors import BadRequest, Forbidden
from xnatfs.spoolfiles import UploadRecord
from xnatfs.spreadsheets import (
    SHEET_KIND,
    NotASheet,
    SheetKind,
    check_sessions,
    check_subjects,
    read_sheet,
    send_sheet,
    value_problem,
)


def Subj(id: str, label: str, fields: dict[str, str] | None = None,  # noqa: N802
         custom: dict[str, str] | None = None) -> SubjectRecord:
    return SubjectRecord(id, label, "P", fields or {}, custom or {})


def Sess(id: str, label: str, subject_id: str, subject_label: str,  # noqa: N802
         xsi_type: str = "xnat:mrSessionData", fields: dict[str, str] | None = None,
         custom: dict[str, str] | None = None) -> SessionRecord:
    return SessionRecord(id, label, "P", subject_id, subject_label, xsi_type, fields or {},
                         custom or {})


HELD = [Subj("XNAT_S1", "S01", {"gender": "male", "yob": "1970", "weight": "70"}, {"site": "A"}),
        Subj("XNAT_S2", "S02", {"gender": "female", "dob": "1980-02-03"})]


def sheet(text: str):  # noqa: ANN201
    return read_sheet(text.encode())


def test_a_downloaded_subjects_table_is_a_subjects_sheet() -> None:
    s = sheet("\ufeffID,label,group,gender,yob,field:site,sessions\r\n"
              "XNAT_S1,S01,,male,1970,A,2\r\n\r\n")
    assert s.kind is SheetKind.SUBJECTS and not s.problems
    assert s.columns == ("ID", "label", "group", "gender", "yob", "field:site", "sessions")
    [row] = s.rows
    assert (row.line, row.label) == (2, "S01")
    assert row.cells == {"ID": "XNAT_S1", "label": "S01", "gender": "male", "yob": "1970",
                         "field:site": "A", "sessions": "2"}  # empty cells are absent


def test_which_csv_is_which_sheet() -> None:
    assert sheet("subject_label;gender\nS01;male\n").kind is SheetKind.SUBJECTS
    assert sheet("subject_label;gender\nS01;male\n").rows[0].label == "S01"
    assert sheet("label,subject_label,visit\nMR1,S01,v1\n").kind is SheetKind.SESSIONS
    assert sheet("label\tdate\nMR1\t2020-01-01\n").kind is SheetKind.SESSIONS
    with pytest.raises(NotASheet):
        sheet("value,score\n1,2\n")  # someone's results
    with pytest.raises(NotASheet):
        read_sheet(b"label\nS\xe9\n")  # not UTF-8
    assert sheet("subject,subject_label\nA,B\n").problems  # two label columns


def test_header_problems_name_the_columns() -> None:
    s = sheet("label,gender,shoe_size,field:a b,gender\nS01,male,9,x,male\n")
    reasons = " | ".join(str(p) for p in s.problems)
    assert "'shoe_size'" in reasons and "'field:a b'" in reasons and "twice" in reasons
    assert all(p.line == 1 for p in s.problems)
    changes, problems = check_subjects(s, "P", HELD)
    assert problems  # a sheet with a bad header is not applied


def test_multi_line_cells_keep_line_numbers() -> None:
    s = sheet('label,educationDesc\nS01,"two\nlines"\nS02,x\n')
    assert [(r.line, r.label) for r in s.rows] == [(2, "S01"), (4, "S02")]
    _, problems = check_subjects(s, "P", HELD)
    assert [(p.line, p.label) for p in problems] == [(2, "S01")]


@pytest.mark.parametrize("name,value,ok", [
    ("gender", "male", True), ("gender", "F", True), ("gender", "maybe", False),
    ("gender", "Male", True), ("handedness", "Left", True), ("gender", "null", True),
    ("field:x", "NULL", False), ("handedness", "ambidextrous", True),
    ("handedness", "both", False), ("dob", "2001-02-28", True), ("dob", "2001-02-30", False),
    ("dob", "28/02/2001", False), ("yob", "1970", True), ("yob", "1970.5", False),
    ("education", "twelve", False), ("age", "23.5", True), ("age", "old", False),
    ("weight", "nan", False), ("race", "any text", True), ("field:x", "O'Brien", False),
    ("field:x", "a&b", False), ("field:x", "plain", True)])
def test_values_xnat_refuses(name: str, value: str, ok: bool) -> None:
    assert (value_problem(name, value) is None) == ok


def test_a_sheet_is_checked_whole() -> None:
    s = sheet("ID,label,gender,dob,yob,field:site\n"
              "XNAT_S1,S01,male,,1970,A\n"        # unchanged
              ",S 03,female,,,\n"                 # XNAT would change the label
              ",S04,maybe,,,\n"                   # schema refuses the gender
              "XNAT_S1,S05,,,,\n"                 # S01's ID under another label
              ",S01,,,,\n"                        # S01 again
              ",S06,,2000-01-01,1999,\n"          # dob and yob
              "XNAT_S2,S02,,,1980,\n")            # XNAT holds a dob for S02
    changes, problems = check_subjects(s, "P", HELD)
    assert sorted({p.line for p in problems}) == [3, 4, 5, 6, 7, 8]
    text = "\n".join(map(str, problems))
    assert "line 3 S 03: subject label 'S 03'" in text and "'S_03'" in text
    assert "line 4 S04: gender 'maybe'" in text
    assert "line 5 S05: ID XNAT_S1 is subject S01's" in text
    assert "line 6 S01: the label of line 2 again" in text
    assert "line 7 S06: dob and yob" in text
    assert "line 8 S02: yob: XNAT holds dob" in text


def test_only_differences_are_sent() -> None:
    s = sheet("ID,label,group,gender,yob,weight,field:site,field:arm,sessions\n"
              "XNAT_S1,S01,,male,1970,70.0,A,,2\n"   # as XNAT holds it (70 = 70.0)
              ",S02,ctl,female,,,,x,0\n"            # group and a custom variable added
              ",S03,,male,1990,,B,,\n")             # new
    changes, problems = check_subjects(s, "P", HELD)
    assert not problems
    unchanged, updated, new = changes
    assert not unchanged.create and not unchanged.fields and not unchanged.custom
    assert (updated.target, updated.fields, updated.custom) == ("XNAT_S2", {"group": "ctl"},
                                                                {"arm": "x"})
    assert new.create and new.target == "S03"
    assert new.fields == {"gender": "male", "yob": "1990"} and new.custom == {"site": "B"}
    # read-only columns are never sent
    assert all("ID" not in c.fields and "sessions" not in c.fields for c in changes)


def test_values_xnat_holds_go_back_unjudged() -> None:
    """XNAT stores O'Brien as O&apos;Brien, and may hold values its schema would
    refuse now: the table it made goes back unchanged, and sends nothing."""
    held = [Subj("XNAT_S7", "S07", {"gender": "Male"}, {"name": "O&apos;Brien"})]
    changes, problems = check_subjects(
        sheet("label,gender,field:name\nS07,Male,O&apos;Brien\n"), "P", held)
    assert not problems and not changes[0].fields and not changes[0].custom
    _, problems = check_subjects(sheet("label,gender\nS07,Mal\n"), "P", held)
    assert [p.reason.split(":")[0] for p in problems] == ["gender 'Mal'"]


def test_null_clears_a_field_xnat_holds() -> None:
    """yob NULL with dob: a subject moves from year of birth to date of birth."""
    s = sheet("label,dob,yob,gender,race\nS01,1970-05-06,NULL,null,NULL\n")
    [change], problems = check_subjects(s, "P", HELD)
    assert not problems
    # race: nothing to clear, not sent
    assert change.fields == {"dob": "1970-05-06", "yob": "NULL", "gender": "NULL"}
    assert change.names(True) == ["yob", "gender"] and change.names(False) == ["dob"]
    _, problems = check_subjects(sheet("label,dob\nS01,1970-05-06\n"), "P", HELD)
    assert "clear it: yob NULL" in problems[0].reason


def test_sessions_sheet_checks_and_diff() -> None:
    held = [Sess("XNAT_E1", "MR1", "XNAT_S1", "S01", fields={"visit": "v1"}),
            Sess("XNAT_E2", "MR2", "XNAT_S2", "S02")]
    s = sheet("ID,label,subject_label,xsiType,visit,date,field:qc\n"
              "XNAT_E1,MR1,S01,xnat:mrSessionData,v2,,ok\n"
              ",MR2,S01,,,,\n"                       # wrong subject
              ",MR3,S01,,,,\n"                       # no such session
              ",MR2,,xnat:petSessionData,,2020-13-01,\n")
    changes, problems = check_sessions(s, "P", held)
    lines = sorted({p.line for p in problems})
    assert lines == [3, 4, 5]
    text = "\n".join(map(str, problems))
    assert "subject_label S01: XNAT has S02" in text and "no session labelled so" in text
    assert "xsiType xnat:petSessionData" in text and "date '2020-13-01'" in text
    good = check_sessions(sheet("label,visit,field:qc\nMR1,v2,ok\nMR2,,\n"), "P", held)
    assert not good[1]
    first, second = good[0]
    assert (first.target, first.subject, first.fields, first.custom) == (
        "XNAT_E1", "XNAT_S1", {"visit": "v2"}, {"qc": "ok"})
    assert not second.fields and not second.custom


class FakeClient:
    """The calls a sheet makes, recorded; ``refuse``: labels/IDs XNAT refuses."""

    def __init__(self, refuse: set[str] = frozenset(),  # type: ignore[assignment]
                 exists: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.puts: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.refuse = refuse
        self.exists = exists  # made by someone else after the listing: XNAT answers 200

    async def list_subject_records(self, project: str) -> list[SubjectRecord]:
        return HELD

    async def list_session_records(self, project: str) -> list[SessionRecord]:
        return []

    async def put_subject(self, project: str, subject: str, fields: dict[str, str],
                          custom: dict[str, str]) -> bool:
        if subject in self.refuse:
            raise Forbidden("insufficient edit privileges", status=403)
        self.puts.append((subject, fields, custom))
        return subject not in self.exists

    async def put_session_fields(self, *args: object) -> None:
        raise AssertionError("no sessions here")


def _send(client: FakeClient, text: str, name: str = "subjects.csv",
          tmp_path=None) -> tuple[UploadRecord, object]:  # noqa: ANN001
    data = tmp_path / "data"
    data.write_text(text)
    record = UploadRecord("id", "P", name, kind="text", size=len(text))

    async def main() -> object:
        try:
            return await send_sheet(client, record, data, "not importable")
        except Exception as exc:  # noqa: BLE001
            return exc

    return record, trio.run(main)


def test_a_bad_row_sends_nothing(tmp_path) -> None:  # noqa: ANN001
    client = FakeClient()
    record, result = _send(client, "label,gender\nS09,female\nS10,maybe\n", tmp_path=tmp_path)
    assert isinstance(result, BadRequest) and "1 of 2 rows" in str(result)
    assert "S10" not in str(result)  # the log's text names no subject
    assert client.puts == [] and record.kind == SHEET_KIND
    assert record.details == ["line 3 S10: gender 'maybe': XNAT takes male, female, other, "
                              "unknown, M, F"]


def test_rows_go_on_after_a_refusal(tmp_path) -> None:  # noqa: ANN001
    client = FakeClient(refuse={"XNAT_S1"})
    record, result = _send(client, "label,gender,field:site\nS01,female,A\nS02,female,\n"
                                   "S09,male,\n", tmp_path=tmp_path)
    assert isinstance(result, Forbidden) and "1 refused" in str(result)
    assert client.puts == [("S09", {"gender": "male"}, {})]
    assert record.details[0].startswith("line 2 S01: refused by XNAT: 403")
    assert record.details[1:] == ["line 3 S02: unchanged", "line 4 S09: created with gender"]


def test_a_subject_made_meanwhile_is_not_called_created(tmp_path) -> None:  # noqa: ANN001
    record, result = _send(FakeClient(exists={"S09"}), "label,gender\nS09,male\n",
                           tmp_path=tmp_path)
    assert result == ["subjects sheet: 1 updated"]
    assert record.details == ["line 2 S09: made meanwhile by someone else; set gender"]


def test_not_a_sheet_is_refused_as_before(tmp_path) -> None:  # noqa: ANN001
    for name, text in (("results.csv", "score\n1\n"), ("notes.txt", "label\nS01\n"),
                       ("sub/subjects.csv", "label\nS01\n")):
        record, result = _send(FakeClient(), text, name=name, tmp_path=tmp_path)
        assert isinstance(result, BadRequest) and record.kind == "text", name

"""The prearchive model: imports, listings, settling and archive actions."""

from __future__ import annotations

import datetime as dt
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from xnatfs.testing.prearchive import PRE_EXISTS, UID_MOD, Prearchive
from xnatfs.testing.store import Store, StoreError

StudyWriter = Callable[..., list[Path]]
LISTING_KEYS = ["project", "timestamp", "lastmod", "uploaded", "scan_date", "scan_time", "subject",
                "folderName", "name", "tag", "status", "url", "autoarchive", "prevent_anon",
                "prevent_auto_commit", "SOURCE", "VISIT", "PROTOCOL", "TIMEZONE"]


class FakeClock:
    """Time that moves only when a test says so, one millisecond per reading so
    that sessions created in a row get distinct timestamps."""

    def __init__(self) -> None:
        self.now = dt.datetime(2024, 6, 19, 10, 11, 28, 996000)

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(milliseconds=1)
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def prearchive(store: Store, clock: FakeClock) -> Prearchive:
    return Prearchive(store, receiving_idle_seconds=60, clock=clock)


def zipped(tmp_path: Path, paths: list[Path], name: str = "upload.zip") -> Path:
    archive = tmp_path / name
    with zipfile.ZipFile(archive, "w") as z:
        for path in paths:
            z.write(path, f"{path.parent.parent.name}/{path.parent.name}/{path.name}")
    return archive


def split(uri: str) -> tuple[str, str, str]:
    """(project, timestamp, folder) of a ``/data/prearchive/...`` URI."""
    parts = uri.split("/")
    assert parts[:4] == ["", "data", "prearchive", "projects"], uri
    return parts[4], parts[5], parts[6]


def import_zip(prearchive: Prearchive, tmp_path: Path, paths: list[Path], user: str = "admin",
               **params: str) -> list[str]:
    archive = zipped(tmp_path, paths, f"upload-{len(list(tmp_path.glob('upload*')))}.zip")
    return prearchive.import_dicom_zip(archive, "upload.zip", params, user)


def blob_count(store: Store) -> int:
    return sum(1 for p in store.blob_dir.rglob("*") if p.is_file())


def study_uid_of(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


# ---------------------------------------------------------------- DICOM-zip
def test_zip_import_lands_ready_in_the_prearchive(
        prearchive: Prearchive, tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 2), ("2", "MR", 1)], patient_id="Sess 01",
                        patient_name="Doe^Jane")
    (uri,) = import_zip(prearchive, tmp_path, paths, project="P")
    project, timestamp, folder = split(uri)
    assert (project, folder) == ("P", "Sess_01")
    assert timestamp == "20240619_101128997"

    row = prearchive.session(project, timestamp, folder)
    assert list(row) == LISTING_KEYS
    assert all(isinstance(v, str) for v in row.values())
    assert row["status"] == "READY"
    assert row["uploaded"] == "2024-06-19 10:11:28.997"
    assert row["subject"] == "Doe_Jane"
    assert row["url"] == uri.removeprefix("/data")
    # HH:mm:ss.SSS, as real prearchive listings show scan_time (issue 20, point 8).
    assert (row["scan_date"], row["scan_time"]) == ("2023-02-19", "08:30:00.000")
    assert row["autoarchive"] == "Manual"
    assert prearchive.sessions(["P"]) == [row]

    assert prearchive.scans(project, timestamp, folder) == [
        {"ID": "1", "xsiType": "xnat:mrScanData", "series_description": "T1W"},
        {"ID": "2", "xsiType": "xnat:mrScanData", "series_description": "T1W"},
    ]
    sizes = [p.stat().st_size for p in paths[:2]]
    assert prearchive.scan_resources(project, timestamp, folder, "1") == [
        {"label": "DICOM", "file_count": "2", "file_size": str(sum(sizes))}]
    files = prearchive.scan_files(project, timestamp, folder, "1", "DICOM")
    base = f"{uri}/scans/1/resources/DICOM/files"
    assert [f.listing_row() for f in files] == [
        {"Name": "1-1.dcm", "Size": str(sizes[0]), "URI": f"{base}/1-1.dcm"},
        {"Name": "1-2.dcm", "Size": str(sizes[1]), "URI": f"{base}/1-2.dcm"},
    ]
    assert files[0].blob_path.read_bytes() == paths[0].read_bytes()


def test_tar_gz_import(prearchive: Prearchive, tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("3", "CT", 2)])
    archive = tmp_path / "body"
    with tarfile.open(archive, "w:gz") as tar:
        for path in paths:
            tar.add(path, f"x/{path.name}")
    (uri,) = prearchive.import_dicom_zip(archive, "upload.tar.gz", {"project": "P"}, "admin")
    assert [s["xsiType"] for s in prearchive.scans(*split(uri))] == ["xnat:ctScanData"]


def test_one_session_per_study(prearchive: Prearchive, tmp_path: Path,
                               write_study: StudyWriter) -> None:
    first = write_study(patient_id="A")
    second = write_study(patient_id="B")
    uris = import_zip(prearchive, tmp_path, first + second, project="P")
    assert [split(u)[2] for u in uris] == ["A", "B"]


def test_params_override_dicom_labels(prearchive: Prearchive, tmp_path: Path,
                                      write_study: StudyWriter) -> None:
    paths = write_study()
    (uri,) = import_zip(prearchive, tmp_path, paths, project="P_ALIAS", subject="Subj 9",
                        session="MR 1", PROJECT_ID="ignored", SUBJECT_ID="ignored")
    project, timestamp, folder = split(uri)
    assert (project, folder) == ("P", "MR_1")
    assert prearchive.session(project, timestamp, folder)["subject"] == "Subj_9"


def test_upper_case_params_for_dicom_zip(prearchive: Prearchive, tmp_path: Path,
                                         write_study: StudyWriter) -> None:
    (uri,) = import_zip(prearchive, tmp_path, write_study(), PROJECT_ID="P", EXPT_LABEL="E1")
    assert split(uri)[0::2] == ("P", "E1")


@pytest.mark.parametrize(("user", "project"), [("carol", "P"), ("bob", "NOPE"), ("admin", None)])
def test_unwritable_or_unknown_project_goes_to_unassigned(
        prearchive: Prearchive, tmp_path: Path, write_study: StudyWriter,
        user: str, project: str | None) -> None:
    params = {"project": project} if project else {}
    (uri,) = import_zip(prearchive, tmp_path, write_study(), user, **params)
    assert split(uri)[0] == "Unassigned"


def test_member_may_upload(prearchive: Prearchive, tmp_path: Path,
                           write_study: StudyWriter) -> None:
    (uri,) = import_zip(prearchive, tmp_path, write_study(), "bob", project="P")
    assert split(uri)[0] == "P"


def test_reupload_of_a_study_merges_into_the_same_session(
        prearchive: Prearchive, tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 2)], study_uid="1.2.3.99")
    more = write_study([("2", "MR", 1)], study_uid="1.2.3.99")
    first = import_zip(prearchive, tmp_path, paths, project="P")
    again = import_zip(prearchive, tmp_path, paths + more, project="P")
    assert first == again
    assert len(prearchive.sessions(["P"])) == 1
    assert [s["ID"] for s in prearchive.scans(*split(first[0]))] == ["1", "2"]
    files = prearchive.scan_files(*split(first[0]), "1", "DICOM")
    assert len(files) == 2  # the same objects replaced, not duplicated


def test_series_number_clash_is_renamed_per_modality(
        prearchive: Prearchive, tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 1), ("1", "MR", 1), ("1", "SR", 1), ("2", "MR", 1)])
    (uri,) = import_zip(prearchive, tmp_path, paths, project="P")
    ids = [s["ID"] for s in prearchive.scans(*split(uri))]
    assert sorted(ids) == ["1-MR1", "1-MR2", "1-SR1", "2"]
    for scan_id in ids:
        assert len(prearchive.scan_files(*split(uri), scan_id, "DICOM")) == 1


def test_same_file_name_for_a_different_object_gets_xnat_name(
        prearchive: Prearchive, tmp_path: Path, write_dicom: Callable,
        new_uid: Callable[[], str]) -> None:
    study, series = new_uid(), new_uid()
    one = write_dicom(tmp_path / "a" / "IM1", study_uid=study, series_uid=series)
    two = write_dicom(tmp_path / "b" / "IM1", study_uid=study, series_uid=series,
                      instance_number=2)
    (uri,) = import_zip(prearchive, tmp_path, [one], project="P")
    import_zip(prearchive, tmp_path, [two], project="P")
    names = [f.name for f in prearchive.scan_files(*split(uri), "1", "DICOM")]
    assert len(names) == 2 and "IM1" in names
    assert next(n for n in names if n != "IM1").startswith(f"{study}-1-2-")


def test_zip_with_junk_fails_but_keeps_nothing_new(
        prearchive: Prearchive, tmp_path: Path) -> None:
    archive = tmp_path / "u.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(".DS_Store", b"Bud1" * 10)
    with pytest.raises(StoreError) as err:
        prearchive.import_dicom_zip(archive, "upload.zip", {"project": "P"}, "admin")
    assert (err.value.status, err.value.message) == (400, "unable to read DICOM object .DS_Store")
    assert prearchive.sessions(["P", "Unassigned"]) == []


# ------------------------------------------------------------- gradual-DICOM
def test_gradual_receives_then_settles(prearchive: Prearchive, clock: FakeClock,
                                       write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 2)])
    uris = {prearchive.import_gradual(p, p.name, {"PROJECT_ID": "P"}, "admin") for p in paths}
    (uri,) = uris
    assert prearchive.session(*split(uri))["status"] == "RECEIVING"
    assert prearchive.settle() == []
    clock.advance(61)
    assert prearchive.settle() == [uri]
    assert prearchive.session(*split(uri))["status"] == "READY"
    assert paths[0].exists()  # the caller's file is copied, not taken


def test_settle_window_is_configurable_per_call(prearchive: Prearchive, clock: FakeClock,
                                                write_study: StudyWriter) -> None:
    (path,) = write_study([("1", "MR", 1)])
    uri = prearchive.import_gradual(path, path.name, {"PROJECT_ID": "P"}, "admin")
    clock.advance(2)
    assert prearchive.settle(idle_seconds=1) == [uri]


def test_gradual_reads_only_upper_case_params(prearchive: Prearchive,
                                              write_study: StudyWriter) -> None:
    (path,) = write_study([("1", "MR", 1)], patient_id="FromDicom")
    uri = prearchive.import_gradual(path, path.name, {"project": "P", "session": "x"}, "admin")
    assert split(uri)[0::2] == ("Unassigned", "FromDicom")
    uri = prearchive.import_gradual(path, path.name, {"PROJECT_ID": "P", "EXPT_LABEL": "E 2",
                                                      "SUBJECT_ID": "S2"}, "admin")
    project, timestamp, folder = split(uri)
    assert (project, folder) == ("P", "E_2")
    assert prearchive.session(project, timestamp, folder)["subject"] == "S2"


def test_gradual_reopens_a_ready_session(prearchive: Prearchive, write_study: StudyWriter) -> None:
    first, second = write_study([("1", "MR", 2)])
    uri = prearchive.import_gradual(first, first.name, {"PROJECT_ID": "P"}, "admin")
    prearchive.build(*split(uri))
    assert prearchive.import_gradual(second, second.name, {"PROJECT_ID": "P"}, "admin") == uri
    assert prearchive.session(*split(uri))["status"] == "RECEIVING"


def test_gradual_rejects_non_dicom(prearchive: Prearchive, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(StoreError) as err:
        prearchive.import_gradual(junk, "notes.txt", {"PROJECT_ID": "P"}, "admin")
    assert (err.value.status, err.value.message) == (400, "unable to read DICOM object notes.txt")


def test_gradual_direct_archive_archives_when_settled(
        prearchive: Prearchive, store: Store, clock: FakeClock, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 2)], patient_id="DA1", patient_name="Sub^One")
    for path in paths:
        uri = prearchive.import_gradual(
            path, path.name, {"PROJECT_ID": "P", "Direct-Archive": "true"}, "bob")
    study_uid = prearchive.sessions(["P"])[0]["tag"]
    assert uri == f"/xapi/direct-archive/P/{study_uid}/DA1"
    clock.advance(61)
    assert prearchive.settle() == ["/data/archive/projects/P/subjects/Sub_One/experiments/DA1"]
    assert store.experiment("P", "DA1")["insert_user"] == "bob"
    assert prearchive.sessions(["P"]) == []


# ---------------------------------------------------------- import to archive
def test_dest_archive_archives_synchronously(
        prearchive: Prearchive, store: Store, tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 2), ("2", "MR", 1)], patient_name="Doe^Jane")
    blobs_before = blob_count(store)
    uris = import_zip(prearchive, tmp_path, paths,
                      dest="/archive/projects/P/subjects/S1/experiments/E1")
    assert uris == ["/data/archive/projects/P/subjects/S1/experiments/E1"]
    experiment = store.experiment("P", "E1")
    assert experiment["xsi_type"] == "xnat:mrSessionData"
    assert (experiment["date"], experiment["time"]) == ("2023-02-19", "08:30:00")
    assert experiment["scanner_manufacturer"] == "ACME"
    assert store.subject("P", "S1")["id"] == experiment["subject_id"]
    scans = store.scans(experiment["id"])
    assert [(s["scan_id"], s["type"], s["xsi_type"]) for s in scans] == [
        ("1", "T1W", "xnat:mrScanData"), ("2", "T1W", "xnat:mrScanData")]
    resource = store.resource(experiment["id"], scans[0]["pk"], "DICOM")
    files = store.files(resource["id"])
    assert [f.path for f in files] == ["1-1.dcm", "1-2.dcm"]
    assert store.blob_path(files[0].blob).read_bytes() == paths[0].read_bytes()
    assert prearchive.sessions(["P"]) == []
    assert blob_count(store) == blobs_before + 3  # shared with the prearchive, not copied


def test_dest_archive_conflict_without_overwrite(
        prearchive: Prearchive, store: Store, tmp_path: Path, write_study: StudyWriter) -> None:
    dest = "/archive/projects/P/subjects/S1/experiments/E1"
    paths = write_study([("1", "MR", 1)])
    more = write_study([("2", "MR", 1)], study_uid=study_uid_of(paths))
    import_zip(prearchive, tmp_path, paths, dest=dest)
    with pytest.raises(StoreError) as err:
        import_zip(prearchive, tmp_path, more, dest=dest)
    assert (err.value.status, err.value.message) == (400, PRE_EXISTS)
    (failed,) = prearchive.sessions(["P"])
    assert failed["status"] == "ERROR"

    assert import_zip(prearchive, tmp_path, more, dest=dest, overwrite="append") == [
        "/data/archive/projects/P/subjects/S1/experiments/E1"]
    experiment = store.experiment("P", "E1")
    assert [s["scan_id"] for s in store.scans(experiment["id"])] == ["1", "2"]


def test_overwrite_any_value_allows_merge(
        prearchive: Prearchive, store: Store, tmp_path: Path, write_study: StudyWriter) -> None:
    dest = "/archive/projects/P/subjects/S1/experiments/E1"
    paths = write_study([("1", "MR", 1)])
    import_zip(prearchive, tmp_path, paths, dest=dest)
    # xnat4tests sends overwrite=True: any value but a missing one merges.
    assert import_zip(prearchive, tmp_path, paths, dest=dest, overwrite="True")
    experiment = store.experiment("P", "E1")
    (scan,) = store.scans(experiment["id"])
    assert len(store.files(store.resource(experiment["id"], scan["pk"], "DICOM")["id"])) == 1


def test_dest_experiment_id_resolves_to_its_label(
        prearchive: Prearchive, store: Store, tmp_path: Path, write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 1)])
    import_zip(prearchive, tmp_path, paths, dest="/archive/projects/P/subjects/S1/experiments/E1")
    experiment_id = store.experiment("P", "E1")["id"]
    more = write_study([("2", "MR", 1)], study_uid=study_uid_of(paths))
    uris = import_zip(prearchive, tmp_path, more, overwrite="append",
                      dest=f"/data/archive/projects/P/subjects/S1/experiments/{experiment_id}")
    assert uris == ["/data/archive/projects/P/subjects/S1/experiments/E1"]


def test_bad_dest_is_rejected(prearchive: Prearchive, tmp_path: Path,
                              write_study: StudyWriter) -> None:
    with pytest.raises(StoreError, match="Parameter dest format error"):
        import_zip(prearchive, tmp_path, write_study(), dest="/nowhere")


def test_dest_prearchive_builds(prearchive: Prearchive, tmp_path: Path,
                                write_study: StudyWriter) -> None:
    (uri,) = import_zip(prearchive, tmp_path, write_study(), dest="/prearchive/projects/P")
    assert prearchive.session(*split(uri))["status"] == "READY"


def test_direct_archive_zip(prearchive: Prearchive, store: Store, tmp_path: Path,
                            write_study: StudyWriter) -> None:
    paths = write_study(patient_id="S01", patient_name="Pat")
    uris = import_zip(prearchive, tmp_path, paths, project="P", **{"Direct-Archive": "true"})
    assert uris == ["/data/archive/projects/P/subjects/Pat/experiments/S01"]
    unassigned = import_zip(prearchive, tmp_path, write_study(), **{"Direct-Archive": "true"})
    assert split(unassigned[0])[0] == "Unassigned"


def test_auto_archive_project(prearchive: Prearchive, store: Store, tmp_path: Path,
                              write_study: StudyWriter) -> None:
    store.execute("UPDATE projects SET prearchive_code = 4 WHERE id = 'P'")
    paths = write_study(patient_id="AA1", patient_name="Pat")
    assert import_zip(prearchive, tmp_path, paths, project="P") == [
        "/data/archive/projects/P/subjects/Pat/experiments/AA1"]


def test_archive_to_unassigned_dest_fails(prearchive: Prearchive, tmp_path: Path,
                                          write_study: StudyWriter) -> None:
    with pytest.raises(StoreError) as err:
        import_zip(prearchive, tmp_path, write_study(), dest="/archive/projects/NOPE")
    assert (err.value.status, err.value.message) == (400, "unable to identify destination project")


# ------------------------------------------------------------ archive action
@pytest.fixture
def ready(prearchive: Prearchive, tmp_path: Path,
          write_study: StudyWriter) -> Callable[..., tuple[str, str, str]]:
    def make(**fields: object) -> tuple[str, str, str]:
        paths = write_study([("1", "MR", 2)], **fields)
        (uri,) = import_zip(prearchive, tmp_path, paths, project="P")
        return split(uri)
    return make


def test_archive_action(prearchive: Prearchive, store: Store, ready: Callable) -> None:
    session = ready(patient_id="E9", patient_name="Doe^J")
    uri = prearchive.archive(*session, user="bob")
    assert uri == "/data/archive/projects/P/subjects/Doe_J/experiments/E9"
    assert store.experiment("P", "E9")["insert_user"] == "bob"
    with pytest.raises(StoreError) as err:
        prearchive.session(*session)
    assert err.value.status == 404


def test_archive_with_overrides(prearchive: Prearchive, store: Store, ready: Callable) -> None:
    store.add_project("Q", owner="admin")
    uri = prearchive.archive(*ready(), user="admin", new_project="Q", subject="S7", label="L7")
    assert uri == "/data/archive/projects/Q/subjects/S7/experiments/L7"
    uri = prearchive.archive(*ready(), user="admin",
                             dest="/archive/projects/Q/subjects/S8/experiments/L8")
    assert uri == "/data/archive/projects/Q/subjects/S8/experiments/L8"


def test_archive_src(prearchive: Prearchive, ready: Callable) -> None:
    project, timestamp, folder = ready(patient_id="E5", patient_name="X")
    src = f"/data/prearchive/projects/{project}/{timestamp}/{folder}"
    assert prearchive.archive_src(src, user="admin") == \
        "/data/archive/projects/P/subjects/X/experiments/E5"
    with pytest.raises(StoreError) as err:
        prearchive.archive_src(src, user="admin")
    assert (err.value.status, err.value.message) == (
        404, f"/prearchive/projects/{project}/{timestamp}/{folder} not found.")


@pytest.mark.parametrize(("src", "status", "message"), [
    (None, 404, "Unknown prearchive session."),
    ("/archive/projects/P/subjects/S/experiments/E", 400,
     "Invalid src URI (/archive/projects/P/subjects/S/experiments/E)"),
])
def test_archive_src_errors(prearchive: Prearchive, src: str | None, status: int,
                            message: str) -> None:
    with pytest.raises(StoreError) as err:
        prearchive.archive_src(src, user="admin")
    assert (err.value.status, err.value.message) == (status, message)


def test_archive_unassigned_is_400(prearchive: Prearchive, tmp_path: Path,
                                   write_study: StudyWriter) -> None:
    (uri,) = import_zip(prearchive, tmp_path, write_study())
    with pytest.raises(StoreError) as err:
        prearchive.archive(*split(uri), user="admin")
    assert err.value.status == 400
    assert prearchive.archive(*split(uri), user="admin", new_project="P").startswith(
        "/data/archive/projects/P/")


def test_archive_locked_is_403(prearchive: Prearchive, ready: Callable) -> None:
    session = ready()
    prearchive.set_status(*session, "ARCHIVING")
    for action in (lambda: prearchive.archive(*session, user="admin"),
                   lambda: prearchive.delete(*session),
                   lambda: prearchive.move(*session, "P")):
        with pytest.raises(StoreError) as err:
            action()
        assert (err.value.status, err.value.message) == (
            403, "Operation already in progress on this prearchive entry.")
    with pytest.raises(StoreError) as err:
        prearchive.build(*session)
    assert (err.value.status, err.value.message) == (409, "session document locked")


def test_archive_different_study_onto_existing_label(
        prearchive: Prearchive, store: Store, ready: Callable) -> None:
    prearchive.archive(*ready(patient_id="E1", patient_name="S"), user="admin")
    other = ready(patient_id="E1", patient_name="S")  # a new study, same labels
    with pytest.raises(StoreError) as err:
        prearchive.archive(*other, user="admin")
    assert (err.value.status, err.value.message) == (500, f"FAILED: {UID_MOD}")
    assert prearchive.session(*other)["status"] == "ERROR"
    # overwrite=append overrides the UID check; the new series number is taken,
    # so ScanIdValidator renames it.
    prearchive.archive(*other, user="admin", overwrite="append")
    scans = store.scans(store.experiment("P", "E1")["id"])
    assert [s["scan_id"] for s in scans] == ["1", "1-MR1"]


def test_archive_same_study_again_merges(prearchive: Prearchive, store: Store, tmp_path: Path,
                                         write_study: StudyWriter) -> None:
    paths = write_study([("1", "MR", 1)], patient_id="E1")
    (uri,) = import_zip(prearchive, tmp_path, paths, project="P")
    prearchive.archive(*split(uri), user="admin")
    more = write_study([("2", "MR", 1)], study_uid=study_uid_of(paths), patient_id="E1")
    (uri,) = import_zip(prearchive, tmp_path, more, project="P")
    prearchive.archive(*split(uri), user="admin")  # Archiver always allows the merge
    assert [s["scan_id"] for s in store.scans(store.experiment("P", "E1")["id"])] == ["1", "2"]


def test_archive_subject_mismatch(prearchive: Prearchive, ready: Callable) -> None:
    prearchive.archive(*ready(patient_id="E1", patient_name="S"), user="admin")
    with pytest.raises(StoreError) as err:
        prearchive.archive(*ready(patient_id="E1", patient_name="T"), user="admin",
                           overwrite="delete")
    assert err.value.status == 500
    assert "Invalid modification of session subject" in err.value.message


# ------------------------------------------------------- other session actions
def test_move(prearchive: Prearchive, store: Store, ready: Callable) -> None:
    store.add_project("Q", owner="admin")
    project, timestamp, folder = ready()
    assert prearchive.move(project, timestamp, folder, "Q") == \
        f"/data/prearchive/projects/Q/{timestamp}/{folder}"
    assert prearchive.sessions(["P"]) == []
    assert prearchive.session("Q", timestamp, folder)["project"] == "Q"
    with pytest.raises(StoreError) as err:
        prearchive.move("Q", timestamp, folder, "NOPE")
    assert err.value.status == 404


def test_move_onto_an_existing_session_is_409(prearchive: Prearchive, store: Store,
                                              ready: Callable) -> None:
    store.add_project("Q", owner="admin")
    _, timestamp, folder = ready(patient_id="SAME")
    store.execute(
        "INSERT INTO prearc_sessions (project, timestamp, folder, name, status, uploaded, lastmod)"
        " VALUES ('Q', ?, ?, ?, 'READY', '', '')", (timestamp, folder, folder))
    with pytest.raises(StoreError) as err:
        prearchive.move("P", timestamp, folder, "Q")
    assert err.value.status == 409


def test_delete_removes_session_and_blobs(prearchive: Prearchive, store: Store,
                                          ready: Callable) -> None:
    blobs_before = blob_count(store)
    session = ready()
    assert blob_count(store) == blobs_before + 2
    prearchive.delete(*session)
    assert blob_count(store) == blobs_before
    with pytest.raises(StoreError) as err:
        prearchive.delete(*session)
    assert err.value.status == 404


def test_status_actions(prearchive: Prearchive, ready: Callable) -> None:
    session = ready()
    with pytest.raises(StoreError) as err:
        prearchive.set_status(*session, "BOGUS")
    assert err.value.status == 400
    prearchive.set_status(*session, "QUEUED_ARCHIVING")
    assert prearchive.session(*session)["status"] == "QUEUED_ARCHIVING"
    prearchive.reset_status(*session)
    assert prearchive.session(*session)["status"] == "READY"
    assert prearchive.build(*session) == "/data/prearchive/projects/{}/{}/{}".format(*session)


def test_listing_missing_scan_is_404(prearchive: Prearchive, ready: Callable) -> None:
    session = ready()
    for call in (lambda: prearchive.scan_resources(*session, "99"),
                 lambda: prearchive.scan_files(*session, "1", "SNAPSHOTS"),
                 lambda: prearchive.scan_file(*session, "1", "DICOM", "nope.dcm")):
        with pytest.raises(StoreError) as err:
            call()
        assert err.value.status == 404
    assert prearchive.scan_file(*session, "1", "DICOM", "1-1.dcm").size > 0
    assert len(prearchive.session_files(*session)) == 2
